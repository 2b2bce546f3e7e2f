"""train.cuda_graphs: the decision (CPU), the detector plumbing around the captured
part (CPU, with the capture itself stubbed out), and graphed vs eager training (CUDA)."""

import json

import pytest
import torch

from norms import NormChoice
from tests.helpers import FAST_CLS, FAST_DET, ROOT, train_args
from trainer.cli import main
from trainer.config import ConfigError
from trainer.graphs import capture, plan_graphs
from trainer.models import build_model

DET = ROOT / "configs/shapes_det.yaml"
CLS = ROOT / "configs/shapes_cls.yaml"


def plan(
    setting="auto",
    device="cuda",
    world_size=1,
    compile=False,
    amp="none",
    accum=1,
    varying=None,
    canvases=(),
):
    return plan_graphs(
        setting, device=device, world_size=world_size, compile=compile, amp=amp,
        grad_accum=accum, varying_shapes=varying, canvases=canvases,
    )  # fmt: skip


def test_auto_captures_a_single_cuda_process_only():
    assert plan().enabled and "captured" in plan().reason
    assert plan("true").enabled
    assert not plan("false").enabled
    off = {
        "on cpu": plan(device="cpu"),
        "world_size 2": plan(world_size=2),
        "train.compile=true": plan(compile=True),
        "train.amp=fp16": plan(amp="fp16"),
        "train.grad_accum=4": plan(accum=4),
        "aspect ratios not known (no canvases to pad them to)": plan(
            varying="aspect ratios not known"
        ),
    }
    for why, p in off.items():
        assert not p.enabled and why in p.reason, (why, p.reason)
    assert plan(amp="bf16").enabled
    canvas = plan(varying="data.min_size=[1, 2] (multi-scale)", canvases=((32, 64), (64, 32)))
    assert canvas.enabled and "one graph per canvas (32x64, 64x32)" in canvas.reason
    assert canvas.as_dict()["canvases"] == [[32, 64], [64, 32]]
    with pytest.raises(ConfigError, match="train.cuda_graphs=true needs a CUDA device"):
        plan("true", device="cpu")


def test_a_detector_with_batches_of_several_shapes_is_graphed_on_canvases(tmp_path):
    """Multi-scale sizes or several aspect ratios give many padded shapes: auto graphs
    them on one canvas per orientation; sizes it does not know (no annotation file to
    group by) run eagerly, and it says why; fixed square sizes capture one shape."""
    from trainer.config import load_config
    from trainer.plan import plan_run

    scenes = [f"data.root={tmp_path}"]
    cases = {
        (DET, ()): ((), "captured"),
        (ROOT / "configs/scenes_det.yaml", ()): (
            ((224, 320), (320, 224), (320, 320)),
            "multi-scale",
        ),
        (ROOT / "configs/scenes_det.yaml", ("data.min_size=192", "data.max_size=288")): (
            ((192, 288), (288, 192), (288, 288)),
            "several aspect ratios",
        ),
        (DET, ("data.dataset=coco", f"data.root={tmp_path}")): (None, "aspect ratios not known"),
        (CLS, ()): ((), "captured"),
    }
    for (config, extra), (canvases, why) in cases.items():
        graphs = plan_run(load_config(config, [*scenes, *extra]), 1, "cuda", "nccl").graphs
        assert graphs.enabled == (canvases is not None), (config, extra, graphs.reason)
        assert graphs.canvases == (canvases or ()) and why in graphs.reason, graphs.reason


def test_classifier_graph_refuses_another_batch_shape(monkeypatch):
    """torch's graphed forward copies any input into its static one (a batch of 1 into
    a graph of 4 broadcasts); the captured classifier runs another shape eagerly, warns
    once, and counts replayed and eager forwards."""
    from torch import nn

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", lambda module, args: module)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    x = torch.rand(4, 3, 8, 8)
    model(x)
    capture(model, "classification", x)
    model(x), model(x)
    with pytest.warns(UserWarning, match=r"captured for batches of \(4, 3, 8, 8\), got \(1,"):
        out = model(x[:1])
    assert out.shape == (1, 2)  # not broadcast to the captured batch
    model.eval()
    model(x)  # eval runs eagerly and is not a training forward
    assert model.graph_counts.as_dict() == {"graph_replays": 2, "graph_eager": 1}


