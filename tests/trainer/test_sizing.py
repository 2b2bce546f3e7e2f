"""Detection sizing: shortest edge / max size as torchvision resizes, anchors that do not
scale with the input, the policy counting values at the real training size, and a
mixed-size, mixed-orientation COCO set that trains, evaluates and predicts in each
image's own pixel coordinates."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from norms import select_norm
from tests.helpers import FAST_DET, ROOT, train_args
from trainer.cli import main
from trainer.config import ConfigError, load_config
from trainer.models import build_model
from trainer.plan import plan_run
from trainer.sizing import Sizing

DET = ROOT / "configs/shapes_det.yaml"


@pytest.mark.parametrize(
    "min_size,max_size,hw",
    [(800, 1333, (480, 640)), (800, 1333, (640, 480)), (800, 1333, (300, 900)), (96, 96, (50, 70))],
)
def test_resize_matches_torchvision(min_size, max_size, hw):
    """The sizes Sizing predicts are the ones torchvision's transform produces."""
    tv = GeneralizedRCNNTransform(min_size, max_size, [0.0] * 3, [1.0] * 3).eval()
    images = tv([torch.rand(3, *hw)])[0]
    got_h, got_w = images.image_sizes[0]
    short, long = Sizing((min_size,), max_size, min_size).resized(min(hw), max(hw), min_size)
    assert sorted((got_h, got_w)) == [short, long]
    padded = images.tensors.shape[-2:]
    assert all(p % 32 == 0 and p - s < 32 for p, s in zip(padded, (got_h, got_w), strict=True))


def test_smallest_map_is_the_worst_case_over_sizes_and_aspects():
    s = Sizing((640, 800), 1333, 800)
    assert s.smallest_map(32, [1.0]) == (20, 20)  # the smaller training size, square
    # 3:1 at 640: the long side is capped at 1333, the short side is 444 -> 448
    assert s.smallest_map(32, [3.0]) == (14, 42)
    assert Sizing.square(96).smallest_map(32, [1.0]) == (3, 3)
    assert Sizing.square(96).smallest_map(128, [1.0]) == (1, 1)


def test_the_policy_counts_values_at_the_training_size(capsys):
    args = ["policy", "--config", str(DET), "train.per_device_batch=1"]
    assert main([*args, "data.min_size=800", "data.max_size=1333"]) == 0
    out = capsys.readouterr().out
    backbone = next(line for line in out.splitlines() if line.startswith("backbone"))
    assert "1 x 625 = 625 values per statistic" in backbone and " brn " in backbone
    assert "smallest normalized maps: backbone 25x25, neck 25x25, head 7x7" in out
    assert main(args) == 0  # the preset: 96-px squares
    assert "1 x 9 = 9 values" in capsys.readouterr().out
    plan = plan_run(load_config(DET, ["data.min_size=[64,80]", "data.max_size=128"]), 1, "cpu")
    assert plan.maps["backbone"] == (2, 2) and plan.record()["smallest_maps"]["head"] == [1, 1]
    # data of unknown shape: up to 2:1 assumed (640 x 1280 -> 20 x 40 is not the worst;
    # the square 640 x 640 is)
    coco = [
        "data.dataset=coco",
        "data.root=/nonexistent",
        "data.min_size=640",
        "data.max_size=1333",
    ]
    plan = plan_run(load_config(DET, coco), 1, "cpu")
    assert plan.maps["backbone"] == (20, 20) and "up to 2:1 assumed" in plan.sizes


def test_the_data_s_own_aspect_ratios_are_used_when_its_annotation_file_says(tmp_path):
    _mixed_coco(tmp_path)  # 3:2 and 25:18 images, no square one
    cfg = load_config(
        DET, ["data.dataset=coco", f"data.root={tmp_path}", "data.min_size=64", "data.max_size=128"]
    )
    plan = plan_run(cfg, 1, "cpu")
    assert plan.maps["backbone"] == (2, 3)  # 64 x 89 pads to 64 x 96
    assert "aspect ratios 1.39 to 1.5 in the training data" in plan.sizes


