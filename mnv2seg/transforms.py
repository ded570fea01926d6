"""DeepLab-style segmentation transforms (albumentations) and the padding collate.

Training (as TF DeepLab's input_preprocess): random scale in [0.5, 2.0], pad to the crop with the
mean pixel (image) / 255 (mask), random crop (513 by default), random left-right flip, normalise,
to tensor. Evaluation: the whole image at its own size, normalised only; `collate` pads a batch to
its largest image with 0 (= the mean pixel after normalisation) and 255 (ignored), and keeps each
image's own size so predictions can be cropped back.
"""
from __future__ import annotations

from typing import Any, Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2

from backbone.errors import ConfigError
from backbone.normalization import NormalizeSpec, resolve_normalization
from backbone.training.voc_format import IGNORE_INDEX

def train_transform(crop_size: int | Sequence[int] = 513, scale_min: float = 0.5, scale_max: float = 2.0,
                    hflip: bool = True, normalize: NormalizeSpec = "imagenet") -> A.Compose:
    """Random scale -> pad (mean / 255) -> random crop -> flip -> normalise -> tensor.

    Output: image (3, ch, cw) float32, mask (ch, cw) uint8.
    """
    ch, cw = (crop_size, crop_size) if isinstance(crop_size, int) else (int(crop_size[0]), int(crop_size[1]))
    if ch < 8 or cw < 8:
        raise ConfigError("data.crop_size", f"must be >= 8, got {crop_size}", "e.g. 513 (VOC) or 257 (CPU runs)")
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


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch samples of possibly different sizes.

    Returns {images: (B, 3, H, W) float (0-padded to the batch max), masks: (B, H, W) int64
    (255-padded), sizes: (B, 2) int64 each image's own (h, w), names: list[str]}.
    """
    images = [s["image"] for s in samples]
    masks = [torch.as_tensor(np.asarray(s["mask"])) if not torch.is_tensor(s["mask"]) else s["mask"] for s in samples]
    sizes = torch.tensor([tuple(im.shape[-2:]) for im in images], dtype=torch.int64)
    h, w = (int(v) for v in sizes.max(0).values)
    if all(tuple(im.shape[-2:]) == (h, w) for im in images):
        batch_images = torch.stack(images)
        batch_masks = torch.stack(masks).long()
    else:
        batch_images = images[0].new_zeros((len(images), images[0].shape[0], h, w))
        batch_masks = torch.full((len(images), h, w), IGNORE_INDEX, dtype=torch.int64)
        for i, (im, m) in enumerate(zip(images, masks)):
            batch_images[i, :, : im.shape[-2], : im.shape[-1]] = im
            batch_masks[i, : m.shape[-2], : m.shape[-1]] = m
    return {"images": batch_images, "masks": batch_masks, "sizes": sizes, "names": [s["name"] for s in samples]}
