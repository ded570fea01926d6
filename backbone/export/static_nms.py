"""A static-shape, exact greedy class-wise NMS in plain tensor ops, for runtimes without an NMS op.

TFLite (litert-torch) and ExecuTorch cannot take ``torch.ops.mnv2.multiclass_nms`` (a custom op) nor
``torchvision::nms`` (data-dependent output size), and neither converter lowers a loop
(``torch._higher_order_ops.while_loop``: litert-torch 0.10 "RuntimeError: Lowering not found:
while_loop"; executorch 1.5.1 "InternalError: Unsupported control flow operator: while_loop"). So
the exporters swap the custom op for :func:`static_multiclass_nms` (a decomposition applied to the
torch.export program, :func:`decompose_nms`), which needs only fixed shapes:

1. the top ``T = pre_nms_top_k`` (anchor, class) candidates per image: the op's own cap, taken here
   by the one top-k the static form needs anyway (no scatter: LiteRT would lower it to
   ``STABLEHLO_SCATTER``, a second subgraph that MediaPipe refuses and TFLite < 2.15 cannot run);
   a model that keeps every candidate (``pre_nms_top_k: null``, e.g. an imported TF graph) gets
   ``DEFAULT_TOP_K``;
2. the (B, T, T) suppression matrix ``sup[i, j]``: same class, i ranked above j, IoU > threshold (IoU
   computed as torchvision's nms does);
3. greedy NMS as the fixpoint of ``keep[j] = valid[j] and not any(keep[i] and sup[i, j])``, iterated
   ``iterations`` times from ``keep = valid`` (a (1, T) x (T, T) matmul each);
4. clip, drop empty boxes, keep the first ``max_detections`` by rank -> fixed (B, D) outputs.

Exactness of 3: the m-th box greedy keeps (by rank) and every box ranked above it are final after
at most 2(m - 1) + 1 iterations (a kept box waits for its suppressed predecessors, a suppressed one
for its first kept suppressor), so ``iterations >= 2 (D + E) + 1`` gives exactly the reference's
top D, E being the kept boxes that the clip empties among them (boxes wholly outside the image:
rare). The default ``min(T, 2 D + 16)`` is exact for E <= 7, and ``T`` iterations are exact always
(no chain is longer than T).
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from backbone.errors import ArgumentError

log = logging.getLogger("mnv2")


#: the candidate count for models whose postprocess keeps every candidate (torchvision's SSD default)
DEFAULT_TOP_K = 1000


def default_iterations(top_k: int, max_detections: int) -> int:
    return int(min(top_k, 2 * max_detections + 16))


def static_multiclass_nms(boxes: torch.Tensor, scores: torch.Tensor, width: float, height: float,
                          iou_threshold: float, score_threshold: float, max_detections: int, *, top_k: int,
                          iterations: int | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as ``torch.ops.mnv2.multiclass_nms`` (:mod:`mnv2det.export`), fixed shapes only.

    boxes: (B, N, 4) xyxy unclipped; scores: (B, K, N), of which the image's top ``top_k`` are the
    candidates (the op's pre-NMS cap; equal to the eager op's up to the order of exact ties). Returns boxes (B, D, 4) clipped, scores (B, D), labels (B, D) int64 1..K (0 pad),
    num_detections (B,) int64; kept rows first, by decreasing score.
    """
    B, K, N = scores.shape
    D = int(max_detections)
    T = int(min(top_k, K * N))
    L = default_iterations(T, D) if iterations is None else int(iterations)
    top_s, top_i = scores.reshape(B, K * N).topk(T, dim=1)  # (B, T), sorted: rank order = score order
    cls = torch.div(top_i, N, rounding_mode="floor")
    anchor = top_i - cls * N
    cand = torch.gather(boxes, 1, anchor.unsqueeze(-1).expand(B, T, 4))  # (B, T, 4)
    valid = top_s >= score_threshold

    x1, y1, x2, y2 = cand.unbind(-1)
    area = (x2 - x1) * (y2 - y1)
    iw = (torch.minimum(x2[:, :, None], x2[:, None, :]) - torch.maximum(x1[:, :, None], x1[:, None, :])).clamp(min=0)
    ih = (torch.minimum(y2[:, :, None], y2[:, None, :]) - torch.maximum(y1[:, :, None], y1[:, None, :])).clamp(min=0)
    inter = iw * ih
    iou = inter / (area[:, :, None] + area[:, None, :] - inter)  # (B, T, T), torchvision's formula
    upper = torch.ones(T, T, dtype=torch.bool, device=scores.device).triu(1)  # i ranked above j
    sup = ((iou > iou_threshold) & (cls[:, :, None] == cls[:, None, :]) & upper).to(torch.float32)

    keep = valid
    for _ in range(L):  # unrolled: the converters take no loop
        hit = torch.bmm(keep.to(torch.float32).unsqueeze(1), sup).squeeze(1)  # kept suppressors of each box
        keep = valid & (hit < 0.5)

    clipped = torch.stack([x1.clamp(0, width), y1.clamp(0, height), x2.clamp(0, width), y2.clamp(0, height)], -1)
    final = keep & (clipped[..., 2] > clipped[..., 0]) & (clipped[..., 3] > clipped[..., 1])
    if T < D:  # fewer candidates than outputs: pad with never-kept rows
        pad = D - T
        clipped = torch.cat([clipped, clipped.new_zeros(B, pad, 4)], 1)
        top_s = torch.cat([top_s, top_s.new_zeros(B, pad)], 1)
        cls = torch.cat([cls, cls.new_zeros(B, pad)], 1)
        final = torch.cat([final, final.new_zeros(B, pad)], 1)
        T = D
    # the first D kept by rank: a unique positive key per kept row, in rank order
    key = torch.where(final, torch.arange(T, 0, -1, device=scores.device).to(torch.float32), torch.zeros_like(top_s) - 1)
    kval, idx = key.topk(D, dim=1)
    ok = kval > 0  # (B, D)
    out_boxes = torch.gather(clipped, 1, idx.unsqueeze(-1).expand(B, D, 4)) * ok.unsqueeze(-1).to(clipped.dtype)
    out_scores = torch.where(ok, torch.gather(top_s, 1, idx), torch.zeros_like(kval))
    out_labels = torch.where(ok, torch.gather(cls, 1, idx) + 1, torch.zeros_like(idx)).to(torch.int64)
    num = ok.to(torch.int64).sum(1)
    return out_boxes, out_scores, out_labels, num


