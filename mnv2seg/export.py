"""Mobile DeepLabv3 for export: 0..255 images in, logits at output stride (or the argmax mask) out.

The eval pipeline (:mod:`mnv2seg.transforms`, ``data.eval_size``) pads every image bottom/right to one
16k+1 size with the mean pixel (0 after normalisation); the export's ``input_size`` is that size and
its metadata says ``resize: pad`` with ``pad_value`` = mean * 255.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from backbone.errors import ConfigError
from backbone.export.layout import MOBILE_SEG_OUTPUT, check_layout, example_input, images_to_nchw
from mnv2seg.deeplabv3 import DeepLabV3

log = logging.getLogger("mnv2")


class SegmentationExport(nn.Module):
    """images (B, 3, H, W) float32 RGB 0..255 (``layout="mobile"``: (B, H, W, 3) float32 or uint8,
    :mod:`backbone.export.layout`) ->
        argmax=False: logits (B, K, h, w) at output stride (h = ceil(H / output_stride));
        mobile: logits_nhwc (B, H, W, K), resized to the input as below (what ImageSegmenter reads);
        argmax=True: mask (B, H, W) int64, the logits resized to the input as the model's forward does
        (bilinear, its align_corners) then argmax over classes: mnv2seg.inference's single-scale eval.
    """

    def __init__(self, model: DeepLabV3, mean: tuple[float, ...], std: tuple[float, ...], argmax: bool = False,
                 layout: str = "nchw", input_dtype: str = "float32") -> None:
        super().__init__()
        self.model = model.eval()
        self.argmax = bool(argmax)
        self.layout, self.input_dtype = check_layout(layout, input_dtype)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255)
        mobile = self.layout == "mobile"
        self.output_names = ("mask",) if self.argmax else (MOBILE_SEG_OUTPUT,) if mobile else ("logits",)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor]:
        x = images_to_nchw(images, self.layout)
        logits = self.model.head(self.model.backbone((x - self.mean) / self.std)[self.model.feature])
        if not self.argmax and self.layout != "mobile":
            return (logits,)
        up = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=self.model.align_corners)
        if not self.argmax:
            return (up.permute(0, 2, 3, 1),)
        return (up.argmax(dim=1),)


def build_export(module: nn.Module, meta: dict[str, Any], data_cfg: dict[str, Any], argmax: bool = False,
                 input_size: Any = None, layout: str = "nchw", input_dtype: str = "float32"
                 ) -> tuple[SegmentationExport, torch.Tensor, dict[str, Any]]:
    """(wrapper, example input, metadata) of a DeepLabModule loaded from a checkpoint. ``input_size``
    (N or [h, w]; None: the checkpoint's data.eval_size, else its crop_size)."""
    from backbone.export.metadata import make_metadata
    from backbone.normalization import resolve_normalization
    from backbone.training.voc_format import class_names_for, voc_palette
    from mnv2seg.transforms import eval_hw

    size = input_size if input_size is not None else (data_cfg.get("eval_size") or data_cfg.get("crop_size"))
    if size is None:
        raise ConfigError("input_size", "the checkpoint names no eval_size or crop_size", "pass input_size=513")
    hw = eval_hw(size)
    if getattr(module, "inference", "single") != "single":  # MF is a loop over resized copies, not in the graph
        log.warning("the checkpoint evaluates with inference=%s; the export is single-scale (its masks are the "
                    "checkpoint's with inference=single)", module.inference)
    mean, std = resolve_normalization(getattr(module, "normalize", "imagenet"))
    wrapper = SegmentationExport(module.model, mean, std, argmax=argmax, layout=layout, input_dtype=input_dtype).eval()
    K = module.model.num_classes
    names = list(meta.get("class_names") or class_names_for(K))
    palette = meta.get("palette") or voc_palette().tolist()
    metadata = make_metadata("seg", hw, "pad", mean, std, names, wrapper.output_names, argmax=argmax,
                             palette=palette[:max(K, 1)] if len(palette) >= K else palette,
                             pad_value=[m * 255 for m in mean], output_stride=module.model.output_stride,
                             align_corners=module.model.align_corners, num_classes=K, inference="single",
                             layout=layout, input_dtype=input_dtype)
    example = example_input(2, hw, layout, input_dtype)  # batch 2: torch.export specialises a size-1 dim (no dynamic batch)
    return wrapper, example, metadata
