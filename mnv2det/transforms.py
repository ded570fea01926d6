"""Detection training augmentation (albumentations): two named recipes; and the eval transform.

``data.augment.recipe`` picks the pipeline (Hydra group ``conf/data/augment/``: ``tf``, ``torchvision``,
``light``); :func:`check_augment` lists each recipe's settings and their defaults (:data:`RECIPES`).

- ``tf``: the TF Object Detection API's ``ssdlite_mobilenet_v2_coco`` train config
  (object_detection/samples/configs/ssdlite_mobilenet_v2_coco.config): ``random_horizontal_flip``, then
  ``ssd_random_crop`` with its defaults (:class:`SSDRandomCrop`), then the model's ``fixed_shape_resizer``
  (resize to ``image_size`` x ``image_size``; object_detection/inputs.py ``transform_input_data`` augments
  first, then runs the model's preprocessing). No photometric jitter, no zoom-out.
- ``torchvision``: torchvision's SSD recipe: photometric distortion -> zoom-out (expand onto a
  mean-filled canvas up to 4x) -> min-IoU random crop (IoU options {0.1, 0.3, 0.5, 0.7, 0.9, no crop},
  boxes kept when their centre is inside) -> horizontal flip -> resize.

Both resize without keeping the aspect (as SSD), then normalise -> CHW float tensor. Boxes under 1 px
are dropped after every step (``_bbox_params``: the box coder takes logs of sizes), which TF does not do.
Eval: resize -> normalise -> tensor.

albumentations has neither SSD's expand nor its constrained crops (``RandomSizedBBoxSafeCrop`` keeps
every box), so they are small custom ``DualTransform``s below. They use the transform's own random
generator, so ``Compose(seed=...)`` / :meth:`DetectionTransform.set_seed` make them reproducible.

Photometric distortion (torchvision recipe) uses ``A.ColorJitter`` (multiplicative brightness instead of
SSD's additive +-32; random order of the four jitters, like SSD's two orders of contrast).
"""
from __future__ import annotations

import sys
from typing import Any, Sequence

import albumentations as A
import cv2
import numpy as np
from albumentations.pytorch import ToTensorV2

from backbone.errors import ArgumentError, ConfigError
from backbone.normalization import NormalizeSpec, resolve_normalization

# Every recipe's settings and their defaults (`data.augment` = {recipe: NAME, **settings}).
# Probabilities of 0 switch a step off.
RECIPES: dict[str, dict[str, Any]] = {
    "torchvision": {
        "photometric_p": 0.5,
        "brightness": 0.125,
        "contrast": 0.5,
        "saturation": 0.5,
        "hue": 0.05,  # 18 degrees of 360, SSD's hue delta
        "zoom_out_p": 0.5,
        "zoom_out_max": 4.0,
        "crop_p": 1.0,  # SSD always samples; "no crop" is one of the sampled options
        "min_ious": [0.1, 0.3, 0.5, 0.7, 0.9],
        "crop_min_scale": 0.3,
        "crop_aspect": [0.5, 2.0],
        "hflip_p": 0.5,
        "min_visibility": 0.0,
    },
    "tf": {  # TF preprocessor.ssd_random_crop's defaults (7 options, one drawn per image)
        "hflip_p": 0.5,
        "min_object_covered": [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0],
        "overlap_thresh": [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0],
        "crop_area": [0.1, 1.0],  # fraction of the image area
        "crop_aspect": [0.5, 2.0],  # width / height
        "random_coef": 0.15,  # probability of keeping the whole image
        "max_attempts": 100,
    },
}
DEFAULT_RECIPE = "torchvision"


