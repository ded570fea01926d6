"""Property-based tests (hypothesis) of the box coder, IoU, matcher and both tasks' augmentations.

Each property draws a few dozen random cases (``max_examples`` below keeps the file well under a
minute on 2 CPU cores). Properties:

1. ``BoxCoder``: decode(encode(b, a), a) == b for both code orders, broadcast (B, A, 4) vs (A, 4);
   the "yx" codes are the "xy" codes permuted (with the weights permuted likewise).
2. ``batched_box_iou``: symmetric, in [0, 1], 1 on the diagonal, 0 for disjoint boxes, equal to
   ``torchvision.ops.box_iou``.
3. ``match``: batched over a padded batch == a plain per-image reference written from the module
   docstring. Coordinates lie on a 1/16 grid so that every IoU is computed exactly in float32 and
   float64 alike (ties are exact ties, thresholds are dyadic), and boxes / anchors are drawn with
   duplicates so that both tie rules (lowest anchor, lowest box) are exercised.
4. Detection augmentation (every recipe): output boxes lie in [0, S]^2 with positive size, and the
   painted rectangle's colour is inside its output box and not far outside it.
5. Segmentation augmentation: the object's colour lies under its mask class (up to the resize's
   interpolation band) and padding (and only padding) carries the ignore index 255.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from scipy import ndimage
from torchvision.ops import box_iou

from mnv2det.box_coder import BoxCoder
from mnv2det.matcher import BACKGROUND, IGNORE, batched_box_iou, match
from mnv2det.transforms import build_train_transform
from mnv2seg.transforms import train_transform

ROOT = Path(__file__).resolve().parents[1]
UNIT_NORM = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}  # output = pixel / 255
FAST = dict(deadline=None, database=None,  # no .hypothesis/ example database in the tree
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------------------------------------
# 1. Box coder
# ---------------------------------------------------------------------------------------------

def _box(lo: float = -0.2, hi: float = 1.0, min_size: float = 0.02, max_size: float = 1.0):
    """xyxy box with corner in [lo, hi] and sides in [min_size, max_size] (inside [0, 1]^2 and a bit out)."""
    coord = st.floats(lo, hi, allow_nan=False, allow_infinity=False)
    side = st.floats(min_size, max_size, allow_nan=False, allow_infinity=False)
    return st.tuples(coord, coord, side, side).map(lambda t: (t[0], t[1], t[0] + t[2], t[1] + t[3]))


@settings(max_examples=40, **FAST)
@given(data=st.data(), order=st.sampled_from(["xy", "yx"]), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_box_coder_roundtrip(data, order, dtype):
    B = data.draw(st.integers(1, 3), label="B")
    A = data.draw(st.integers(1, 6), label="A")
    # sizes in [0.02, 1]: size ratios stay below exp(clip) = 62.5, where decode is exact
    anchors = torch.tensor(data.draw(st.lists(_box(), min_size=A, max_size=A), label="anchors"), dtype=dtype)
    boxes = torch.tensor(data.draw(st.lists(st.lists(_box(), min_size=A, max_size=A), min_size=B, max_size=B),
                                   label="boxes"), dtype=dtype)
    weights = data.draw(st.tuples(*[st.floats(0.5, 20.0)] * 4), label="weights")
    coder = BoxCoder(weights=weights, order=order)
    codes = coder.encode(boxes, anchors)
    assert codes.shape == (B, A, 4) and codes.dtype == dtype
    assert torch.isfinite(codes).all()
    decoded = coder.decode(codes, anchors)
    assert decoded.shape == (B, A, 4)
    torch.testing.assert_close(decoded, boxes, atol=1e-4, rtol=0)
    # the broadcast encode equals the per-image one
    for b in range(B):
        torch.testing.assert_close(coder.encode(boxes[b], anchors), codes[b], atol=1e-6, rtol=1e-6)


@settings(max_examples=30, **FAST)
@given(data=st.data())
def test_box_coder_yx_is_xy_permuted(data):
    """Codes in "yx" order are the "xy" codes as (ty, tx, th, tw), weights given in the codes' order."""
    A = data.draw(st.integers(1, 6), label="A")
    anchors = torch.tensor(data.draw(st.lists(_box(), min_size=A, max_size=A)), dtype=torch.float64)
    boxes = torch.tensor(data.draw(st.lists(_box(), min_size=A, max_size=A)), dtype=torch.float64)
    wx, wy, ww, wh = data.draw(st.tuples(*[st.floats(0.5, 20.0)] * 4), label="weights")
    xy = BoxCoder(weights=(wx, wy, ww, wh), order="xy")
    yx = BoxCoder(weights=(wy, wx, wh, ww), order="yx")
    c_xy, c_yx = xy.encode(boxes, anchors), yx.encode(boxes, anchors)
    torch.testing.assert_close(c_yx, c_xy[..., [1, 0, 3, 2]], atol=1e-9, rtol=1e-9)
    # an anchor encodes to zeros against itself
    torch.testing.assert_close(xy.encode(anchors, anchors), torch.zeros_like(anchors), atol=1e-6, rtol=0)
    # decoding the same codes read in either layout gives the same boxes
    torch.testing.assert_close(yx.decode(c_xy[..., [1, 0, 3, 2]], anchors), xy.decode(c_xy, anchors),
                               atol=1e-9, rtol=1e-9)


