"""Batched post-processing equals a slow per-image, per-class reference."""
from __future__ import annotations

import pytest
import torch
from torchvision.ops import nms

from backbone.errors import ArgumentError
from mnv2det.box_coder import BoxCoder
from mnv2det.postprocess import PostProcessor


def _reference(cls_logits, box_reg, anchors, image_sizes, *, score_converter, score_threshold, nms_iou,
               max_detections, pre_nms_top_k, coder, clip_before_nms=False):
    """Slow reference: one image and one class at a time, float32 pixel boxes, torchvision.ops.nms."""
    results = []
    for b in range(cls_logits.shape[0]):
        if score_converter == "softmax":
            scores = cls_logits[b].softmax(-1)[:, 1:]
        else:
            scores = cls_logits[b, :, 1:].sigmoid()
        A, K = scores.shape
        h, w = image_sizes[b].tolist()
        boxes = coder.decode(box_reg[b], anchors) * torch.tensor([w, h, w, h], dtype=torch.float32)

        def clip(bx):
            bx = bx.clone()
            bx[:, 0::2] = bx[:, 0::2].clamp(0, w)
            bx[:, 1::2] = bx[:, 1::2].clamp(0, h)
            return bx, (bx[:, 2] > bx[:, 0]) & (bx[:, 3] > bx[:, 1])

        if clip_before_nms:
            boxes, ok = clip(boxes)
            flat = torch.where(ok[:, None], scores, torch.full_like(scores, -1.0)).flatten()
        else:
            flat = scores.flatten()
        idx = torch.arange(A * K)
        if pre_nms_top_k is not None and pre_nms_top_k < A * K:
            flat, idx = flat.topk(pre_nms_top_k)
        keep = (flat >= score_threshold) & (flat >= 0)
        flat, idx = flat[keep], idx[keep]
        det_b, det_s, det_l = [], [], []
        for c in range(K):
            in_c = idx % K == c
            if not in_c.any():
                continue
            cb, cs = boxes[idx[in_c] // K], flat[in_c]
            k = nms(cb, cs, nms_iou)
            cb, ok = clip(cb[k])  # TF clips after NMS and drops boxes left empty
            det_b.append(cb[ok])
            det_s.append(cs[k][ok])
            det_l.append(torch.full((int(ok.sum()),), c + 1))
        if det_b:
            bb, ss, ll = torch.cat(det_b), torch.cat(det_s), torch.cat(det_l)
        else:
            bb, ss, ll = torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long)
        order = ss.argsort(descending=True)[:max_detections]
        results.append({"boxes": bb[order], "scores": ss[order], "labels": ll[order]})
    return results


def _inputs(seed: int, B: int = 3, A: int = 60, K: int = 4):
    gen = torch.Generator().manual_seed(seed)
    c = torch.rand(A, 2, generator=gen) * 0.6 + 0.2  # clustered anchors -> lots of overlap for NMS
    s = torch.rand(A, 2, generator=gen) * 0.3 + 0.1
    anchors = torch.cat([c - s / 2, c + s / 2], dim=1)
    cls_logits = torch.randn(B, A, K + 1, generator=gen) * 2
    box_reg = torch.randn(B, A, 4, generator=gen) * 0.5
    box_reg[:, :8] *= 10  # pushes some boxes off the image -> clipping
    sizes = torch.tensor([[480, 640], [300, 300], [333, 500], [100, 50]])[:B]
    return cls_logits, box_reg, anchors, sizes


@pytest.mark.parametrize("clip_before_nms", [False, True])
@pytest.mark.parametrize("score_converter", ["softmax", "sigmoid"])
@pytest.mark.parametrize("pre_nms_top_k,max_det,thr", [(None, 100, 0.01), (50, 10, 0.05), (1000, 7, 0.2)])
def test_matches_slow_reference(score_converter: str, pre_nms_top_k: int | None, max_det: int, thr: float,
                                clip_before_nms: bool) -> None:
    cls_logits, box_reg, anchors, sizes = _inputs(0)
    coder = BoxCoder()
    post = PostProcessor(score_threshold=thr, nms_iou=0.6, max_detections=max_det, pre_nms_top_k=pre_nms_top_k,
                         score_converter=score_converter, box_coder=coder, clip_before_nms=clip_before_nms)
    got = post(cls_logits, box_reg, anchors, sizes)
    ref = _reference(cls_logits, box_reg, anchors, sizes, score_converter=score_converter, score_threshold=thr,
                     nms_iou=0.6, max_detections=max_det, pre_nms_top_k=pre_nms_top_k, coder=coder,
                     clip_before_nms=clip_before_nms)
    assert len(got) == len(ref) == 3
    touching = 0
    for g, r, (h, w) in zip(got, ref, sizes.tolist()):
        assert g["boxes"].shape[0] == r["boxes"].shape[0] <= max_det
        assert torch.equal(g["labels"], r["labels"])
        assert g["labels"].dtype == torch.long and (g["labels"] >= 1).all()
        assert torch.allclose(g["scores"], r["scores"])
        assert torch.allclose(g["boxes"], r["boxes"], atol=1e-4)
        assert (g["boxes"][:, 0::2] <= w).all() and (g["boxes"][:, 1::2] <= h).all() and (g["boxes"] >= 0).all()
        assert (g["scores"][:-1] >= g["scores"][1:]).all()
        bx = g["boxes"]
        touching += int(((bx[:, :2] == 0).any(1) | (bx[:, 2] == w) | (bx[:, 3] == h)).sum())
    assert touching > 0  # clipping was exercised
    # the inputs exercise NMS: without suppression (IoU 1.0) far more boxes survive
    loose = PostProcessor(score_threshold=thr, nms_iou=1.0, max_detections=10**6, pre_nms_top_k=pre_nms_top_k,
                          score_converter=score_converter)(cls_logits, box_reg, anchors, sizes)
    tight = PostProcessor(score_threshold=thr, nms_iou=0.6, max_detections=10**6, pre_nms_top_k=pre_nms_top_k,
                          score_converter=score_converter)(cls_logits, box_reg, anchors, sizes)
    assert sum(len(t["scores"]) for t in tight) < sum(len(t["scores"]) for t in loose)


def test_yx_codes_and_empty_output() -> None:
    cls_logits, box_reg, anchors, sizes = _inputs(1, B=2)
    xy = PostProcessor(box_coder=BoxCoder(order="xy"))(cls_logits, box_reg, anchors, sizes)
    yx = PostProcessor(box_coder=BoxCoder(order="yx"))(cls_logits, box_reg[..., [1, 0, 3, 2]], anchors, sizes)
    for a, b in zip(xy, yx):
        assert torch.allclose(a["boxes"], b["boxes"], atol=1e-4) and torch.equal(a["labels"], b["labels"])
    out = PostProcessor(score_threshold=0.999)(torch.full_like(cls_logits, -10.0), box_reg, anchors, sizes)
    assert [o["boxes"].shape for o in out] == [(0, 4), (0, 4)]
    assert out[0]["labels"].dtype == torch.long


def test_bad_arguments() -> None:
    with pytest.raises(ArgumentError, match="^nms_iou "):
        PostProcessor(nms_iou=0.0)
    with pytest.raises(ArgumentError, match="^max_detections "):
        PostProcessor(max_detections=0)