def check_augment(augment: dict[str, Any] | None, key: str = "data.augment") -> dict[str, Any]:
    """``{recipe: NAME, **settings}`` (recipe default: torchvision) -> the recipe's full settings
    (:data:`RECIPES` overridden by ``augment``) with ``recipe``, every value validated."""
    augment = dict(augment or {})
    recipe = augment.pop("recipe", DEFAULT_RECIPE)
    if recipe not in RECIPES:
        raise ConfigError(f"{key}.recipe", f"must be one of {list(RECIPES)}, got {recipe!r}",
                          "pick a preset with data/augment=tf|torchvision|light")
    defaults = RECIPES[recipe]
    unknown = sorted(set(augment) - set(defaults))
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}", f"is not a setting of the {recipe} recipe",
                          f"use only {', '.join(defaults)}")
    cfg = {**defaults, **augment}

    def number(name: str, lo: float, hi: float = float("inf")) -> None:
        v = cfg[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
            raise ConfigError(f"{key}.{name}", f"must be a number in [{lo}, {hi}], got {v!r}",
                              f"e.g. {key}.{name}={defaults[name]}")

    def numbers(name: str, length: int | None = None) -> list:
        v = cfg[name]
        if (not isinstance(v, (list, tuple)) or not v or (length is not None and len(v) != length)
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)):
            size = f"{length} numbers" if length is not None else "a non-empty list of numbers"
            raise ConfigError(f"{key}.{name}", f"must be {size}, got {v!r}", f"e.g. {defaults[name]}")
        return list(v)

    def fractions(name: str, length: int | None = None) -> list:
        v = numbers(name, length)
        if not all(0 <= x <= 1 for x in v):
            raise ConfigError(f"{key}.{name}", f"must hold values in [0, 1], got {v!r}", f"e.g. {defaults[name]}")
        return v

    def range_pair(name: str, hi: float = float("inf")) -> None:
        lo_v, hi_v = numbers(name, 2)
        if not 0 < lo_v <= hi_v <= hi:
            raise ConfigError(f"{key}.{name}", f"must be [min, max] with 0 < min <= max <= {hi}, got {cfg[name]!r}",
                              f"e.g. {defaults[name]}")

    number("hflip_p", 0.0, 1.0)
    range_pair("crop_aspect")
    if recipe == "tf":
        number("random_coef", 0.0, 1.0)
        attempts = cfg["max_attempts"]
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise ConfigError(f"{key}.max_attempts", f"must be an integer >= 1, got {attempts!r}", "e.g. 100 (TF)")
        covered = fractions("min_object_covered")
        fractions("overlap_thresh", len(covered))
        range_pair("crop_area", 1.0)
        return {"recipe": recipe, **cfg}
    for name in ("photometric_p", "zoom_out_p", "crop_p", "min_visibility", "crop_min_scale"):
        number(name, 0.0, 1.0)
    for name in ("brightness", "contrast", "saturation"):
        number(name, 0.0, 1.0)
    number("hue", 0.0, 0.5)
    number("zoom_out_max", 1.0)
    if cfg["crop_min_scale"] <= 0:
        raise ConfigError(f"{key}.crop_min_scale", "must be > 0", "e.g. 0.3 (SSD)")
    ious = cfg["min_ious"]
    if not isinstance(ious, (list, tuple)) or not all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in ious):
        raise ConfigError(f"{key}.min_ious", f"must be a list of IoUs in [0, 1], got {ious!r}", "e.g. [0.1,0.3,0.5,0.7,0.9]")
    return {"recipe": recipe, **cfg}


def _replace_boxes(bboxes: np.ndarray, xyxy: np.ndarray) -> np.ndarray:
    out = np.array(bboxes, copy=True)
    out[:, :4] = xyxy
    return out