# ---------------------------------------------------------------------------------------------
# 2. IoU
# ---------------------------------------------------------------------------------------------

def _boxes(n_min: int, n_max: int, min_size: float = 0.0):
    return st.lists(_box(lo=0.0, hi=1.0, min_size=min_size, max_size=1.0), min_size=n_min, max_size=n_max)


def _iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(M, 4) x (N, 4) -> (M, N) through the batched function."""
    return batched_box_iou(a[None], b)[0]


@settings(max_examples=40, **FAST)
@given(a=_boxes(1, 6), b=_boxes(1, 6))
def test_iou_symmetric_and_bounded(a, b):
    """Holds for degenerate (zero-size) boxes too: no NaN, 0 where the union is empty."""
    a, b = torch.tensor(a), torch.tensor(b)
    ab, ba = _iou(a, b), _iou(b, a)
    assert ab.shape == (len(a), len(b))
    assert torch.isfinite(ab).all()
    assert (ab >= 0).all() and (ab <= 1 + 1e-6).all()
    torch.testing.assert_close(ab, ba.T, atol=1e-6, rtol=0)


@settings(max_examples=40, **FAST)
@given(a=_boxes(1, 6, min_size=1e-3), b=_boxes(1, 6, min_size=1e-3), batch=st.integers(1, 3))
def test_iou_matches_torchvision_and_diagonal(a, b, batch):
    a, b = torch.tensor(a), torch.tensor(b)
    torch.testing.assert_close(_iou(a, b), box_iou(a, b), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.diagonal(_iou(a, a)), torch.ones(len(a)), atol=1e-5, rtol=0)
    # batched: every image's row block is its own IoU matrix
    stacked = torch.stack([a.roll(i, 0) for i in range(batch)])
    out = batched_box_iou(stacked, b)
    assert out.shape == (batch, len(a), len(b))
    for i in range(batch):
        torch.testing.assert_close(out[i], box_iou(a.roll(i, 0), b), atol=1e-5, rtol=1e-5)


@settings(max_examples=40, **FAST)
@given(a=_boxes(1, 6), b=_boxes(1, 6), gap=st.floats(0.0, 0.5), axis=st.sampled_from([0, 1]),
       after=st.booleans())
def test_iou_disjoint_is_zero(a, b, gap, axis, after):
    """Shift every box of b past every box of a (touching when gap == 0): all IoUs are 0."""
    a, b = torch.tensor(a), torch.tensor(b)
    if after:
        shift = a[:, 2 + axis].max() - b[:, axis].min() + gap
    else:
        shift = a[:, axis].min() - b[:, 2 + axis].max() - gap
    b = b.clone()
    b[:, [axis, 2 + axis]] += shift
    # float rounding of the shift may leave a hair of overlap: only exact separation is asserted
    sep = (b[:, axis].min() >= a[:, 2 + axis].max()) if after else (b[:, 2 + axis].max() <= a[:, axis].min())
    assume(bool(sep))
    assert (_iou(a, b) == 0).all()
    assert (_iou(b, a) == 0).all()


# ---------------------------------------------------------------------------------------------
# 3. Matcher
# ---------------------------------------------------------------------------------------------

G = 16  # grid: coordinates are k / 16, so IoUs are exact rationals of small denominators
THRESHOLDS = [0.25, 0.375, 0.5, 0.625, 0.75]  # dyadic: float32 and float64 compare alike


def _grid_box(k_lo: int, k_hi: int, s_min: int, s_max: int):
    k, s = st.integers(k_lo, k_hi), st.integers(s_min, s_max)
    return st.tuples(k, k, s, s).map(lambda t: (t[0] / G, t[1] / G, (t[0] + t[2]) / G, (t[1] + t[3]) / G))


def _with_duplicates(data, items: list, label: str) -> list:
    """items plus copies of some of them, shuffled: exact ties at varied indices."""
    if items:
        idx = data.draw(st.lists(st.integers(0, len(items) - 1), max_size=3), label=f"{label}_dups")
        items = items + [items[i] for i in idx]
    return data.draw(st.permutations(items), label=f"{label}_order") if items else items


def _near_anchor(anchors: list):
    """An anchor with its right (or bottom) side moved by -w .. +w grid steps: IoU = k / w or w / k."""
    @st.composite
    def draw(draw_):
        x0, y0, x1, y1 = draw_(st.sampled_from(anchors))
        axis = draw_(st.sampled_from([0, 1]))
        w = round(((x1 - x0) if axis == 0 else (y1 - y0)) * G)
        end = (x0 if axis == 0 else y0) + draw_(st.integers(0, 2 * w)) / G
        return (x0, y0, end, y1) if axis == 0 else (x0, y0, x1, end)
    return draw()


def _ref_iou(a: tuple, b: tuple) -> np.float32:
    """IoU in float32 like the matcher: on the 1/16 grid every step but the division is exact, so the
    two agree bit for bit (exact ties stay ties, thresholds compare alike)."""
    f = np.float32
    iw = max(f(0), f(min(a[2], b[2])) - f(max(a[0], b[0])))
    ih = max(f(0), f(min(a[3], b[3])) - f(max(a[1], b[1])))
    inter = iw * ih
    area = lambda r: max(f(0), f(r[2]) - f(r[0])) * max(f(0), f(r[3]) - f(r[1]))  # noqa: E731
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else f(0)


def _reference_match_image(boxes, valid, crowd, anchors, pos, neg, force):
    """One image, written from the matcher's docstring with plain loops."""
    normal = [m for m in range(len(boxes)) if valid[m] and not crowd[m]]
    crowds = [m for m in range(len(boxes)) if valid[m] and crowd[m]]
    iou = {(m, a): _ref_iou(boxes[m], anchors[a]) for m in normal + crowds for a in range(len(anchors))}
    out = []
    for a in range(len(anchors)):
        best, best_m = np.float32(-1), None
        for m in normal:  # strict '>': the lowest box index wins a tie
            if iou[m, a] > best:
                best, best_m = iou[m, a], m
        if best >= pos:
            out.append(best_m)
        elif best >= neg:
            out.append(IGNORE)
        elif any(iou[m, a] >= neg for m in crowds):
            out.append(IGNORE)  # would-be negative overlapping a crowd region
        else:
            out.append(BACKGROUND)
    if force:
        forced: dict[int, int] = {}
        for m in normal:  # ascending: the first (lowest) box to claim an anchor keeps it
            best, best_a = np.float32(-1), None
            for a in range(len(anchors)):  # strict '>': the lowest anchor index wins a tie
                if iou[m, a] > best:
                    best, best_a = iou[m, a], a
            if best > 0 and best_a not in forced:  # boxes overlapping no anchor are not forced
                forced[best_a] = m
        for a, m in forced.items():
            out[a] = m
    return out


