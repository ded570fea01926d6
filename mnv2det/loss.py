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

Hard mining (TF `HardExampleMiner`, object_detection/core/losses.py; ssdlite_mobilenet_v2_coco sets
loss_type CLASSIFICATION, max_negatives_per_positive 3, min_negatives_per_image 3, iou_threshold 0.99,
num_hard_examples 3000):
- `miner_nms_iou=None` (default): per image keep all positives and the max(ratio * num_pos,
  min_negatives_per_image) negatives with the highest classification loss (TF with its NMS turned off:
  iou_threshold 1.0, num_hard_examples None).
- `miner_nms_iou=0.99` (TF): first `tf.image.non_max_suppression` per image over the decoded predicted
  boxes of ALL anchors, scored by their classification loss (ignored anchors score 0: TF gives them
  classification weight 0), at most `num_hard_examples` kept; then
  `_subsample_selection_to_desired_neg_pos_ratio` on the kept anchors, in NMS order (decreasing loss):
  every kept positive, and the first max(min_negatives_per_image, int(ratio * kept positives)) kept
  negatives. Positives suppressed by NMS count neither for the ratio nor in the loss, box term included
  (TF sums both losses over the selected anchors only); the normaliser stays all positives
  (`normalize_loss_by_num_matches`, object_detection/meta_architectures/ssd_meta_arch.py `loss`).
  The whole batch goes through one NMS call (boxes offset per image, as in post-processing), whose cost
  grows with the square of batch x anchors.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from backbone.errors import ArgumentError
from mnv2det.postprocess import batched_nms_single_call


def _max_negatives(num_pos: torch.Tensor, neg_pos_ratio: float, min_negatives: int, dtype: torch.dtype) -> torch.Tensor:
    """TF: max(min_negatives_per_image, int(max_negatives_per_positive * float(num_positives)))."""
    return torch.clamp((num_pos.to(dtype) * neg_pos_ratio).floor().long(), min=min_negatives)


def hard_negative_mask(cls_loss: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                       neg_pos_ratio: float, min_negatives: int = 0) -> torch.Tensor:
    """Select the hardest negatives per image, vectorised over the batch.

    cls_loss: (B, A) per-anchor loss (only ranks matter), positive/negative: (B, A) bool.
    Returns (B, A) bool: the top max(ratio * num_pos_i, min_negatives) negatives of each image i.
    """
    B, A = cls_loss.shape
    num_neg = _max_negatives(positive.sum(dim=1), neg_pos_ratio, min_negatives, cls_loss.dtype)  # (B,)
    loss = cls_loss.detach().masked_fill(~negative, float("-inf"))
    order = loss.argsort(dim=1, descending=True, stable=True)  # stable: deterministic among equal losses
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(A, device=cls_loss.device).expand(B, A))
    return negative & (rank < num_neg[:, None])


