"""SSD loss: hand-checked values, hard negative mining (with TF's NMS), sigmoid/focal variants, normalisation."""
from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torchvision.ops import sigmoid_focal_loss as tv_focal

from backbone.errors import ArgumentError
from mnv2det.loss import SSDLoss, hard_negative_mask, nms_hard_example_mask

LOGITS = [[0.0, 2.0, 0.5], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [2.0, 0.0, 0.0], [0.0, 5.0, 0.0]]
LABELS = [1, 0, 0, 0, 0, -1]  # one positive, four negatives, one ignored
BOX_PRED = [[0.5, -2.0, 0.0, 0.1]] + [[9.0, 9.0, 9.0, 9.0]] * 5  # only anchor 0 is positive
BOX_TGT = [[0.0, 0.0, 0.0, 0.0]] * 6


def _tiny():
    return (torch.tensor([LOGITS]), torch.tensor([BOX_PRED]), torch.tensor([LABELS]), torch.tensor([BOX_TGT]))


def _ce(logits: list[float], y: int) -> float:
    return math.log(sum(math.exp(v) for v in logits)) - logits[y]


def _bce_sum(logits: list[float], y: int, first_column: int = 0) -> float:
    """Sum over columns >= first_column of binary CE against one-hot(y)."""
    return sum(math.log1p(math.exp(v)) - (1.0 if c == y else 0.0) * v
               for c, v in enumerate(logits) if c >= first_column)


def test_softmax_ce_with_mining_by_hand() -> None:
    out = SSDLoss("softmax", neg_pos_ratio=2, min_negatives_per_image=0)(*_tiny())
    neg = {a: _ce(LOGITS[a], 0) for a in (1, 2, 3, 4)}
    hardest = sorted(neg, key=neg.get, reverse=True)[:2]
    assert sorted(hardest) == [2, 3]
    exp_cls = _ce(LOGITS[0], 1) + sum(neg[a] for a in hardest)
    exp_box = 0.5 * 0.5 ** 2 + (2.0 - 0.5) + 0.0 + 0.5 * 0.1 ** 2  # smooth L1, beta 1, positives only
    assert out["num_pos"].item() == 1
    assert out["loss_cls"].item() == pytest.approx(exp_cls, rel=1e-5)
    assert out["loss_box"].item() == pytest.approx(exp_box, rel=1e-5)
    assert out["loss"].item() == pytest.approx(exp_cls + exp_box, rel=1e-5)


def test_sigmoid_ce_trains_background_column_by_hand() -> None:
    out = SSDLoss("sigmoid", neg_pos_ratio=2, min_negatives_per_image=0)(*_tiny())
    neg = {a: _bce_sum(LOGITS[a], 0) for a in (1, 2, 3, 4)}
    hardest = sorted(neg, key=neg.get, reverse=True)[:2]
    exp = _bce_sum(LOGITS[0], 1) + sum(neg[a] for a in hardest)
    assert out["loss_cls"].item() == pytest.approx(exp, rel=1e-5)

    # without the background column: only columns 1..K, and no gradient reaches column 0
    logits = torch.tensor([LOGITS], requires_grad=True)
    loss = SSDLoss("sigmoid", neg_pos_ratio=2, min_negatives_per_image=0, train_background=False)
    out = loss(logits, *_tiny()[1:])
    neg = {a: _bce_sum(LOGITS[a], 0, first_column=1) for a in (1, 2, 3, 4)}
    hardest = sorted(neg, key=neg.get, reverse=True)[:2]
    exp = _bce_sum(LOGITS[0], 1, first_column=1) + sum(neg[a] for a in hardest)
    assert out["loss_cls"].item() == pytest.approx(exp, rel=1e-5)
    out["loss"].backward()
    assert (logits.grad[..., 0] == 0).all()