@settings(max_examples=60, **FAST)
@given(data=st.data())
def test_match_equals_per_image_reference(data):
    A0 = data.draw(st.integers(1, 8), label="A0")
    anchors = data.draw(st.lists(_grid_box(0, 12, 1, 8), min_size=A0, max_size=A0), label="anchors")
    anchors = _with_duplicates(data, anchors, "anchors")
    B = data.draw(st.integers(1, 3), label="B")
    # valid boxes: on the anchors' grid, some zero-size, some far off (overlapping no anchor), and
    # many cut from / grown out of an anchor (IoU k / w); copies of boxes make exact ties
    near = _near_anchor(anchors)
    box_st = st.one_of(near, near, _grid_box(-4, 16, 0, 8), _grid_box(20, 30, 1, 4))
    reals = [_with_duplicates(data, data.draw(st.lists(box_st, max_size=4), label=f"boxes{b}"), f"boxes{b}")
             for b in range(B)]
    M = max(map(len, reals)) + data.draw(st.integers(0, 2), label="extra_pad")
    pad_st = st.one_of(box_st, st.tuples(*[st.sampled_from([-5.0, 0.0, 1.0, 7.0, float("nan")])] * 4))
    images = []
    for b, real in enumerate(reals):
        pad = data.draw(st.lists(pad_st, min_size=M - len(real), max_size=M - len(real)), label=f"pad{b}")
        crowd = data.draw(st.lists(st.booleans(), min_size=M, max_size=M), label=f"crowd{b}")
        images.append((real + pad, [m < len(real) for m in range(M)], crowd))
    # thresholds: dyadic ones, or IoUs that occur in the batch (so that some IoUs sit exactly on them)
    seen = sorted({float(_ref_iou(box, a)) for real in reals for box in real for a in anchors} - {0.0})
    pos = data.draw(st.sampled_from(THRESHOLDS + seen), label="pos")
    neg = data.draw(st.sampled_from([t for t in [0.0] + THRESHOLDS + seen if t <= pos]), label="neg")
    force = data.draw(st.booleans(), label="force")

    gt_boxes = torch.tensor([im[0] for im in images], dtype=torch.float32).reshape(B, M, 4)
    gt_valid = torch.tensor([im[1] for im in images], dtype=torch.bool).reshape(B, M)
    gt_crowd = torch.tensor([im[2] for im in images], dtype=torch.bool).reshape(B, M)
    got = match(gt_boxes, gt_valid, gt_crowd, torch.tensor(anchors, dtype=torch.float32),
                iou_threshold=pos, negative_threshold=neg, force_match=force)
    assert got.shape == (B, len(anchors)) and got.dtype == torch.long
    for b, (boxes, valid, crowd) in enumerate(images):
        want = _reference_match_image(boxes, valid, crowd, anchors, np.float32(pos), np.float32(neg), force)
        assert got[b].tolist() == want, f"image {b}"


