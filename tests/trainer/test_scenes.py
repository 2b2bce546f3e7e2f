"""The embedded scenes preset: photo-like JPEGs of mixed sizes and orientations, generated
deterministically, read by the COCO loader, planned at their own aspect ratios, and
trained end to end (train, eval, predict) through the preset."""

import json
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import ROOT, train_args
from trainer.cli import main
from trainer.config import ConfigError, load_config
from trainer.data import build_datasets, dataset_root
from trainer.data.scenes import CLASSES, ensure_scenes, nominal_aspects
from trainer.plan import plan_run

SCENES = ROOT / "configs/scenes_det.yaml"


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    return ensure_scenes(tmp_path_factory.mktemp("scenes"), 40, 6, 320)


def _coco(folder: Path, split: str = "train") -> dict:
    return json.loads((folder / "annotations" / f"instances_{split}.json").read_text())


def test_generation_is_deterministic_and_keyed_by_its_parameters(scenes, tmp_path):
    again = ensure_scenes(tmp_path, 40, 6, 320)
    assert _coco(again) == _coco(scenes) and _coco(again, "val") == _coco(scenes, "val")
    for name in ("000000.jpg", "000017.jpg"):
        assert (again / "train" / name).read_bytes() == (scenes / "train" / name).read_bytes()
    assert ensure_scenes(tmp_path, 40, 6, 256) != again  # another size: another folder


def test_images_are_jpegs_of_mixed_sizes_in_both_orientations(scenes):
    coco = _coco(scenes)
    sizes = []
    for im in coco["images"]:
        with Image.open(scenes / "train" / im["file_name"]) as f:
            assert f.format == "JPEG" and f.size == (im["width"], im["height"])
        sizes.append((im["width"], im["height"]))
        assert 160 <= max(sizes[-1]) <= 320
    assert {w > h for w, h in sizes} == {True, False}  # landscape and portrait
    assert len(set(sizes)) > len(sizes) // 2  # mixed sizes, not a handful
    ratios = [max(s) / min(s) for s in sizes]
    # every image's ratio is one the generator draws, within the rounding of a side
    assert all(min(abs(r - a) for a in nominal_aspects()) < 0.02 for r in ratios)


def test_objects_cover_every_class_small_and_large_and_overlap(scenes):
    coco = _coco(scenes)
    assert [c["name"] for c in coco["categories"]] == list(CLASSES) and len(CLASSES) >= 6
    anns = coco["annotations"]
    assert {a["category_id"] for a in anns} == set(range(1, len(CLASSES) + 1))
    dims = {im["id"]: (im["width"], im["height"]) for im in coco["images"]}
    sides = []
    for a in anns:
        x, y, w, h = a["bbox"]
        W, H = dims[a["image_id"]]
        assert x >= 0 and y >= 0 and x + w <= W and y + h <= H and w >= 3 and h >= 3
        sides.append((w * h) ** 0.5)
    assert min(sides) < 16 and max(sides) > 96  # COCO "small" and "large" objects
    overlaps = 0
    by_image: dict[int, list] = {}
    for a in anns:
        by_image.setdefault(a["image_id"], []).append(a["bbox"])
    for boxes in by_image.values():
        for i, (x0, y0, w0, h0) in enumerate(boxes):
            for x1, y1, w1, h1 in boxes[i + 1 :]:
                overlaps += x0 < x1 + w1 and x1 < x0 + w0 and y0 < y1 + h1 and y1 < y0 + h0
    assert overlaps >= 5  # occlusion happens


def test_the_loader_reads_the_generated_set_and_the_plan_uses_its_aspects(tmp_path):
    cfg = load_config(SCENES, [f"data.root={tmp_path}", "data.num_train=12", "data.num_val=4"])
    d = cfg.data
    folder = dataset_root(d.dataset, d.root, "detection", d.image_size, 12, 4, cfg.run.seed)
    before = plan_run(cfg, 1, "cpu")  # nothing written yet: the generator's ratios
    assert not folder.exists() and f"1 to {max(nominal_aspects()):g}" in before.sizes
    train, val = build_datasets(
        "scenes", str(tmp_path), "detection", image_size=d.image_size, num_train=12,
        num_val=4, seed=cfg.run.seed, generate=True,
    )  # fmt: skip
    assert folder.is_dir() and len(train) == 12 and len(val) == 4
    assert [c["name"] for c in train.categories] == list(CLASSES)
    after = plan_run(cfg, 1, "cpu")  # written: the ratios its annotation file lists
    assert "in the training data" in after.sizes and after.maps == before.maps


def test_a_start_parses_the_training_annotation_file_once(tmp_path, monkeypatch):
    """The plan reads the image sizes and hands the parse to the dataset built next (the
    file is COCO's 450 MB at full size); a changed file is parsed again."""
    import json as json_module

    import trainer.data.coco as coco

    args = dict(image_size=320, num_train=12, num_val=4, seed=0)
    build = lambda: build_datasets("scenes", str(tmp_path), "detection", generate=True, **args)  # noqa: E731
    build()  # generated
    ann = dataset_root("scenes", str(tmp_path), "detection", 320, 12, 4, 0)
    ann = ann / "annotations" / "instances_train.json"
    parsed = []
    real = json_module.load

    def counting(f, *a, **k):
        parsed.append(Path(f.name).name)
        return real(f, *a, **k)

    monkeypatch.setattr(coco.json, "load", counting)
    cfg = load_config(SCENES, [f"data.root={tmp_path}", "data.num_train=12", "data.num_val=4"])
    plan_run(cfg, 1, "cpu")
    build()
    assert parsed.count("instances_train.json") == 1
    plan_run(cfg, 1, "cpu")
    ann.write_text(ann.read_text() + " ")  # another size: the handed parse is stale
    build()
    assert parsed.count("instances_train.json") == 3


def test_the_dataset_must_fit_the_model_s_task():
    with pytest.raises(ConfigError, match="data.dataset='scenes' holds detection data"):
        load_config(ROOT / "configs/shapes_cls.yaml", ["data.dataset=scenes"])


def test_the_scenes_preset_trains_evaluates_and_predicts(tmp_path, capsys):
    small = [
        "run.device=cpu", "data.num_train=16", "data.num_val=4", "data.num_workers=0",
        "data.image_size=192", "data.min_size=[96,128]", "data.max_size=192",
        "data.test_size=96", "model.fpn_channels=32", "norm.policy.gn_groups=16",
        "train.per_device_batch=2", "train.max_steps=3", "train.log_interval=1",
        "train.warmup_steps=1", "checkpoint.interval=3", "wandb.mode=disabled",
        "norm.precise_bn.num_batches=2",
    ]  # fmt: skip
    assert main(train_args(SCENES, tmp_path / "runs", tmp_path / "data", "sc", *small)) == 0
    run_dir = tmp_path / "runs" / "sc"
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert 0.0 <= [r for r in rows if "eval" in r][-1]["eval"]["mAP50"] <= 1.0
    policy = json.loads((run_dir / "policy.json").read_text())
    assert policy["parts"]["backbone"]["kind"] == "brn"  # B=2: Batch Renorm at these sizes
    folder = next((tmp_path / "data").glob("scenes_192px_16_4_*"))
    images = sorted(str(p) for p in (folder / "val").glob("*.jpg"))
    capsys.readouterr()
    out = tmp_path / "pred"
    assert main(["predict", "--run", str(run_dir), *images, "--out", str(out)]) == 0
    ids = {im["id"] for im in _coco(folder, "val")["images"]}
    assert {p["image_id"] for p in json.loads((out / "predictions.json").read_text())} <= ids
