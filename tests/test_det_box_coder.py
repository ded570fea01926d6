"""Faster R-CNN box coder (TF scales 10/10/5/5), both code orders."""
from __future__ import annotations

import math

import pytest
import torch

from backbone.errors import ArgumentError
from mnv2det.box_coder import BoxCoder


def _random_boxes(n: int, gen: torch.Generator) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=gen) * 0.7
    wh = torch.rand(n, 2, generator=gen) * 0.3 + 0.02
    return torch.cat([xy, xy + wh], dim=1)


@pytest.mark.parametrize("order", ["xy", "yx"])
def test_round_trip_with_batch_broadcast(order: str) -> None:
    gen = torch.Generator().manual_seed(0)
    anchors = _random_boxes(50, gen)  # (A, 4)
    boxes = torch.stack([_random_boxes(50, gen) for _ in range(3)])  # (B, A, 4)
    coder = BoxCoder(order=order)
    codes = coder.encode(boxes, anchors)
    assert codes.shape == (3, 50, 4)
    assert torch.allclose(coder.decode(codes, anchors), boxes, atol=1e-5)


def test_hand_computed_codes_and_orders() -> None:
    anchor = torch.tensor([[0.0, 0.0, 0.2, 0.4]])  # cx .1 cy .2 w .2 h .4
    box = torch.tensor([[0.05, 0.1, 0.25, 0.9]])  # cx .15 cy .5 w .2 h .8
    tx, ty = 10 * (0.15 - 0.1) / 0.2, 10 * (0.5 - 0.2) / 0.4
    tw, th = 5 * math.log(0.2 / 0.2), 5 * math.log(0.8 / 0.4)
    xy = BoxCoder(order="xy").encode(box, anchor)
    yx = BoxCoder(order="yx").encode(box, anchor)
    assert torch.allclose(xy, torch.tensor([[tx, ty, tw, th]]), atol=1e-5)
    assert torch.allclose(yx, torch.tensor([[ty, tx, th, tw]]), atol=1e-5)  # TF layout


def test_weights_follow_code_order() -> None:
    anchor = torch.tensor([[0.0, 0.0, 0.2, 0.4]])
    box = torch.tensor([[0.05, 0.1, 0.25, 0.9]])
    # non-symmetric weights: first weight scales the first code of each layout
    xy = BoxCoder((1.0, 2.0, 3.0, 4.0), order="xy").encode(box, anchor)
    ref = BoxCoder((1.0, 1.0, 1.0, 1.0), order="xy").encode(box, anchor)
    assert torch.allclose(xy, ref * torch.tensor([1.0, 2.0, 3.0, 4.0]), atol=1e-6)
    yx = BoxCoder((1.0, 2.0, 3.0, 4.0), order="yx").encode(box, anchor)
    assert torch.allclose(yx, ref[:, [1, 0, 3, 2]] * torch.tensor([1.0, 2.0, 3.0, 4.0]), atol=1e-6)
    assert torch.allclose(BoxCoder((1.0, 2.0, 3.0, 4.0), order="yx").decode(yx, anchor), box, atol=1e-5)


def test_decode_clamps_huge_sizes() -> None:
    anchors = torch.tensor([[0.4, 0.4, 0.6, 0.6]])
    out = BoxCoder().decode(torch.tensor([[0.0, 0.0, 1e4, 1e4]]), anchors)
    assert torch.isfinite(out).all()
    w = out[0, 2] - out[0, 0]
    assert torch.allclose(w, torch.tensor(0.2 * 1000 / 16), rtol=1e-4)


def test_bad_arguments() -> None:
    with pytest.raises(ArgumentError, match="^order "):
        BoxCoder(order="ab")
    with pytest.raises(ArgumentError, match="^weights "):
        BoxCoder((10.0, 10.0, 5.0))
