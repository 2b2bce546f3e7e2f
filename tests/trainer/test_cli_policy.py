"""``python -m trainer policy``: the table it prints, run as a real subprocess."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.cli import main

ROOT = Path(__file__).resolve().parents[2]
DET = str(ROOT / "configs/shapes_det.yaml")


def rows(out: str) -> dict[str, list[str]]:
    table = {}
    for line in out.splitlines():
        cells = line.split()
        if cells and cells[0] in ("backbone", "neck", "head"):
            table[cells[0]] = cells
    return table


def test_issue_example_8_ranks_batch_2_as_subprocess():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer",
            "policy",
            "--config",
            DET,
            "--world-size",
            "8",
            "--device",  # the plan's impl depends on the device: the test must not
            "cpu",
            "train.per_device_batch=2",
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    ).stdout
    table = rows(out)
    assert table["backbone"][1:4] == ["syncbn", "no", "portable"]
    assert table["neck"][1:4] == ["syncbn", "no", "portable"]
    assert table["head"][1:4] == ["gn", "yes", "plain"]
    assert "world_size 8 x per_device_batch 2 = 16 >= min_batch 8" in out


@pytest.mark.parametrize(
    "world,batch,backbone",
    # The default config's 96 px images reach the last stage as 3x3: 9 values per image.
    [
        ("1", "32", "bn"),
        ("1", "2", "brn"),  # 18 values
        ("2", "2", "syncbrn"),  # 4 x 9 = 36
        ("2", "4", "syncbn"),  # 8 >= min_batch 8
        ("64", "2", "syncbn"),
    ],
)
def test_world_sizes(capsys, world, batch, backbone):
    assert (
        main(["policy", "--config", DET, "--world-size", world, f"train.per_device_batch={batch}"])
        == 0
    )
    table = rows(capsys.readouterr().out)
    assert table["backbone"][1] == backbone and table["neck"][1] == backbone
    assert table["head"][1] == "gn"


def test_cuda_plan_uses_fused_syncbn_and_accumulation_does_not_count(capsys):
    assert (
        main(
            [
                "policy",
                "--config",
                DET,
                "--world-size",
                "4",
                "--device",
                "cuda",
                "train.per_device_batch=1",
                "train.grad_accum=8",
                "norm.policy.small_batch=brn",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    table = rows(out)
    # 4 x 1 = 4 < 8 whatever the accumulation: synchronized Batch Renorm.
    assert table["backbone"][1:4] == ["syncbrn", "no", "portable"]
    assert "grad_accum 8 (does not enlarge" in out and "cuda/nccl" in out


def test_classifier_has_only_a_backbone(capsys):
    assert main(["policy", "--config", str(ROOT / "configs/shapes_cls.yaml")]) == 0
    assert set(rows(capsys.readouterr().out)) == {"backbone"}


def test_override_shows_in_table(capsys):
    assert main(["policy", "--config", DET, "--world-size", "8", "norm.override.neck=gn"]) == 0
    table = rows(capsys.readouterr().out)
    assert table["neck"][1] == "gn" and "override" in " ".join(table["neck"])


@pytest.mark.parametrize(
    "args,message",
    [
        (["train.per_device_batch=0"], "train.per_device_batch must be >= 1, got 0"),
        (["norm.override.backbone=gn", "norm.policy.gn_groups=24"], "gn_groups=24 does not divide"),
        (["bogus.key=1"], "unknown config key bogus in override"),
    ],
)
def test_errors_exit_2_with_message(capsys, args, message):
    assert main(["policy", "--config", DET, *args]) == 2
    assert message in capsys.readouterr().err


def test_world_size_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        main(["policy", "--config", DET, "--world-size", "0"])
    assert "must be >= 1, got 0" in capsys.readouterr().err


def _json(capsys, *args):
    assert main(["policy", "--config", DET, "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_256_gpus_sync_in_groups_of_a_node(capsys):
    base = ["--world-size", "256", "--nproc-per-node", "8", "--device", "cpu"]
    record = _json(capsys, *base, "train.per_device_batch=1")
    for part in ("backbone", "neck"):
        assert record["parts"][part]["kind"] == "syncbn"
        assert record["parts"][part]["sync_group_size"] == 8
    assert "groups of 8 ranks (8 images) inside each node" in record["parts"]["backbone"]["reason"]
    assert record["parts"]["head"]["sync_group_size"] == 1
    world = _json(capsys, *base, "train.per_device_batch=2", "norm.policy.sync_group=world")
    assert world["parts"]["backbone"]["sync_group_size"] == 256
    big = _json(capsys, *base, "train.per_device_batch=32")
    assert big["parts"]["backbone"]["kind"] == "bn"
    assert big["parts"]["backbone"]["sync_group_size"] == 1
