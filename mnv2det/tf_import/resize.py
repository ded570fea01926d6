"""TF1's legacy bilinear resize (the input resize of TF OD API graphs) in torch."""
from __future__ import annotations

import torch


def tf_resize_bilinear(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """TF1 `ResizeBilinear(align_corners=False, half_pixel_centers=False)`, as in TF OD API graphs.

    images: (B, C, H, W) float -> (B, C, h, w) float32. Source coordinate of output pixel i is
    i * (H / h) (no half-pixel offset, unlike torch/cv2), interpolated in float32 like TF's kernel.
    """
    x = images.to(torch.float32)
    H, W = x.shape[-2:]
    h, w = size

    def weights(n_out: int, n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scale = torch.tensor(n_in / n_out, dtype=torch.float32)
        src = torch.arange(n_out, dtype=torch.float32, device=x.device) * scale.to(x.device)
        lo = src.floor().long()
        hi = torch.clamp(lo + 1, max=n_in - 1)
        return lo, hi, src - lo.to(torch.float32)

    y0, y1, ly = weights(h, H)
    x0, x1, lx = weights(w, W)
    top_left, top_right = x[..., y0, :][..., x0], x[..., y0, :][..., x1]
    bottom_left, bottom_right = x[..., y1, :][..., x0], x[..., y1, :][..., x1]
    top = top_left + (top_right - top_left) * lx
    bottom = bottom_left + (bottom_right - bottom_left) * lx
    return top + (bottom - top) * ly[:, None]
