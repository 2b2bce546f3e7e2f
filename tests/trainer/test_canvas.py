"""trainer.canvas and the detector's canvas routing (trainer.graphs), on the CPU with the
graph capture left out: every batch of a mixed-size dataset lands on a canvas, and a
detector trained through the canvases computes what it computes on each batch alone
(losses, gradients, running statistics, Batch Renorm state)."""

import copy
import random

import pytest
import torch

from norms import NormChoice
from trainer.canvas import canvases, fit
from trainer.data.grouping import GroupedBatches, aspect_groups
from trainer.graphs import canvas_parts, route_to_canvases
from trainer.models import build_model
from trainer.sizing import SIZE_DIVISIBLE, Sizing


def test_canvases_per_orientation_and_one_for_mixed_batches():
    assert canvases(Sizing((160, 192, 224), 320, 192)) == [(224, 320), (320, 224), (320, 320)]
    assert canvases(Sizing((800,), 1333, 800)) == [(800, 1344), (1344, 800), (1344, 1344)]
    assert canvases(Sizing.square(96)) == [(96, 96)]
    assert fit((192, 288), canvases(Sizing((160, 192, 224), 320, 192))) == (224, 320)
    assert fit((320, 320), [(224, 320), (320, 224)]) is None


def _photo_sizes(n: int, seed: int) -> list[tuple[int, int]]:
    """(width, height) of COCO-like photos: 72 % landscape, 24 % portrait, 4 % square."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        long = rng.randint(300, 640)
        short = round(long / rng.choice((4 / 3, 16 / 9, 3 / 2, 1.25)))
        kind = rng.random()
        out.append((long, short) if kind < 0.72 else (short, long) if kind < 0.96 else (long,) * 2)
    return out


def _padded(sizes, sizing: Sizing, rng: random.Random) -> tuple[int, int]:
    """The transform's padded (H, W) for images of ``sizes``, a scale drawn per image."""
    hs, ws = [], []
    for w, h in sizes:
        short, long = sizing.resized(min(w, h), max(w, h), rng.choice(sizing.min_size))
        hs.append(short if h <= w else long)
        ws.append(long if h <= w else short)
    return tuple(-(-max(v) // SIZE_DIVISIBLE) * SIZE_DIVISIBLE for v in (hs, ws))


@pytest.mark.parametrize(
    "sizing", [Sizing((640, 672, 704, 736, 768, 800), 1333, 800), Sizing((160, 192, 224), 320, 192)]
)
def test_every_grouped_batch_of_mixed_photos_lands_on_a_canvas(sizing):
    sizes = _photo_sizes(403, seed=1)
    options, rng = canvases(sizing), random.Random(0)
    used = set()
    for batch in (1, 2, 4, 8):
        for world in (1, 2):
            for epoch in range(3):
                for rank in range(world):
                    batches = GroupedBatches(
                        aspect_groups(sizes), batch, world_size=world, rank=rank, seed=0,
                        epoch=epoch,
                    )  # fmt: skip
                    for b in batches:
                        canvas = fit(_padded([sizes[i] for i in b], sizing, rng), options)
                        assert canvas is not None, (batch, [sizes[i] for i in b])
                        used.add(canvas)
    assert used == set(options)  # each canvas serves batches


def test_the_padded_size_model_is_the_transforms():
    """``_padded`` above is checked against torchvision's transform itself."""
    sizing = Sizing((96, 128), 160, 128)
    model = _detector("fcos_resnet18_fpn", "gn", "gn", sizing)
    model.transform.train()
    for sizes in ([(150, 90), (100, 70)], [(60, 140), (90, 150)], [(150, 90), (70, 100)]):
        torch.manual_seed(0)
        images = [torch.rand(3, h, w) for w, h in sizes]
        rng_state = torch.get_rng_state()
        shape = tuple(model.transform(images)[0].tensors.shape[-2:])
        torch.set_rng_state(rng_state)
        # torchvision draws min_size with torch's RNG: replay its draws
        drawn = [sizing.min_size[int(torch.empty(1).uniform_(0.0, 2.0).item())] for _ in sizes]
        rng = _Replay(drawn)
        assert _padded(sizes, sizing, rng) == shape


class _Replay:
    def __init__(self, values):
        self.values = list(values)

    def choice(self, _options):
        return self.values.pop(0)


def _detector(arch, kind, head, sizing):
    choice = {
        "backbone": NormChoice("backbone", kind, False),
        "neck": NormChoice("neck", kind, False),
        "head": NormChoice("head", head, head == "gn"),
    }
    torch.manual_seed(0)
    return build_model(
        arch, 3, choice, sizing=sizing, fpn_channels=32, gn_groups=8, brn={"warmup_steps": 2}
    )


def _targets(sizes):
    return [
        {"boxes": torch.tensor([[4.0, 6.0, w * 0.6, h * 0.7]], dtype=torch.float64),
         "labels": torch.tensor([1 + i % 3])}
        for i, (w, h) in enumerate(sizes)
    ]  # fmt: skip


@pytest.mark.parametrize(
    "arch,kind,head",
    [
        ("fcos_resnet18_fpn", "bn", "gn"),
        ("fcos_resnet18_fpn", "brn", "bn"),  # a BN-family head: one layer per level
        ("retinanet_resnet18_fpn", "gn", "gn"),
        ("retinanet_resnet18_fpn", "frozenbn", "gn"),
    ],
)
def test_training_on_canvases_equals_training_on_each_batch_alone(arch, kind, head):
    sizing = Sizing((64, 96), 128, 96)
    eager = _detector(arch, kind, head, sizing).double().train()
    routed = copy.deepcopy(eager)
    route_to_canvases(routed, canvas_parts(routed, canvases(sizing), "cpu"), batch=2)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.01)
    opt_r = torch.optim.SGD(routed.parameters(), lr=0.01)
    # a landscape batch with its content at the padded batch's edge, a portrait batch,
    # and a mixed one (the square canvas): Batch Renorm's r and d act from step 2 on
    batches = [[(120, 72), (80, 56)], [(48, 112), (72, 120)], [(120, 72), (56, 80)]]
    for step, sizes in enumerate(batches):
        torch.manual_seed(step)
        images = [torch.rand(3, h, w, dtype=torch.float64) for w, h in sizes]
        torch.manual_seed(100 + step)  # the same scale draws in both
        a = eager(images, _targets(sizes))
        torch.manual_seed(100 + step)
        b = routed(images, _targets(sizes))
        for key in a:
            torch.testing.assert_close(b[key], a[key], msg=key)
        sum(a.values()).backward()
        sum(b.values()).backward()
        pairs = zip(eager.named_parameters(), routed.named_parameters(), strict=True)
        for (key, p), (_, q) in pairs:
            if p.grad is not None:
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-7, atol=1e-10, msg=key)
        opt_e.step(), opt_r.step()
        opt_e.zero_grad(set_to_none=True), opt_r.zero_grad(set_to_none=True)
    for (key, u), (_, v) in zip(eager.named_buffers(), routed.named_buffers(), strict=True):
        torch.testing.assert_close(v, u, msg=key)
    assert routed.graph_counts.as_dict() == {"graph_replays": 3, "graph_eager": 0}