# ---------------------------------------------------------------------------------------------
# 4. Detection augmentation
# ---------------------------------------------------------------------------------------------

def _light() -> dict:
    return yaml.safe_load((ROOT / "conf" / "data" / "augment" / "light.yaml").read_text())


DET_RECIPES = {
    "tf": {"recipe": "tf"},
    "torchvision": {"recipe": "torchvision"},
    "light": _light(),
    # the photometric jitter recolours every pixel by design (a per-pixel colour map that moves
    # nothing): the colour checks run on the geometric part of each recipe
    "torchvision-geometric": {"recipe": "torchvision", "photometric_p": 0.0},
    "light-geometric": {**_light(), "photometric_p": 0.0},
}


def _colour(lo: int = 0):
    return st.tuples(*[st.integers(lo, 255)] * 3)


def _near(img: np.ndarray, colour, tol: int = 2) -> np.ndarray:
    """img (H, W, 3) int -> (H, W) bool: within tol of colour in every channel."""
    return (np.abs(img - np.asarray(colour)[None, None]) <= tol).all(-1)


@pytest.mark.parametrize("recipe", list(DET_RECIPES))
@settings(max_examples=25, **FAST)
@given(data=st.data(), seed=st.integers(0, 2**31 - 1), S=st.sampled_from([32, 48, 64]))
def test_det_augment_keeps_boxes_on_their_pixels(recipe, data, seed, S):
    augment = DET_RECIPES[recipe]
    H, W = data.draw(st.integers(48, 128), label="H"), data.draw(st.integers(48, 128), label="W")
    x0 = data.draw(st.integers(0, W - 8), label="x0")
    y0 = data.draw(st.integers(0, H - 8), label="y0")
    x1 = data.draw(st.integers(x0 + 8, W), label="x1")
    y1 = data.draw(st.integers(y0 + 8, H), label="y1")
    paint = data.draw(_colour(), label="paint")
    assume(max(paint) >= 60)  # far from the zoom-out canvas (mean colour 0 here)
    ch = data.draw(st.integers(0, 2), label="channel")
    bg = list(data.draw(_colour(), label="bg"))
    bg[ch] = (paint[ch] + 128 + data.draw(st.integers(-40, 40), label="delta")) % 256  # >= 88 apart
    img = np.empty((H, W, 3), np.uint8)
    img[...] = bg
    img[y0:y1, x0:x1] = paint
    # unpainted extra boxes change which crops are drawn and which boxes survive
    n_extra = data.draw(st.integers(0, 2), label="n_extra")
    extra = [data.draw(st.tuples(st.integers(0, W - 2), st.integers(0, H - 2)), label=f"extra{i}")
             for i in range(n_extra)]
    extra = [(x, y, data.draw(st.integers(x + 1, W)), data.draw(st.integers(y + 1, H))) for x, y in extra]
    boxes = np.array([(x0, y0, x1, y1), *extra], np.float32)
    labels = np.arange(1, len(boxes) + 1)
    target = {"boxes": boxes, "labels": labels, "crowd": np.zeros(len(boxes), bool), "image_id": 7}

    tf = build_train_transform(S, normalize=UNIT_NORM, augment=augment, seed=seed)
    out, t = tf(img, target)
    assert tuple(out.shape) == (3, S, S)
    ob = t["boxes"]
    assert ob.shape[1] == 4 and len(ob) == len(t["labels"]) == len(t["crowd"]) and t["image_id"] == 7
    assert np.isfinite(ob).all()
    assert (ob >= 0).all() and (ob[:, [0, 2]] <= S).all() and (ob[:, [1, 3]] <= S).all(), ob
    assert (ob[:, 2] > ob[:, 0]).all() and (ob[:, 3] > ob[:, 1]).all(), ob
    assert set(t["labels"].tolist()) <= set(labels.tolist())

    if recipe in ("torchvision", "light") or 1 not in t["labels"].tolist():
        return  # colours jittered, or the painted box was cropped away: nothing more to check
    bx0, by0, bx1, by1 = ob[t["labels"].tolist().index(1)]
    pix = np.rint(out.numpy().transpose(1, 2, 0) * 255).astype(np.int64)
    # bilinear resize blurs an edge over ~1 source pixel = up to S / (smallest crop side) output pixels
    # (crops keep >= 0.1 of the area with aspect in [0.5, 2] (tf), or sides >= 0.3 (torchvision))
    margin = math.ceil(S / (0.22 * min(H, W) - 1)) + 1
    ys, xs = np.mgrid[0:S, 0:S] + 0.5  # pixel centres
    inner = (xs > bx0 + margin) & (xs < bx1 - margin) & (ys > by0 + margin) & (ys < by1 - margin)
    outer = (xs < bx0 - margin) | (xs > bx1 + margin) | (ys < by0 - margin) | (ys > by1 + margin)
    is_paint = _near(pix, paint)
    assert is_paint[inner].all(), f"{(~is_paint[inner]).sum()} px inside the box are not the painted colour"
    assert not is_paint[outer].any(), f"{is_paint[outer].sum()} px of the painted colour far outside its box"
    inside = (xs > bx0) & (xs < bx1) & (ys > by0) & (ys < by1)
    if (bx1 - bx0) > 2 * margin and (by1 - by0) > 2 * margin:
        assert is_paint[inside].any()


