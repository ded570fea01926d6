"""Evaluate exported models with the training evaluators, calibration images, batch-1 latency.

Images come from the configured datamodule with an identity normalisation (``(x - 0) / (1/255 * 255)``:
the eval pipeline's resize / padding, pixels left in 0..255), so the exported model sees exactly what
the PyTorch model sees before its own normalisation. Det: :class:`mnv2det.coco_eval.COCOEvaluator`;
seg: :class:`mnv2seg.metrics.ConfusionMatrix` (padding refilled with the mean pixel, as the eval
pipeline's 0 after normalisation).
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

IDENTITY_NORMALIZE = {"mean": [0.0, 0.0, 0.0], "std": [1 / 255, 1 / 255, 1 / 255]}


def _pad_fill(images: torch.Tensor, sizes: torch.Tensor, pad_value: list[float]) -> torch.Tensor:
    """images (B, 3, H, W) 0-padded bottom/right past sizes (B, 2) -> padded with pad_value instead."""
    H, W = images.shape[-2:]
    inside = (torch.arange(H)[None, :, None] < sizes[:, 0, None, None]) & (
        torch.arange(W)[None, None, :] < sizes[:, 1, None, None])  # (B, H, W)
    fill = torch.tensor(pad_value, dtype=images.dtype).view(1, 3, 1, 1)
    return torch.where(inside[:, None], images, fill)


def evaluate_exported(model: Any, datamodule: Any) -> dict[str, Any]:
    """The task's metrics of an exported model on the datamodule's whole val set (normalize must be
    :data:`IDENTITY_NORMALIZE`). Det: COCO metrics (``map``, ...); seg: ``miou``, ``pixel_acc``, ..."""
    meta = model.metadata
    datamodule.setup("validate")
    loader = datamodule.val_dataloader()
    if meta["task"] == "det":
        from mnv2det.coco_eval import COCOEvaluator

        if not meta["nms"]:
            raise ValueError("evaluating a detector needs the post-processing inside (nms=true)")
        ds = datamodule.val_dataset
        evaluator = COCOEvaluator(ds.coco, datamodule.meta["category_ids"], img_ids=ds.ids,
                                  class_names=datamodule.meta.get("class_names"))
        H, W = meta["input_size"]
        for batch in loader:
            out = model(batch["images"].numpy())
            sizes = batch["orig_sizes"].float()  # (B, 2) h, w
            scale = torch.stack([sizes[:, 1] / W, sizes[:, 0] / H] * 2, dim=1)[:, None, :]
            boxes = torch.from_numpy(out["boxes"]) * scale
            dets = [{"boxes": boxes[i, :n], "scores": torch.from_numpy(out["scores"][i, :n]),
                     "labels": torch.from_numpy(out["labels"][i, :n])}
                    for i, n in enumerate(out["num_detections"].tolist())]
            evaluator.update(batch["image_ids"], dets)
        return evaluator.compute()
    from mnv2seg.metrics import ConfusionMatrix

    cm = ConfusionMatrix(int(meta["num_classes"]))
    for batch in loader:
        images = _pad_fill(batch["images"], batch["sizes"], meta["pad_value"])
        cm.update(predict_mask(model, images.numpy()), batch["masks"])
    return cm.compute()


def predict_mask(model: Any, images: np.ndarray) -> torch.Tensor:
    """(B, H, W) int64 class indices of a seg export (argmax inside, or its logits resized as the model does)."""
    out = model(images)
    if "mask" in out:
        return torch.from_numpy(out["mask"]).long()
    logits = F.interpolate(torch.from_numpy(out["logits"]), size=images.shape[-2:], mode="bilinear",
                           align_corners=bool(model.metadata.get("align_corners", False)))
    return logits.argmax(1)


def calibration_images(datamodule: Any, metadata: dict[str, Any], num_images: int, seed: int = 0
                       ) -> Iterator[np.ndarray]:
    """``num_images`` (1, 3, H, W) float32 0..255 images from the TRAINING split, eval preprocessing
    (no augmentation), a seeded random choice."""
    from backbone.export.metadata import prepare_image

    if metadata["task"] == "det":
        from mnv2det.dataset import COCODetection

        ds = COCODetection(datamodule.root, datamodule.train_split, None, datamodule.label_category_ids)
        read = lambda i: ds.read_image(i)  # noqa: E731
    else:
        from mnv2seg.dataset import VOCSegmentation

        ds = VOCSegmentation(datamodule.root, datamodule.train_split, datamodule.sbd_root, datamodule.num_classes,
                             None, on_bad="ignore")
        read = lambda i: ds[i]["image"]  # noqa: E731
    order = np.random.default_rng(seed).permutation(len(ds))[:num_images]
    for i in order.tolist():
        image = read(i)
        if image is not None:
            yield prepare_image(np.asarray(image), metadata)[None]


def latency_ms(model: Any, runs: int = 50, warmup: int = 5) -> float:
    """Median wall time (ms) of ``runs`` batch-1 calls on a fixed random input, after ``warmup`` calls."""
    H, W = model.metadata["input_size"]
    x = np.random.default_rng(0).uniform(0, 255, (1, 3, H, W)).astype(np.float32)
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        model(x)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)
