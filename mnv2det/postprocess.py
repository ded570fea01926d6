"""Detection post-processing: decode, score, per-class NMS, top-k, scale to original pixels.

The whole batch goes through ONE NMS pass, each candidate's group being (image, class), without a
Python loop over groups (`torchvision.ops.batched_nms` loops over the unique groups above ~5k
candidates: thousands for a COCO batch). On the CPU, :func:`grouped_nms` compares only the pairs
inside each group (one torchvision call over the whole batch would compare every pair of it: 5x
slower for a batch of 8 at 2034 anchors x 80 classes, tests/test_fast_paths.py checks the results are
identical to per-group torchvision NMS). Otherwise the groups are separated by offsetting boxes
(torchvision's "coordinate trick") in float64, exact to ~1e-9 px for any realistic batch, and go
through one `torchvision.ops.nms` call.

Order of operations (TF `batch_multiclass_non_max_suppression` with a clip window):
decode (normalised xyxy) -> scale to the original image (w, h) -> drop candidates below
`score_threshold` -> optional `pre_nms_top_k` per image -> per-(image, class) NMS at `nms_iou` on the
UNCLIPPED boxes -> clip to the image, drop empty boxes -> top `max_detections` per image by score.
Clipping after NMS is what a real TF OD API frozen graph does (checked against TF's outputs on the
pedestrian SSDLite graph: clipping first changes which low-score boxes survive NMS);
`clip_before_nms=True` clips first instead.
"""
from __future__ import annotations

import torch
import torchvision

from backbone.errors import ArgumentError
from mnv2det.box_coder import BoxCoder

SCORE_CONVERTERS = ("softmax", "sigmoid")


def check_score_converter(score_converter: str) -> str:
    """The one check of ``score_converter`` (SSDLite runs it; loss and post-processing trust it)."""
    if score_converter not in SCORE_CONVERTERS:
        convert_scores(torch.zeros(1, 1, 2), score_converter)  # raises the ArgumentError
    return score_converter


def convert_scores(cls_logits: torch.Tensor, score_converter: str) -> torch.Tensor:
    """cls_logits: (B, A, K+1) -> (B, A, K) class scores without the background column."""
    if score_converter == "softmax":
        return cls_logits.float().softmax(dim=-1)[..., 1:]
    if score_converter == "sigmoid":
        return cls_logits.float()[..., 1:].sigmoid()
    raise ArgumentError("score_converter", f"must be one of {list(SCORE_CONVERTERS)}, got {score_converter!r}",
                        "softmax (CE + hard negative mining) or sigmoid (TF ssdlite)")


# within-group pairs above which grouped NMS falls back to one torchvision call (bounds its memory:
# ~100 bytes a pair)
MAX_NMS_PAIRS = 2_000_000


