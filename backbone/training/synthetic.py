"""Synthetic shape scenes written in the real COCO 2017 and PASCAL VOC 2012 on-disk layouts.

The project's embedded default data: one set of scenes, stored twice, so that the detection and
segmentation pipelines read exactly the files they would read for the real datasets and can be
trained end to end on a CPU in minutes.

Layout written by :func:`generate` under ``DIR``::

    DIR/coco/train2017/*.jpg, DIR/coco/val2017/*.jpg
    DIR/coco/annotations/instances_{train,val}2017.json
    DIR/VOCdevkit/VOC2012/JPEGImages/*.jpg              (the same JPEG bytes, same file stem)
    DIR/VOCdevkit/VOC2012/SegmentationClass/*.png       ("P" mode, standard VOC palette)
    DIR/VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val,trainval}.txt
    DIR/.complete                                       (json of the arguments, written last)

Scenes: ``K = 6`` classes (:data:`CLASS_NAMES`), each with its own shape, colour family and
texture, drawn as polygons over a procedural background (value noise, gradients, stripes in
random low-saturation colours). Images are non-square (short side ``0.75*size .. size``, aspect
``1 .. 4/3`` in either orientation); objects range from COCO "small" (< 32^2 px) to "large"
(> 96^2 px) at the default size; 1..8 objects per image, and every ``EMPTY_EVERY``-th image of
each split (index 0 included) has none, as COCO has images without annotations.

Format choices:

* COCO ``categories`` use the non-contiguous ids :data:`CATEGORY_IDS` (like COCO's 1..90 with
  gaps), so loaders must map ids to contiguous labels. Image ids: train ``1..N``, val
  ``VAL_ID_OFFSET + 1 ..``; file names are the 12-digit zero-padded id (``000000000001.jpg``)
  as in COCO 2017; annotation ids are unique over both files.
* ``segmentation`` is a single polygon (the ring is a "C" with a gap, so it is a simple polygon
  without holes); it is the exact polygon the renderer filled, with the pixel-centre convention
  that pycocotools uses (pixel ``(i, j)`` covers ``[j, j+1) x [i, i+1)`` and belongs to the shape
  when its centre ``(j+0.5, i+0.5)`` is inside). ``bbox`` is the polygon's tight xywh box and
  ``area`` its shoelace area. Coordinates are rounded to 0.01 px before drawing, so the file
  holds exactly what was drawn.
* Occlusion: later objects are drawn over earlier ones. COCO keeps each object's full outline
  (as COCO annotators outline occluded objects); the VOC mask holds the visible pixels only. An
  object that would leave an earlier one less than ``MIN_VISIBLE`` visible is not placed at all,
  so no hidden object appears in either format.
* ``iscrowd`` is 0 everywhere: VOC has no crowd regions, and keeping both formats describing the
  same instances keeps them comparable. Evaluators still handle ``iscrowd`` as usual.
* Objects lie entirely inside the image (no truncation), so polygons need no clipping.
* VOC masks: 0 = background, ``1..K`` = class index in :data:`CLASS_NAMES` order (the order of
  the COCO categories), 255 = "void" band about ``2*BAND_RADIUS+2`` px wide on every instance
  boundary, as in VOC. A tiny object the band would swallow completely keeps its pixels.

Determinism: scene ``i`` of a split is drawn from ``numpy.random.default_rng([seed, split, i])``,
so the same seed gives byte-identical json files and identical pixels, and the first ``n``
scenes do not depend on ``num_train``/``num_val``.
"""
from __future__ import annotations

import colorsys
import io
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from backbone.errors import ConfigError, DataError
from backbone.training.voc_format import IGNORE_INDEX, voc_palette

__all__ = [
    "CLASS_NAMES",
    "CATEGORY_IDS",
    "DEFAULTS",
    "coco_root",
    "voc_root",
    "render_scene",
    "generate",
    "ensure_synthetic",
]

CLASS_NAMES: tuple[str, ...] = ("disc", "square", "triangle", "star", "ring", "cross")
CATEGORY_IDS: tuple[int, ...] = (1, 3, 7, 12, 18, 25)
SUPERCATEGORY = "shape"

