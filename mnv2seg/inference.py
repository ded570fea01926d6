"""Single-scale and multi-scale + flip ("MF" in the paper's Table 7) segmentation inference.

MF follows TF DeepLab (research/deeplab/model.py ``predict_labels_multi_scale``): the image is
resized to each scale, the logits of every scale (and of the left-right flipped image) are resized
back to the input size, turned into softmax probabilities and averaged. It works on what it is
given: the val batches' images already padded to ``data.eval_size``, as TF's are padded to
eval_crop_size, so the flip and the rescaling see the same padded image whatever the batching.

With ``align_corners`` every resize is TF's (research/deeplab/model.py ``multi_scale_logits``, which
``predict_labels_multi_scale`` calls once per scale): the image is resized with
``tf.image.resize_bilinear(..., align_corners=True)`` to ``scale_dimension(dim, scale) =
int((dim - 1) * scale + 1)`` (513 -> 257, 385, 641, 769, 897: 16k+1 again); the logits of a scale
below 1 are resized to the logits size of scale 1, ``scale_dimension(dim, 1 / output_stride)``, and
then every scale's to the image size, each with align_corners=True. Where TF resizes the
low-resolution logits, this module resizes the model's output, already upsampled (corner-aligned)
to the scaled size: when the scaled size is 16k+1 (as above) that upsampling is exact on the feature
grid and the results are the same (tests/test_seg_model.py compares them). Without align_corners
(PyTorch's default) the scaled size is ``round(dim * scale)`` and the logits go straight back to the
image size.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

DEFAULT_MF_SCALES: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
INFERENCE_MODES = ("single", "mf")


def scaled_size(dim: int, scale: float, align_corners: bool) -> int:
    """A side of `dim` pixels resized by `scale`: TF's ``scale_dimension`` with align_corners, else rounded."""
    if align_corners:
        return max(1, int((dim - 1) * scale + 1))
    return max(1, round(dim * scale))


def _probs_at(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, scale: float,
              align_corners: bool) -> torch.Tensor:
    """Softmax probabilities (B, K, H, W) of the model run on images resized by `scale`."""
    size = images.shape[-2:]
    if scale == 1.0:
        logits = model(images)  # no resize at all: bit-identical to single scale
    else:
        h, w = (scaled_size(s, scale, align_corners) for s in size)
        scaled = F.interpolate(images, size=(h, w), mode="bilinear", align_corners=align_corners)
        logits = model(scaled)
        stride = getattr(model, "output_stride", None)
        if align_corners and scale < 1.0 and stride:  # TF: first to the logits size of scale 1
            merged = tuple(scaled_size(s, 1.0 / stride, True) for s in size)
            logits = F.interpolate(logits, size=merged, mode="bilinear", align_corners=True)
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=align_corners)
    return logits.float().softmax(dim=1)


@torch.no_grad()
def predict_probs(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                  scales: Sequence[float] = (1.0,), flip: bool = False,
                  align_corners: bool | None = None) -> torch.Tensor:
    """Class probabilities averaged over scales (and flips).

    Args:
        model: images (B, 3, h, w) -> logits (B, K, h, w).
        images: (B, 3, H, W) normalised.
        scales: resize factors; (1.0,) with flip=False is plain single-scale inference.
        flip: also run the left-right flipped images and flip the result back.
        align_corners: of the image and logit resizes (and TF's scaled sizes); None: the model's
            own ``align_corners`` attribute (False when it has none).
    Returns:
        (B, K, H, W) float32 probabilities.
    """
    scales = tuple(float(s) for s in scales)
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"scales must be a non-empty list of positive numbers, got {scales}")
    if align_corners is None:
        align_corners = bool(getattr(model, "align_corners", False))
    total = None
    count = 0
    for scale in scales:
        for flipped in ((False, True) if flip else (False,)):
            x = images.flip(-1) if flipped else images
            p = _probs_at(model, x, scale, align_corners)
            if flipped:
                p = p.flip(-1)
            total = p if total is None else total + p
            count += 1
    return total / count


@torch.no_grad()
def predict(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, mode: str = "single",
            scales: Sequence[float] = DEFAULT_MF_SCALES, flip: bool = True,
            align_corners: bool | None = None) -> torch.Tensor:
    """Class probabilities (B, K, H, W) with mode "single" or "mf" (multi-scale `scales` + flip)."""
    if mode == "single":
        return predict_probs(model, images, (1.0,), False, align_corners)
    if mode == "mf":
        return predict_probs(model, images, scales, flip, align_corners)
    raise ValueError(f"inference mode must be one of {INFERENCE_MODES}, got {mode!r}")