class ZoomOut(A.DualTransform):
    """SSD's "expand": place the image at a random position on a canvas ``r`` times larger
    (``r ~ U[1, max_ratio]``) filled with ``fill`` (the dataset mean), so that objects get smaller.

    Boxes (albumentations' normalised xyxy) are mapped exactly; nothing is dropped.
    """

    def __init__(self, max_ratio: float = 4.0, fill: Sequence[float] = (124, 116, 104), p: float = 0.5) -> None:
        super().__init__(p=p)
        self.max_ratio = float(max_ratio)
        self.fill = tuple(float(v) for v in fill)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        r = self.random_generator.uniform(1.0, self.max_ratio)
        ch, cw = int(h * r), int(w * r)
        top = int(self.random_generator.integers(0, ch - h + 1))
        left = int(self.random_generator.integers(0, cw - w + 1))
        return {"canvas": (ch, cw), "offset": (top, left)}

    def apply(self, img: np.ndarray, canvas: tuple[int, int], offset: tuple[int, int], **params: Any) -> np.ndarray:
        (ch, cw), (top, left) = canvas, offset
        h, w = img.shape[:2]
        fill = np.asarray(self.fill[: img.shape[2]] if img.ndim == 3 else self.fill[:1], dtype=img.dtype)
        out = np.empty((ch, cw) + img.shape[2:], dtype=img.dtype)
        out[...] = fill
        out[top:top + h, left:left + w] = img
        return out

    def apply_to_bboxes(self, bboxes: np.ndarray, canvas: tuple[int, int], offset: tuple[int, int],
                        **params: Any) -> np.ndarray:
        if len(bboxes) == 0:
            return bboxes
        h, w = params["shape"][:2]
        (ch, cw), (top, left) = canvas, offset
        scale = np.array([w / cw, h / ch, w / cw, h / ch])
        shift = np.array([left / cw, top / ch, left / cw, top / ch])
        return _replace_boxes(bboxes, bboxes[:, :4] * scale + shift)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("max_ratio", "fill")


