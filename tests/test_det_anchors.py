"""TF ssd_anchor_generator default boxes."""
from __future__ import annotations

import math

import pytest
import torch

from backbone.errors import ArgumentError
from mnv2det.anchor_generator import DefaultBoxGenerator

SIZES_300 = [(19, 19), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)]
SIZES_320 = [(20, 20), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)]


def _box_yx(cy: float, cx: float, scale: float, ratio: float) -> list[float]:
    h, w = scale / math.sqrt(ratio), scale * math.sqrt(ratio)
    return [cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2]


def test_count_and_per_map_counts_300() -> None:
    gen = DefaultBoxGenerator()
    assert gen.num_anchors_per_location() == [3, 6, 6, 6, 6, 6]
    anchors = gen(SIZES_300)
    assert anchors.shape == (1917, 4)
    per_map = [h * w * n for (h, w), n in zip(SIZES_300, gen.num_anchors_per_location())]
    assert per_map == [1083, 600, 150, 54, 24, 6]


def test_first_anchors_match_tf_frozen_graph() -> None:
    yx = DefaultBoxGenerator().forward_yx(SIZES_300)
    tf_first = torch.tensor([[-0.02368, -0.02368, 0.07632, 0.07632],
                             [-0.04439, -0.11511, 0.09703, 0.16774]])
    assert torch.allclose(yx[:2], tf_first, atol=1e-4)


def test_hand_computed_anchors() -> None:
    yx = DefaultBoxGenerator().forward_yx(SIZES_300).double()
    scales = [0.2 + 0.75 * k / 5 for k in range(6)] + [1.0]
    # lowest map, cell (y=0, x=0): (0.1, 1), (0.2, 2), (0.2, 0.5)
    c = 0.5 / 19
    exp0 = [_box_yx(c, c, 0.1, 1.0), _box_yx(c, c, 0.2, 2.0), _box_yx(c, c, 0.2, 0.5)]
    assert torch.allclose(yx[:3], torch.tensor(exp0, dtype=torch.float64), atol=1e-6)
    # (y, x, anchor) order: cell (y=1, x=0) of the first map starts at (1 * 19 + 0) * 3
    i = (1 * 19 + 0) * 3
    assert torch.allclose(yx[i], torch.tensor(_box_yx(1.5 / 19, 0.5 / 19, 0.1, 1.0), dtype=torch.float64), atol=1e-6)
    # second map, first cell: ratios 1, 2, 1/2, 3, 1/3 at s1, then sqrt(s1 s2) at ratio 1
    start = 19 * 19 * 3
    c = 0.5 / 10
    s1, s2 = scales[1], scales[2]
    exp1 = [_box_yx(c, c, s1, a) for a in (1.0, 2.0, 0.5, 3.0, 1.0 / 3.0)] + [_box_yx(c, c, math.sqrt(s1 * s2), 1.0)]
    assert torch.allclose(yx[start:start + 6], torch.tensor(exp1, dtype=torch.float64), atol=1e-6)
    # last map (1x1): centre 0.5, scale 0.95, extra box sqrt(0.95 * 1.0); corners are NOT clipped
    exp_last = _box_yx(0.5, 0.5, math.sqrt(0.95), 1.0)
    assert torch.allclose(yx[-1], torch.tensor(exp_last, dtype=torch.float64), atol=1e-6)
    ratio3 = _box_yx(0.5, 0.5, 0.95, 3.0)
    assert ratio3[1] < 0  # wide box sticks out of the image
    assert torch.allclose(yx[-3], torch.tensor(ratio3, dtype=torch.float64), atol=1e-6)


def test_xy_is_permuted_yx_and_sizes_320() -> None:
    gen = DefaultBoxGenerator()
    xy, yx = gen(SIZES_320), gen.forward_yx(SIZES_320)
    assert xy.shape == (2034, 4)
    assert torch.equal(xy, yx[:, [1, 0, 3, 2]])
    # 20x20 lowest map: centre of the first cell is 0.5 / 20
    assert torch.allclose((xy[0, :2] + xy[0, 2:]) / 2, torch.full((2,), 0.025))
    # widths / heights: ratio-2 box is twice as wide as high
    w, h = xy[1, 2] - xy[1, 0], xy[1, 3] - xy[1, 1]
    assert torch.allclose(w / h, torch.tensor(2.0), atol=1e-5)


def test_cache_and_options() -> None:
    gen = DefaultBoxGenerator()
    a = gen(SIZES_300)
    assert gen(SIZES_300) is a  # cached
    assert gen(SIZES_320) is not a
    full = DefaultBoxGenerator(reduce_boxes_in_lowest_layer=False)
    assert full.num_anchors_per_location() == [6] * 6
    no_extra = DefaultBoxGenerator(interpolated_scale_aspect_ratio=0.0)
    assert no_extra.num_anchors_per_location() == [3, 5, 5, 5, 5, 5]


def test_non_square_input_keeps_anchors_square_in_pixels() -> None:
    gen = DefaultBoxGenerator()
    sizes = [(10, 20), (5, 10), (3, 5), (2, 3), (1, 2), (1, 1)]
    xy = gen(sizes, image_hw=(160, 320))
    w_px = (xy[:, 2] - xy[:, 0]) * 320
    h_px = (xy[:, 3] - xy[:, 1]) * 160
    ratios = torch.tensor([1.0, 2.0, 0.5] + ([1.0, 2.0, 0.5, 3.0, 1 / 3, 1.0] * 5))
    per_loc = torch.cat([ratios[:3].repeat(200)] + [ratios[3 + 6 * k: 9 + 6 * k].repeat(h * w)
                                                    for k, (h, w) in enumerate(sizes[1:])])
    assert torch.allclose(w_px / h_px, per_loc, rtol=1e-4)


def test_bad_config_and_layer_mismatch() -> None:
    with pytest.raises(ArgumentError, match="^min_scale "):
        DefaultBoxGenerator(min_scale=0.9, max_scale=0.2)
    with pytest.raises(ArgumentError, match="^num_layers "):
        DefaultBoxGenerator()(SIZES_300[:5])