DEFAULTS: dict[str, int] = {"num_train": 512, "num_val": 128, "size": 256, "seed": 0}
GENERATOR_VERSION = 2  # bump when the scenes change, so ensure_synthetic regenerates
MARKER = ".complete"
SPLITS = ("train", "val")
VAL_ID_OFFSET = 1_000_000
EMPTY_EVERY = 10  # image i of a split has no objects when i % EMPTY_EVERY == 0
MAX_OBJECTS = 8
MIN_VISIBLE = 0.3  # fraction of an object's pixels that must stay visible
MIN_RADIUS_PX = 7.0
RADIUS_RANGE = (0.05, 0.5)  # circumradius as a fraction of the short side
RADIUS_SKEW = 0.75  # log-radius = u**skew of the log range: < 1 favours larger objects
BAND_RADIUS = 1  # void band: 2 px boundary pairs dilated by this many px
JPEG_QUALITY = 90

# Hue centre of each class's colour family (red, blue, green, yellow, magenta, cyan).
_HUES = (0.0, 0.62, 0.33, 0.14, 0.83, 0.5)


# --------------------------------------------------------------------------------------- paths
def coco_root(root: Path | str) -> Path:
    """``root/coco``: holds ``train2017/``, ``val2017/`` and ``annotations/``."""
    return Path(root) / "coco"


def voc_root(root: Path | str) -> Path:
    """``root/VOCdevkit/VOC2012``: holds ``JPEGImages/``, ``SegmentationClass/``, ``ImageSets/``."""
    return Path(root) / "VOCdevkit" / "VOC2012"


# ---------------------------------------------------------------------------------- geometry
def _rasterize(poly: np.ndarray, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """Even-odd fill of a polygon on the pixel grid of a crop.

    poly: (P, 2) xy in image coordinates; the crop covers pixels ``x0..x0+w-1, y0..y0+h-1``.
    Returns (h, w) bool: pixel centre (x+0.5, y+0.5) inside the polygon (pycocotools' convention).
    Vectorised: crossings of every row centre with every edge, then a cumulative parity.
    """
    x1, y1 = poly[:, 0] - x0, poly[:, 1] - y0
    x2, y2 = np.roll(x1, -1), np.roll(y1, -1)
    yc = np.arange(h, dtype=np.float64)[:, None] + 0.5
    crosses = (y1 <= yc) != (y2 <= yc)  # (h, P): half-open rule counts shared vertices once
    rows, edges = np.nonzero(crosses)
    dy = (y2 - y1)[edges]
    xi = x1[edges] + (yc[rows, 0] - y1[edges]) * (x2 - x1)[edges] / dy
    # first pixel whose centre lies right of the crossing starts a toggle
    col = np.clip(np.floor(xi - 0.5).astype(np.int64) + 1, 0, w)
    toggles = np.zeros((h, w + 1), dtype=np.int32)
    np.add.at(toggles, (rows, col), 1)
    return (np.cumsum(toggles[:, :w], axis=1) & 1).astype(bool)


def _shoelace(poly: np.ndarray) -> float:
    x, y = poly[:, 0], poly[:, 1]
    return float(0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _unit_shape(cls: int, radius: float) -> np.ndarray:
    """Class ``cls`` as a counter-clockwise polygon (P, 2) of circumradius 1 about the origin."""
    name = CLASS_NAMES[cls]
    if name == "disc":
        n = int(np.clip(round(radius * 0.8), 20, 64))
        t = np.linspace(0, 2 * np.pi, n, endpoint=False)
        return np.stack([np.cos(t), np.sin(t)], 1)
    if name == "square":
        t = np.pi / 4 + np.arange(4) * np.pi / 2
        return np.stack([np.cos(t), np.sin(t)], 1)
    if name == "triangle":
        t = np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        return np.stack([np.cos(t), np.sin(t)], 1)
    if name == "star":
        t = np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return np.stack([r * np.cos(t), r * np.sin(t)], 1)
    if name == "ring":  # a "C": simple polygon, no hole, so one COCO polygon describes it exactly
        n = int(np.clip(round(radius * 0.6), 14, 48))
        gap = np.deg2rad(50)
        t = np.linspace(gap / 2, 2 * np.pi - gap / 2, n)
        outer = np.stack([np.cos(t), np.sin(t)], 1)
        inner = 0.55 * outer[::-1]
        return np.concatenate([outer, inner])
    if name == "cross":
        a = 0.3  # arm half-width
        return np.array([[a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1],
                         [-a, 1], [-a, a], [-1, a], [-1, -a], [-a, -a], [-a, -1]], dtype=np.float64)
    raise AssertionError(name)


# ---------------------------------------------------------------------------------- colours
def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, float(np.clip(s, 0, 1)), float(np.clip(v, 0, 1))),
                    dtype=np.float32) * 255.0


