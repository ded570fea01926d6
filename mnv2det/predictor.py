"""Detection part of ``tools/predict.py`` (the flow: :mod:`backbone.predict`).

Two :class:`backbone.predict.Predictor` implementations, both answering in original pixels:

- :class:`CheckpointDetPredictor`: the LightningModule of a checkpoint, preprocessed by the evaluation's
  own transform (:func:`mnv2det.transforms.build_eval_transform`: ``resize`` cv2_linear | tf_bilinear,
  normalisation) and post-processed by the model's own :class:`mnv2det.postprocess.PostProcessor` with
  the original sizes, exactly as validation does -- so predict and evaluate cannot drift apart.
- :class:`ExportedDetPredictor`: an exported model (:mod:`backbone.export.runtime`, NMS inside), fed
  0..255 RGB resized the same way (its normalisation is inside the model).

:class:`ResultWriter` writes ``predictions.jsonl`` (one line per image) and one JPEG per image.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from backbone.errors import ArgumentError, DataError
from backbone.predict import InputItem, Predictor
from mnv2det.transforms import build_eval_transform
from mnv2det.visualize import draw_detections

#: the eval transform without normalisation: exported models normalise inside (0..255 in, 0..255 out)
IDENTITY_NORMALIZE = {"mean": [0.0, 0.0, 0.0], "std": [1.0 / 255.0] * 3}


def _empty_target() -> dict[str, np.ndarray]:
    return {"boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int64), "crowd": np.zeros(0, bool)}


def _keep(det: dict[str, torch.Tensor], threshold: float) -> dict[str, np.ndarray]:
    """One image's detections with score >= threshold, as numpy (boxes float32, scores float32, labels int64)."""
    ok = det["scores"] >= threshold
    return {"boxes": det["boxes"][ok].float().cpu().numpy().reshape(-1, 4),
            "scores": det["scores"][ok].float().cpu().numpy(),
            "labels": det["labels"][ok].long().cpu().numpy()}


