"""DeepLab-style segmentation transforms (albumentations) and the padding collate.

Training (as TF DeepLab's input_preprocess): random scale in [0.5, 2.0], pad to the crop with the
mean pixel (image) / 255 (mask), random crop (513 by default), random left-right flip, normalise,
to tensor. Evaluation: the whole image at its own size, normalised only; `collate` pads it at the
bottom/right with 0 (= the mean pixel after normalisation) and 255 (ignored) and keeps each image's
own size so predictions can be cropped back.

Eval padding (``eval_size``): TF DeepLab pads every eval image to one fixed ``eval_crop_size``
(513x513 for VOC): research/deeplab/input_preprocess.py ``preprocess_image_and_label`` pads at the
bottom/right to ``max(image, crop)`` with ``pad_to_bounding_box(image, 0, 0, target_height,
target_width, mean_pixel)`` (the label with ``ignore_label``), crops only when training, and then
sets the shape to the crop, so a larger eval image is an error there. The network sees the padding (the image-pooling branch averages over
it, convolutions near the border read it), so a prediction depends on how much padding surrounds
its image: with one fixed size it depends on the image alone, whatever the batch size or DDP split.
``eval_size=None`` pads to the batch's largest image instead: scores then depend on the batching.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2

from backbone.errors import ArgumentError, ConfigError
from backbone.normalization import NormalizeSpec, resolve_normalization
from backbone.training.voc_format import IGNORE_INDEX

log = logging.getLogger(__name__)

#: Eval sizes are SIZE_STEP * k + 1 (TF DeepLab's 513 = 16 * 32 + 1): with the backbone's stride-2
#: convs (symmetric padding 1, which is also TF 'SAME' on odd sizes), feature j of an output stride
#: 16 (or 8) map is centred on pixel 16 * j (8 * j), so the first and last features sit on the
#: first and last pixels, which is what align_corners=True upsampling assumes.
SIZE_STEP = 16
_warned_oversize: set[str] = set()


def check_crop_size(crop_size: Any, output_stride: int | None = None) -> tuple[int, int]:
    """The training crop ``N`` or ``[h, w]`` as (h, w), else ArgumentError naming ``crop_size``.

    Each side must be >= 8 and, given the model's ``output_stride``, larger than it: a crop of at most
    one stride gives a 1x1 feature map, so the whole crop is predicted from one feature (and the image
    pooling branch sees nothing else). ``output_stride * k + 1`` sizes (513, 161, 65) are the ones where
    align_corners=True upsampling puts each logit back on the pixel it was computed at.
    """
    values = list(crop_size) if isinstance(crop_size, (list, tuple)) else [crop_size]
    if len(values) not in (1, 2) or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in values):
        raise ArgumentError("crop_size", f"must be an integer or [h, w], got {crop_size!r}", "e.g. 513 (VOC) or 161")
    ch, cw = int(values[0]), int(values[-1])
    low = 8 if output_stride is None else max(8, int(output_stride) + 1)
    if min(ch, cw) < low:
        why = "" if output_stride is None else f" (over the output stride {output_stride}: a feature map of 2x2 or more)"
        fix = f"e.g. {2 * (output_stride or SIZE_STEP) + 1}, or 513 (VOC) / 161 (CPU runs)"
        raise ArgumentError("crop_size", f"must be >= {low}{why}, got {crop_size}", fix)
    return ch, cw


def train_transform(crop_size: int | Sequence[int] = 513, scale_min: float = 0.5, scale_max: float = 2.0,
                    hflip: bool = True, normalize: NormalizeSpec = "imagenet") -> A.Compose:
    """Random scale -> pad (mean / 255) -> random crop -> flip -> normalise -> tensor.

    Output: image (3, ch, cw) float32, mask (ch, cw) uint8.
    """
    try:
        ch, cw = check_crop_size(crop_size)
    except ArgumentError as err:
        raise err.to_config_error("data") from None
    if not 0 < scale_min <= scale_max:
        raise ConfigError("data.augment.scale_min", f"need 0 < scale_min <= scale_max, got {scale_min}, {scale_max}",
                          "e.g. scale_min=0.5 scale_max=2.0")
    mean, std = resolve_normalization(normalize)
    mean_pixel = tuple(float(m * 255.0) for m in mean)
    ops: list[Any] = []
    if (scale_min, scale_max) != (1.0, 1.0):
        # scale_limit is added to 1: (-0.5, 1.0) -> uniform factor in [0.5, 2.0]
        ops.append(A.RandomScale(scale_limit=(scale_min - 1.0, scale_max - 1.0), interpolation=cv2.INTER_LINEAR,
                                 mask_interpolation=cv2.INTER_NEAREST, p=1.0))
    ops += [
        # TF DeepLab pads at the bottom/right with the mean pixel; padded labels are ignored
        A.PadIfNeeded(min_height=ch, min_width=cw, position="top_left", border_mode=cv2.BORDER_CONSTANT,
                      fill=mean_pixel, fill_mask=IGNORE_INDEX),
        A.RandomCrop(height=ch, width=cw),
    ]
    if hflip:
        ops.append(A.HorizontalFlip(p=0.5))
    ops += [A.Normalize(mean=mean, std=std, max_pixel_value=255.0), ToTensorV2()]
    return A.Compose(ops)


def eval_transform(normalize: NormalizeSpec = "imagenet") -> A.Compose:
    """Whole image at its own size: normalise -> tensor."""
    mean, std = resolve_normalization(normalize)
    return A.Compose([A.Normalize(mean=mean, std=std, max_pixel_value=255.0), ToTensorV2()])


def fitting_size(n: int, step: int = SIZE_STEP) -> int:
    """The smallest ``step * k + 1`` >= n (e.g. 341 -> 353, 500 -> 513, 513 -> 513)."""
    return step * max(0, -(-(int(n) - 1) // step)) + 1


def eval_hw(eval_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    """``eval_size`` (None, N or [h, w]) as None or (h, w)."""
    if eval_size is None:
        return None
    if isinstance(eval_size, (int, np.integer)):
        return int(eval_size), int(eval_size)
    h, w = eval_size
    return int(h), int(w)


def collate(samples: list[dict[str, Any]], eval_size: int | Sequence[int] | None = None) -> dict[str, Any]:
    """Batch samples of possibly different sizes, padded at the bottom/right.

    eval_size: None pads to the batch's largest image (training crops are all the same size, so
    they are only stacked). N or [h, w]: every image is padded to that one size (TF DeepLab's
    eval_crop_size), so its prediction does not depend on its batch. An image larger than it pads
    its batch to the smallest ``16k + 1`` that fits and is reported once (a warning naming it).

    Returns {images: (B, 3, H, W) float (0-padded), masks: (B, H, W) int64 (255-padded),
    sizes: (B, 2) int64 each image's own (h, w), names: list[str], health: {samples: B, events: [...]}
    (the samples' data-health records, see :mod:`backbone.training.data_health`)}.
    """
    images = [s["image"] for s in samples]
    masks = [torch.as_tensor(np.asarray(s["mask"])) if not torch.is_tensor(s["mask"]) else s["mask"] for s in samples]
    names = [s["name"] for s in samples]
    sizes = torch.tensor([tuple(im.shape[-2:]) for im in images], dtype=torch.int64)
    h, w = (int(v) for v in sizes.max(0).values)
    fixed = eval_hw(eval_size)
    if fixed is not None:
        _warn_oversize(names, sizes, fixed)
        h = fixed[0] if h <= fixed[0] else fitting_size(h)
        w = fixed[1] if w <= fixed[1] else fitting_size(w)
    if all(tuple(im.shape[-2:]) == (h, w) for im in images):
        batch_images = torch.stack(images)
        batch_masks = torch.stack(masks).long()
    else:
        batch_images = images[0].new_zeros((len(images), images[0].shape[0], h, w))
        batch_masks = torch.full((len(images), h, w), IGNORE_INDEX, dtype=torch.int64)
        for i, (im, m) in enumerate(zip(images, masks)):
            batch_images[i, :, : im.shape[-2], : im.shape[-1]] = im
            batch_masks[i, : m.shape[-2], : m.shape[-1]] = m
    health = {"samples": len(samples), "events": [e for s in samples for e in s.get("health", ())]}
    return {"images": batch_images, "masks": batch_masks, "sizes": sizes, "names": names, "health": health}


def _warn_oversize(names: list[str], sizes: torch.Tensor, fixed: tuple[int, int]) -> None:
    """One warning per val image larger than the eval size (once per process, not every epoch)."""
    for name, (ih, iw) in zip(names, sizes.tolist()):
        if (ih > fixed[0] or iw > fixed[1]) and name not in _warned_oversize:
            _warned_oversize.add(name)
            need = fitting_size(max(ih, iw))
            log.warning("val image %s is %dx%d, larger than data.eval_size=%dx%d: its batch is padded to the next "
                        "16k+1 size that fits instead, so its score (and its batch's) depends on how the val set is "
                        "batched -- fix: raise data.eval_size to at least %d", name, ih, iw, fixed[0], fixed[1], need)
