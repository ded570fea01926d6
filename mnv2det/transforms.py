"""SSD data augmentation (albumentations) and the eval transform.

Train (SSD, Liu et al. 2016, as in the TF Object Detection API / torchvision recipes):
photometric distortion -> zoom-out (expand onto a mean-filled canvas up to 4x) -> min-IoU random
crop (IoU options {0.1, 0.3, 0.5, 0.7, 0.9, no crop}, boxes kept when their centre is inside) ->
horizontal flip -> resize to ``image_size`` x ``image_size`` (no aspect keep, as SSD) ->
normalise -> CHW float tensor. Eval: resize -> normalise -> tensor.

albumentations has neither SSD's expand nor its IoU-constrained crop (``RandomSizedBBoxSafeCrop``
keeps every box; SSD's crop may drop boxes and must overlap some box by a sampled IoU), so both
are small custom ``DualTransform``s below. They use the transform's own random generator, so
``Compose(seed=...)`` / :meth:`DetectionTransform.set_seed` make them reproducible.

Photometric distortion uses ``A.ColorJitter`` (multiplicative brightness instead of SSD's
additive +-32; random order of the four jitters, like SSD's two orders of contrast).
"""
from __future__ import annotations

from typing import Any, Sequence

import albumentations as A
import cv2
import numpy as np
from albumentations.pytorch import ToTensorV2

from backbone.errors import ConfigError
from backbone.normalization import NormalizeSpec, resolve_normalization

# Defaults of `data.augment` (SSD's recipe). Probabilities of 0 switch a step off.
AUGMENT_DEFAULTS: dict[str, Any] = {
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
}


def check_augment(augment: dict[str, Any] | None, key: str = "data.augment") -> dict[str, Any]:
    """Merge ``augment`` over :data:`AUGMENT_DEFAULTS` and validate every value."""
    augment = dict(augment or {})
    unknown = sorted(set(augment) - set(AUGMENT_DEFAULTS))
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}", "unknown augmentation key", f"use only {', '.join(AUGMENT_DEFAULTS)}")
    cfg = {**AUGMENT_DEFAULTS, **augment}

    def number(name: str, lo: float, hi: float = float("inf")) -> None:
        v = cfg[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
            raise ConfigError(f"{key}.{name}", f"must be a number in [{lo}, {hi}], got {v!r}",
                              f"e.g. {key}.{name}={AUGMENT_DEFAULTS[name]}")

    for name in ("photometric_p", "zoom_out_p", "crop_p", "hflip_p", "min_visibility", "crop_min_scale"):
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
    aspect = cfg["crop_aspect"]
    if (not isinstance(aspect, (list, tuple)) or len(aspect) != 2
            or not all(isinstance(v, (int, float)) for v in aspect) or not 0 < aspect[0] <= aspect[1]):
        raise ConfigError(f"{key}.crop_aspect", f"must be [min, max] with 0 < min <= max, got {aspect!r}", "e.g. [0.5, 2.0]")
    return cfg


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


def build_train_transform(image_size: int, normalize: NormalizeSpec = "imagenet", augment: dict[str, Any] | None = None,
                          seed: int | None = None) -> DetectionTransform:
    """SSD training augmentation; ``augment`` overrides :data:`AUGMENT_DEFAULTS`."""
    cfg = check_augment(augment)
    mean, std = resolve_normalization(normalize)
    fill = tuple(round(m * 255) for m in mean)  # zoom-out canvas = mean colour (0 after normalising)
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
    ops += [A.Resize(image_size, image_size, interpolation=cv2.INTER_LINEAR),
            A.Normalize(mean=mean, std=std, max_pixel_value=255.0), ToTensorV2()]
    return DetectionTransform(A.Compose(ops, bbox_params=_bbox_params(cfg["min_visibility"]), seed=seed))


def build_eval_transform(image_size: int, normalize: NormalizeSpec = "imagenet") -> DetectionTransform:
    """Resize to ``image_size`` x ``image_size``, normalise, to tensor (deterministic)."""
    mean, std = resolve_normalization(normalize)
    ops = [A.Resize(image_size, image_size, interpolation=cv2.INTER_LINEAR),
           A.Normalize(mean=mean, std=std, max_pixel_value=255.0), ToTensorV2()]
    return DetectionTransform(A.Compose(ops, bbox_params=_bbox_params(), seed=0))