def test_focal_uses_all_non_ignored_anchors() -> None:
    logits, box, labels, tgt = _tiny()
    out = SSDLoss("sigmoid", cls_loss="focal")(logits, box, labels, tgt)
    onehot = torch.nn.functional.one_hot(labels.clamp(min=0), 3).float()
    per = tv_focal(logits, onehot, alpha=0.25, gamma=2.0, reduction="none").sum(-1)
    exp = per[0, :5].sum().item()  # anchor 5 ignored
    assert out["loss_cls"].item() == pytest.approx(exp, rel=1e-5)
    with pytest.raises(ArgumentError, match="^cls_loss "):
        SSDLoss("softmax", cls_loss="focal")


def test_mining_count_is_three_per_positive_and_hardest() -> None:
    gen = torch.Generator().manual_seed(0)
    B, A = 4, 200
    loss = torch.rand(B, A, generator=gen)
    labels = torch.zeros(B, A, dtype=torch.long)
    for b, npos in enumerate([0, 1, 5, 60]):
        labels[b, torch.randperm(A, generator=gen)[:npos]] = 1
    labels[:, :3] = -1  # some ignored anchors (never mined)
    pos, neg = labels > 0, labels == 0
    sel = hard_negative_mask(loss, pos, neg, 3.0, min_negatives=0)
    for b in range(B):
        n_pos, n_neg = int(pos[b].sum()), int(neg[b].sum())
        assert int(sel[b].sum()) == min(3 * n_pos, n_neg)
        assert not (sel[b] & ~neg[b]).any()
        if sel[b].any() and (neg[b] & ~sel[b]).any():
            assert loss[b][sel[b]].min() >= loss[b][neg[b] & ~sel[b]].max()
    sel3 = hard_negative_mask(loss, pos, neg, 3.0, min_negatives=3)
    assert int(sel3[0].sum()) == 3  # TF's min_negatives_per_image for an image without positives


def test_ignored_and_unmined_anchors_get_no_gradient() -> None:
    logits, box, labels, tgt = _tiny()
    logits.requires_grad_(True)
    box.requires_grad_(True)
    SSDLoss("softmax", neg_pos_ratio=2, min_negatives_per_image=0)(logits, box, labels, tgt)["loss"].backward()
    assert (logits.grad[0, 5] == 0).all()  # ignored
    assert (logits.grad[0, [1, 4]] == 0).all()  # easy negatives not mined
    assert (logits.grad[0, [0, 2, 3]] != 0).any(dim=-1).all()
    assert (box.grad[0, 1:] == 0).all() and (box.grad[0, 0] != 0).any()


def test_normalised_by_positives_over_the_batch() -> None:
    gen = torch.Generator().manual_seed(3)
    B, A, C = 2, 30, 4
    logits = torch.randn(B, A, C, generator=gen)
    box = torch.randn(B, A, 4, generator=gen)
    tgt = torch.randn(B, A, 4, generator=gen)
    labels = torch.zeros(B, A, dtype=torch.long)
    labels[0, :2] = torch.tensor([1, 3])
    labels[1, :5] = torch.tensor([2, 2, 1, 3, 1])
    fn = SSDLoss("softmax")
    both = fn(logits, box, labels, tgt)
    singles = [fn(logits[b:b + 1], box[b:b + 1], labels[b:b + 1], tgt[b:b + 1]) for b in range(B)]
    npos = [2, 5]
    exp = sum(s["loss"].item() * n for s, n in zip(singles, npos)) / sum(npos)
    assert both["num_pos"].item() == 7
    assert both["loss"].item() == pytest.approx(exp, rel=1e-5)
    # no positives at all: normaliser clamps to 1, loss stays finite
    out = fn(logits, box, torch.zeros(B, A, dtype=torch.long), tgt)
    assert torch.isfinite(out["loss"]) and out["loss_box"].item() == 0.0


