"""SSD default boxes, exactly as TF Object Detection API's `ssd_anchor_generator`.

TF builds, for `num_layers` feature maps, scales linear in [min_scale, max_scale]
(s_k = min + (max - min) * k / (n - 1), plus s_n = 1.0 used only for the interpolated box):

- lowest map (when `reduce_boxes_in_lowest_layer`): 3 boxes (0.1, ratio 1), (s_0, 2), (s_0, 1/2);
- other maps: one box per aspect ratio at scale s_k (in the given order), then the extra box
  sqrt(s_k * s_{k+1}) at `interpolated_scale_aspect_ratio`.

A box of scale s and ratio a has h = s / sqrt(a), w = s * sqrt(a) (normalised to the input; the
image is square in TF's config, so no min-side correction is applied for square inputs; for a
non-square input TF shrinks the base size of the longer side by min(H, W) / side, and so do we).
Centres sit at ((i + 0.5) / H, (j + 0.5) / W); corners are NOT clipped. Anchors are ordered
(y, x, anchor) inside each map and maps are concatenated, which is the order of the head outputs.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from backbone.errors import ArgumentError


def check_num_layers(num_layers: int, num_feature_maps: int) -> None:
    """The generator makes one set of boxes per feature map: ArgumentError naming ``num_layers`` unless
    it equals ``num_feature_maps`` (checked at start-up by :mod:`backbone.training.config_checks` and
    again for every batch's maps)."""
    if int(num_layers) != int(num_feature_maps):
        raise ArgumentError("num_layers",
                            f"anchor generator has {num_layers} layers but got {num_feature_maps} feature maps",
                            "make num_layers equal to the number of feature maps")


class DefaultBoxGenerator(nn.Module):
    """TF `ssd_anchor_generator` default boxes.

    Args:
        min_scale, max_scale: scale range over the feature maps (fraction of the input side).
        aspect_ratios: ratios w / h used on all maps but the lowest (TF config order).
        reduce_boxes_in_lowest_layer: use TF's 3 fixed boxes on the first map.
        interpolated_scale_aspect_ratio: ratio of the extra sqrt(s_k s_k+1) box; <= 0 disables it.
        num_layers: number of feature maps the boxes are generated for.
    """

    def __init__(self, min_scale: float = 0.2, max_scale: float = 0.95,
                 aspect_ratios: Sequence[float] = (1.0, 2.0, 0.5, 3.0, 1.0 / 3.0),
                 reduce_boxes_in_lowest_layer: bool = True,
                 interpolated_scale_aspect_ratio: float = 1.0, num_layers: int = 6) -> None:
        super().__init__()
        if not 0 < min_scale <= max_scale:
            raise ArgumentError("min_scale", f"need 0 < min_scale <= max_scale, got {min_scale}, {max_scale}",
                              "use e.g. min_scale=0.2, max_scale=0.95")
        if num_layers < 1:
            raise ArgumentError("num_layers", f"must be >= 1, got {num_layers}")
        if not aspect_ratios or any(float(a) <= 0 for a in aspect_ratios):
            raise ArgumentError("aspect_ratios", f"need positive ratios, got {list(aspect_ratios)}",
                              "use e.g. [1.0, 2.0, 0.5, 3.0, 0.3333]")
        self.min_scale = float(min_scale)
        self.max_scale = float(max_scale)
        self.aspect_ratios = tuple(float(a) for a in aspect_ratios)
        self.reduce_boxes_in_lowest_layer = bool(reduce_boxes_in_lowest_layer)
        self.interpolated_scale_aspect_ratio = float(interpolated_scale_aspect_ratio)
        self.num_layers = int(num_layers)
        self.box_specs = self._box_specs()
        self._cache: dict[tuple, torch.Tensor] = {}

    def _box_specs(self) -> list[list[tuple[float, float]]]:
        """Per map, the (scale, aspect_ratio) of each box, in TF's order."""
        n = self.num_layers
        if n == 1:
            scales = [self.min_scale]
        else:
            scales = [self.min_scale + (self.max_scale - self.min_scale) * k / (n - 1) for k in range(n)]
        scales.append(1.0)
        specs: list[list[tuple[float, float]]] = []
        for k in range(n):
            if k == 0 and self.reduce_boxes_in_lowest_layer:
                layer = [(0.1, 1.0), (scales[0], 2.0), (scales[0], 0.5)]
            else:
                layer = [(scales[k], a) for a in self.aspect_ratios]
                if self.interpolated_scale_aspect_ratio > 0:
                    layer.append((math.sqrt(scales[k] * scales[k + 1]), self.interpolated_scale_aspect_ratio))
            specs.append(layer)
        return specs

    def num_anchors_per_location(self) -> list[int]:
        """Boxes per cell for each map (TF ssdlite: [3, 6, 6, 6, 6, 6])."""
        return [len(s) for s in self.box_specs]

    def _check_sizes(self, feature_map_sizes: Sequence[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
        sizes = tuple((int(h), int(w)) for h, w in feature_map_sizes)
        check_num_layers(self.num_layers, len(sizes))
        return sizes

    def _generate_yx(self, sizes: tuple[tuple[int, int], ...], image_hw: tuple[int, int] | None,
                     device: torch.device) -> torch.Tensor:
        """(A, 4) anchors (ymin, xmin, ymax, xmax), computed in float64 then cast to float32."""
        if image_hw is not None:
            # TF: base anchor size shrinks on the longer side so anchors stay square in pixels.
            im_h, im_w = image_hw
            m = min(im_h, im_w)
            base_h, base_w = m / im_h, m / im_w
        else:
            base_h = base_w = 1.0
        out = []
        for (fh, fw), specs in zip(sizes, self.box_specs):
            sc = torch.tensor([s for s, _ in specs], dtype=torch.float64)
            ar = torch.tensor([a for _, a in specs], dtype=torch.float64).sqrt()
            heights = sc / ar * base_h  # (n,)
            widths = sc * ar * base_w
            cy = (torch.arange(fh, dtype=torch.float64) + 0.5) / fh  # (fh,)
            cx = (torch.arange(fw, dtype=torch.float64) + 0.5) / fw  # (fw,)
            # (fh, fw, n) grids in (y, x, anchor) order
            cyg = cy[:, None, None].expand(fh, fw, len(specs))
            cxg = cx[None, :, None].expand(fh, fw, len(specs))
            hg = heights[None, None, :].expand(fh, fw, len(specs))
            wg = widths[None, None, :].expand(fh, fw, len(specs))
            boxes = torch.stack([cyg - hg / 2, cxg - wg / 2, cyg + hg / 2, cxg + wg / 2], dim=-1)
            out.append(boxes.reshape(-1, 4))
        return torch.cat(out).to(device=device, dtype=torch.float32)

    def forward_yx(self, feature_map_sizes: Sequence[tuple[int, int]], device: torch.device | str = "cpu",
                   image_hw: tuple[int, int] | None = None) -> torch.Tensor:
        """Anchors in TF's order: (A, 4) normalised (ymin, xmin, ymax, xmax)."""
        sizes = self._check_sizes(feature_map_sizes)
        key = ("yx", sizes, tuple(image_hw) if image_hw is not None else None, str(torch.device(device)))
        if key not in self._cache:
            self._cache[key] = self._generate_yx(sizes, image_hw, torch.device(device))
        return self._cache[key]

    def forward(self, feature_map_sizes: Sequence[tuple[int, int]], device: torch.device | str = "cpu",
                image_hw: tuple[int, int] | None = None) -> torch.Tensor:
        """Anchors (A, 4) normalised xyxy (x1, y1, x2, y2), cached per (sizes, image_hw, device).

        feature_map_sizes: [(H_k, W_k)] for the maps, lowest (largest) first.
        image_hw: network input (H, W); only matters for non-square inputs (TF base-size rule).
        """
        sizes = self._check_sizes(feature_map_sizes)
        if image_hw is not None and image_hw[0] == image_hw[1]:
            image_hw = None  # square: identical anchors, share the cache entry
        key = ("xy", sizes, tuple(image_hw) if image_hw is not None else None, str(torch.device(device)))
        if key not in self._cache:
            yx = self.forward_yx(sizes, device, image_hw)
            self._cache[key] = yx[:, [1, 0, 3, 2]].contiguous()
        return self._cache[key]

    def extra_repr(self) -> str:
        return (f"min_scale={self.min_scale}, max_scale={self.max_scale}, aspect_ratios={self.aspect_ratios}, "
                f"per_location={self.num_anchors_per_location()}")
