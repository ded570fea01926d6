"""TensorBoard pictures of every validation epoch: a few val images, and the task's plot.

:class:`ValImages` (``conf/callbacks/default.yaml``, entry ``val_images``) keeps the first
``num_images`` val images of the epoch (on rank 0) with what the task's ``validation_step`` returned
(det: ``{"detections": [...]}`` in original pixels; seg: ``{"preds": (B, H, W)}``) and, once the
module has finished the epoch, logs each as ``val_images/<i>``: prediction | ground truth side by
side (:mod:`backbone.draw`). With ``plots`` it also logs the plot of the metrics already computed:
det, the COCO precision-recall curves at IoU 0.5 (all classes, as COCO averages them, and each
class; ``val/pr_curve_iou50``); seg, the row-normalised confusion matrix (``val/confusion_matrix``).

Nothing happens (and nothing is kept) without a TensorBoard logger (``logger=none``), during the
sanity check, on other ranks, or with ``num_images=0 plots=false``.
"""
from __future__ import annotations

import logging
from typing import Any

import cv2
import lightning.pytorch as pl
import numpy as np
import torch

from backbone.draw import class_colours, confusion_matrix_image, draw_boxes, overlay_mask, pr_curve_image, side_by_side
from backbone.normalization import resolve_normalization

log = logging.getLogger(__name__)

#: val images are enlarged (integer factor) to at least this long side, so their tags stay readable
MIN_SIDE = 320