def _mix(c0: np.ndarray, c1: np.ndarray, f: np.ndarray) -> np.ndarray:
    """Blend colours (3,) by a field (H, W) in [0, 1] -> (H, W, 3)."""
    return c0 + (c1 - c0) * f[..., None]


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Procedural background (h, w, 3) float32 in [0, 255]: one or two blended layers + grain."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)

    def colour() -> np.ndarray:
        return _hsv(rng.random(), rng.uniform(0.0, 0.45), rng.uniform(0.15, 0.95))

    def layer() -> np.ndarray:
        kind = rng.integers(3)
        if kind == 0:  # smooth value noise: a coarse random grid upsampled bicubically
            gh, gw = rng.integers(3, 10, size=2)
            grid = Image.fromarray(rng.random((gh, gw)).astype(np.float32))  # mode "F"
            f = np.asarray(grid.resize((w, h), Image.BICUBIC), dtype=np.float32)
        elif kind == 1:  # linear gradient in a random direction
            t = rng.uniform(0, 2 * np.pi)
            p = xs * np.cos(t) + ys * np.sin(t)
            f = (p - p.min()) / max(float(p.max() - p.min()), 1e-6)
        else:  # stripes, soft or hard
            t = rng.uniform(0, np.pi)
            period = rng.uniform(8, 48)
            f = 0.5 + 0.5 * np.sin(2 * np.pi * (xs * np.cos(t) + ys * np.sin(t)) / period + rng.uniform(0, 6.3))
            if rng.random() < 0.5:
                f = (f > 0.5).astype(np.float32)
        return _mix(colour(), colour(), np.clip(f, 0, 1))

    img = layer()
    if rng.random() < 0.5:
        img = img + (layer() - img) * rng.uniform(0.25, 0.6)
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(2.0, 10.0))
    return img


def _texture(cls: int, rng: np.random.Generator, xs: np.ndarray, ys: np.ndarray,
             centre: np.ndarray, radius: float, angle: float) -> np.ndarray:
    """Class-specific appearance over a crop: xs, ys (h, w) pixel centres -> (h, w, 3) float32."""
    hue = _HUES[cls] + rng.uniform(-0.04, 0.04)
    s, v = rng.uniform(0.65, 1.0), rng.uniform(0.7, 1.0)
    light, dark = _hsv(hue, s, v), _hsv(hue, s * rng.uniform(0.7, 1.0), v * rng.uniform(0.35, 0.6))
    dx, dy = xs - centre[0], ys - centre[1]
    u = dx * np.cos(angle) + dy * np.sin(angle)  # object frame, so patterns turn with the shape
    w_ = -dx * np.sin(angle) + dy * np.cos(angle)
    name = CLASS_NAMES[cls]
    if name == "disc":  # shaded sphere: highlight up-left
        d = np.hypot(dx + 0.3 * radius, dy + 0.3 * radius) / (1.3 * radius)
        tex = _mix(light, dark, np.clip(d, 0, 1))
    elif name == "square":  # checkerboard
        p = max(3.0, rng.uniform(0.25, 0.5) * radius)
        f = (np.floor(u / p) + np.floor(w_ / p)) % 2
        tex = _mix(light, dark, f)
    elif name == "triangle":  # hard stripes
        p = max(3.0, rng.uniform(0.2, 0.4) * radius)
        f = (np.floor(u / p) % 2).astype(np.float32)
        tex = _mix(light, dark, f)
    elif name == "star":  # flat with grain
        tex = _mix(light, dark, np.full(xs.shape, 0.1, np.float32))
        tex = tex + 8.0 * rng.standard_normal(tex.shape, dtype=np.float32)
    elif name == "ring":  # speckles
        tex = _mix(light, dark, (rng.random(xs.shape) < 0.35).astype(np.float32))
    else:  # cross: linear gradient across the shape
        tex = _mix(light, dark, np.clip(0.5 + u / (2 * radius), 0, 1))
    return tex + 4.0 * rng.standard_normal(tex.shape, dtype=np.float32)