# ------------------------------------------------------------------ TF hard example miner with NMS
def _tf_miner_reference(loss: torch.Tensor, boxes: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                        ratio: float, min_negatives: int, iou: float, num_hard: int | None):
    """TF HardExampleMiner.__call__ + _subsample_selection_to_desired_neg_pos_ratio, one image at a time."""
    sel_pos, sel_neg = torch.zeros_like(positive), torch.zeros_like(negative)
    for b in range(loss.shape[0]):
        keep = torchvision.ops.nms(boxes[b], loss[b], iou)[:num_hard]  # by decreasing loss
        pos, neg = positive[b, keep], negative[b, keep]
        max_neg = max(min_negatives, int(ratio * int(pos.sum())))
        sel_pos[b, keep[pos]] = True
        sel_neg[b, keep[neg & (neg.long().cumsum(0) <= max_neg)]] = True
    return sel_pos, sel_neg


def _mining_case(seed: int, B: int = 4, A: int = 150):
    """Random boxes where every third one near-duplicates another (IoU around 0.99), distinct losses."""
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(B, A, 2, generator=gen) * 0.7
    boxes = torch.cat([xy, xy + 0.05 + torch.rand(B, A, 2, generator=gen) * 0.25], -1)
    src = torch.randint(0, A, (B, len(range(1, A, 3))), generator=gen)
    jitter = (torch.rand(src.shape + (4,), generator=gen) - 0.5) * 4e-3
    boxes[:, 1::3] = boxes.gather(1, src[..., None].expand(-1, -1, 4)) + jitter
    loss = 0.01 + torch.randperm(B * A, generator=gen).float().view(B, A) / (B * A)  # no ties
    u = torch.rand(B, A, generator=gen)
    labels = torch.where(u < 0.15, 1, 0) - (u > 0.9).long()  # ~15% positives, ~10% ignored
    return loss, boxes, labels > 0, labels == 0


@pytest.mark.parametrize("ratio,min_neg,iou,num_hard", [(3.0, 3, 0.99, None), (3.0, 3, 0.99, 40),
                                                        (0.5, 1, 0.9, 3000), (3.0, 0, 0.99, 3000)])
def test_nms_mining_matches_per_image_reference(ratio: float, min_neg: int, iou: float, num_hard: int | None) -> None:
    suppressed = dropped_positives = 0
    for seed in range(3):
        loss, boxes, pos, neg = _mining_case(seed)
        got = nms_hard_example_mask(loss, boxes, pos, neg, ratio, min_neg, iou, num_hard)
        exp = _tf_miner_reference(loss, boxes, pos, neg, ratio, min_neg, iou, num_hard)
        assert torch.equal(got[0], exp[0]) and torch.equal(got[1], exp[1])
        suppressed += sum(len(torchvision.ops.nms(boxes[b], loss[b], iou)) < loss.shape[1] for b in range(len(loss)))
        dropped_positives += int((pos & ~got[0]).sum())
    assert suppressed > 0 and dropped_positives > 0  # NMS (and the cap) really removed anchors, positives too