def test_cli_refuses_graphs_on_the_cpu_before_training(tmp_path, data_root, capsys):
    args = train_args(DET, tmp_path, data_root, "g", *FAST_DET, "train.cuda_graphs=true")
    assert main(args) == 2
    assert "train.cuda_graphs=true needs a CUDA device, this run is on cpu" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "g").exists()  # nothing was started


def test_policy_command_and_policy_json_say_what_was_chosen(tmp_path, data_root, capsys):
    assert main(["policy", "--config", str(DET), "--device", "cuda"]) == 0
    assert "cuda graphs: on (auto: forward+backward of the static part captured)" in (
        capsys.readouterr().out
    )
    assert main(train_args(CLS, tmp_path, data_root, "p", *FAST_CLS)) == 0
    record = json.loads((tmp_path / "p" / "policy.json").read_text())
    reason = "auto: off on cpu (CUDA graphs need a GPU)"
    assert record["cuda_graphs"] == {"enabled": False, "reason": reason}


def _detector():
    choice = {
        "backbone": NormChoice("backbone", "brn", False),
        "neck": NormChoice("neck", "brn", False),
        "head": NormChoice("head", "gn", True),
    }
    torch.manual_seed(0)
    return build_model(
        "fcos_resnet18_fpn", 3, choice, image_size=64, fpn_channels=32, brn={"warmup_steps": 3}
    )


def _targets(n):
    box = torch.tensor([[8.0, 8.0, 40.0, 40.0]])
    return [{"boxes": box, "labels": torch.tensor([1])} for _ in range(n)]


def _stub_capture(monkeypatch):
    """No CUDA: the "graphed" callables run their eager forwards."""
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", lambda module, args, **kw: module)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)


def test_detector_plumbing_around_the_captured_part(monkeypatch):
    """With the capture stubbed (CPU), the rewired backbone/head give the eager model's
    losses and detections, keep the state_dict keys, and run other shapes eagerly."""
    _stub_capture(monkeypatch)
    eager, graphed = _detector(), _detector()
    keys = list(graphed.state_dict())
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    sample = graphed.transform(images)[0].tensors
    capture(graphed, "detection", sample)
    assert list(graphed.state_dict()) == keys
    for _ in range(2):  # BRN running statistics and ramp move alike in both
        a, b = eager(images, _targets(2)), graphed(images, _targets(2))
        torch.testing.assert_close(sum(b.values()), sum(a.values()))
    eager.eval(), graphed.eval()
    with torch.no_grad():
        da, db = eager(images), graphed(images)
    torch.testing.assert_close(db[0]["scores"], da[0]["scores"])
    graphed.train(), eager.train()
    # padded to 64 x 32: the 64 x 64 canvas holds it, and its norms count 64 x 32 only
    wide = [torch.rand(3, 64, 32) for _ in range(2)]
    b = graphed(wide, _targets(2))
    torch.testing.assert_close(sum(b.values()), sum(eager(wide, _targets(2)).values()))
    three = [torch.rand(3, 64, 64) for _ in range(3)]  # another batch size: eager
    with pytest.warns(UserWarning, match="this batch runs eagerly"):
        b = graphed(three, _targets(3))
    torch.testing.assert_close(sum(b.values()), sum(eager(three, _targets(3)).values()))
    # three training forwards replayed, one eager (eval is not counted)
    assert graphed.graph_counts.as_dict() == {"graph_replays": 3, "graph_eager": 1}


SCENES = ROOT / "configs/scenes_det.yaml"
# mixed sizes and both orientations, multi-scale: batches graphed on three canvases
FAST_SCENES = [*FAST_DET, "data.min_size=[64, 96]", "data.max_size=128", "data.test_size=96"]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("preset,fast", [(CLS, FAST_CLS), (DET, FAST_DET), (SCENES, FAST_SCENES)])
def test_graphed_training_matches_eager_on_cuda(tmp_path, data_root, preset, fast):
    losses = {}
    for flag in ("false", "true"):
        extra = [*fast, "run.device=cuda", f"train.cuda_graphs={flag}", "train.max_steps=6"]
        assert main(train_args(preset, tmp_path, data_root, flag, *extra)) == 0
        rows = (tmp_path / flag / "metrics.jsonl").read_text().splitlines()
        losses[flag] = [json.loads(r)["loss"] for r in rows if '"loss"' in r]
        record = json.loads((tmp_path / flag / "policy.json").read_text())
        assert record["cuda_graphs"]["enabled"] == (flag == "true")
        if flag == "true":  # every training step replayed the graph: none fell back
            last = [json.loads(r) for r in rows if '"graph_replays"' in r][-1]
            assert (last["graph_replays"], last["graph_eager"]) == (6, 0)
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-3, abs=1e-4)