def nms_settings(module: torch.nn.Module, iterations: int | None) -> dict[str, Any] | None:
    """``{top_k, iterations}`` for a detection wrapper with NMS inside, None for any other module.

    The candidate count is the wrapper's ``pre_nms_top_k``; a wrapper that keeps every candidate gets
    :data:`DEFAULT_TOP_K` (logged: its detections can differ from PyTorch's uncapped ones only where a
    box ranked below that many candidates survives NMS among the top ``max_detections``).
    """
    model = getattr(module, "model", None)
    pp = getattr(model, "postprocessor", None)
    if not getattr(module, "nms", False) or pp is None:
        return None
    top_k = int(getattr(module, "pre_nms_top_k", 0) or 0)
    if top_k <= 0:
        top_k = DEFAULT_TOP_K
        log.warning("the model keeps every pre-NMS candidate (postprocess.pre_nms_top_k: null); the static NMS "
                    "takes the top %d per image (pre_nms_top_k=N to choose)", top_k)
    A = int(module.anchors.shape[0])
    T = int(min(top_k, A * model.num_classes))
    if iterations is not None and int(iterations) < 1:
        raise ArgumentError("nms_iterations", f"must be >= 1, got {iterations}",
                            f"leave it unset (default {default_iterations(T, pp.max_detections)})")
    L = default_iterations(T, pp.max_detections) if iterations is None else int(iterations)
    return {"top_k": T, "iterations": L}


def decompose_nms(program: torch.export.ExportedProgram, top_k: int, iterations: int) -> torch.export.ExportedProgram:
    """``program`` with ``mnv2::multiclass_nms`` replaced by :func:`static_multiclass_nms`."""
    import mnv2det.export  # noqa: F401 -- registers the op

    def impl(boxes, scores, width, height, iou_threshold, score_threshold, max_detections, pre_nms_top_k):
        return static_multiclass_nms(boxes, scores, width, height, iou_threshold, score_threshold, max_detections,
                                     top_k=top_k, iterations=iterations)

    # only the custom op: the converters run their own decompositions (XNNPACK's BN fusion needs the
    # training-IR convolutions)
    return program.run_decompositions({torch.ops.mnv2.multiclass_nms.default: impl})


def contiguous_copy(module: torch.nn.Module) -> torch.nn.Module:
    """An eval copy of ``module`` with NCHW (contiguous) weights: the models default to channels_last
    weights (``memory_format``), which XNNPACK's lowering refuses ("Expected ..._weight_fused_bn to be
    NCHW in channels last reshape pass") and which the converters need not see."""
    import copy

    module = copy.deepcopy(module).eval().to(memory_format=torch.contiguous_format)
    for m in module.modules():
        if isinstance(getattr(m, "memory_format", None), torch.memory_format):
            m.memory_format = torch.contiguous_format
    return module