# ------------------------------------------------------------------------------------ scenes
@dataclass
class Scene:
    """One rendered scene.

    image: (H, W, 3) uint8 RGB. mask: (H, W) uint8 VOC labels (0, 1..K, 255).
    classes: class index 0..K-1 per object. polygons: (P_i, 2) xy per object, full outline.
    """

    image: np.ndarray
    mask: np.ndarray
    classes: list[int] = field(default_factory=list)
    polygons: list[np.ndarray] = field(default_factory=list)


def _image_size(rng: np.random.Generator, size: int) -> tuple[int, int]:
    short = int(rng.integers(round(0.75 * size), size + 1))
    long = int(round(short * np.exp(rng.uniform(0.0, np.log(4 / 3)))))
    return (long, short) if rng.random() < 0.5 else (short, long)  # (w, h)


def render_scene(rng: np.random.Generator, size: int, empty: bool = False) -> Scene:
    """Draw one scene with ``rng``; ``empty=True`` draws the background only."""
    w, h = _image_size(rng, size)
    img = _background(rng, w, h)
    inst = np.zeros((h, w), dtype=np.int16)  # 0 = background, k+1 = object k (topmost wins)
    classes: list[int] = []
    polygons: list[np.ndarray] = []
    full = np.zeros(0, dtype=np.int64)  # pixel count of each object's full shape
    visible = np.zeros(0, dtype=np.int64)  # pixels still on top
    short = min(w, h)
    r_lo = max(MIN_RADIUS_PX, RADIUS_RANGE[0] * short)
    r_hi = max(r_lo, RADIUS_RANGE[1] * short)

    n_objects = 0 if empty else int(rng.integers(1, MAX_OBJECTS + 1))
    for _ in range(n_objects):
        for _attempt in range(4):  # a rejected placement is retried with a fresh object
            cls = int(rng.integers(len(CLASS_NAMES)))
            radius = float(r_lo * (r_hi / r_lo) ** (rng.random() ** RADIUS_SKEW))
            angle = float(rng.uniform(0, 2 * np.pi))
            stretch = float(np.exp(rng.uniform(-0.15, 0.15)))
            rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
            poly = (_unit_shape(cls, radius) * [stretch, 1 / stretch] * radius) @ rot.T
            lo, hi = poly.min(0), poly.max(0)
            fit = min(1.0, (w - 1) / (hi[0] - lo[0]), (h - 1) / (hi[1] - lo[1]))
            poly, lo, hi = poly * fit, lo * fit, hi * fit
            shift = np.array([rng.uniform(-lo[0], w - hi[0]), rng.uniform(-lo[1], h - hi[1])])
            poly = np.clip(np.round(poly + shift, 2), 0.0, [w, h])  # rounded: draw what is written
            x0, y0 = (int(v) for v in np.floor(poly.min(0)))
            x1, y1 = (int(v) for v in np.ceil(poly.max(0)))
            x1, y1 = min(x1, w), min(y1, h)
            m = _rasterize(poly, x0, y0, x1 - x0, y1 - y0)
            count = int(m.sum())
            if count < 20:
                continue
            crop = inst[y0:y1, x0:x1]
            hidden = np.bincount(crop[m], minlength=len(classes) + 1)[1:]
            if np.any(visible - hidden < MIN_VISIBLE * full):
                continue
            ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
            centre = shift
            tex = _texture(cls, rng, xs, ys, centre, radius * fit, angle)
            img[y0:y1, x0:x1][m] = tex[m]
            crop[m] = len(classes) + 1
            visible = np.append(visible - hidden, count)
            full = np.append(full, count)
            classes.append(cls)
            polygons.append(poly)
            break

    image = np.clip(np.round(img), 0, 255).astype(np.uint8)
    return Scene(image=image, mask=_voc_mask(inst, classes), classes=classes, polygons=polygons)