@cuda
@pytest.mark.cuda
def test_batch_renorm_ramp_advances_inside_the_graph():
    from torch import nn

    from norms import BatchRenorm2d

    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchRenorm2d(4, warmup_steps=4)).cuda()
    x = torch.randn(2, 3, 8, 8, device="cuda")
    capture(model, "classification", x)
    assert int(model[1].num_batches_tracked) == 0  # the warm-up's forwards were undone
    seen = []
    for _ in range(6):
        model(x).sum().backward()
        seen.append(float(model[1].last_limits[0]))
    assert int(model[1].num_batches_tracked) == 6
    assert seen == pytest.approx([1.0, 1.5, 2.0, 2.5, 3.0, 3.0])


@cuda
@pytest.mark.cuda
def test_batch_renorm_diagnostics_follow_the_graph_after_precise_bn():
    """Precise BN runs Batch Renorm eagerly at rmax 1, dmax 0 between replays: the clip
    diagnostics the log reads must come from the next replay, not stay at (1, 0)."""
    from torch import nn

    from norms import BatchRenorm2d, precise_bn

    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchRenorm2d(4, rmax=2.0, warmup_steps=0)).cuda()
    x = torch.randn(2, 3, 8, 8, device="cuda") * 3 + 2
    capture(model, "classification", x)
    model(x).sum().backward()
    assert model[1].renorm_stats()["rmax_t"] == 2.0
    precise_bn(model, [x] * 2, num_batches=2)
    assert model[1].renorm_stats()["rmax_t"] == 1.0  # precise BN's own eager forward
    model.train()
    model(x).sum().backward()  # a replay
    stats = model[1].renorm_stats()
    assert stats["rmax_t"] == 2.0 and stats["r_dev"] > 0


def _graphs_on(monkeypatch):
    """Let the run plan capture on the CPU (the capture itself is stubbed by the test)."""
    from trainer import plan as plan_module
    from trainer.graphs import GraphPlan

    monkeypatch.setattr(
        plan_module, "plan_graphs", lambda *a, **k: GraphPlan(True, "auto: test capture")
    )


def test_a_failed_capture_trains_eagerly_and_says_why(tmp_path, data_root, monkeypatch):
    """An out-of-memory (or an op that cannot be captured) during capture must not kill a
    run that works eagerly: the model is left as it was, the record says why, training
    goes on."""
    from torch import nn

    def fail(module, args, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", fail)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    why = capture(model, "classification", torch.rand(2, 3, 8, 8))
    assert why == "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert "forward" not in vars(model) and not hasattr(model, "graph_counts")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    _graphs_on(monkeypatch)
    args = train_args(DET, tmp_path, data_root, "oom", *FAST_DET)
    with pytest.warns(UserWarning, match=r"CUDA graphs: eager \(capture failed: OutOfMemory"):
        assert main(args) == 0
    record = json.loads((tmp_path / "oom" / "policy.json").read_text())
    assert record["cuda_graphs"] == {
        "enabled": False,
        "reason": "eager (capture failed: OutOfMemoryError: CUDA out of memory. Tried to "
        "allocate 2.00 GiB)",
    }
    rows = (tmp_path / "oom" / "metrics.jsonl").read_text()
    assert '"eval"' in rows and "graph_replays" not in rows


def test_graphed_training_steps_with_gradients_set_to_none(tmp_path, data_root, monkeypatch):
    """A graphed backward hands back static gradient buffers the parameters adopt, so
    gradients must be None between steps: a stubbed-capture run (graphed on the CPU)
    trains through train_step's check and logs its replays; leftover gradients are
    refused."""
    from torch import nn

    from trainer.step import _check_grads_cleared

    _stub_capture(monkeypatch)
    _graphs_on(monkeypatch)
    assert main(train_args(DET, tmp_path, data_root, "g", *FAST_DET)) == 0
    rows = [json.loads(r) for r in (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()]
    counted = [r for r in rows if "graph_replays" in r]
    assert counted and counted[-1]["graph_replays"] == 4 and counted[-1]["graph_eager"] == 0
    layer = nn.Linear(2, 2)
    _check_grads_cleared(layer)
    layer(torch.rand(1, 2)).sum().backward()
    with pytest.raises(RuntimeError, match=r"zero_grad\(set_to_none=True\)"):
        _check_grads_cleared(layer)
