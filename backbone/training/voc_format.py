"""PASCAL VOC label conventions, defined once for the segmentation task and the synthetic set.

Masks are palette PNGs whose pixel values ARE the class indices: 0 background, 1..K-1 the
classes, ``IGNORE_INDEX`` (255) "void" (object boundaries, padding), never scored nor trained on.
The palette only colours them for viewers.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

IGNORE_INDEX = 255

VOC_CLASS_NAMES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


def voc_palette(num: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map: ``(num, 3)`` uint8, the index's bits interleaved into R, G, B.

    Index 0 is black, 1 is (128, 0, 0), ..., 255 is (224, 224, 192).
    """
    idx = np.arange(num)
    cmap = np.zeros((num, 3), dtype=np.int64)
    for shift in range(8):  # 8 bit planes, not a per-index loop
        for ch in range(3):
            cmap[:, ch] |= ((idx >> (3 * shift + ch)) & 1) << (7 - shift)
    return cmap.astype(np.uint8)


def class_names_for(num_classes: int, names: Sequence[str] | None = None) -> list[str]:
    """Names for K classes (background first): the given ones, VOC's 21 for K == 21, else
    background + class_1..K-1. Raises ValueError when ``names`` does not have K entries."""
    if names is not None:
        names = [str(n) for n in names]
        if len(names) != num_classes:
            raise ValueError(f"class_names has {len(names)} names but num_classes={num_classes}: give one name per "
                             "class, background first")
        return names
    if num_classes == len(VOC_CLASS_NAMES):
        return list(VOC_CLASS_NAMES)
    return ["background"] + [f"class_{i}" for i in range(1, num_classes)]