def test_sizing_and_anchor_settings_are_checked():
    cfg = load_config(DET, ["data.min_size=[640,800]", "data.max_size=1333"])
    assert cfg.data.sizing() == Sizing((640, 800), 1333, 800)
    assert load_config(DET, ["data.test_size=700"]).data.sizing().test_size == 700
    for bad, message in [
        ("data.min_size=8", "data.min_size must be an integer >= 16"),
        ("data.min_size=[]", "data.min_size must be an integer >= 16"),
        ("data.max_size=50", "data.max_size must be >= 96"),
        ("model.anchor_sizes=[8,16]", "model.anchor_sizes must be 5 positive sizes"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
            load_config(DET, [bad])


def test_anchors_are_torchvision_s_unless_set_and_do_not_follow_the_input_size():
    from torchvision.models.detection.retinanet import _default_anchorgen

    plan = {p: select_norm(1, 2, p) for p in ("backbone", "neck", "head")}
    fcos = build_model("fcos_resnet18_fpn", 3, plan, sizing=Sizing.square(640), fpn_channels=32)
    assert fcos.anchor_generator.sizes == ((8,), (16,), (32,), (64,), (128,))
    retina = build_model(
        "retinanet_resnet18_fpn", 3, plan, sizing=Sizing.square(64), fpn_channels=32
    )
    assert retina.anchor_generator.sizes == _default_anchorgen().sizes
    custom = build_model(
        "fcos_resnet18_fpn", 3, plan, image_size=64, anchor_sizes=[5, 10, 20, 40, 80]
    )
    assert custom.anchor_generator.sizes == ((5,), (10,), (20,), (40,), (80,))
    # the preset pins its own, whatever data.image_size says
    assert load_config(DET, ["data.image_size=64"]).model.anchor_sizes == [8, 16, 32, 64, 128]


def test_eval_resizes_to_test_size_and_training_draws_from_min_size():
    plan = {p: select_norm(1, 2, p) for p in ("backbone", "neck", "head")}
    model = build_model(
        "fcos_resnet18_fpn", 3, plan, sizing=Sizing((64, 96), 160, 128), fpn_channels=32
    )
    model.eval()
    assert model.transform([torch.rand(3, 100, 120)])[0].image_sizes == [(128, 153)]
    assert model.transform([torch.rand(3, 50, 100)])[0].image_sizes == [(80, 160)]  # max_size
    model.train()
    torch.manual_seed(0)
    seen = {model.transform([torch.rand(3, 50, 50)])[0].image_sizes[0] for _ in range(20)}
    assert seen == {(64, 64), (96, 96)}


def _mixed_coco(root, n_train=8, n_val=4):
    """JPEGs of two sizes in both orientations, each with one or two filled boxes."""
    sizes = [(120, 80), (80, 120), (100, 72), (72, 100)]  # (width, height)
    for split, n in (("train", n_train), ("val", n_val)):
        (root / split).mkdir(parents=True)
        images, anns = [], []
        for i in range(n):
            w, h = sizes[i % len(sizes)]
            im = Image.new("RGB", (w, h), (30, 30, 30))
            boxes = [[8, 10, w // 3, h // 3], [w // 2, h // 2, w // 3, h // 4]][: 1 + i % 2]
            draw = ImageDraw.Draw(im)
            for k, (x, y, bw, bh) in enumerate(boxes):
                draw.rectangle([x, y, x + bw, y + bh], fill=(220, 60 + 100 * k, 40))
            name = f"{i:03d}.jpg"
            im.save(root / split / name, quality=90)
            images.append({"id": 100 + i, "file_name": name, "width": w, "height": h})
            for k, b in enumerate(boxes):
                anns.append(
                    {"id": len(anns) + 1, "image_id": 100 + i, "category_id": 1 + k, "bbox": b}
                )
        (root / "annotations").mkdir(exist_ok=True)
        coco = {"images": images, "annotations": anns, "categories": [{"id": 1}, {"id": 2}]}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))


def test_mixed_size_coco_trains_evaluates_and_predicts_in_image_coordinates(tmp_path, capsys):
    root = tmp_path / "coco"
    _mixed_coco(root)
    sizing = ["data.min_size=[64,80]", "data.max_size=128", "data.test_size=80"]
    args = train_args(DET, tmp_path / "runs", root, "mixed", *FAST_DET, "data.dataset=coco")
    assert main([*args, "model.num_classes=2", *sizing, "data.image_size=64"]) == 0
    run_dir = tmp_path / "runs" / "mixed"
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert 0.0 <= [r for r in rows if "eval" in r][-1]["eval"]["mAP50"] <= 1.0
    policy = json.loads((run_dir / "policy.json").read_text())
    # the images are 3:2 and 25:18: at a 64-px short side the smallest pads to 64 x 96
    assert policy["smallest_maps"]["backbone"] == [2, 3]
    capsys.readouterr()
    out = tmp_path / "pred"
    files = [str(root / "val" / f"{i:03d}.jpg") for i in range(4)]
    assert main(["predict", "--run", str(run_dir), *files, "--out", str(out),
                 "--score-thresh", "0"]) == 0  # fmt: skip
    assert f"(image ids: {root / 'annotations' / 'instances_val.json'})" in capsys.readouterr().out
    preds = json.loads((out / "predictions.json").read_text())
    assert preds, "no predictions at score 0"
    # the dataset's own image ids, so the file goes straight into COCOeval
    assert {(Path(p["file_name"]).name, p["image_id"]) for p in preds} <= {
        (f"{i:03d}.jpg", 100 + i) for i in range(4)
    }
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO(str(root / "annotations" / "instances_val.json"))
    gt.dataset["annotations"] = [
        {**a, "area": a["bbox"][2] * a["bbox"][3], "iscrowd": 0} for a in gt.dataset["annotations"]
    ]
    gt.createIndex()
    COCOeval(gt, gt.loadRes(str(out / "predictions.json")), "bbox").evaluate()
    # --ann must list every image; images outside a COCO layout keep the argument order
    other = tmp_path / "loose"
    other.mkdir()
    (other / "x.jpg").write_bytes((root / "val" / "000.jpg").read_bytes())
    pred = ["predict", "--run", str(run_dir), str(other / "x.jpg"), "--out", str(out)]
    assert main([*pred, "--ann", str(root / "annotations" / "instances_val.json")]) == 2
    assert "does not list" in capsys.readouterr().err
    assert main(pred) == 0 and "(image ids: argument order)" in capsys.readouterr().out
    for p in preds:
        w, h = Image.open(p["file_name"]).size
        x, y, bw, bh = p["bbox"]
        assert x >= -1e-3 and x + bw <= w + 1e-3 and y >= -1e-3 and y + bh <= h + 1e-3, (p, w, h)
    # portrait and landscape images both got boxes in their own frame
    landscape = {p["file_name"]: Image.open(p["file_name"]).size for p in preds}
    assert {w > h for w, h in landscape.values()} == {True, False}