def tensorboard_writer(trainer: pl.Trainer) -> Any | None:
    """The SummaryWriter of the trainer's first TensorBoard logger (None without one)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    for lg in trainer.loggers:
        if isinstance(lg, TensorBoardLogger):
            return lg.experiment
    return None


def denormalize(images: torch.Tensor, normalize: Any) -> np.ndarray:
    """(B, 3, H, W) normalised -> (B, H, W, 3) uint8 RGB."""
    mean, std = resolve_normalization(normalize)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    x = (images.detach().float().cpu() * s + m) * 255.0
    return x.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _enlarge(h: int, w: int) -> int:
    return max(1, -(-MIN_SIDE // max(h, w)))


class ValImages(pl.Callback):
    """Log val pictures (prediction | ground truth) and the task's plot to TensorBoard every validation epoch.

    Args:
        num_images: val images per epoch (the first of rank 0's share); 0: none.
        score_threshold: det, predictions drawn from this score.
        plots: det, the PR curves at IoU 0.5; seg, the confusion matrix.
        every_n_epochs: log every n-th validation epoch only.
    """

    def __init__(self, num_images: int = 4, score_threshold: float = 0.3, plots: bool = True,
                 every_n_epochs: int = 1) -> None:
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 0:
            from backbone.errors import ArgumentError

            raise ArgumentError("num_images", f"must be an integer >= 0, got {num_images!r}", "e.g. 4; 0 turns it off")
        self.num_images = num_images
        self.score_threshold = float(score_threshold)
        self.plots = bool(plots)
        self.every_n_epochs = max(1, int(every_n_epochs))
        self._pictures: list[np.ndarray] = []

    def _active(self, trainer: pl.Trainer) -> bool:
        return (not trainer.sanity_checking and trainer.is_global_zero
                and trainer.current_epoch % self.every_n_epochs == 0 and (self.num_images > 0 or self.plots)
                and tensorboard_writer(trainer) is not None)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pictures = []

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        take = self.num_images - len(self._pictures)
        if take <= 0 or not isinstance(outputs, dict) or not self._active(trainer):
            return
        names = list(pl_module.meta.get("class_names") or getattr(pl_module, "class_names", None) or [])
        images = denormalize(batch["images"][:take], pl_module.hparams.get("normalize", "imagenet"))
        if "detections" in outputs:
            self._pictures += self._det_pictures(images, outputs["detections"], batch, names)
        elif "preds" in outputs:
            self._pictures += self._seg_pictures(images, outputs["preds"], batch, names, pl_module)

    def _det_pictures(self, images: np.ndarray, detections: list[dict[str, torch.Tensor]], batch: dict[str, Any],
                      names: list[str]) -> list[np.ndarray]:
        out = []
        targets = batch["targets"]
        colours = class_colours(len(names))
        for i, image in enumerate(images):
            S_h, S_w = image.shape[:2]
            f = _enlarge(S_h, S_w)
            image = cv2.resize(image, (S_w * f, S_h * f), interpolation=cv2.INTER_LINEAR) if f > 1 else image
            h, w = (float(v) for v in batch["orig_sizes"][i].tolist())
            det = detections[i]
            # detections are in original pixels, the picture is the S x S network input (enlarged)
            scale = torch.tensor([S_w / w, S_h / h, S_w / w, S_h / h]) * f
            pred = draw_boxes(image, det["boxes"].float().cpu() * scale, det["labels"].cpu().numpy(),
                              det["scores"].float().cpu().numpy(), names, colours, self.score_threshold)
            valid = targets["valid"][i].cpu().numpy()
            gt_boxes = targets["boxes"][i].cpu().numpy()[valid] * np.array([S_w, S_h, S_w, S_h]) * f  # normalised
            gt = draw_boxes(image, gt_boxes, targets["labels"][i].cpu().numpy()[valid], None, names, colours)
            out.append(side_by_side([pred, gt], ["prediction", "ground truth"]))
        return out

    def _seg_pictures(self, images: np.ndarray, preds: torch.Tensor, batch: dict[str, Any], names: list[str],
                      pl_module: pl.LightningModule) -> list[np.ndarray]:
        out = []
        palette = pl_module.meta.get("palette")
        palette = np.asarray(palette, np.uint8) if palette is not None else None
        preds = preds[: len(images)].to(torch.uint8).cpu().numpy()
        masks = batch["masks"][: len(images)].cpu().numpy()
        for image, pred, mask, (h, w) in zip(images, preds, masks, batch["sizes"].tolist()):
            image, pred, mask = image[:h, :w], pred[:h, :w], mask[:h, :w]  # drop the eval padding
            f = _enlarge(h, w)
            if f > 1:
                image = cv2.resize(image, (w * f, h * f), interpolation=cv2.INTER_LINEAR)
                pred = cv2.resize(pred, (w * f, h * f), interpolation=cv2.INTER_NEAREST)
                mask = cv2.resize(mask.astype(np.uint8), (w * f, h * f), interpolation=cv2.INTER_NEAREST)
            out.append(side_by_side([overlay_mask(image, pred, names, palette), overlay_mask(image, mask, names, palette)],
                                    ["prediction", "ground truth"]))
        return out

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after the module's on_validation_epoch_end (callbacks' epoch-end hooks run before the module's)
        if not self._active(trainer):
            self._pictures = []
            return
        writer = tensorboard_writer(trainer)
        step = trainer.global_step
        for i, picture in enumerate(self._pictures):
            writer.add_image(f"val_images/{i}", picture, step, dataformats="HWC")
        self._pictures = []
        if self.plots:
            plot, tag = self._plot(pl_module)
            if plot is not None:
                writer.add_image(tag, plot, step, dataformats="HWC")
        writer.flush()

    def _plot(self, pl_module: pl.LightningModule) -> tuple[np.ndarray | None, str]:
        evaluator = getattr(pl_module, "evaluator", None)
        pr = getattr(evaluator, "pr", None)
        if pr:
            precision = np.asarray(pr["precision"], np.float64)  # (R, K), -1: category without ground truth
            names = dict(zip(evaluator.category_ids, evaluator.class_names))
            has_gt = (precision > -1).any(0)
            curves = []
            if has_gt.any():  # COCO's all-class curve: the mean over categories with ground truth
                curves.append(("all classes", np.where(precision[:, has_gt] > -1, precision[:, has_gt], 0).mean(1)))
            curves += [(str(names.get(c, c)), precision[:, k]) for k, c in enumerate(pr["category_ids"])]
            return pr_curve_image(pr["recall"], curves, highlight="all classes"), "val/pr_curve_iou50"
        confmat = getattr(pl_module, "confmat", None)
        if confmat is not None:
            names = list(getattr(pl_module, "class_names", None) or [])
            return confusion_matrix_image(confmat.mat.cpu().numpy(), names or None), "val/confusion_matrix"
        return None, ""
