"""Detection augmentation (torchvision.transforms.v2): the flip moves the boxes with the
image, every draw is fixed by (seed, epoch, index), and colour jitter is optional."""

import torch

from tests.trainer.test_sizing import _mixed_coco
from trainer.data.coco import CocoDetection


def _dataset(root, **kw):
    return CocoDetection(root / "train", root / "annotations/instances_train.json", **kw)


def test_the_flip_is_the_one_drawn_before_and_moves_the_boxes(tmp_path):
    _mixed_coco(tmp_path, n_train=8, n_val=2)
    plain = _dataset(tmp_path, train=False)
    ds = _dataset(tmp_path, train=True, seed=3)
    flips = 0
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        for idx in range(len(ds)):
            image, target = ds[idx]
            ref_image, ref_target = plain[idx]
            # the rule of the hand-written flip it replaced: first draw of a generator
            # seeded with (seed, epoch, index), flip below 0.5
            g = torch.Generator().manual_seed(hash((3, epoch, idx)) & 0x7FFFFFFF)
            flipped = bool(torch.rand((), generator=g) < 0.5)
            flips += flipped
            width = ref_image.shape[-1]
            want = ref_target["boxes"].clone()
            if flipped:
                want[:, [0, 2]] = width - ref_target["boxes"][:, [2, 0]]
            torch.testing.assert_close(image, ref_image.flip(-1) if flipped else ref_image)
            torch.testing.assert_close(target["boxes"], want)
            assert type(image) is torch.Tensor and type(target["boxes"]) is torch.Tensor
    assert 0 < flips < 16


def test_colour_jitter_is_deterministic_per_seed_epoch_and_index(tmp_path):
    _mixed_coco(tmp_path, n_train=4, n_val=2)
    a = _dataset(tmp_path, train=True, color_jitter=0.4)
    b = _dataset(tmp_path, train=True, color_jitter=0.4)
    plain = _dataset(tmp_path, train=True)
    torch.testing.assert_close(a[1][0], b[1][0])  # same draw, whatever the global RNG
    torch.manual_seed(123)
    torch.testing.assert_close(a[1][0], b[1][0])
    assert not torch.equal(a[1][0], plain[1][0])  # jittered
    first = a[1][0]
    a.set_epoch(1)
    assert not torch.equal(a[1][0], first)  # another epoch, another draw
    val = _dataset(tmp_path, train=False, color_jitter=0.4)
    torch.testing.assert_close(val[1][0], _dataset(tmp_path, train=False)[1][0])
