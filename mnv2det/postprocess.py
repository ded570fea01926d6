"""Detection post-processing: decode, score, per-class NMS, top-k, scale to original pixels.

The whole batch goes through ONE NMS call: each candidate's group is (image, class), and groups
are separated by offsetting boxes (torchvision's `batched_nms` "coordinate trick"). We do the
offset ourselves in float64 instead of calling `torchvision.ops.batched_nms` because, above
~5k candidates, batched_nms switches to a Python loop over the unique groups (thousands for a
COCO batch), and a float32 offset of (image * K + class) * size loses the precision of the
coordinates. In float64 the offsets are exact to ~1e-9 px for any realistic batch.

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


def batched_nms_single_call(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor,
                            iou_threshold: float) -> torch.Tensor:
    """Group-wise NMS over all groups in one torchvision.ops.nms call.

    boxes: (N, 4) xyxy (any scale, non-negative extent), scores: (N,), groups: (N,) long.
    Returns indices kept, sorted by decreasing score.
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    b = boxes.double()
    span = (b.max() - b.min()).clamp(min=0) + 1  # larger than any box extent -> groups never overlap
    b = b - b.min() + groups.to(torch.float64)[:, None] * span
    return torchvision.ops.nms(b, scores.double(), iou_threshold)


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
        cand_boxes = boxes[img_idx, anchor_idx]  # (N, 4)

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
