"""SSD loss: hand-checked values, hard negative mining, sigmoid/focal variants, normalisation."""
from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import sigmoid_focal_loss as tv_focal

from backbone.errors import ArgumentError
from mnv2det.loss import SSDLoss, hard_negative_mask

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
