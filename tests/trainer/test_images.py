"""The start-up image check's cache (trainer/data/images.py, CheckCache)."""

import pytest


def test_a_second_start_reuses_the_image_check_for_unchanged_files(
    tmp_path, monkeypatch, image_check_cache
):
    """Start-up checks each image once: unchanged files (same size and mtime) are not
    opened again; a changed one is; the cache lives outside the dataset folder."""
    from tests.trainer.test_sizing import _mixed_coco
    from trainer.data import coco

    _mixed_coco(tmp_path / "set", n_train=6, n_val=2)
    ann = tmp_path / "set/annotations/instances_train.json"
    opened = []
    real = coco.check_image

    def counting(path, **kw):
        opened.append(path.name)
        return real(path, **kw)

    monkeypatch.setattr(coco, "check_image", counting)
    first = coco.CocoDetection(tmp_path / "set/train", ann, train=True)
    assert len(opened) == 6
    opened.clear()
    second = coco.CocoDetection(tmp_path / "set/train", ann, train=True)
    assert opened == [] and second.sizes() == first.sizes()
    # a changed file is checked again, and a damaged one still fails at start-up
    path = tmp_path / "set/train/003.jpg"
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(coco.DataError, match="003.jpg"):
        coco.CocoDetection(tmp_path / "set/train", ann, train=True)
    assert opened == ["003.jpg"]
    assert not list((tmp_path / "set").rglob("*image_check*"))  # nothing in the dataset
    assert list((image_check_cache / "image_check").glob("*.json"))