class MinIoURandomCrop(A.DualTransform):
    """SSD's IoU-constrained random crop.

    Each call samples a mode from ``min_ious + [None]`` (None: keep the whole image), then up to
    ``trials`` crops with side scales in ``[min_scale, 1]`` and aspect ``w/h`` in ``aspect``; a crop
    is accepted when it contains the centre of at least one box and its IoU with at least one of
    those boxes is >= the mode's IoU (SSD / torchvision semantics: "any box", not "all boxes").
    Kept boxes are those whose centre lies inside the crop, clipped to it. If no trial succeeds the
    mode is resampled (up to ``rounds`` times), then the image is kept whole. Images without boxes
    get an unconstrained crop of the sampled size.
    """

    def __init__(self, min_ious: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9), min_scale: float = 0.3,
                 aspect: Sequence[float] = (0.5, 2.0), trials: int = 50, rounds: int = 10, p: float = 1.0) -> None:
        super().__init__(p=p)
        self.min_ious = tuple(float(v) for v in min_ious)
        self.min_scale = float(min_scale)
        self.aspect = (float(aspect[0]), float(aspect[1]))
        self.trials = int(trials)
        self.rounds = int(rounds)

    def _sample(self, h: int, w: int, boxes: np.ndarray) -> tuple[int, int, int, int]:
        """boxes: (N, 4) xyxy pixels -> crop (x0, y0, x1, y1) pixels."""
        rng = self.random_generator
        options: list[float | None] = [*self.min_ious, None]
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2  # (N, 2)
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        for _ in range(self.rounds):
            mode = options[int(rng.integers(len(options)))]
            if mode is None:
                return 0, 0, w, h
            # All trials at once: (T,) candidate crops, the first valid one wins.
            T = self.trials
            sw = rng.uniform(self.min_scale, 1.0, T) * w
            sh = rng.uniform(self.min_scale, 1.0, T) * h
            ok = (sw / np.maximum(sh, 1e-6) >= self.aspect[0]) & (sw / np.maximum(sh, 1e-6) <= self.aspect[1])
            x0 = rng.uniform(0, 1, T) * (w - sw)
            y0 = rng.uniform(0, 1, T) * (h - sh)
            crops = np.stack([x0, y0, x0 + sw, y0 + sh], 1).astype(np.int64).astype(np.float64)  # (T, 4)
            ok &= (crops[:, 2] - crops[:, 0] >= 1) & (crops[:, 3] - crops[:, 1] >= 1)
            if len(boxes):
                inside = ((centres[None, :, 0] > crops[:, None, 0]) & (centres[None, :, 0] < crops[:, None, 2])
                          & (centres[None, :, 1] > crops[:, None, 1]) & (centres[None, :, 1] < crops[:, None, 3]))
                lt = np.maximum(crops[:, None, :2], boxes[None, :, :2])
                rb = np.minimum(crops[:, None, 2:], boxes[None, :, 2:])
                inter = np.clip(rb - lt, 0, None).prod(-1)  # (T, N)
                crop_area = ((crops[:, 2] - crops[:, 0]) * (crops[:, 3] - crops[:, 1]))[:, None]
                iou = inter / np.maximum(crop_area + areas[None] - inter, 1e-9)
                ok &= (inside & (iou >= mode)).any(1)
            valid = np.flatnonzero(ok)
            if len(valid):
                c = crops[valid[0]]
                return int(c[0]), int(c[1]), int(c[2]), int(c[3])
        return 0, 0, w, h

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        bboxes = data.get("bboxes")
        boxes = np.zeros((0, 4)) if bboxes is None or len(bboxes) == 0 else np.asarray(bboxes)[:, :4] * [w, h, w, h]
        return {"crop_coords": self._sample(h, w, boxes)}

    def apply(self, img: np.ndarray, crop_coords: tuple[int, int, int, int], **params: Any) -> np.ndarray:
        x0, y0, x1, y1 = crop_coords
        return img[y0:y1, x0:x1]

    def apply_to_bboxes(self, bboxes: np.ndarray, crop_coords: tuple[int, int, int, int], **params: Any) -> np.ndarray:
        if len(bboxes) == 0:
            return bboxes
        h, w = params["shape"][:2]
        x0, y0, x1, y1 = crop_coords
        px = bboxes[:, :4] * [w, h, w, h]
        cx, cy = (px[:, 0] + px[:, 2]) / 2, (px[:, 1] + px[:, 3]) / 2
        keep = (cx > x0) & (cx < x1) & (cy > y0) & (cy < y1)
        if (x0, y0, x1, y1) == (0, 0, w, h):
            keep[:] = True  # the whole image: keep every box (also those centred on the border)
        cw, ch = x1 - x0, y1 - y0
        xyxy = np.clip(px[keep] - [x0, y0, x0, y0], 0, [cw, ch, cw, ch]) / [cw, ch, cw, ch]
        return _replace_boxes(bboxes[keep], xyxy)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("min_ious", "min_scale", "aspect", "trials", "rounds")


def _lrint(x: np.ndarray) -> np.ndarray:
    """C's lrintf: round half to even (the default rounding mode), to integers."""
    return np.rint(x).astype(np.int64)


