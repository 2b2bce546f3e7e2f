"""After training: ``eval``, ``predict``, ``export`` and ``runs`` (see trainer.cli)."""

from __future__ import annotations

import csv
import json
import sys
import warnings
from pathlib import Path

__all__ = ["cmd_eval", "cmd_predict", "cmd_export", "cmd_runs"]


def cmd_eval(args) -> int:
    """Evaluate a checkpoint on the configured val split (or a dataset given by
    overrides); under torchrun every rank takes a shard.  Writes <run>/eval.json."""
    from trainer.distributed import init_distributed, teardown
    from trainer.evaluate import evaluate
    from trainer.files import write_atomic
    from trainer.inference import load_run
    from trainer.plan import eval_batch
    from trainer.training import load_datasets

    run_dir = Path(args.run)
    probe = load_run(run_dir, args.checkpoint, args.overrides)  # fails before any group
    cfg = probe.cfg
    env = init_distributed(cfg.run.device, cfg.dist.backend, cfg.dist.timeout_s)
    try:
        run = (
            probe
            if env.device.type == "cpu"
            else load_run(run_dir, args.checkpoint, args.overrides, device=str(env.device))
        )
        _, val_ds = load_datasets(cfg, env)
        metrics = evaluate(
            run.model,
            val_ds,
            env,
            task=cfg.model.task,
            batch=eval_batch(cfg.train.per_device_batch),
            workers=cfg.data.workers(env.local_world_size),
        )
    finally:
        teardown()
    if env.is_main:
        record = {
            "checkpoint": str(run.checkpoint),
            "step": run.step,
            "data": {"dataset": cfg.data.dataset, "root": cfg.data.root},
            "metrics": metrics,
        }
        write_atomic(run_dir / "eval.json", json.dumps(record, indent=2) + "\n")
        print(json.dumps(metrics))
        print(f"wrote {run_dir / 'eval.json'} ({run.checkpoint.name}, step {run.step})")
    return 0


def cmd_predict(args) -> int:
    """Images -> predictions.json (detection: COCO results with the dataset's category ids
    and names, plus <image>.png with the boxes drawn; classification: top-k, also as
    predictions.csv)."""
    from trainer.inference import image_paths, load_run, read_images

    run = load_run(args.run, args.checkpoint)
    paths = image_paths(args.images)
    ids, source = image_ids(paths, Path(args.ann) if args.ann else None)
    images = read_images(paths)
    out = Path(args.out or Path(args.run) / "predictions")
    out.mkdir(parents=True, exist_ok=True)
    if run.dataset["task"] == "detection":
        results = _detections(run, paths, ids, images, out, args.score_thresh)
    else:
        results = _top_k(run, paths, ids, images, out, args.top_k)
    (out / "predictions.json").write_text(json.dumps(results, indent=1) + "\n")
    print(
        f"{len(paths)} image(s), {len(results)} prediction(s) -> {out}/predictions.json "
        f"(image ids: {source})"
    )
    return 0


def image_ids(paths: list[Path], ann: Path | None) -> tuple[list[int], str]:
    """The COCO image id of each image, so predictions.json goes straight into COCOeval:
    from ``ann`` (every image must be listed), else from the annotation file of the
    project's COCO layout (``<root>/<split>/x.jpg`` -> ``<root>/annotations/
    instances_<split>.json``) when it lists them all, else the argument order."""
    candidates = [ann] if ann is not None else sorted({_layout_ann(p) for p in paths} - {None})
    if len(candidates) == 1 and candidates[0].is_file():
        try:
            listed = json.loads(candidates[0].read_text()).get("images", [])
            by_name = {Path(im["file_name"]).name: im["id"] for im in listed}
        except (json.JSONDecodeError, AttributeError, KeyError, TypeError) as e:
            raise ValueError(f"--ann {candidates[0]}: not a COCO annotation file ({e})") from None
        missing = [p for p in paths if p.name not in by_name]
        if not missing:
            return [by_name[p.name] for p in paths], str(candidates[0])
        if ann is not None:
            raise ValueError(f"--ann {ann} does not list {missing[0]} ({len(missing)} missing)")
    elif ann is not None:
        raise ValueError(f"--ann {ann}: no such file")
    return list(range(len(paths))), "argument order"


def _layout_ann(path: Path) -> Path | None:
    split = path.parent
    ann = split.parent / "annotations" / f"instances_{split.name}.json"
    return ann if ann.is_file() else None