def nms_hard_example_mask(cls_loss: torch.Tensor, boxes: torch.Tensor, positive: torch.Tensor,
                          negative: torch.Tensor, neg_pos_ratio: float, min_negatives: int, iou_threshold: float,
                          num_hard_examples: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """TF ``HardExampleMiner`` (NMS, then ``_subsample_selection_to_desired_neg_pos_ratio``), batched.

    cls_loss: (B, A) NMS scores (TF: the anchors' classification losses), boxes: (B, A, 4) decoded xyxy
    predictions, positive/negative: (B, A) bool (anchors that are neither are never selected).
    Per image: NMS at ``iou_threshold`` over all anchors by decreasing loss, the first
    ``num_hard_examples`` kept (None: all); the kept positives, and the first
    max(min_negatives, int(ratio * kept positives)) kept negatives in NMS order.
    Returns (selected positives, selected negatives), (B, A) bool each.
    """
    B, A = cls_loss.shape
    device = cls_loss.device
    image = torch.arange(B, device=device).repeat_interleave(A)
    kept = batched_nms_single_call(boxes.detach().reshape(B * A, 4), cls_loss.detach().reshape(B * A), image,
                                   iou_threshold)  # by decreasing loss over the whole batch
    kept = kept[torch.sort(kept // A, stable=True).indices]  # image by image, NMS order within each
    image = kept // A
    per_image = torch.bincount(image, minlength=B)
    if num_hard_examples is not None:
        rank = torch.arange(kept.numel(), device=device) - (per_image.cumsum(0) - per_image)[image]
        kept, image = kept[rank < num_hard_examples], image[rank < num_hard_examples]
    pos = positive.reshape(-1)[kept]
    neg = negative.reshape(-1)[kept]
    num_pos = torch.zeros(B, dtype=torch.long, device=device).index_add_(0, image, pos.long())
    max_neg = _max_negatives(num_pos, neg_pos_ratio, min_negatives, cls_loss.dtype)
    neg_count = neg.long().cumsum(0)
    neg_per_image = torch.zeros(B, dtype=torch.long, device=device).index_add_(0, image, neg.long())
    neg_rank = neg_count - (neg_per_image.cumsum(0) - neg_per_image)[image]  # 1-based within its image
    take_neg = neg & (neg_rank <= max_neg[image])
    sel_pos = torch.zeros(B * A, dtype=torch.bool, device=device)
    sel_neg = torch.zeros(B * A, dtype=torch.bool, device=device)
    sel_pos[kept[pos]] = True
    sel_neg[kept[take_neg]] = True
    return sel_pos.view(B, A), sel_neg.view(B, A)


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
        miner_nms_iou: hard mining NMS IoU over the decoded predictions (TF ssdlite: 0.99; None: no NMS,
            as before); forward then needs ``decoded_boxes``. Only with cls_loss "ce".
        num_hard_examples: with miner_nms_iou: anchors NMS keeps per image at most (TF ssdlite: 3000;
            None: all).
    """

    def __init__(self, score_converter: str = "softmax", cls_loss: str = "ce", neg_pos_ratio: float = 3.0,
                 box_loss: str = "smooth_l1", beta: float = 1.0, focal_alpha: float = 0.25,
                 focal_gamma: float = 2.0, min_negatives_per_image: int = 3, train_background: bool = True,
                 miner_nms_iou: float | None = None, num_hard_examples: int | None = None) -> None:
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
        if miner_nms_iou is not None:
            iou = miner_nms_iou
            if isinstance(iou, bool) or not isinstance(iou, (int, float)) or not 0 < iou <= 1:
                raise ArgumentError("miner_nms_iou", f"must be in (0, 1] or null, got {miner_nms_iou!r}", "TF: 0.99")
            if cls_loss != "ce":
                raise ArgumentError("miner_nms_iou", "is part of hard negative mining, which focal loss does not use",
                                    "set model.loss.miner_nms_iou=null or model.loss.cls_loss=ce")
        if num_hard_examples is not None:
            if isinstance(num_hard_examples, bool) or not isinstance(num_hard_examples, int) or num_hard_examples < 1:
                raise ArgumentError("num_hard_examples", f"must be an integer >= 1 or null, got {num_hard_examples!r}",
                                    "TF: 3000")
            if miner_nms_iou is None:
                raise ArgumentError("num_hard_examples", "caps the mining NMS, which is off (miner_nms_iou null)",
                                    "set model.loss.miner_nms_iou=0.99 or model.loss.num_hard_examples=null")
        self.score_converter = score_converter
        self.cls_loss = cls_loss
        self.neg_pos_ratio = float(neg_pos_ratio)
        self.min_negatives_per_image = int(min_negatives_per_image)
        self.box_loss = box_loss
        self.beta = float(beta)
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)
        self.train_background = bool(train_background)
        self.miner_nms_iou = None if miner_nms_iou is None else float(miner_nms_iou)
        self.num_hard_examples = num_hard_examples

    def _sigmoid_targets(self, labels: torch.Tensor, num_columns: int) -> torch.Tensor:
        """labels (B, A) in -1..K -> one-hot (B, A, K+1) float, background column = 1 for negatives."""
        onehot = F.one_hot(labels.clamp(min=0), num_columns).float()
        return onehot

    def forward(self, cls_logits: torch.Tensor, bbox_regression: torch.Tensor, labels: torch.Tensor,
                box_targets: torch.Tensor, decoded_boxes: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Compute the loss.

        cls_logits: (B, A, K+1) logits (slot 0 background).
        bbox_regression: (B, A, 4) predicted codes.
        labels: (B, A) long: 0 background, 1..K object class, -1 ignore.
        box_targets: (B, A, 4) encoded targets (only read at positives).
        decoded_boxes: (B, A, 4) decoded predicted boxes (xyxy), needed with ``miner_nms_iou``.
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

        trained = positive  # anchors whose box term counts
        if self.cls_loss == "focal":
            selected = positive | negative  # all non-ignored anchors
        elif self.miner_nms_iou is None:
            selected = positive | hard_negative_mask(ce, positive, negative, self.neg_pos_ratio,
                                                     self.min_negatives_per_image)
        else:
            if decoded_boxes is None:
                raise ValueError("SSDLoss with miner_nms_iou needs decoded_boxes (B, A, 4)")
            score = ce.detach().masked_fill(~(positive | negative), 0.0)  # TF: ignored anchors weigh 0
            trained, mined = nms_hard_example_mask(score, decoded_boxes, positive, negative, self.neg_pos_ratio,
                                                   self.min_negatives_per_image, self.miner_nms_iou,
                                                   self.num_hard_examples)
            selected = trained | mined
        loss_box = (box_l.sum(-1) * trained).sum() / normalizer
        loss_cls = (ce * selected).sum() / normalizer
        return {
            "loss": loss_cls + loss_box,
            "loss_cls": loss_cls.detach(),
            "loss_box": loss_box.detach(),
            "num_pos": num_pos.detach().float(),
        }