class SSDRandomCrop(A.DualTransform):
    """The TF Object Detection API's ``ssd_random_crop`` with its defaults, step by step.

    TF: object_detection/core/preprocessor.py, ``ssd_random_crop`` -> ``random_crop_image`` ->
    ``_strict_random_crop_image`` -> ``tf.image.sample_distorted_bounding_box`` (kernel:
    tensorflow/core/kernels/image/sample_distorted_bounding_box_op.cc, ``GenerateRandomCrop`` and
    ``SatisfiesOverlapConstraints``); box ops from object_detection/core/box_list_ops.py. Per image:

    1. Draw one option uniformly (``_apply_with_random_selector_tuples``): its ``min_object_covered``
       and ``overlap_thresh`` (TF defaults: both 0, .1, .3, .5, .7, .9, 1).
    2. ``random_crop_image``: crop only when ``U[0, 1) > random_coef`` (TF: 0.15); otherwise the image and
       its boxes pass untouched (no pruning, no clipping).
    3. Sample the window as ``sample_distorted_bounding_box`` (boxes first clipped to [0, 1],
       ``use_image_if_no_bounding_boxes=True``, ``max_attempts`` 100):
       - boxes become integer pixel rectangles by truncation (``int(xmin * width)``, ...); an image
         without boxes has the whole image as its one box;
       - each attempt draws an aspect ``width / height ~ U[lo, hi)``, then a height uniform over the
         integers ``lrint(sqrt(min_area / aspect)) .. lrint(sqrt(max_area / aspect))`` (the top end
         lowered until ``lrint(height * aspect) <= image width`` and ``height <= image height``; the
         height moved by one pixel when rounding leaves ``[min_area, max_area]``, the attempt failing if
         it still does), width ``lrint(height * aspect)``, then ``y ~ U{0 .. H - height - 1}`` and
         ``x ~ U{0 .. W - width - 1}`` (0 when the crop spans the image: as in TF, a crop narrower than
         the image never touches its right edge, nor a shorter one its bottom edge); ``min_area`` /
         ``max_area`` are ``area_range`` times the image area;
       - an attempt is accepted when the crop has >= 1 px^2 and covers ``min_object_covered`` or more
         of the area of AT LEAST ONE box (intersection / box area, boxes under 1 px^2 skipped); the
         first accepted attempt is the window;
       - when no attempt is accepted, the window is the whole image (step 4 still runs).
    4. ``prune_completely_outside_window`` (drop boxes with ``ymin >= win_ymax``, ``xmin >= win_xmax``,
       ``ymax <= win_ymin`` or ``xmax <= win_xmin``), ``prune_non_overlapping_boxes`` (keep a box when
       intersection / BOX area >= ``overlap_thresh``), ``change_coordinate_frame`` to the window, clip to
       [0, 1] (``clip_boxes=True``).

    Arithmetic is float32 where TF's is, so thresholds compare as in TF. Random draws come from the
    transform's own generator (TF's Philox stream is not reproduced); the attempts are drawn all at once
    and the first accepted one taken, which has the distribution of TF's sequential loop.
    """

    def __init__(self, min_object_covered: Sequence[float] = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0),
                 overlap_thresh: Sequence[float] = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0),
                 area_range: Sequence[float] = (0.1, 1.0), aspect_ratio_range: Sequence[float] = (0.5, 2.0),
                 random_coef: float = 0.15, max_attempts: int = 100, p: float = 1.0) -> None:
        super().__init__(p=p)
        self.min_object_covered = tuple(float(v) for v in min_object_covered)
        self.overlap_thresh = tuple(float(v) for v in overlap_thresh)
        if len(self.overlap_thresh) != len(self.min_object_covered):
            raise ValueError("min_object_covered and overlap_thresh need one value per option")
        self.area_range = (float(area_range[0]), float(area_range[1]))
        self.aspect_ratio_range = (float(aspect_ratio_range[0]), float(aspect_ratio_range[1]))
        self.random_coef = float(random_coef)
        self.max_attempts = int(max_attempts)

    def sample_window(self, h: int, w: int, rects: np.ndarray, min_object_covered: float) -> tuple[int, int, int, int]:
        """``sample_distorted_bounding_box``: image h x w, boxes ``rects`` (N >= 1, 4) integer xyxy pixels ->
        window (x0, y0, x1, y1) in pixels; the whole image when no attempt is accepted."""
        rng, f32, n = self.random_generator, np.float32, self.max_attempts
        lo, hi = f32(self.aspect_ratio_range[0]), f32(self.aspect_ratio_range[1])
        aspect = rng.random(n, dtype=np.float32) * (hi - lo) + lo
        min_area = f32(self.area_range[0]) * f32(w) * f32(h)
        max_area = f32(self.area_range[1]) * f32(w) * f32(h)

        def width_of(height: np.ndarray) -> np.ndarray:
            return _lrint(height.astype(f32) * aspect)

        height = _lrint(np.sqrt(min_area / aspect))
        max_height = _lrint(np.sqrt(max_area / aspect))
        fitted = ((w + 0.5 - float(f32(1e-7))) / aspect.astype(np.float64)).astype(np.int64)  # TF: in double
        fitted -= width_of(fitted) > w
        max_height = np.minimum(np.where(width_of(max_height) > w, fitted, max_height), h)
        height = np.minimum(height, max_height)
        height = height + rng.integers(0, max_height - height + 1)  # + U{0 .. max_height - height}
        width = width_of(height)
        height = np.where((width * height).astype(f32) < min_area, height + 1, height)
        width = width_of(height)
        height = np.where((width * height).astype(f32) > max_area, height - 1, height)
        width = width_of(height)
        area = (width * height).astype(f32)
        ok = (area >= min_area) & (area <= max_area) & (width <= w) & (height <= h) & (width > 0) & (height > 0)
        y = np.where(height < h, rng.integers(0, np.maximum(h - height, 1)), 0)
        x = np.where(width < w, rng.integers(0, np.maximum(w - width, 1)), 0)
        crops = np.stack([x, y, x + width, y + height], 1)  # (T, 4)

        # SatisfiesOverlapConstraints, all attempts x all boxes
        ok &= area >= 1
        iw = np.minimum(crops[:, None, 2], rects[None, :, 2]) - np.maximum(crops[:, None, 0], rects[None, :, 0])
        ih = np.minimum(crops[:, None, 3], rects[None, :, 3]) - np.maximum(crops[:, None, 1], rects[None, :, 1])
        inter = np.where((iw >= 0) & (ih >= 0), iw * ih, 0).astype(f32)  # (T, N)
        box_area = ((rects[:, 2] - rects[:, 0]) * (rects[:, 3] - rects[:, 1])).astype(f32)[None]  # (1, N)
        counted = box_area >= 1
        covered = np.divide(inter, box_area, out=np.zeros_like(inter), where=counted)
        ok &= (counted & (covered >= f32(min_object_covered))).any(1)
        if not ok.any():
            return 0, 0, w, h
        return tuple(int(v) for v in crops[int(np.argmax(ok))])  # type: ignore[return-value]

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        rng = self.random_generator
        option = int(rng.integers(len(self.min_object_covered)))
        if self.random_coef >= sys.float_info.min and not rng.random() > self.random_coef:
            return {"window": None, "min_overlap": self.overlap_thresh[option]}
        bboxes = data.get("bboxes")
        if bboxes is None or len(bboxes) == 0:
            rects = np.array([[0, 0, w, h]], np.int64)
        else:
            boxes = np.clip(np.asarray(bboxes)[:, :4], 0, 1).astype(np.float32)
            rects = (boxes * np.array([w, h, w, h], np.float32)).astype(np.int64)  # truncation, as TF
        window = self.sample_window(h, w, rects, self.min_object_covered[option])
        return {"window": window, "min_overlap": self.overlap_thresh[option]}

    def apply(self, img: np.ndarray, window: tuple[int, int, int, int] | None, **params: Any) -> np.ndarray:
        if window is None:
            return img
        x0, y0, x1, y1 = window
        return img[y0:y1, x0:x1]

    def apply_to_bboxes(self, bboxes: np.ndarray, window: tuple[int, int, int, int] | None, min_overlap: float,
                        **params: Any) -> np.ndarray:
        if window is None or len(bboxes) == 0:
            return bboxes
        h, w = params["shape"][:2]
        f32 = np.float32
        wx0, wy0, wx1, wy1 = (np.array(window, f32) / np.array([w, h, w, h], f32))  # TF's im_box
        b = np.asarray(bboxes[:, :4], f32)
        outside = (b[:, 1] >= wy1) | (b[:, 0] >= wx1) | (b[:, 3] <= wy0) | (b[:, 2] <= wx0)
        inter_h = np.maximum(f32(0), np.minimum(b[:, 3], wy1) - np.maximum(b[:, 1], wy0))
        inter_w = np.maximum(f32(0), np.minimum(b[:, 2], wx1) - np.maximum(b[:, 0], wx0))
        area = (b[:, 3] - b[:, 1]) * (b[:, 2] - b[:, 0])
        with np.errstate(divide="ignore", invalid="ignore"):
            ioa = (inter_h * inter_w) / area  # NaN for an empty box: dropped, as in TF
        keep = ~outside & (ioa >= f32(min_overlap))
        scale = np.array([1 / (wx1 - wx0), 1 / (wy1 - wy0)] * 2, f32)
        xyxy = np.clip((b[keep] - np.array([wx0, wy0, wx0, wy0], f32)) * scale, 0, 1)
        return _replace_boxes(bboxes[keep], xyxy)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("min_object_covered", "overlap_thresh", "area_range", "aspect_ratio_range", "random_coef",
                "max_attempts")