# ---------------------------------------------------------------------------------------------
# 5. Segmentation augmentation
# ---------------------------------------------------------------------------------------------

@settings(max_examples=40, **FAST)
@given(data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_seg_augment_keeps_mask_aligned(data, seed):
    H, W = data.draw(st.integers(16, 80), label="H"), data.draw(st.integers(16, 80), label="W")
    crop = data.draw(st.one_of(st.integers(8, 64), st.tuples(st.integers(8, 64), st.integers(8, 64))), label="crop")
    scale_min = data.draw(st.sampled_from([0.5, 0.75, 1.0, 1.25]), label="scale_min")
    scale_max = data.draw(st.sampled_from([s for s in [0.5, 0.75, 1.0, 1.5, 2.0] if s >= scale_min]),
                          label="scale_max")
    hflip = data.draw(st.booleans(), label="hflip")
    cls = data.draw(st.integers(1, 20), label="cls")
    x0, y0 = data.draw(st.integers(0, W - 4), label="x0"), data.draw(st.integers(0, H - 4), label="y0")
    x1, y1 = data.draw(st.integers(x0 + 4, W), label="x1"), data.draw(st.integers(y0 + 4, H), label="y1")
    # all channels >= 30 so that no interpolated pixel is the padding's 0; the two colours >= 60 apart
    paint = data.draw(_colour(30), label="paint")
    ch = data.draw(st.integers(0, 2), label="channel")
    bg = list(data.draw(_colour(30), label="bg"))
    bg[ch] = paint[ch] + 60 if paint[ch] <= 195 else paint[ch] - 60
    img = np.empty((H, W, 3), np.uint8)
    img[...] = bg
    img[y0:y1, x0:x1] = paint
    mask = np.zeros((H, W), np.uint8)
    mask[y0:y1, x0:x1] = cls

    tf = train_transform(crop, scale_min=scale_min, scale_max=scale_max, hflip=hflip, normalize=UNIT_NORM)
    tf.set_random_seed(seed)
    out = tf(image=img, mask=mask)
    ch_, cw_ = (crop, crop) if isinstance(crop, int) else crop
    assert tuple(out["image"].shape) == (3, ch_, cw_) and tuple(out["mask"].shape) == (ch_, cw_)
    pix = np.rint(out["image"].numpy().transpose(1, 2, 0) * 255).astype(np.int64)
    m = np.asarray(out["mask"])
    assert set(np.unique(m).tolist()) <= {0, cls, 255}
    # padding (mean pixel = 0 here) and the ignore label coincide exactly (padding is not interpolated)
    padded = (pix == 0).all(-1)
    np.testing.assert_array_equal(m == 255, padded)
    # away from the object's border (linear image vs nearest mask resize), colours follow the mask;
    # the crop's own border counts as a possible class border too (the object may end just outside)
    band = max(2, math.ceil(scale_max) + 1)
    for k, colour in ((cls, paint), (0, bg)):
        core = ndimage.binary_erosion(m == k, iterations=band, border_value=0)
        near = _near(pix, colour)
        assert near[core].all(), f"class {k}: {(~near[core]).sum()} px under the mask lack its colour"
