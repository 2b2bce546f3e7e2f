"""train.compile: compiled and eager training give the same losses (aot_eager: no code
generation, so CI needs no compiler), and a recompile storm fails fast with a message."""

import json

import pytest
import torch
from torch import nn

import trainer.cli
from tests.helpers import FAST_CLS, FAST_DET, ROOT, train_args
from trainer.cli import main
from trainer.training import RECOMPILE_LIMIT, compile_static_part


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.parametrize(
    "preset,fast", [("shapes_cls.yaml", FAST_CLS), ("shapes_det.yaml", FAST_DET)]
)
def test_compiled_training_matches_eager(tmp_path, data_root, preset, fast):
    config = ROOT / "configs" / preset
    common = [*fast, "run.deterministic=true", "train.compile_backend=aot_eager"]
    for name, flag in (("eager", "false"), ("compiled", "true")):
        args = train_args(config, tmp_path, data_root, name, *common, f"train.compile={flag}")
        assert main(args) == 0
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert len(eager) == 4
    assert compiled == pytest.approx(eager, rel=1e-5)


class _Shifting(nn.Module):
    """Recompiles on every call: its forward bakes in a Python int that keeps changing."""

    def __init__(self):
        super().__init__()
        self.lin, self.calls = nn.Linear(2, 2), 0

    def forward(self, x):
        self.calls += 1
        return self.lin(x) * self.calls


def test_recompile_storm_is_an_error_not_a_crawl():
    model = _Shifting()
    compile_static_part(model, "classification", "eager")
    with pytest.raises(Exception, match="recompile") as err:
        for _ in range(RECOMPILE_LIMIT + 3):
            model(torch.randn(3, 2))
    assert type(err.value).__name__ == "FailOnRecompileLimitHit"


def test_cli_names_the_key_when_compile_gives_up(monkeypatch, capsys, tmp_path, data_root):
    from torch._dynamo.exc import FailOnRecompileLimitHit

    def storm(cfg, env, **kwargs):
        raise FailOnRecompileLimitHit("recompile_limit reached")

    monkeypatch.setattr("trainer.loop.train", storm)
    args = train_args(ROOT / "configs/shapes_cls.yaml", tmp_path, data_root, "x", *FAST_CLS)
    assert trainer.cli.main([*args, "train.compile=true"]) == 2
    err = capsys.readouterr().err
    assert "train.compile=true: torch.compile recompiled more than 8 times" in err
    assert "train.compile=false" in err
