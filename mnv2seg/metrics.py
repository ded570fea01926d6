"""Semantic segmentation metrics from a confusion matrix accumulated on the device.

The matrix is accumulated over the whole validation set (not averaged per batch or per image),
as PASCAL VOC's official evaluation, TF DeepLab, mmsegmentation and torchmetrics do. A class that
appears in neither the ground truth nor the predictions has no IoU (0 / 0): it is reported as
NaN / "n/a (absent)" and left out of the mean, as mmsegmentation (nanmean) and torchmetrics
(MulticlassJaccardIndex, which drops classes with an empty union) do. A class absent from the
ground truth but predicted somewhere has IoU 0 and counts.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.distributed as dist

from backbone.training.voc_format import IGNORE_INDEX


class ConfusionMatrix:
    """Accumulates a (K, K) confusion matrix: rows = ground truth, columns = prediction.

    >>> cm = ConfusionMatrix(21)
    >>> cm.update(preds, target)   # (B, H, W) class indices; target 255 = ignore
    >>> cm.reduce()                # sums over DDP ranks (no-op otherwise)
    >>> cm.compute()["miou"]
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, device: torch.device | str | None = None) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        # int64: a VOC val set has ~2e8 labelled pixels; float32 would lose counts past 2^24
        self.mat = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64, device=device)

    def to(self, device: torch.device | str) -> "ConfusionMatrix":
        self.mat = self.mat.to(device)
        return self

    def reset(self) -> None:
        self.mat.zero_()

    @torch.no_grad()
    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """preds: (B, H, W) or (N,) predicted class indices; target: same shape, ignore_index = unlabelled.

        Vectorised over the whole batch: one bincount over the flattened pixels.
        Target values outside [0, K) other than ignore_index raise (the dataset filters bad masks).
        """
        if preds.shape != target.shape:
            raise ValueError(f"preds {tuple(preds.shape)} and target {tuple(target.shape)} differ in shape")
        k = self.num_classes
        if self.mat.device != target.device:
            self.mat = self.mat.to(target.device)
        target = target.reshape(-1).long()
        preds = preds.reshape(-1).long()
        keep = target != self.ignore_index
        target, preds = target[keep], preds[keep]
        if target.numel() == 0:
            return
        bad = (target < 0) | (target >= k) | (preds < 0) | (preds >= k)
        if bool(bad.any()):
            raise ValueError(
                f"class index outside [0, {k}) (ignore_index={self.ignore_index}): "
                f"target range [{int(target.min())}, {int(target.max())}], preds range [{int(preds.min())}, {int(preds.max())}]"
            )
        self.mat += torch.bincount(target * k + preds, minlength=k * k).reshape(k, k)

    def reduce(self) -> None:
        """Sum the matrix over all DDP ranks (all_reduce); a no-op without torch.distributed."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.mat, op=dist.ReduceOp.SUM)

    def compute(self) -> dict[str, Any]:
        """Metrics from the accumulated matrix.

        Returns {miou, pixel_acc, mean_acc, fw_iou: float (0..1, NaN if nothing was counted),
        iou_per_class, acc_per_class: list[float] (NaN where undefined), num_pixels: int,
        present: list[bool] (class in GT or predictions)}.
        """
        m = self.mat.double()
        tp = m.diagonal()
        gt = m.sum(1)
        pred = m.sum(0)
        union = gt + pred - tp
        nan = torch.full_like(tp, float("nan"))
        iou = torch.where(union > 0, tp / union.clamp(min=1), nan)
        acc = torch.where(gt > 0, tp / gt.clamp(min=1), nan)
        total = m.sum()
        present = union > 0
        miou = float(iou[present].mean()) if bool(present.any()) else float("nan")
        gt_present = gt > 0
        mean_acc = float(acc[gt_present].mean()) if bool(gt_present.any()) else float("nan")
        pixel_acc = float(tp.sum() / total) if total > 0 else float("nan")
        fw_iou = float((gt[present] / total * iou[present]).sum()) if total > 0 else float("nan")
        return {
            "miou": miou,
            "pixel_acc": pixel_acc,
            "mean_acc": mean_acc,
            "fw_iou": fw_iou,
            "iou_per_class": iou.tolist(),
            "acc_per_class": acc.tolist(),
            "present": present.tolist(),
            "num_pixels": int(self.mat.sum()),
        }


def _pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100.0 * x:6.2f}"


def format_report(metrics: dict[str, Any], class_names: Sequence[str] | None = None, title: str = "") -> str:
    """The printed table: per-class IoU (%) with names, 'n/a (absent)' marks, mIoU and pixel accuracy."""
    ious = metrics["iou_per_class"]
    names = list(class_names) if class_names is not None else [f"class_{i}" for i in range(len(ious))]
    if len(names) != len(ious):
        names = names + [f"class_{i}" for i in range(len(names), len(ious))]
    width = max([len(n) for n in names] + [len("pixel accuracy")])
    lines = [title] if title else []
    lines.append(f"{'class':<{width}}  IoU (%)")
    lines.append("-" * (width + 16))
    absent = 0
    for name, v in zip(names, ious):
        if v is None or math.isnan(v):
            absent += 1
            lines.append(f"{name:<{width}}  n/a (absent)")
        else:
            lines.append(f"{name:<{width}}  {_pct(v)}")
    lines.append("-" * (width + 16))
    n_used = len(ious) - absent
    lines.append(f"{'mIoU':<{width}}  {_pct(metrics['miou'])}   (mean over {n_used}/{len(ious)} classes)")
    lines.append(f"{'pixel accuracy':<{width}}  {_pct(metrics['pixel_acc'])}")
    if "mean_acc" in metrics:
        lines.append(f"{'mean accuracy':<{width}}  {_pct(metrics['mean_acc'])}")
    if absent:
        lines.append(f"n/a (absent): {absent} class(es) in neither the ground truth nor the predictions; "
                     "they have no IoU and are left out of the mIoU.")
    return "\n".join(lines)