def batched_nms_single_call(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor,
                            iou_threshold: float, max_pairs: int | None = None) -> torch.Tensor:
    """Group-wise NMS of all groups at once, without a Python loop over groups or images.

    boxes: (N, 4) xyxy (any scale, non-negative extent), scores: (N,), groups: (N,) long.
    Returns indices kept, sorted by decreasing score.

    On the CPU, when the within-group pairs number at most ``max_pairs`` (default :data:`MAX_NMS_PAIRS`), only
    those pairs are compared (:func:`grouped_nms`): a COCO-style batch has thousands of small
    (image, class) groups, and one torchvision call over all candidates would compare every pair of
    the batch (N^2 / 2). Otherwise (e.g. hard mining over all anchors, one group per image) the groups
    are separated by a float64 coordinate offset and go through one ``torchvision.ops.nms`` call.
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    cap = MAX_NMS_PAIRS if max_pairs is None else max_pairs
    if boxes.device.type == "cpu":  # CUDA's NMS kernel compares all pairs in parallel: keep it there
        counts = torch.unique(groups, return_counts=True)[1]
        if int((counts * (counts - 1)).sum()) // 2 <= cap:
            return grouped_nms(boxes, scores, groups, iou_threshold)
    b = boxes.double()
    span = (b.max() - b.min()).clamp(min=0) + 1  # larger than any box extent -> groups never overlap
    b = b - b.min() + groups.to(torch.float64)[:, None] * span
    return torchvision.ops.nms(b, scores.double(), iou_threshold)


def grouped_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor,
                iou_threshold: float) -> torch.Tensor:
    """Exact greedy NMS per group, comparing only the pairs inside each group.

    boxes: (N, 4) xyxy, scores: (N,), groups: (N,) long. Returns the kept indices sorted by
    decreasing score (the same set as ``torchvision.ops.nms`` run on each group alone: IoU computed
    as torchvision does, in the boxes' dtype, suppression when IoU > iou_threshold).

    Greedy NMS keeps a box iff no KEPT higher-scored box of its group overlaps it above the threshold.
    Over the suppression edges (i -> j: same group, i scored higher, IoU > threshold) that is the
    unique fixpoint of keep[j] = not any(keep[i] for i -> j); iterating it from all-kept settles the
    boxes in order of their longest chain of edges, so the loop runs (longest chain + 1) times, each a
    vectorised pass over the edges.
    """
    device = boxes.device
    N = boxes.shape[0]
    if N == 0:
        return torch.empty(0, dtype=torch.long, device=device)
    order = torch.sort(scores, descending=True, stable=True).indices
    order = order[torch.sort(groups[order], stable=True).indices]  # group-major, by score within a group
    g = groups[order]
    b = boxes[order]
    _, counts = torch.unique_consecutive(g, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    gid = torch.repeat_interleave(torch.arange(counts.numel(), device=device), counts)
    later = counts[gid] - 1 - (torch.arange(N, device=device) - starts[gid])  # lower-scored boxes in the group
    i = torch.repeat_interleave(torch.arange(N, device=device), later)
    first = torch.cumsum(later, 0) - later
    j = i + 1 + (torch.arange(i.numel(), device=device) - first[i])
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    bi, bj = b[i], b[j]
    w = (torch.minimum(bi[:, 2], bj[:, 2]) - torch.maximum(bi[:, 0], bj[:, 0])).clamp(min=0)
    h = (torch.minimum(bi[:, 3], bj[:, 3]) - torch.maximum(bi[:, 1], bj[:, 1])).clamp(min=0)
    inter = w * h
    edge = inter / (area[i] + area[j] - inter) > iou_threshold
    i, j = i[edge], j[edge]
    keep = torch.ones(N, dtype=torch.bool, device=device)
    while i.numel():
        suppressed = torch.zeros(N, dtype=torch.bool, device=device)
        suppressed[j[keep[i]]] = True
        if torch.equal(~suppressed, keep):
            break
        keep = ~suppressed
    kept = order[keep]
    return kept[torch.sort(scores[kept], descending=True, stable=True).indices]


class PostProcessor:
    """Turn raw SSD outputs into per-image detections.

    Args:
        score_threshold: drop candidates with score < this (TF ssdlite: 1e-8; COCO eval: 0.01 is usual).
        nms_iou: per-class NMS IoU threshold (TF: 0.6).
        max_detections: detections kept per image (TF: 100).
        pre_nms_top_k: if set, keep only the top-k (anchor, class) candidates per image before NMS
            (bounds NMS cost, which grows with the square of the candidates); None keeps all.
        score_converter: "softmax" | "sigmoid".
        box_coder: decodes the regression outputs.
        clip_before_nms: clip boxes to the image before NMS (default False: after, as TF does).
    """

    def __init__(self, score_threshold: float = 0.01, nms_iou: float = 0.6, max_detections: int = 100,
                 pre_nms_top_k: int | None = 1000, score_converter: str = "softmax",
                 box_coder: BoxCoder | None = None, clip_before_nms: bool = False) -> None:
        if not 0 < nms_iou <= 1:
            raise ArgumentError("nms_iou", f"must be in (0, 1], got {nms_iou}", "use 0.6")
        if max_detections < 1:
            raise ArgumentError("max_detections", f"must be >= 1, got {max_detections}", "use 100")
        if pre_nms_top_k is not None and pre_nms_top_k < 1:
            raise ArgumentError("pre_nms_top_k", f"must be >= 1 or null, got {pre_nms_top_k}")
        self.score_threshold = float(score_threshold)
        self.nms_iou = float(nms_iou)
        self.max_detections = int(max_detections)
        self.pre_nms_top_k = None if pre_nms_top_k is None else int(pre_nms_top_k)
        self.score_converter = score_converter
        self.clip_before_nms = bool(clip_before_nms)
        self.box_coder = box_coder if box_coder is not None else BoxCoder()

    @torch.no_grad()
    def __call__(self, cls_logits: torch.Tensor, bbox_regression: torch.Tensor, anchors: torch.Tensor,
                 image_sizes: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Detections per image.

        cls_logits: (B, A, K+1), bbox_regression: (B, A, 4), anchors: (A, 4) normalised xyxy,
        image_sizes: (B, 2) original (h, w).
        Returns B dicts: boxes (N, 4) xyxy in original pixels, scores (N,), labels (N,) long in 1..K,
        sorted by decreasing score.
        """
        B, A, C = cls_logits.shape
        K = C - 1
        device = cls_logits.device
        scores = convert_scores(cls_logits, self.score_converter)  # (B, A, K)
        boxes = self.box_coder.decode(bbox_regression.float(), anchors.float())  # (B, A, 4) normalised
        sizes = torch.as_tensor(image_sizes, device=device).to(torch.float32).view(B, 2)
        h, w = sizes[:, 0], sizes[:, 1]
        scale = torch.stack([w, h, w, h], dim=1)[:, None, :]  # (B, 1, 4)
        boxes = boxes * scale
        if self.clip_before_nms:
            boxes = torch.minimum(boxes.clamp(min=0), scale)
            nonempty = (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])  # (B, A)
            scores = scores.masked_fill(~nonempty[..., None], -1.0)

        flat = scores.reshape(B, A * K)
        if self.pre_nms_top_k is not None and self.pre_nms_top_k < A * K:
            top_scores, top_idx = flat.topk(self.pre_nms_top_k, dim=1)  # (B, k), sorted
        else:
            top_scores, top_idx = flat, torch.arange(A * K, device=device).expand(B, A * K)
        keep = (top_scores >= self.score_threshold) & (top_scores >= 0)  # < 0: empty box
        img_idx, pos = keep.nonzero(as_tuple=True)
        cand = top_idx[img_idx, pos]  # flat (anchor * K + class) index
        cand_scores = top_scores[img_idx, pos]
        anchor_idx = cand // K
        cls_idx = cand % K  # 0-based class
        cand_boxes = boxes.reshape(B * A, 4).index_select(0, img_idx * A + anchor_idx)  # (N, 4)

        kept = batched_nms_single_call(cand_boxes, cand_scores, img_idx * K + cls_idx, self.nms_iou)
        # clip the survivors (a no-op when clipped before NMS) and drop boxes left empty
        cand_boxes = torch.minimum(cand_boxes.clamp(min=0), scale[img_idx, 0])
        kb = cand_boxes[kept]
        kept = kept[(kb[:, 2] > kb[:, 0]) & (kb[:, 3] > kb[:, 1])]
        img_k = img_idx[kept]
        # top max_detections per image: kept is sorted by score; a stable sort by image keeps that order
        order = torch.sort(img_k, stable=True).indices
        kept, img_k = kept[order], img_k[order]
        counts = torch.bincount(img_k, minlength=B)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(kept.numel(), device=device) - starts[img_k]
        sel = rank < self.max_detections
        kept, img_k = kept[sel], img_k[sel]
        counts = torch.bincount(img_k, minlength=B).tolist()

        out_boxes = cand_boxes[kept].split(counts)
        out_scores = cand_scores[kept].split(counts)
        out_labels = (cls_idx[kept] + 1).split(counts)
        return [{"boxes": b, "scores": s, "labels": l} for b, s, l in zip(out_boxes, out_scores, out_labels)]