class CheckpointDetPredictor:
    """A checkpoint's SSDLiteModule on images of any size (see the module docstring).

    Args:
        module: the :class:`mnv2det.lightning_module.SSDLiteModule`, weights loaded, on its device, eval mode.
        class_names: K names of labels 1..K; category_ids: the dataset id of each label (default 1..K).
        score_threshold: detections scoring below it are dropped (the model's own post-processing
            threshold still applies first).
    """

    task = "det"

    def __init__(self, module: Any, class_names: Sequence[str], category_ids: Sequence[int] | None = None,
                 score_threshold: float = 0.3) -> None:
        self.module = module
        self.class_names = [str(n) for n in class_names]
        self.category_ids = [int(c) for c in category_ids] if category_ids else list(range(1, len(class_names) + 1))
        self.score_threshold = float(score_threshold)
        hp = module.hparams
        self.transform = build_eval_transform(int(hp.image_size), hp.get("normalize", "imagenet"), module.resize)

    @torch.no_grad()
    def predict_batch(self, images: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """images: B (H_i, W_i, 3) uint8 RGB -> B dicts of boxes (N, 4) xyxy original px, scores, labels 1..K."""
        if not images:
            return []
        device = next(self.module.parameters()).device
        x = torch.stack([self.transform(im, _empty_target())[0] for im in images]).to(device)
        sizes = torch.tensor([im.shape[:2] for im in images], dtype=torch.int64, device=device)
        model = self.module.inference_model()
        detections = model.postprocess(model(x), sizes)
        return [_keep(d, self.score_threshold) for d in detections]


class ExportedDetPredictor:
    """An exported detector (``ExportedModel``: metadata + ``__call__`` on (B, 3, H, W) float32 0..255 RGB ->
    ``boxes (B, 100, 4)`` xyxy input px, ``scores``, ``labels`` 1..K, ``num_detections (B,)``)."""

    task = "det"

    def __init__(self, model: Any, score_threshold: float = 0.3) -> None:
        meta = dict(model.metadata)
        if meta.get("nms") is False:  # raw cls_logits / bbox_regression: no boxes to write
            raise DataError(getattr(model, "path", "ckpt_path"), "was exported with nms=false (raw outputs): predict "
                            "needs the post-processing inside", "re-export with tools/export.py nms=true")
        self.model = model
        self.class_names = [str(n) for n in meta.get("class_names") or []]
        ids = meta.get("category_ids")
        self.category_ids = [int(c) for c in ids] if ids else list(range(1, len(self.class_names) + 1))
        self.score_threshold = float(score_threshold)
        h, w = (int(v) for v in meta["input_size"])
        if h != w:
            raise ArgumentError("input_size", f"must be square for detection (the eval resize), got {[h, w]}")
        self.input_size = (h, w)
        self.transform = build_eval_transform(h, IDENTITY_NORMALIZE, meta.get("resize", "cv2_linear"))

    def predict_batch(self, images: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        if not images:
            return []
        x = np.stack([self.transform(im, _empty_target())[0].numpy() for im in images]).astype(np.float32)
        out = self.model(x)
        h_in, w_in = self.input_size
        sizes = np.array([im.shape[:2] for im in images], np.float32)  # (B, 2) h, w
        scale = np.stack([sizes[:, 1] / w_in, sizes[:, 0] / h_in] * 2, 1)[:, None, :]  # (B, 1, 4)
        limit = np.stack([sizes[:, 1], sizes[:, 0]] * 2, 1)[:, None, :]
        boxes = np.clip(np.asarray(out["boxes"], np.float32) * scale, 0, limit)
        scores = np.asarray(out["scores"], np.float32)
        labels = np.asarray(out["labels"]).astype(np.int64)
        n = np.asarray(out.get("num_detections", np.full(len(images), scores.shape[1])))
        valid = (np.arange(scores.shape[1])[None, :] < n.reshape(-1, 1)) & (scores >= self.score_threshold)
        return [{"boxes": boxes[i][valid[i]], "scores": scores[i][valid[i]], "labels": labels[i][valid[i]]}
                for i in range(len(images))]


def from_checkpoint(module: Any, info: dict[str, Any], score_threshold: float = 0.3) -> Predictor:
    """The predictor of a loaded checkpoint (``info``: its ``mnv2`` entry, for the class names and ids)."""
    meta = info.get("meta") or {}
    names = meta.get("class_names") or [f"class_{k}" for k in range(1, module.num_classes + 1)]
    return CheckpointDetPredictor(module, names, meta.get("category_ids"), score_threshold)


def from_exported(model: Any, score_threshold: float = 0.3) -> Predictor:
    return ExportedDetPredictor(model, score_threshold)


class ResultWriter:
    """``OUT/predictions.jsonl`` + ``OUT/<name>.jpg`` (the image with its detections drawn).

    One JSON line per image: ``file``, ``frame`` (videos), ``width``, ``height``, ``boxes`` (xyxy original
    px), ``scores``, ``labels`` (1..K), ``class_names``, ``category_ids``.
    """

    def __init__(self, out_dir: Path, predictor: Predictor) -> None:
        self.out_dir = Path(out_dir)
        self.class_names = list(predictor.class_names)
        self.category_ids = np.asarray(getattr(predictor, "category_ids", range(1, len(self.class_names) + 1)))
        self.names = np.asarray(self.class_names, dtype=object)
        self.jsonl = open(self.out_dir / "predictions.jsonl", "w")

    def write(self, item: InputItem, image: np.ndarray, result: dict[str, np.ndarray]) -> None:
        h, w = image.shape[:2]
        labels = np.asarray(result["labels"], np.int64)
        line = {"file": str(item.path), **({"frame": item.frame} if item.frame is not None else {}),
                "width": int(w), "height": int(h),
                "boxes": np.round(np.asarray(result["boxes"], np.float64), 2).tolist(),
                "scores": np.round(np.asarray(result["scores"], np.float64), 5).tolist(),
                "labels": labels.tolist(),
                "class_names": self.names[labels - 1].tolist() if len(labels) else [],
                "category_ids": self.category_ids[labels - 1].tolist() if len(labels) else []}
        self.jsonl.write(json.dumps(line) + "\n")
        picture = draw_detections(image, result["boxes"], labels, result["scores"], self.class_names,
                                  score_threshold=0.0)
        path = self.out_dir / f"{item.name}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture).save(path, quality=90)

    def close(self) -> None:
        self.jsonl.close()