def _detections(run, paths, ids, images, out: Path, score_thresh: float) -> list[dict]:
    from torchvision.ops import box_convert, nms
    from torchvision.transforms.v2.functional import to_pil_image
    from torchvision.utils import draw_bounding_boxes

    from trainer.inference import predict

    cats, results = run.dataset["categories"], []
    for i, path, image, output in zip(ids, paths, images, predict(run, images), strict=True):
        keep = (output["scores"] >= score_thresh) & (output["labels"] > 0)
        boxes, labels, scores = (output[k][keep] for k in ("boxes", "labels", "scores"))
        names = [cats[int(lab) - 1]["name"] for lab in labels]
        for box, lab, name, score in zip(
            box_convert(boxes, "xyxy", "xywh"), labels, names, scores, strict=True
        ):
            results.append(
                {
                    "image_id": i,
                    "file_name": str(path),
                    "category_id": cats[int(lab) - 1]["id"],
                    "category_name": name,
                    "bbox": [float(v) for v in box],
                    "score": float(score),
                }
            )
        # The drawing keeps one box per object: the detector's NMS is per class, so the
        # same object can carry a box per class; predictions.json keeps them all.
        shown = nms(boxes, scores, iou_threshold=0.5).tolist()
        text = [f"{names[j]} {scores[j]:.2f}" for j in shown]
        drawn = (image * 255).byte()
        if shown:  # (torchvision warns on an empty drawing)
            drawn = draw_bounding_boxes(drawn, boxes[shown], text, colors="red")
        to_pil_image(drawn).save(out / f"{path.stem}.png")
    return results


def _top_k(run, paths, ids, images, out: Path, k: int) -> list[dict]:
    from trainer.inference import predict

    cats = run.dataset["categories"]
    results = [
        {
            "image_id": i,
            "file_name": str(path),
            "top_k": [{"class": c, "name": cats[c]["name"], "probability": p} for c, p in top],
        }
        for i, path, top in zip(ids, paths, predict(run, images, top_k=k), strict=True)
    ]
    with open(out / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "rank", "class", "name", "probability"])
        for r in results:
            for rank, t in enumerate(r["top_k"], 1):
                w.writerow([r["file_name"], rank, t["class"], t["name"], f"{t['probability']:.6f}"])
    return results


def cmd_export(args) -> int:
    from trainer.export import export_run
    from trainer.inference import load_run

    run = load_run(args.run, args.checkpoint)
    files = export_run(run, args.out or Path(args.run) / "export")
    for kind, path in files.items():
        print(f"{kind:>8}: {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0


def cmd_runs(args) -> int:
    """One line per run folder under --root: step reached, newest valid checkpoint, last
    eval, norm kind per part."""
    from trainer.checkpoint import load_latest

    root = Path(args.root)
    folders = sorted(p.parent for p in root.glob("*/config.yaml")) if root.is_dir() else []
    if not folders:
        print(f"no runs under {root}/")
        return 0
    rows = [("run", "step", "checkpoint", "last eval", "norms")]
    for folder in folders:
        with warnings.catch_warnings(record=True) as skipped:  # said once below, per run
            warnings.simplefilter("always")
            found = load_latest(folder / "checkpoints", metadata_only=True)
        for w in skipped:
            print(f"warning: {folder.name}: {w.message}", file=sys.stderr)
        step, ckpt = (found[0]["step"], found[1].name) if found else ("-", "-")
        policy = _read_json(folder / "policy.json")
        parts = policy.get("parts", {}) if isinstance(policy, dict) else {}
        kinds = "/".join(
            f"{k}:{v.get('kind', '?')}" for k, v in parts.items() if isinstance(v, dict)
        )
        rows.append((folder.name, str(step), ckpt, _last_eval(folder), kinds or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row[:4], widths, strict=True)) + "  " + row[4])
    return 0


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _format_eval(metrics: dict, step) -> str:
    return (
        " ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k != "images" and _is_number(v))
        + f" (step {step})"
    )


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _last_eval(folder: Path) -> str:
    """The newer of ``normpilot eval``'s eval.json and the last eval row of
    metrics.jsonl (by file time); a row cut short by a crash is passed over."""
    metrics, found = folder / "metrics.jsonl", None
    try:
        lines = metrics.read_text().splitlines()
    except OSError:
        lines = []
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("eval"), dict):
            found = (row["eval"], row.get("step", "?"))
            break
    record = _read_json(folder / "eval.json")
    if isinstance(record, dict) and isinstance(record.get("metrics"), dict):
        newer = (
            not found
            or not lines
            or ((folder / "eval.json").stat().st_mtime >= metrics.stat().st_mtime)
        )
        if newer:
            found = (record["metrics"], f"{record.get('step', '?')}, normpilot eval")
    return _format_eval(*found) if found else "-"
