"""wandb is best effort: a failure to start or to log never stops training or loses rows."""

import json

import pytest

from trainer.tracking import RunLogger


class _BrokenRun:
    id = "abc123"
    dir = None

    def __init__(self):
        self.calls = 0

    def log(self, *args, **kwargs):
        self.calls += 1
        raise ConnectionError("wandb backend unreachable")

    def finish(self):
        pass


def make(tmp_path, **kw):
    settings = dict(enabled=True, wandb_mode="online", project="p", entity=None, name="n")
    return RunLogger(tmp_path, **(settings | {"config": {"a": 1}, "run_id": None} | kw))


def test_wandb_failing_to_start_warns_and_metrics_continue(tmp_path, monkeypatch):
    import wandb

    def refuse(**kwargs):
        raise wandb.errors.UsageError("api_key not configured")

    monkeypatch.setattr(wandb, "init", refuse)
    with pytest.warns(UserWarning, match="wandb could not start"):
        logger = make(tmp_path)
    for step in (1, 2):
        logger.log({"step": step, "loss": 1.0 / step})
    logger.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]


def test_wandb_failing_mid_run_is_dropped_once(tmp_path, monkeypatch):
    import wandb

    broken = _BrokenRun()
    monkeypatch.setattr(wandb, "init", lambda **kwargs: broken)
    logger = make(tmp_path)
    assert logger.run_id == "abc123"
    with pytest.warns(UserWarning, match="wandb.log failed"):
        logger.log({"step": 1, "loss": 0.5})
    logger.log({"step": 2, "loss": 0.4})  # no second attempt, no second warning
    logger.close()
    assert broken.calls == 1
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_non_main_rank_writes_nothing(tmp_path):
    logger = RunLogger(
        tmp_path,
        enabled=False,
        wandb_mode="offline",
        project="p",
        entity=None,
        name="n",
        config={},
        run_id=None,
    )
    logger.log({"step": 1})
    logger.close()
    assert not (tmp_path / "metrics.jsonl").exists()


def test_progress_off_a_terminal_prints_at_the_first_step_and_every_30_s(capsys, monkeypatch):
    from trainer.tracking import Progress

    clock = iter([0.0, 1.0, 2.0, 40.0, 41.0])
    monkeypatch.setattr("trainer.tracking.time.perf_counter", lambda: next(clock))
    p = Progress(True, 100, 0)  # t0 = 0; stdout is captured, not a terminal
    p.advance()  # step 1 at 1 s: the first line
    p.advance()  # step 2 at 2 s: too soon
    p.advance()  # step 3 at 40 s: 39 s since the last line
    p.advance()  # step 4 at 41 s
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["step 1/100  (1 s since start)", "step 3/100  (40 s since start)"]


def test_threads_auto_shares_the_cpus_between_processes_and_respects_omp(monkeypatch):
    from trainer.cpus import resolve_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("trainer.cpus.cpus_available", lambda: 16)
    assert resolve_threads("auto", 1, 8)[0] == 16  # the workers wait on a full queue
    assert resolve_threads("auto", 2, 4)[0] == 8  # 8 CPUs each
    assert resolve_threads("auto", 3, 4)[0] == 5
    monkeypatch.setattr("trainer.cpus.cpus_available", lambda: 2)
    assert resolve_threads("auto", 1, 2)[0] == 2
    assert resolve_threads("auto", 2, 1)[0] == 1
    assert resolve_threads("auto", 4, 1)[0] == 1  # never 0
    assert resolve_threads(3, 1, 2) == (3, "run.threads")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert resolve_threads("auto", 1, 0) == (1, "OMP_NUM_THREADS")


def test_prediction_images_of_mixed_sizes_log_without_wandb_s_size_warning(tmp_path, capfd):
    import torch

    from tests.trainer.wandb_reader import wandb_runs

    logger = make(tmp_path, wandb_mode="offline", name="mixed")
    images = [torch.rand(3, 80, 120), torch.rand(3, 120, 80)]
    out = {"boxes": torch.tensor([[1.0, 2.0, 30.0, 40.0]]), "labels": torch.tensor([1])}
    outputs = [{**out, "scores": torch.tensor([0.9])}] * 2
    logger.log_detections(3, images, outputs, [{"id": 1, "name": "circle"}])
    logger.close()
    assert "sizes do not match" not in capfd.readouterr().err
    history = wandb_runs(tmp_path / "wandb")["mixed"]["history"]
    # each image keeps its own size under its own key
    sizes = {
        (history[f"val/predictions/{i}/width"], history[f"val/predictions/{i}/height"])
        for i in (0, 1)
    }
    assert sizes == {(120, 80), (80, 120)}
