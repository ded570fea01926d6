"""Faster R-CNN centre-size box coding (TF `faster_rcnn_box_coder`, scales 10/10/5/5).

For a box (cx, cy, w, h) and an anchor (cxa, cya, wa, ha), all normalised:
    tx = wx * (cx - cxa) / wa,  ty = wy * (cy - cya) / ha,
    tw = ww * log(w / wa),      th = wh * log(h / ha).
`order="xy"` lays codes out as (tx, ty, tw, th) (our models); `order="yx"` as TF stores them,
(ty, tx, th, tw), for imported TF weights. `weights` are given in the SAME order as the codes:
(centre, centre, size, size) = (10, 10, 5, 5) for both orders of TF's config.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from backbone.errors import ArgumentError

# Clamp on the size deltas before exp (as torchvision): keeps decode finite for wild predictions.
BBOX_XFORM_CLIP = math.log(1000.0 / 16)
_EPS = 1e-8  # TF adds this to sizes before dividing / taking logs


class BoxCoder:
    """Encode xyxy boxes against xyxy anchors and back.

    Args:
        weights: 4 scales in the order of the codes ((x, y, w, h) for "xy", (y, x, h, w) for "yx").
        order: "xy" -> codes (tx, ty, tw, th); "yx" -> codes (ty, tx, th, tw) (TF layout).
        clip: max value of the (unweighted) log size delta at decode time.
    """

    def __init__(self, weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0), order: str = "xy",
                 clip: float = BBOX_XFORM_CLIP) -> None:
        if order not in ("xy", "yx"):
            raise ArgumentError("order", f"must be 'xy' or 'yx', got {order!r}",
                              "use 'xy' for own models, 'yx' for TF-imported weights")
        if len(weights) != 4 or any(float(w) <= 0 for w in weights):
            raise ArgumentError("weights", f"need 4 positive numbers, got {list(weights)}",
                              "use [10, 10, 5, 5]")
        self.weights = tuple(float(w) for w in weights)
        self.order = order
        self.clip = float(clip)

    def _code_weights(self, ref: torch.Tensor) -> torch.Tensor:
        """Weights as (wx, wy, ww, wh) whatever the code order."""
        w = self.weights if self.order == "xy" else (self.weights[1], self.weights[0], self.weights[3], self.weights[2])
        return torch.tensor(w, dtype=ref.dtype, device=ref.device)

    def encode(self, boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """boxes: (..., 4) xyxy, anchors: (..., 4) xyxy (broadcastable, e.g. (B, A, 4) vs (A, 4)).

        Returns (..., 4) codes in `self.order`.
        """
        wx, wy, ww, wh = self._code_weights(boxes).unbind(-1)
        aw = anchors[..., 2] - anchors[..., 0] + _EPS
        ah = anchors[..., 3] - anchors[..., 1] + _EPS
        acx = anchors[..., 0] + 0.5 * (anchors[..., 2] - anchors[..., 0])
        acy = anchors[..., 1] + 0.5 * (anchors[..., 3] - anchors[..., 1])
        bw = boxes[..., 2] - boxes[..., 0] + _EPS
        bh = boxes[..., 3] - boxes[..., 1] + _EPS
        bcx = boxes[..., 0] + 0.5 * (boxes[..., 2] - boxes[..., 0])
        bcy = boxes[..., 1] + 0.5 * (boxes[..., 3] - boxes[..., 1])
        tx = wx * (bcx - acx) / aw
        ty = wy * (bcy - acy) / ah
        tw = ww * torch.log(bw / aw)
        th = wh * torch.log(bh / ah)
        if self.order == "xy":
            return torch.stack([tx, ty, tw, th], dim=-1)
        return torch.stack([ty, tx, th, tw], dim=-1)

    def decode(self, rel_codes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """rel_codes: (..., 4) in `self.order`, anchors: (..., 4) xyxy (broadcastable) -> (..., 4) xyxy."""
        if self.order == "xy":
            tx, ty, tw, th = rel_codes.unbind(-1)
        else:
            ty, tx, th, tw = rel_codes.unbind(-1)
        wx, wy, ww, wh = self._code_weights(rel_codes).unbind(-1)
        anchors = anchors.to(rel_codes.dtype)
        aw = anchors[..., 2] - anchors[..., 0]
        ah = anchors[..., 3] - anchors[..., 1]
        acx = anchors[..., 0] + 0.5 * aw
        acy = anchors[..., 1] + 0.5 * ah
        cx = tx / wx * aw + acx
        cy = ty / wy * ah + acy
        w = torch.exp((tw / ww).clamp(max=self.clip)) * aw
        h = torch.exp((th / wh).clamp(max=self.clip)) * ah
        return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)

    def __repr__(self) -> str:
        return f"BoxCoder(weights={self.weights}, order={self.order!r})"