def test_nms_drops_a_near_duplicate_negative_by_hand() -> None:
    # image 0: a1 near-duplicates a0 (IoU ~0.995): NMS drops it, the next negative (a3) is mined instead.
    # image 1: the positive b1 near-duplicates the harder negative b0: suppressed, it counts for nothing.
    X, P, Y = [0.1, 0.1, 0.5, 0.5], [0.6, 0.6, 0.9, 0.9], [0.0, 0.6, 0.3, 0.9]
    boxes = torch.tensor([[X, [0.1, 0.1, 0.5, 0.501], P, Y, [0.5, 0.0, 0.9, 0.3], [0.3, 0.3, 0.7, 0.7]],
                          [X, [0.1, 0.1, 0.5, 0.501], P, Y, [0.5, 0.0, 0.9, 0.3], [0.3, 0.3, 0.7, 0.7]]])
    labels = torch.tensor([[0, 0, 1, 0, 0, 0], [0, 1, 0, 0, 0, 0]])
    # negatives' CE falls with the class-1 logit: a0 > a1 > a3 > a4 > a5 (anchor 2, a positive, in between)
    logits = torch.tensor([[[0.0, s, 0.0] for s in (5.0, 4.0, 0.0, 3.0, 2.0, 1.0)]] * 2)
    pos, neg = labels > 0, labels == 0
    score = torch.nn.functional.cross_entropy(logits.view(-1, 3), labels.view(-1), reduction="none").view(2, 6)
    sel_pos, sel_neg = nms_hard_example_mask(score, boxes, pos, neg, 2.0, 1, 0.99)
    assert sel_pos[0].tolist() == [False, False, True, False, False, False]
    assert sel_neg[0].tolist() == [True, False, False, True, False, False]  # without NMS: a0 and a1
    assert hard_negative_mask(score, pos, neg, 2.0, 1)[0].tolist() == [True, True, False, False, False, False]
    assert not sel_pos[1].any() and sel_neg[1].tolist() == [True, False, False, False, False, False]  # min 1

    box_pred = torch.zeros(2, 6, 4)
    box_pred[1, 1] = 1.0  # the suppressed positive's box error: not in the loss (TF sums selected anchors only)
    box_pred[0, 2] = 0.5
    out = SSDLoss("softmax", neg_pos_ratio=2, min_negatives_per_image=1, miner_nms_iou=0.99)(
        logits, box_pred, labels, torch.zeros(2, 6, 4), decoded_boxes=boxes)
    ce = score.detach()
    assert out["num_pos"].item() == 2  # the normaliser still counts every positive
    assert out["loss_cls"].item() == pytest.approx((ce[0, [0, 2, 3]].sum() + ce[1, 0]).item() / 2, rel=1e-6)
    assert out["loss_box"].item() == pytest.approx(4 * 0.5 * 0.5 ** 2 / 2, rel=1e-6)


def test_nms_mining_loss_matches_reference_and_errors() -> None:
    loss_in, boxes, pos, neg = _mining_case(7, B=3, A=60)
    gen = torch.Generator().manual_seed(1)
    labels = pos.long() * torch.randint(1, 4, pos.shape, generator=gen) - (~pos & ~neg).long()
    logits = torch.randn(3, 60, 4, generator=gen)
    box, tgt = torch.randn(3, 60, 4, generator=gen), torch.randn(3, 60, 4, generator=gen)
    out = SSDLoss("softmax", miner_nms_iou=0.99, num_hard_examples=50)(logits, box, labels, tgt, decoded_boxes=boxes)
    ce = torch.nn.functional.cross_entropy(logits.view(-1, 4), labels.clamp(min=0).view(-1), reduction="none")
    ce = ce.view(3, 60)
    sel_pos, sel_neg = _tf_miner_reference(ce.masked_fill(labels < 0, 0.0), boxes, pos, neg, 3.0, 3, 0.99, 50)
    n = int(pos.sum())
    smooth_l1 = torch.nn.functional.smooth_l1_loss(box, tgt, reduction="none").sum(-1)
    assert out["loss_cls"].item() == pytest.approx(ce[sel_pos | sel_neg].sum().item() / n, rel=1e-5)
    assert out["loss_box"].item() == pytest.approx(smooth_l1[sel_pos].sum().item() / n, rel=1e-5)

    with pytest.raises(ArgumentError, match="^miner_nms_iou "):
        SSDLoss("softmax", miner_nms_iou=1.5)
    with pytest.raises(ArgumentError, match="^miner_nms_iou "):
        SSDLoss("sigmoid", cls_loss="focal", miner_nms_iou=0.99)
    with pytest.raises(ArgumentError, match="^num_hard_examples "):
        SSDLoss("softmax", num_hard_examples=3000)
    with pytest.raises(ValueError, match="decoded_boxes"):
        SSDLoss("softmax", miner_nms_iou=0.99)(logits, box, labels, tgt)
