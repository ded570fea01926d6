"""SSD multibox loss: smooth-L1 on positives + classification with hard negative mining.

Follows TF Object Detection API's SSD loss (`ssd_meta_arch.loss` with `normalize_loss_by_num_matches`):
both terms are summed over the batch and divided by the number of positive anchors in the batch
(clamped to >= 1). Ignored anchors (matcher's -2) contribute to neither term.

Classification variants:
- softmax + "ce": cross entropy over K+1 classes (slot 0 background), hard negative mining.
- sigmoid + "ce": TF `weighted_sigmoid`: binary CE per column, summed over the columns of an anchor.
  As in TF, the background column IS trained (target 1 for negatives, 0 for positives;
  `train_background=True`); with `train_background=False` only the K object columns are used and
  the background logit gets no gradient. Hard negative mining ranks anchors by their summed loss.
- sigmoid + "focal": sigmoid focal loss (alpha, gamma) over all non-ignored anchors, no mining.

Hard mining (TF `hard_example_miner`, max_negatives_per_positive=3, min_negatives_per_image=3):
per image keep all positives and the max(ratio * num_pos, min_negatives_per_image) negatives with
the highest classification loss. TF additionally de-duplicates candidates with NMS at IoU 0.99
over decoded predictions; that step is omitted (it removes near-identical predictions only).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from backbone.errors import ArgumentError


def hard_negative_mask(cls_loss: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                       neg_pos_ratio: float, min_negatives: int = 0) -> torch.Tensor:
    """Select the hardest negatives per image, vectorised over the batch.

    cls_loss: (B, A) per-anchor loss (only ranks matter), positive/negative: (B, A) bool.
    Returns (B, A) bool: the top max(ratio * num_pos_i, min_negatives) negatives of each image i.
    """
    B, A = cls_loss.shape
    num_pos = positive.sum(dim=1)  # (B,)
    num_neg = torch.clamp((num_pos.to(cls_loss.dtype) * neg_pos_ratio).floor().long(), min=min_negatives)  # (B,)
    loss = cls_loss.detach().masked_fill(~negative, float("-inf"))
    order = loss.argsort(dim=1, descending=True, stable=True)  # stable: deterministic among equal losses
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(A, device=cls_loss.device).expand(B, A))
    return negative & (rank < num_neg[:, None])


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25,
                       gamma: float = 2.0) -> torch.Tensor:
    """Elementwise focal loss (Lin et al.): logits, targets (..., C) -> (..., C)."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss


class SSDLoss(nn.Module):
    """SSD loss on per-anchor targets.

    Args:
        score_converter: "softmax" | "sigmoid" (must match the model's).
        cls_loss: "ce" (with hard negative mining) | "focal" (sigmoid only, no mining).
        neg_pos_ratio: negatives kept per positive in hard mining (TF: 3).
        min_negatives_per_image: hard mining floor per image (TF: 3), also for images without positives.
        box_loss: "smooth_l1" | "l1".
        beta: smooth-L1 transition point (TF's Huber delta = 1).
        focal_alpha, focal_gamma: focal loss parameters.
        train_background: sigmoid only: train the background column (TF: yes).
    """

    def __init__(self, score_converter: str = "softmax", cls_loss: str = "ce", neg_pos_ratio: float = 3.0,
                 box_loss: str = "smooth_l1", beta: float = 1.0, focal_alpha: float = 0.25,
                 focal_gamma: float = 2.0, min_negatives_per_image: int = 3, train_background: bool = True) -> None:
        super().__init__()
        if cls_loss not in ("ce", "focal"):
            raise ArgumentError("cls_loss", f"must be 'ce' or 'focal', got {cls_loss!r}")
        if cls_loss == "focal" and score_converter != "sigmoid":
            raise ArgumentError("cls_loss", "focal needs score_converter='sigmoid'",
                              "set model.score_converter=sigmoid or model.loss.cls_loss=ce")
        if box_loss not in ("smooth_l1", "l1"):
            raise ArgumentError("box_loss", f"must be 'smooth_l1' or 'l1', got {box_loss!r}")
        if neg_pos_ratio <= 0:
            raise ArgumentError("neg_pos_ratio", f"must be > 0, got {neg_pos_ratio}", "use 3")
        self.score_converter = score_converter
        self.cls_loss = cls_loss
        self.neg_pos_ratio = float(neg_pos_ratio)
        self.min_negatives_per_image = int(min_negatives_per_image)
        self.box_loss = box_loss
        self.beta = float(beta)
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)
        self.train_background = bool(train_background)

    def _sigmoid_targets(self, labels: torch.Tensor, num_columns: int) -> torch.Tensor:
        """labels (B, A) in -1..K -> one-hot (B, A, K+1) float, background column = 1 for negatives."""
        onehot = F.one_hot(labels.clamp(min=0), num_columns).float()
        return onehot

    def forward(self, cls_logits: torch.Tensor, bbox_regression: torch.Tensor, labels: torch.Tensor,
                box_targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Compute the loss.

        cls_logits: (B, A, K+1) logits (slot 0 background).
        bbox_regression: (B, A, 4) predicted codes.
        labels: (B, A) long: 0 background, 1..K object class, -1 ignore.
        box_targets: (B, A, 4) encoded targets (only read at positives).
        Returns dict(loss, loss_cls, loss_box, num_pos) of scalar tensors.
        """
        cls_logits = cls_logits.float()  # losses in fp32 even under autocast
        bbox_regression = bbox_regression.float()
        B, A, C = cls_logits.shape
        positive = labels > 0
        negative = labels == 0
        num_pos = positive.sum()
        normalizer = num_pos.clamp(min=1).to(cls_logits.dtype)

        if self.box_loss == "smooth_l1":
            box_l = F.smooth_l1_loss(bbox_regression, box_targets.float(), beta=self.beta, reduction="none")
        else:
            box_l = (bbox_regression - box_targets.float()).abs()
        loss_box = (box_l.sum(-1) * positive).sum() / normalizer

        if self.score_converter == "softmax":
            ce = F.cross_entropy(cls_logits.reshape(-1, C), labels.clamp(min=0).reshape(-1),
                                 reduction="none").view(B, A)
        else:
            targets = self._sigmoid_targets(labels, C)
            if self.cls_loss == "focal":
                per = sigmoid_focal_loss(cls_logits, targets, self.focal_alpha, self.focal_gamma)
            else:
                per = F.binary_cross_entropy_with_logits(cls_logits, targets, reduction="none")
            if not self.train_background:
                per = per[..., 1:]
            ce = per.sum(-1)  # (B, A)

        if self.cls_loss == "focal":
            selected = positive | negative  # all non-ignored anchors
        else:
            selected = positive | hard_negative_mask(ce, positive, negative, self.neg_pos_ratio,
                                                     self.min_negatives_per_image)
        loss_cls = (ce * selected).sum() / normalizer
        return {
            "loss": loss_cls + loss_box,
            "loss_cls": loss_cls.detach(),
            "loss_box": loss_box.detach(),
            "num_pos": num_pos.detach().float(),
        }