def _voc_mask(inst: np.ndarray, classes: list[int]) -> np.ndarray:
    """Instance map (H, W) -> VOC labels (H, W) uint8 with a void band on instance boundaries."""
    label_of = np.array([0] + [c + 1 for c in classes], dtype=np.uint8)
    mask = label_of[inst]
    edge = np.zeros(inst.shape, dtype=bool)
    dx = inst[:, 1:] != inst[:, :-1]
    dy = inst[1:, :] != inst[:-1, :]
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    edge[1:, :] |= dy
    edge[:-1, :] |= dy
    if BAND_RADIUS > 0:
        edge = ndimage.binary_dilation(edge, structure=np.ones((3, 3), bool), iterations=BAND_RADIUS)
    # an object the band would swallow entirely keeps its pixels (its class must stay visible)
    kept = np.bincount(inst[~edge], minlength=len(classes) + 1)
    swallowed = kept < 4
    swallowed[0] = False
    band = edge & ~swallowed[inst]
    mask[band] = IGNORE_INDEX
    return mask


# ----------------------------------------------------------------------------------- writing
def _check_args(num_train: int, num_val: int, size: int, seed: int) -> None:
    for key, value, lo in (("num_train", num_train, 0), ("num_val", num_val, 0), ("size", size, 64),
                           ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
            raise ConfigError(key, f"must be an integer >= {lo}, got {value!r}", f"set {key} to e.g. {DEFAULTS[key]}")
    if num_train + num_val == 0:
        raise ConfigError("num_train", "num_train + num_val is 0", "ask for at least one image")
    if num_train >= VAL_ID_OFFSET:
        raise ConfigError("num_train", f"must be < {VAL_ID_OFFSET}, got {num_train}", "generate fewer images")


def _marker_args(num_train: int, num_val: int, size: int, seed: int) -> dict[str, int]:
    return {"generator_version": GENERATOR_VERSION, "num_train": int(num_train),
            "num_val": int(num_val), "size": int(size), "seed": int(seed)}


def _coco_header(split: str, args: dict[str, int]) -> dict[str, Any]:
    return {
        "info": {
            "description": f"mnv2 synthetic shapes {split}2017 "
                           f"(seed={args['seed']}, size={args['size']}, v{GENERATOR_VERSION})",
            "url": "", "version": str(GENERATOR_VERSION), "year": 2017,
            "contributor": "mnv2.synthetic", "date_created": "2017/09/01",
        },
        "licenses": [{"id": 1, "name": "CC0 1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}],
        "images": [],
        "annotations": [],
        "categories": [{"id": cid, "name": name, "supercategory": SUPERCATEGORY}
                       for cid, name in zip(CATEGORY_IDS, CLASS_NAMES)],
    }


def generate(out: Path | str, num_train: int = DEFAULTS["num_train"], num_val: int = DEFAULTS["num_val"],
             size: int = DEFAULTS["size"], seed: int = DEFAULTS["seed"], overwrite: bool = False,
             progress: bool = True) -> Path:
    """Write ``num_train`` + ``num_val`` scenes under ``out`` in both layouts; returns ``out``.

    ``size`` is the largest short side (short sides are ``0.75*size .. size``, long sides up to
    ``4/3`` of that). ``out`` may exist but must not already hold ``coco/``, ``VOCdevkit/`` or
    the marker unless ``overwrite`` (then only those three are removed). The marker ``.complete``
    is written last, so an interrupted run never looks complete.
    """
    _check_args(num_train, num_val, size, seed)
    out = Path(out)
    ours = [out / "coco", out / "VOCdevkit", out / MARKER]
    existing = [p for p in ours if p.exists()]
    if existing and not overwrite:
        raise DataError(out, f"already holds {', '.join(p.name for p in existing)}",
                        "pass overwrite=True (--overwrite) or choose another output directory")
    for p in existing:
        shutil.rmtree(p) if p.is_dir() else p.unlink()

    args = _marker_args(num_train, num_val, size, seed)
    coco, voc = coco_root(out), voc_root(out)
    for d in (coco / "annotations", coco / "train2017", coco / "val2017", voc / "JPEGImages",
              voc / "SegmentationClass", voc / "ImageSets" / "Segmentation"):
        d.mkdir(parents=True, exist_ok=True)
    palette = voc_palette().ravel().tolist()
    counts = {"train": num_train, "val": num_val}
    stems: dict[str, list[str]] = {s: [] for s in SPLITS}
    ann_id = 0
    bar = tqdm(total=num_train + num_val, desc="synthetic scenes", unit="img", disable=not progress)
    for split_idx, split in enumerate(SPLITS):
        ds = _coco_header(split, args)
        for i in range(counts[split]):
            rng = np.random.default_rng([seed, split_idx, i])
            scene = render_scene(rng, size, empty=(i % EMPTY_EVERY == 0))
            image_id = i + 1 + (VAL_ID_OFFSET if split == "val" else 0)
            stem = f"{image_id:012d}"
            h, w = scene.mask.shape
            buf = io.BytesIO()
            Image.fromarray(scene.image).save(buf, format="JPEG", quality=JPEG_QUALITY)
            jpeg = buf.getvalue()  # the same bytes in both layouts
            (coco / f"{split}2017" / f"{stem}.jpg").write_bytes(jpeg)
            (voc / "JPEGImages" / f"{stem}.jpg").write_bytes(jpeg)
            png = Image.fromarray(scene.mask)
            png.putpalette(palette)  # "L" -> "P" with the VOC colour map
            png.save(voc / "SegmentationClass" / f"{stem}.png")
            stems[split].append(stem)
            ds["images"].append({"id": image_id, "file_name": f"{stem}.jpg", "width": w, "height": h,
                                 "license": 1, "date_captured": "2017-09-01 00:00:00"})
            for cls, poly in zip(scene.classes, scene.polygons):
                ann_id += 1
                (x0, y0), (x1, y1) = poly.min(0), poly.max(0)
                ds["annotations"].append({
                    "id": ann_id, "image_id": image_id, "category_id": CATEGORY_IDS[cls],
                    "segmentation": [[round(float(v), 2) for v in poly.ravel()]],
                    "area": round(_shoelace(poly), 2),
                    "bbox": [round(float(x0), 2), round(float(y0), 2),
                             round(float(x1 - x0), 2), round(float(y1 - y0), 2)],
                    "iscrowd": 0,
                })
            bar.update(1)
        with open(coco / "annotations" / f"instances_{split}2017.json", "w") as f:
            json.dump(ds, f, separators=(",", ":"))
    bar.close()
    sets = voc / "ImageSets" / "Segmentation"
    (sets / "train.txt").write_text("".join(s + "\n" for s in stems["train"]))
    (sets / "val.txt").write_text("".join(s + "\n" for s in stems["val"]))
    (sets / "trainval.txt").write_text("".join(s + "\n" for s in stems["train"] + stems["val"]))
    (out / MARKER).write_text(json.dumps(args, sort_keys=True) + "\n")
    return out


def _read_marker(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return None


def ensure_synthetic(root: Path | str, **kwargs: Any) -> Path:
    """Return ``root`` holding a complete synthetic dataset made with ``kwargs``; generate if needed.

    kwargs: ``num_train``, ``num_val``, ``size``, ``seed`` (defaults :data:`DEFAULTS`) and
    ``progress``. Nothing happens when ``root/.complete`` records the same arguments (and
    generator version). Otherwise the scenes are written to a temporary sibling directory that
    is renamed into place, so a crash never leaves a partial dataset that looks complete. An
    existing ``root`` that is not a synthetic dataset (no marker, not empty) is never deleted.
    """
    unknown = set(kwargs) - set(DEFAULTS) - {"progress"}
    if unknown:
        raise ConfigError(sorted(unknown)[0], "is not an argument of the synthetic generator",
                          f"use only {sorted(DEFAULTS)}")
    progress = bool(kwargs.pop("progress", True))
    args = {**DEFAULTS, **kwargs}
    _check_args(**args)
    root = Path(root)
    want = _marker_args(**args)
    if _read_marker(root) == want:
        return root
    if root.exists() and (not root.is_dir() or (any(root.iterdir()) and _read_marker(root) is None)):
        raise DataError(root, "exists and is not a synthetic dataset made by mnv2 (no .complete marker)",
                        "point the synthetic root at a new or empty directory")
    root.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = root.parent / f".{root.name}.tmp-{tag}"
    try:
        generate(tmp, overwrite=True, progress=progress, **args)
        old = None
        if root.exists():
            old = root.parent / f".{root.name}.old-{tag}"
            root.rename(old)
        try:
            tmp.rename(root)
        except OSError:
            if _read_marker(root) != want:  # someone else finished first with other args
                raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root
