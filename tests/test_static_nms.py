"""The static-shape greedy NMS (TFLite / ExecuTorch) equals the reference op, eagerly, on crowded random
boxes: every kept box, label and score, including boxes the clip empties and caps that bind."""
from __future__ import annotations

import pytest
import torch

import mnv2det.export  # noqa: F401 -- registers torch.ops.mnv2.multiclass_nms
from backbone.export.static_nms import static_multiclass_nms


def _crowd(seed: int, B: int, K: int, N: int, size: float = 100.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(B, N, 2, generator=g) * size * 1.04 - size * 0.05  # a few boxes wholly outside
    wh = torch.rand(B, N, 2, generator=g) * size * 0.3 + 0.5
    return torch.cat([xy, xy + wh], -1), torch.rand(B, K, N, generator=g) ** 3


@pytest.mark.parametrize("K,N,top_k,D", [(3, 400, 300, 100), (1, 200, 0, 50), (5, 120, 1000, 20), (2, 30, 40, 100)])
def test_static_nms_equals_reference(K: int, N: int, top_k: int, D: int) -> None:
    boxes, scores = _crowd(K * N + D, 2, K, N)
    args = (boxes, scores, 100.0, 100.0, 0.5, 0.05, D)
    ref = torch.ops.mnv2.multiclass_nms(*args, top_k)
    got = static_multiclass_nms(*args, top_k=top_k if top_k > 0 else K * N)
    assert torch.equal(got[3], ref[3]) and int(ref[3].min()) > 0
    for g, r in zip(got[:3], ref[:3]):
        assert torch.equal(g, r)


def test_static_nms_too_few_steps_fails() -> None:
    """The steps bound is real: fewer greedy picks than kept boxes lose detections."""
    boxes, scores = _crowd(1, 1, 3, 400)
    args = (boxes, scores, 100.0, 100.0, 0.5, 0.05, 100)
    ref = torch.ops.mnv2.multiclass_nms(*args, 300)
    got = static_multiclass_nms(*args, top_k=300, steps=int(ref[3]) // 2)
    assert int(got[3]) < int(ref[3])
