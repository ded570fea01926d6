"""LightningModule for Mobile DeepLabv3 (training, validation with mIoU, evaluation outputs).

Built from `cfg.model` (the contract: :mod:`backbone.training.task_module`).
"""
from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

from backbone.errors import ArgumentError
from backbone.training.task_module import TaskModule
from backbone.training.voc_format import IGNORE_INDEX, class_names_for, voc_palette
from mnv2seg.deeplabv3 import DeepLabV3
from mnv2seg.inference import DEFAULT_MF_SCALES, INFERENCE_MODES, predict
from mnv2seg.metrics import ConfusionMatrix, format_report


class DeepLabModule(TaskModule):
    """Mobile DeepLabv3 on MobileNetV2.

    Args:
        num_classes: K, background included.
        backbone: `backbone.build_backbone` kwargs (output_stride, pretrained, ...).
        head / feature / atrous_rates / head_channels / dropout / align_corners: see DeepLabV3.
        optimizer / scheduler: partials of a ``torch.optim`` class and a :mod:`backbone.training.optim`
            schedule (:class:`TaskModule`), e.g. ``partial(torch.optim.SGD, lr=0.007, momentum=0.9,
            weight_decay=4e-5)`` and ``partial(WarmupPolyLR, power=0.9)``; None: evaluation only.
        inference: "single" or "mf" (multi-scale `mf_scales` + left-right flip when mf_flip) for validation.
        normalize: the input normalisation the weights expect (imagenet | tf); data configs read it.
        save_predictions: keep the predicted masks of the last validation and write them in
            `save_evaluation(out_dir)` to out_dir/predictions/<name>.png (VOC palette PNGs, each at
            its image's own size). Setting the attribute `predictions_dir` instead writes them there
            during validation.
        memory_format: channels_last | contiguous, the network's layout (backbone/memory_format.py).
    """

    num_classes_meaning = "classes (background included)"

    def __init__(self, num_classes: int = 21, backbone: dict[str, Any] | None = None, head: str = "lite",
                 feature: str = "layer_18", atrous_rates: Sequence[int] = (6, 12, 18), head_channels: int = 256,
                 dropout: float = 0.1, align_corners: bool = False,
                 optimizer: Callable[..., Any] | None = None, scheduler: Callable[..., Any] | None = None,
                 inference: str = "single", mf_scales: Sequence[float] = DEFAULT_MF_SCALES, mf_flip: bool = True,
                 normalize: str = "imagenet", save_predictions: bool = False,
                 memory_format: str = "channels_last") -> None:
        super().__init__(optimizer, scheduler)
        if inference not in INFERENCE_MODES:
            raise ArgumentError("inference", f"must be one of {list(INFERENCE_MODES)}, got {inference!r}",
                              "single, or mf for multi-scale + flip")
        if not mf_scales or any(float(s) <= 0 for s in mf_scales):
            raise ArgumentError("mf_scales", f"must be positive numbers, got {mf_scales!r}",
                              "e.g. [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]")
        self.model = DeepLabV3(num_classes, backbone, head, feature, atrous_rates, head_channels, dropout, align_corners,
                               memory_format)
        self.num_classes = num_classes
        self.inference = inference
        self.mf_scales = tuple(float(s) for s in mf_scales)
        self.mf_flip = bool(mf_flip)
        self.save_predictions = bool(save_predictions)
        self.confmat: ConfusionMatrix | None = None
        self._predictions: dict[str, bytes] = {}
        self._class_names: list[str] | None = None

    # ------------------------------------------------------------------ forward / training
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W) normalised -> logits (B, K, H, W)."""
        return self.model(images)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        logits = self.model(batch["images"])
        # mean over labelled pixels of the batch; 255 (void band, padding) is ignored
        loss = F.cross_entropy(logits.float(), batch["masks"], ignore_index=IGNORE_INDEX)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch["images"].shape[0])
        return loss

    # ------------------------------------------------------------------ validation
    def setup(self, stage: str) -> None:
        super().setup(stage)
        names = self.meta.get("class_names")
        if names is not None:
            self._class_names = list(names)

    def on_validation_epoch_start(self) -> None:
        self.confmat = ConfusionMatrix(self.num_classes, IGNORE_INDEX, device=self.device)
        self._loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._loss_count = torch.zeros((), dtype=torch.int64, device=self.device)
        self._predictions = {}

    def predict_probs(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> softmax probabilities (B, K, H, W) with the configured inference mode."""
        return predict(self.inference_model(), images, self.inference, self.mf_scales, self.mf_flip,
                       self.model.align_corners)

    def predict_labels(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised -> (B, H, W) class indices, as validation computes them (tools/predict.py)."""
        if self.inference == "single":
            return self.inference_model()(images).argmax(1)
        return self.predict_probs(images).argmax(1)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        images, masks = batch["images"], batch["masks"]
        if self.inference == "single":
            logits = self.inference_model()(images)
            # summed on the device (no per-step sync); a fully ignored batch adds 0 / 0 pixels
            self._loss_sum += F.cross_entropy(logits.float(), masks, ignore_index=IGNORE_INDEX, reduction="sum")
            self._loss_count += (masks != IGNORE_INDEX).sum()
            preds = logits.argmax(1)
        else:
            preds = self.predict_labels(images)
        # padded pixels carry mask 255, so they are not scored
        self.confmat.update(preds, masks)
        if self.save_predictions or self.predictions_dir is not None:
            self._keep_predictions(preds, batch["sizes"], batch["names"])
        return {"preds": preds}  # for callbacks (backbone.training.tb_images); Lightning keeps nothing

    def on_validation_epoch_end(self) -> None:
        self.confmat.reduce()
        metrics = self.confmat.compute()
        loss = torch.stack([self._loss_sum, self._loss_count.double()])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(loss)
        if self.inference == "single" and float(loss[1]) > 0:
            self.log("val/loss", float(loss[0] / loss[1]), sync_dist=True)
        self._metrics = metrics
        # already identical on every rank after the all_reduce; sync_dist only silences Lightning's warning
        self.log("val/miou", metrics["miou"], prog_bar=True, sync_dist=True)
        self.log("val/pixel_acc", metrics["pixel_acc"], sync_dist=True)
        self.log("val/mean_acc", metrics["mean_acc"], sync_dist=True)
        if self.save_predictions and self.predictions_dir is None and dist.is_available() and dist.is_initialized():
            gathered: list[dict[str, bytes] | None] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, self._predictions)
            self._predictions = {k: v for part in gathered if part for k, v in part.items()}

    def _keep_predictions(self, preds: torch.Tensor, sizes: torch.Tensor, names: list[str]) -> None:
        """Encode each prediction, cropped to its image's own size, as a VOC palette PNG."""
        if self._trainer is not None and self._trainer.sanity_checking:
            return
        palette = voc_palette().ravel().tolist()
        preds = preds.to(torch.uint8).cpu().numpy()
        for pred, (h, w), name in zip(preds, sizes.tolist(), names):
            im = Image.fromarray(np.ascontiguousarray(pred[:h, :w]))  # "L": values are the class indices
            im.putpalette(palette)  # "L" -> "P", indices kept
            if self.predictions_dir is not None:
                path = Path(self.predictions_dir) / f"{name}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                im.save(path)
            else:
                buf = io.BytesIO()
                im.save(buf, format="PNG")
                self._predictions[name] = buf.getvalue()

    # ------------------------------------------------------------------ evaluation outputs
    @property
    def class_names(self) -> list[str]:
        if self._class_names is not None:
            return self._class_names
        return class_names_for(self.num_classes)

    def _metrics_of(self, results: dict[str, Any]) -> dict[str, float]:
        """{miou, pixel_acc, mean_acc, fw_iou} (fractions in 0..1) of the last validation epoch."""
        return {k: float(results[k]) for k in ("miou", "pixel_acc", "mean_acc", "fw_iou")}

    def _format_report(self, results: dict[str, Any]) -> str:
        """The per-class IoU table of the last validation epoch."""
        mode = "single scale" if self.inference == "single" else f"MF: scales {list(self.mf_scales)}" + (
            " + flip" if self.mf_flip else "")
        title = (f"Mobile DeepLabv3 ({self.hparams.head}, OS{self.model.output_stride}, {mode}) -- "
                 f"{results['num_pixels']:,} labelled pixels")
        return format_report(results, self.class_names, title)

    def _write_evaluation(self, results: dict[str, Any], out_dir: Path) -> Path:
        """Write out_dir/metrics.json ({miou, pixel_acc, mean_acc, fw_iou, iou_per_class: {name: value|None}})
        and, with save_predictions, out_dir/predictions/<name>.png. Returns the metrics.json path."""

        def num(v: float) -> float | None:
            return None if v is None or math.isnan(v) else float(v)

        doc = {
            **{k: num(v) for k, v in self._metrics_of(results).items()},
            "iou_per_class": {n: num(v) for n, v in zip(self.class_names, results["iou_per_class"])},
            "acc_per_class": {n: num(v) for n, v in zip(self.class_names, results["acc_per_class"])},
            "num_pixels": results["num_pixels"],
            "inference": self.inference,
            "mf_scales": list(self.mf_scales) if self.inference == "mf" else None,
            "mf_flip": self.mf_flip if self.inference == "mf" else None,
        }
        path = out_dir / "metrics.json"
        path.write_text(json.dumps(doc, indent=2) + "\n")
        if self._predictions:
            pred_dir = out_dir / "predictions"
            pred_dir.mkdir(parents=True, exist_ok=True)
            for name, data in self._predictions.items():
                (pred_dir / f"{name}.png").write_bytes(data)
        return path
