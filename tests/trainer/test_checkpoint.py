"""TrainState round trip, Checkpointer's when/where (interval, keep-K, preemption), and
resume checks; the end-to-end resume is in test_train.py."""

import pytest
import torch
from torch import nn

from norms import NormChoice
from trainer.checkpoint import (
    Checkpointer,
    CheckpointError,
    TrainState,
    check_resume,
    list_checkpoints,
)
from trainer.data.stream import BatchStream
from trainer.distributed import DistEnv

CPU = DistEnv(0, 1, 0, torch.device("cpu"), "gloo")
META = {"config": {"model": {"arch": "arch"}}, "policy": {"parts": {}}}


def make_state(seed: int) -> TrainState:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return TrainState(model, opt, sched, scaler, BatchStream(None))


def train_a_bit(state: TrainState, steps: int) -> None:
    for _ in range(steps):
        state.model(torch.randn(5, 3)).square().mean().backward()
        state.optimizer.step()
        state.optimizer.zero_grad()
        state.scheduler.step()
        state.step += 1
    state.data.epoch, state.data.pos = 1, 7


def test_state_round_trip_and_rng(tmp_path):
    a = make_state(0)
    train_a_bit(a, 3)
    ckpt = Checkpointer(tmp_path, CPU, interval=2, keep=2, meta=META)
    path = ckpt.save(a)
    expected_draw = torch.rand(3)  # what the RNG gives right after the save

    b = make_state(1)
    found = ckpt.latest("arch", {})
    assert found[1] == path and found[0]["config"] == META["config"]
    ckpt.restore(b, found, reseed=None)
    assert torch.equal(torch.rand(3), expected_draw)  # the saved RNG state is back
    assert (b.step, b.data.epoch, b.data.pos) == (3, 1, 7)
    for k, v in a.model.state_dict().items():
        assert torch.equal(b.model.state_dict()[k], v), k
    assert b.optimizer.state_dict()["state"][0]["momentum_buffer"].equal(
        a.optimizer.state_dict()["state"][0]["momentum_buffer"]
    )
    assert b.scheduler.last_epoch == 3


def test_when_and_keep_k_and_preemption(tmp_path):
    state = make_state(0)
    ckpt = Checkpointer(tmp_path, CPU, interval=2, keep=2, meta={})
    assert [s for s in range(1, 8) if ckpt.due(s, max_steps=7)] == [2, 4, 6, 7]
    for step in (2, 4, 6):
        state.step = step
        ckpt.save(state)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000006.pt", "step_00000004.pt"]
    assert ckpt.last_saved == 6  # what a preemption checks before saving again


def test_precise_bn_checkpoints_restore_the_training_averages(tmp_path):
    a = make_state(0)
    train_a_bit(a, 2)
    bn = a.model[1]
    ema = {"1.running_mean": bn.running_mean.clone(), "1.running_var": bn.running_var.clone()}
    with torch.no_grad():
        bn.running_mean.fill_(7.0)  # stands for the precise statistics the file carries
    ckpt = Checkpointer(tmp_path, CPU, interval=1, keep=1, meta=META)
    path = ckpt.save(a, bn_ema=ema)
    assert torch.load(path, weights_only=True)["model"]["1.running_mean"].eq(7.0).all()
    b = make_state(1)
    ckpt.restore(b, ckpt.latest("arch", {}), reseed=None)
    assert torch.equal(b.model[1].running_mean, ema["1.running_mean"])
    assert torch.equal(b.model[1].running_var, ema["1.running_var"])


def test_world_size_change_starts_next_epoch_and_reseeds(tmp_path):
    a = make_state(0)
    train_a_bit(a, 2)
    Checkpointer(tmp_path, CPU, interval=1, keep=1, meta=META).save(a)
    two_ranks = DistEnv(0, 2, 0, torch.device("cpu"), "gloo")  # only reads, no collective
    b = make_state(1)
    reseeded = []
    ckpt = Checkpointer(tmp_path, CPU, interval=1, keep=1, meta=META)
    found = ckpt.latest("arch", {})
    ckpt.env = two_ranks
    ckpt.restore(b, found, reseed=reseeded.append)
    assert reseeded == [2] and (b.data.epoch, b.data.pos) == (2, 0)


def choice(kind):
    return NormChoice("backbone", kind, False)


def test_resume_checks_name_what_differs(tmp_path):
    ckpt = {"config": {"model": {"arch": "a"}}, "policy": {"parts": {"backbone": {"kind": "bn"}}}}
    check_resume(ckpt, tmp_path, "a", {"backbone": choice("syncbrn")})  # BN family: fine
    with pytest.raises(CheckpointError, match="model.arch='a', this run is model.arch='b'"):
        check_resume(ckpt, tmp_path, "b", {"backbone": choice("bn")})
    with pytest.raises(CheckpointError, match="norm.override.backbone=bn"):
        check_resume(ckpt, tmp_path, "a", {"backbone": choice("gn")})


def test_position_is_translated_in_samples_for_another_batch():
    """8 samples into the epoch at batch 2 is batch 2 at batch 4 (the sampler's order does
    not depend on the batch); 8 samples do not start a batch of 3, which is refused."""
    from pathlib import Path
    from types import SimpleNamespace

    from trainer.checkpoint import CheckpointError, _translate_position

    ckpt = {"config": {"train": {"per_device_batch": 2}}}
    state = SimpleNamespace(data=SimpleNamespace(epoch=1, pos=4))
    _translate_position(state, ckpt, Path("step_00000004.pt"), batch=4)
    assert (state.data.epoch, state.data.pos) == (1, 2)
    state = SimpleNamespace(data=SimpleNamespace(epoch=1, pos=4))
    with pytest.raises(CheckpointError, match="resume with train.per_device_batch=2"):
        _translate_position(state, ckpt, Path("step_00000004.pt"), batch=3)
    assert state.data.pos == 4
