"""The fuzzing table: bad inputs and faults, each run through ``normpilot`` in-process on a
tiny COCO copy of the shapes data.  Every case asserts the exit code, one message naming
the file, key or id, no traceback (``main`` returns instead of raising), and that files
already in the run folder are left as they were.

A case is ``Case(id, setup, argv, code, message)``: ``setup(ctx)`` corrupts the private
copy (``ctx.coco``: the COCO folder, ``ctx.run``: a finished 4-step run folder,
``ctx.tmp``) and ``argv(ctx)`` gives the command line.  Cases that need a real process
(signals, file-size limits) live in tests/trainer/test_faults.py.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import FAST_DET, ROOT, train_args
from trainer.cli import main
from trainer.data.shapes import ensure_shapes

DET = str(ROOT / "configs/shapes_det.yaml")


@dataclass
class Ctx:
    tmp: Path
    coco: Path
    run: Path  # a finished run folder (runs/done), trained on ctx.coco

    def ann(self, split: str = "train") -> Path:
        return self.coco / "annotations" / f"instances_{split}.json"

    def edit_ann(self, edit: Callable[[dict], None], split: str = "train") -> Path:
        data = json.loads(self.ann(split).read_text())
        edit(data)
        self.ann(split).write_text(json.dumps(data))
        return self.ann(split)

    def train(self, *extra: str, name: str = "fuzz") -> list[str]:
        return train_args(
            DET, self.tmp / "runs", self.coco, name, *FAST_DET, "data.dataset=coco", *extra
        )

    def resume(self, *extra: str) -> list[str]:
        return self.train(*extra, name="done")


@dataclass
class Case:
    id: str
    setup: Callable[[Ctx], object]
    argv: Callable[[Ctx], list[str]]
    code: int
    message: str | Callable[[Ctx], str]
    warns: str | None = None  # a warning that must be raised (its text)
    changes_run: bool = False  # the command may write into ctx.run (eval.json)
    after: Callable[[Ctx], bool] | None = None  # a further check on the files left
    marks: list = field(default_factory=list)


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (wandb's own folder aside) -> its content hash."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "wandb" not in p.parts
    }


# -- corruptions -------------------------------------------------------------------------
def _first_ann(key, value):
    def edit(data):
        data["annotations"][0][key] = value

    return edit


def _drop_key(section, key):
    def edit(data):
        del data[section][0][key]

    return edit


def _png16(ctx: Ctx) -> None:
    """Every training image becomes a 16-bit grayscale PNG of its own luminance."""
    for p in (ctx.coco / "train").glob("*.png"):
        gray = np.asarray(Image.open(p).convert("L"), dtype=np.uint16) * 257
        Image.fromarray(gray).save(p)  # uint16 -> mode I;16


def _truncated_jpeg(ctx: Ctx) -> None:
    def edit(data):
        data["images"][2]["file_name"] = "000002.jpg"

    Image.open(ctx.coco / "train" / "000002.png").convert("RGB").save(
        ctx.coco / "train" / "000002.jpg", quality=95
    )
    jpg = ctx.coco / "train" / "000002.jpg"
    jpg.write_bytes(jpg.read_bytes()[: len(jpg.read_bytes()) * 2 // 3])
    ctx.edit_ann(edit)


def _truncated_png(ctx: Ctx) -> None:
    png = ctx.coco / "val" / "000001.png"
    png.write_bytes(png.read_bytes()[:-40])


def _huge_image(ctx: Ctx) -> None:
    # A 1-bit 10000x10000 PNG is a few KB on disk and 100 Mpixel in the header.
    Image.new("1", (10000, 10000)).save(ctx.coco / "train" / "000004.png")


def _yaml(text: str) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        (ctx.tmp / "c.yaml").write_text(text)

    return setup


def _config(ctx: Ctx) -> list[str]:
    return ["train", "--config", str(ctx.tmp / "c.yaml")]


def _eval(*extra: str) -> Callable[[Ctx], list[str]]:
    return lambda ctx: ["eval", "--run", str(ctx.run), *extra]


def _ckpt(ctx: Ctx, step: int) -> Path:
    return ctx.run / "checkpoints" / f"step_{step:08d}.pt"


def _save_as(step: int, make: Callable[[dict], object]) -> Callable[[Ctx], None]:
    """A file named like the checkpoint of ``step``, made from the step-4 checkpoint."""

    def setup(ctx: Ctx) -> None:
        torch.save(make(torch.load(_ckpt(ctx, 4), weights_only=True)), _ckpt(ctx, step))

    return setup


def _damage(ctx: Ctx) -> None:
    newest = _ckpt(ctx, 4)
    data = bytearray(newest.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 4096] = bytes(b ^ 0xFF for b in data[mid : mid + 4096])
    newest.write_bytes(bytes(data))


def _append(path: Path, text: str) -> None:
    with open(path, "a") as f:
        f.write(text)


def _other_arch(ckpt: dict) -> dict:
    ckpt["config"]["model"]["arch"] = "resnet18"
    return ckpt


CASES = [
    # -- configuration ----------------------------------------------------------------------
    Case(
        "yaml-section-is-a-list",
        _yaml("run: [1, 2]\n"),
        _config,
        2,
        lambda c: (
            f"run in {c.tmp / 'c.yaml'} must be a mapping of keys (run.KEY: value), got [1, 2]"
        ),
    ),
    Case(
        "yaml-section-is-a-number",
        _yaml("train: 5\n"),
        _config,
        2,
        "train in",
    ),
    Case(
        "yaml-top-level-list",
        _yaml("[1, 2]\n"),
        _config,
        2,
        "the file must be a mapping of sections (run:, data:, train:, ...), got a list",
    ),
    Case("yaml-empty", _yaml(""), _config, 2, lambda c: f"{c.tmp / 'c.yaml'} is empty"),
    Case(
        "config-is-a-folder",
        lambda c: None,
        lambda c: ["train", "--config", str(c.tmp)],
        2,
        lambda c: f"--config {str(c.tmp)!r} is a folder, not a YAML file",
    ),
    Case(
        "run-name-leaves-output-dir",
        lambda c: (c.tmp / "config.yaml").write_text("unrelated\n"),
        lambda c: c.train("run.name=.."),
        2,
        "run.name must be a plain folder name (no '/', '\\', '..' or '.'), got '..'",
    ),
    Case(
        "run-name-with-separator",
        lambda c: None,
        lambda c: c.train("run.name=a/../../b"),
        2,
        "run.name must be a plain folder name",
    ),
    Case(
        "lr-inf",
        lambda c: None,
        lambda c: c.train("train.lr=inf"),
        2,
        "train.lr must be a finite number > 0, got inf",
    ),
    Case(
        "momentum-nan",
        lambda c: None,
        lambda c: c.train("train.momentum=nan"),
        2,
        "train.momentum must be in [0, 1), got nan",
    ),
    Case(
        "wandb-timeout-nan",
        lambda c: None,
        lambda c: c.train("wandb.init_timeout=nan"),
        2,
        "wandb.init_timeout must be > 0, got nan",
    ),
    Case(
        "duplicate-override",
        lambda c: None,
        lambda c: c.train("train.lr=0.01", "train.lr=inf"),
        2,
        "got inf",
        warns="override train.lr given twice ('train.lr=0.01', then 'train.lr=inf')",
    ),
    # -- training runs ----------------------------------------------------------------------
    Case(
        "resume-with-another-optimizer",
        lambda c: None,
        lambda c: c.resume("train.optimizer=sgd", "train.max_steps=6"),
        2,
        "was trained with train.optimizer='adamw', this run has train.optimizer='sgd'",
    ),
    Case(
        "resume-with-a-batch-that-splits-the-position",
        lambda c: None,
        lambda c: c.resume("train.per_device_batch=3", "train.max_steps=6"),
        2,
        "resume with train.per_device_batch=2",
    ),
    Case(
        "rerun-a-finished-run",
        lambda c: None,
        lambda c: c.resume(),
        0,
        "already finished: step_00000004.pt is at step 4 (train.max_steps=4); nothing to do",
        after=lambda c: not (c.run / "wandb").exists(),
    ),
    Case(
        "config-error-leaves-no-run-folder",
        lambda c: None,
        lambda c: c.train("model.num_classes=5"),
        2,
        "model.num_classes=5 but the training data has 3 classes: set model.num_classes=3",
        after=lambda c: not (c.tmp / "runs" / "fuzz").exists(),
    ),
    Case(
        "loss-diverges",
        lambda c: None,
        lambda c: c.train("train.lr=1e30", "train.warmup_steps=0"),
        2,
        "(train.clip_grad_norm is set); lower train.lr. No checkpoint was written",
        after=lambda c: not list((c.tmp / "runs" / "fuzz").glob("checkpoints/*.pt")),
    ),
    Case(
        "precise-bn-with-a-short-epoch",
        lambda c: None,
        lambda c: c.train(),
        0,
        "precise BN: 12 batches (one epoch of this rank's data) instead of "
        "norm.precise_bn.num_batches=50",
    ),
    # -- checkpoints and after-training commands --------------------------------------------
    Case(
        "checkpoint-holds-a-list",
        lambda c: torch.save([1, 2, 3], _ckpt(c, 99)),
        _eval(),
        0,
        "(step_00000004.pt, step 4)",
        warns="step_00000099.pt is not a normpilot checkpoint: it holds a list",
        changes_run=True,
    ),
    Case(
        "checkpoint-is-text",
        lambda c: _ckpt(c, 99).write_text("not a checkpoint"),
        _eval(),
        0,
        "(step_00000004.pt, step 4)",
        warns="step_00000099.pt is not a torch checkpoint file (File is not a zip file)",
        changes_run=True,
    ),
    Case(
        "checkpoint-damaged-mid-file",
        _damage,
        _eval(),
        0,
        "(step_00000002.pt, step 2)",
        warns="step_00000004.pt is damaged: record",
        changes_run=True,
    ),
    Case(
        "checkpoint-weights-only",
        _save_as(99, lambda ckpt: ckpt["model"]),
        _eval("--checkpoint", "{run}/checkpoints/step_00000099.pt"),
        2,
        "is not a normpilot training checkpoint (a weights-only file, e.g. from export)",
    ),
    Case(
        "checkpoint-of-another-arch",
        _save_as(99, _other_arch),
        _eval("--checkpoint", "{run}/checkpoints/step_00000099.pt"),
        2,
        "is from model.arch='resnet18', the run",
    ),
    Case(
        "eval-with-another-num-classes",
        lambda c: None,
        _eval("model.num_classes=5"),
        2,
        "does not fit the model of",
    ),
    Case(
        "checkpoint-is-garbage",
        lambda c: (c.tmp / "junk.pt").write_bytes(b"\x80\x02garbage"),
        lambda c: ["eval", "--run", str(c.run), "--checkpoint", str(c.tmp / "junk.pt")],
        2,
        "junk.pt is not a torch checkpoint file",
    ),
    Case(
        "runs-with-a-cut-off-metrics-row",
        lambda c: _append(c.run / "metrics.jsonl", '{"step": 5, "ev'),
        lambda c: ["runs", "--root", str(c.tmp / "runs")],
        0,
        "done  4     step_00000004.pt  mAP",
    ),
    Case(
        "runs-with-a-weights-only-step-file",
        _save_as(99, lambda ckpt: ckpt["model"]),
        lambda c: ["runs", "--root", str(c.tmp / "runs")],
        0,
        "done  4     step_00000004.pt",
    ),
    Case(
        "runs-shows-a-newer-eval-json",
        lambda c: (c.run / "eval.json").write_text(
            json.dumps({"step": 4, "metrics": {"mAP": 0.123, "mAP50": 0.456}})
        ),
        lambda c: ["runs", "--root", str(c.tmp / "runs")],
        0,
        "mAP 0.123 mAP50 0.456 (step 4, normpilot eval)",
    ),
    # -- COCO annotation files --------------------------------------------------------------
    Case(
        "bbox-nan",
        lambda c: c.edit_ann(_first_ann("bbox", [10, 10, float("nan"), float("nan")])),
        Ctx.train,
        2,
        lambda c: f"in {c.ann()} has a bbox that is not finite: [10, 10, nan, nan]",
    ),
    Case(
        "bbox-3-numbers",
        lambda c: c.edit_ann(_first_ann("bbox", [10, 10, 5])),
        Ctx.train,
        2,
        lambda c: f"in {c.ann()} has bbox [10, 10, 5]: expected 4 numbers",
    ),
    Case(
        "bbox-strings",
        lambda c: c.edit_ann(_first_ann("bbox", ["10", 10, 5, 5])),
        Ctx.train,
        2,
        "has bbox ['10', 10, 5, 5]: expected 4 numbers",
    ),
    Case(
        "image-without-file-name",
        lambda c: c.edit_ann(_drop_key("images", "file_name")),
        Ctx.train,
        2,
        lambda c: f"image 1 (entry 0) in {c.ann()} has no 'file_name'",
    ),
    Case(
        "image-without-id",
        lambda c: c.edit_ann(_drop_key("images", "id")),
        Ctx.train,
        2,
        lambda c: f"image (no id) (entry 0) in {c.ann()} has no 'id'",
    ),
    Case(
        "annotation-without-bbox",
        lambda c: c.edit_ann(_drop_key("annotations", "bbox")),
        Ctx.train,
        2,
        "has no 'bbox'",
    ),
    Case(
        "duplicate-image-ids",
        lambda c: c.edit_ann(lambda d: d["images"][1].update(id=d["images"][0]["id"])),
        Ctx.train,
        2,
        lambda c: f"{c.ann()} lists image id 1 more than once",
    ),
    Case(
        "category-id-string",
        lambda c: c.edit_ann(_first_ann("category_id", "1")),
        Ctx.train,
        2,
        "has category_id '1' (a str); COCO ids are integers",
    ),
    Case(
        "coco-json-is-a-list",
        lambda c: c.ann().write_text("[1, 2]"),
        Ctx.train,
        2,
        lambda c: f"annotation file {c.ann()} is not COCO format: its top level is a list",
    ),
    Case(
        "val-annotations-without-area",
        lambda c: c.edit_ann(lambda d: [a.pop("area", None) for a in d["annotations"]], "val"),
        Ctx.train,
        0,
        "final eval:",
    ),
    Case(
        "annotations-for-unknown-images",
        lambda c: c.edit_ann(_first_ann("image_id", 999)),
        Ctx.train,
        0,
        "final eval:",
        warns="1 annotation(s) point at image ids the file does not list",
    ),
    Case(
        "no-annotations",
        lambda c: c.edit_ann(lambda d: d.update(annotations=[]), "val"),
        Ctx.train,
        0,
        "final eval:",
        warns="has no annotations: every image is background",
    ),
    # -- image files ------------------------------------------------------------------------
    Case(
        "truncated-jpeg",
        _truncated_jpeg,
        Ctx.train,
        2,
        lambda c: f"cannot read image {c.coco / 'train' / '000002.jpg'}: image file is truncated",
    ),
    Case(
        "truncated-png",
        _truncated_png,
        Ctx.train,
        2,
        lambda c: f"cannot read image {c.coco / 'val' / '000001.png'}",
    ),
    Case(
        "image-above-pixel-limit",
        _huge_image,
        Ctx.train,
        2,
        lambda c: (
            f"image {c.coco / 'train' / '000004.png'} is 10000x10000 (100.0 Mpixel), "
            f"above data.max_image_pixels=89478485"
        ),
    ),
]


@pytest.fixture(scope="module")
def tiny_coco(tmp_path_factory, data_root):
    return ensure_shapes(data_root, "detection", 24, 8, 64)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_coco):
    """A 4-step run on the tiny COCO copy (checkpoints at steps 2 and 4)."""
    tmp = tmp_path_factory.mktemp("finished")
    ctx = Ctx(tmp, Path(tiny_coco), tmp / "runs" / "done")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(ctx.resume()) == 0
    return ctx.run


@pytest.fixture
def ctx(tmp_path, tiny_coco, finished_run):
    coco = tmp_path / "coco"
    shutil.copytree(tiny_coco, coco)
    shutil.copytree(finished_run, tmp_path / "runs" / "done")
    return Ctx(tmp_path, coco, tmp_path / "runs" / "done")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fuzz_case(case: Case, ctx: Ctx, capsys):
    case.setup(ctx)
    argv = [a.replace("{run}", str(ctx.run)) for a in case.argv(ctx)]
    before = _snapshot(ctx.run)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(argv)  # raising (a traceback) fails the case
    out, err = capsys.readouterr()
    message = case.message(ctx) if callable(case.message) else case.message
    assert code == case.code, out[-2000:] + err[-2000:]
    assert message in out + err, out[-2000:] + err[-2000:]
    assert "Traceback" not in err
    if case.warns:
        assert any(case.warns in str(w.message) for w in caught), [str(w.message) for w in caught]
    if not case.changes_run:
        # a failed command changes nothing; another run's folder is never touched
        assert _snapshot(ctx.run) == before
    if case.after:
        assert case.after(ctx)


def test_16bit_png_loads_as_its_luminance(ctx):
    """A 16-bit grayscale PNG is scaled to 8 bits, not clipped to white."""
    from trainer.data.coco import CocoDetection

    src = ctx.coco / "train" / "000000.png"
    gray8 = np.asarray(Image.open(src).convert("L"))
    _png16(ctx)
    assert Image.open(src).mode == "I;16"
    ds = CocoDetection(ctx.coco / "train", ctx.ann(), train=False)
    image = ds[0][0]
    assert image.shape[0] == 3 and not torch.all(image == 1.0)
    expected = torch.from_numpy(gray8).float() / 255  # x*257 in 16 bits is x in 8 bits
    assert torch.allclose(image[0], expected, atol=1e-6)
    assert torch.equal(image[0], image[2])
