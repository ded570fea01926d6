"""LightningModule for SSDLite-MobileNetV2: training, COCO evaluation, prediction.

Built from `cfg.model` (the contract: :mod:`backbone.training.task_module`): every key except
``optimizer`` and ``scheduler`` (partials, see :class:`TaskModule`) is a keyword argument of
:class:`mnv2det.ssdlite.SSDLite`.

Validation: each step runs the model, the loss (logged as ``val/loss``) and post-processing, and
feeds :class:`COCOEvaluator`; at the epoch end every rank gathers all detections, scores them with
pycocotools over the whole val set and logs ``val/map``, ``val/map_50``, ... (identical values on
every rank). The sanity check only runs the steps (no metrics).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import torch

from backbone.errors import ArgumentError, ConfigError
from backbone.training.task_module import TaskModule
from mnv2det.coco_eval import COCOEvaluator
from mnv2det.ssdlite import build_ssdlite
from mnv2det.transforms import check_resize

log = logging.getLogger(__name__)

LOGGED_METRICS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_100")


class SSDLiteModule(TaskModule):
    """SSDLite detector + SSD loss + COCO evaluation.

    Args:
        num_classes: object classes K (labels 1..K; must equal the dataset's number of categories).
        backbone: kwargs of ``backbone.build_backbone`` (width_mult, output_stride, padding, bn_eps,
            pretrained, ...).
        image_size: square network input side (the data pipeline resizes to it).
        score_converter: ``softmax`` (CE + hard negative mining) | ``sigmoid`` (loss.cls_loss ce | focal).
        normalize: ``imagenet`` | ``tf`` (input normalisation the backbone expects).
        resize: how the data pipeline resizes the input (``data.resize`` reads it): ``cv2_linear``
            (models trained here) | ``tf_bilinear`` (imported TF graphs; :data:`mnv2det.transforms.EVAL_RESIZES`).
        optimizer / scheduler: partials of a ``torch.optim`` class and a
            :mod:`backbone.training.optim` schedule (:class:`TaskModule`); None: evaluation only.
        **model: other SSDLite kwargs: anchor, loss, postprocess, matcher, head, extra_depths,
            box_coder_weights, box_code_order, min_depth.
    """

    num_classes_meaning = "object classes (background excluded)"

    def __init__(self, num_classes: int = 80, backbone: dict[str, Any] | None = None, image_size: int = 300,
                 score_converter: str = "softmax", normalize: str = "imagenet", resize: str = "cv2_linear",
                 optimizer: Callable[..., Any] | None = None, scheduler: Callable[..., Any] | None = None,
                 **model: Any) -> None:
        super().__init__(optimizer, scheduler)
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 32:
            raise ArgumentError("image_size", f"must be an integer >= 32, got {image_size!r}", "e.g. 300")
        self.resize = check_resize(resize)
        self.model = build_ssdlite({"num_classes": num_classes, "backbone": dict(backbone or {}),
                                    "image_size": image_size, "score_converter": score_converter,
                                    "normalize": normalize, **model})
        self.num_classes = self.model.num_classes
        self.evaluator: COCOEvaluator | None = None
        self._evaluator_key: Any = None
        self._report: str = ""
        self._eval_info: dict[str, Any] = {}
        # with predictions_dir set (tools/evaluate.py save_predictions=true), the pictures draw the
        # detections scoring at least this
        self.draw_score_threshold: float = 0.3

    # ------------------------------------------------------------------------------ helpers
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images: (B, 3, S, S) normalised -> cls_logits (B, A, K+1), bbox_regression (B, A, 4), anchors (A, 4)."""
        return self.model(images)

    def _val_dataset(self) -> Any:
        dm = self._datamodule()
        ds = getattr(dm, "val_dataset", None)
        if ds is None:
            loaders = self.trainer.val_dataloaders
            loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
            ds = getattr(loader, "dataset", None)
        if ds is None or not hasattr(ds, "coco"):
            raise ConfigError("data", "the validation dataset has no COCO ground truth (.coco)",
                              "validate with mnv2det.datamodule.DetDataModule / mnv2det.dataset.COCODetection")
        return ds

    def _category_ids(self, dataset: Any) -> list[int]:
        if "category_ids" in self.meta:  # setup() checked their number
            return list(self.meta["category_ids"])
        ids = list(dataset.category_ids)  # validating without a datamodule: no meta, check here
        self.check_num_classes(len(ids))
        return ids

    # ----------------------------------------------------------------------------- training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        outputs = self.model(batch["images"])
        losses = self.model.compute_loss(outputs, batch["targets"])
        B = batch["images"].shape[0]
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=B)
        self.log("train/loss_cls", losses["loss_cls"], batch_size=B)
        self.log("train/loss_box", losses["loss_box"], batch_size=B)
        self.log("train/num_pos", losses["num_pos"].float() / B, batch_size=B)
        return losses["loss"]

    # ---------------------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        dataset = self._val_dataset()
        key = (id(dataset), len(dataset))
        if self.evaluator is None or self._evaluator_key != key:  # building the GT index once per dataset
            self.evaluator = COCOEvaluator(dataset.coco, self._category_ids(dataset), img_ids=dataset.ids,
                                           class_names=self.meta.get("class_names") or dataset.class_names)
            self._evaluator_key = key
            self._eval_info = {"dataset": getattr(dataset, "name", type(dataset).__name__),
                               "num_images": len(dataset.ids), "class_names": list(dataset.class_names)}
        self.evaluator.reset()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        model = self.inference_model()
        outputs = model(batch["images"])
        losses = model.compute_loss(outputs, batch["targets"])
        self.log("val/loss", losses["loss"], sync_dist=True, batch_size=batch["images"].shape[0])
        detections = model.postprocess(outputs, batch["orig_sizes"])
        self.evaluator.update(batch["image_ids"], detections)
        return {"detections": detections}  # for callbacks (backbone.training.tb_images); Lightning keeps nothing

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            self.evaluator.reset()
            return
        metrics = self.evaluator.compute()  # gathers over ranks: identical on every rank
        self._metrics = metrics
        self._report = self.evaluator.report
        self._eval_info["num_images_with_detections"] = self.evaluator.num_images_with_detections
        for name in LOGGED_METRICS:
            self.log(f"val/{name}", metrics[name], sync_dist=True, prog_bar=name in ("map", "map_50"))
        self.evaluator.reset()  # drop this epoch's detections (results/metrics stay for save_evaluation)

    # ------------------------------------------------------------------ evaluation contract
    def _metrics_of(self, results: dict[str, Any]) -> dict[str, float]:
        """COCO metrics of the last validation epoch (fractions in [0, 1]; -1: no GT in that range)."""
        return dict(results)

    def _format_report(self, results: dict[str, Any]) -> str:
        """The pycocotools summary table with the dataset name and image count."""
        info = self._eval_info
        head = (f"COCO bbox evaluation -- {info.get('dataset')}: {info.get('num_images')} images "
                f"({info.get('num_images_with_detections')} with detections), "
                f"{len(info.get('class_names', []))} classes")
        return f"{head}\n{self._report}"

    def _write_evaluation(self, results: dict[str, Any], out_dir: Path) -> None:
        """Write ``metrics.json`` and ``detections.json`` (COCO results, original category ids); with
        ``predictions_dir`` set, also one picture per val image (mnv2det.visualize)."""
        self.evaluator.save(out_dir)
        if self.predictions_dir is not None:
            from mnv2det.visualize import save_detection_images

            n = save_detection_images(self._val_dataset(), self.evaluator.results, self.predictions_dir,
                                      self.evaluator.category_ids, self.evaluator.class_names,
                                      score_threshold=self.draw_score_threshold)
            log.info("%d pictures of detections (score >= %.2f) written to %s", n, self.draw_score_threshold,
                     self.predictions_dir)

    # ------------------------------------------------------------------------------ predict
    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        """Per image: image_id, boxes (N, 4) xyxy original px, scores (N,), labels (N,) 1..K,
        category_ids (N,) (the dataset's ids when known)."""
        model = self.inference_model()
        detections = model.postprocess(model(batch["images"]), batch["orig_sizes"])
        cat = self.meta.get("category_ids")
        lut = torch.as_tensor(cat, device=batch["images"].device) if cat else None
        out = []
        for img_id, det in zip(batch["image_ids"].tolist(), detections):
            item = {"image_id": int(img_id), **{k: v.cpu() for k, v in det.items()}}
            if lut is not None:
                item["category_ids"] = lut[det["labels"] - 1].cpu()
            out.append(item)
        return out