class DetectionTransform:
    """``(image HWC uint8, target) -> (image (3, S, S) float32 tensor, target)``.

    target in/out: ``boxes (N, 4) float32 xyxy pixels`` (out: pixels of the S x S output),
    ``labels (N,) int64``, ``crowd (N,) bool``; other keys (image_id, orig_size) pass through.
    Boxes dropped by the crop or shrunk below 1 px are removed together with their labels.
    """

    def __init__(self, compose: A.Compose) -> None:
        self.compose = compose

    def set_seed(self, seed: int) -> None:
        """Reseed (e.g. per DataLoader worker, so workers do not repeat each other's draws)."""
        self.compose.set_random_seed(int(seed) % 2**32)

    def __call__(self, image: np.ndarray, target: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        out = self.compose(image=image, bboxes=np.asarray(target["boxes"], np.float32).reshape(-1, 4),
                           labels=np.asarray(target["labels"], np.int64), crowd=np.asarray(target["crowd"], bool))
        target = dict(target)
        target["boxes"] = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
        target["labels"] = np.asarray(out["labels"], dtype=np.int64).reshape(-1)
        target["crowd"] = np.asarray(out["crowd"], dtype=bool).reshape(-1)
        return out["image"], target

    def __repr__(self) -> str:
        return f"DetectionTransform({self.compose})"


def _bbox_params(min_visibility: float = 0.0) -> A.BboxParams:
    # clip: COCO boxes may touch the border by rounding; min 1 px: the box coder takes log(w), log(h).
    return A.BboxParams(format="pascal_voc", label_fields=["labels", "crowd"], min_visibility=min_visibility,
                        min_width=1.0, min_height=1.0, clip=True)


def _tf_recipe(cfg: dict[str, Any]) -> list[A.BasicTransform]:
    """TF ssdlite_mobilenet_v2_coco's data_augmentation_options, in its order: flip, then ssd_random_crop."""
    ops: list[A.BasicTransform] = []
    if cfg["hflip_p"] > 0:
        ops.append(A.HorizontalFlip(p=cfg["hflip_p"]))
    ops.append(SSDRandomCrop(min_object_covered=cfg["min_object_covered"], overlap_thresh=cfg["overlap_thresh"],
                             area_range=cfg["crop_area"], aspect_ratio_range=cfg["crop_aspect"],
                             random_coef=cfg["random_coef"], max_attempts=cfg["max_attempts"]))
    return ops


def _torchvision_recipe(cfg: dict[str, Any], fill: tuple[int, ...]) -> list[A.BasicTransform]:
    """torchvision's SSD augmentation: photometric -> zoom-out -> min-IoU crop -> flip."""
    ops: list[A.BasicTransform] = []
    if cfg["photometric_p"] > 0:
        ops.append(A.ColorJitter(brightness=cfg["brightness"], contrast=cfg["contrast"],
                                 saturation=cfg["saturation"], hue=cfg["hue"], p=cfg["photometric_p"]))
    if cfg["zoom_out_p"] > 0 and cfg["zoom_out_max"] > 1:
        ops.append(ZoomOut(max_ratio=cfg["zoom_out_max"], fill=fill, p=cfg["zoom_out_p"]))
    if cfg["crop_p"] > 0:
        ops.append(MinIoURandomCrop(min_ious=cfg["min_ious"], min_scale=cfg["crop_min_scale"],
                                    aspect=cfg["crop_aspect"], p=cfg["crop_p"]))
    if cfg["hflip_p"] > 0:
        ops.append(A.HorizontalFlip(p=cfg["hflip_p"]))
    return ops


def build_train_transform(image_size: int, normalize: NormalizeSpec = "imagenet", augment: dict[str, Any] | None = None,
                          seed: int | None = None) -> DetectionTransform:
    """Training augmentation: the recipe of ``augment`` (:func:`check_augment`), resize, normalise, to tensor."""
    cfg = check_augment(augment)
    mean, std = resolve_normalization(normalize)
    if cfg["recipe"] == "tf":
        ops = _tf_recipe(cfg)
    else:
        ops = _torchvision_recipe(cfg, fill=tuple(round(m * 255) for m in mean))  # zoom-out canvas: mean colour
    ops += [A.Resize(image_size, image_size, interpolation=cv2.INTER_LINEAR),
            A.Normalize(mean=mean, std=std, max_pixel_value=255.0), ToTensorV2()]
    bbox_params = _bbox_params(cfg.get("min_visibility", 0.0))
    return DetectionTransform(A.Compose(ops, bbox_params=bbox_params, seed=seed))


#: How the eval transform resizes: part of a model's input contract (``model.resize``, read by ``data.resize``).
#: ``cv2_linear``: OpenCV bilinear with half-pixel centres on uint8 (our models, trained so);
#: ``tf_bilinear``: TF1's legacy bilinear on float (align_corners=False, no half-pixel centres), as the
#: Preprocessor of TF OD API graphs (:func:`mnv2det.tf_import.tf_resize_bilinear`; imported models).
EVAL_RESIZES: tuple[str, ...] = ("cv2_linear", "tf_bilinear")


def check_resize(resize: str) -> str:
    """``resize`` if it is one of :data:`EVAL_RESIZES`, else an ArgumentError."""
    if resize not in EVAL_RESIZES:
        raise ArgumentError("resize", f"must be one of {list(EVAL_RESIZES)}, got {resize!r}",
                            "cv2_linear for models trained here, tf_bilinear for imported TF graphs")
    return resize


class TFBilinearResize(A.Resize):
    """``A.Resize`` whose pixels are TF1's legacy bilinear resize, computed on float32 (boxes as A.Resize)."""

    def apply(self, img: np.ndarray, *args: Any, **params: Any) -> np.ndarray:
        import torch

        from mnv2det.tf_import.resize import tf_resize_bilinear

        x = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)).permute(2, 0, 1)[None]
        return tf_resize_bilinear(x, (self.height, self.width))[0].permute(1, 2, 0).numpy()


def build_eval_transform(image_size: int, normalize: NormalizeSpec = "imagenet",
                         resize: str = "cv2_linear") -> DetectionTransform:
    """Resize to ``image_size`` x ``image_size``, normalise, to tensor (deterministic).

    ``resize`` (:data:`EVAL_RESIZES`): ``cv2_linear`` resizes the uint8 image; ``tf_bilinear`` follows
    TF's order, uint8 -> float -> TF legacy bilinear -> normalise, and reproduces TF's input to 1e-5.
    """
    mean, std = resolve_normalization(normalize)
    resizer = TFBilinearResize if check_resize(resize) == "tf_bilinear" else A.Resize
    ops = [resizer(image_size, image_size, interpolation=cv2.INTER_LINEAR),
           A.Normalize(mean=mean, std=std, max_pixel_value=255.0), ToTensorV2()]
    return DetectionTransform(A.Compose(ops, bbox_params=_bbox_params(), seed=0))
