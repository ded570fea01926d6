"""Segmentation part of ``tools/predict.py`` (the flow: :mod:`backbone.predict`).

Two :class:`backbone.predict.Predictor` implementations, both answering with a mask at the image's
original size:

- :class:`CheckpointSegPredictor`: the evaluation path itself -- :func:`mnv2seg.transforms.eval_transform`
  (normalise, whole image), :func:`mnv2seg.transforms.collate` padding to the checkpoint's
  ``data.eval_size`` (so a prediction does not depend on the batch), the module's
  :meth:`~mnv2seg.lightning_module.DeepLabModule.predict_labels` (single or MF, as configured), and
  the crop back to each image's size.
- :class:`ExportedSegPredictor`: an exported model with a fixed ``input_size`` (normalisation inside):
  the image is padded at the bottom/right with the metadata's ``pad_value`` (the mean pixel, 0 after
  normalisation) to the input size, and the mask cropped back. For an image that fits the input size
  (export's ``input_size`` = the checkpoint's ``data.eval_size``) this is exactly the checkpoint path:
  collate pads the normalised image with 0 to eval_size (tests/test_predict.py checks the masks agree).
  An image LARGER than the input size differs: the checkpoint path pads it to the next 16k+1 size
  that fits, which a fixed-size graph cannot, so the adapter scales it down to fit (and the mask back
  up, nearest) and warns once. An export is also single-scale: a checkpoint configured with
  ``inference: mf`` predicts with multi-scale + flip, its export does not.

:class:`ResultWriter` writes ``masks/<name>.png`` (palette PNG, pixel values = class indices) and
``overlays/<name>.jpg`` (the mask over the image, with a legend of the classes present).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from backbone.draw import overlay_mask, seg_palette
from backbone.errors import DataError
from backbone.normalization import resolve_normalization
from backbone.predict import InputItem, Predictor
from mnv2seg.transforms import collate, eval_transform

log = logging.getLogger("mnv2")


class CheckpointSegPredictor:
    """A checkpoint's DeepLabModule on images of any size (see the module docstring).

    Args:
        module: :class:`mnv2seg.lightning_module.DeepLabModule`, weights loaded, on its device, eval mode.
        class_names: K names (background first); palette: (>= K, 3) uint8 mask colours.
        eval_size: the padding size of evaluation (``data.eval_size``: None, N or [h, w]).
    """

    task = "seg"

    def __init__(self, module: Any, class_names: Sequence[str], palette: np.ndarray | None = None,
                 eval_size: int | Sequence[int] | None = 513) -> None:
        self.module = module
        self.class_names = [str(n) for n in class_names]
        self.palette = seg_palette() if palette is None else np.asarray(palette, np.uint8).reshape(-1, 3)
        self.eval_size = eval_size
        self.transform = eval_transform(module.hparams.get("normalize", "imagenet"))

    @torch.no_grad()
    def predict_batch(self, images: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """images: B (H_i, W_i, 3) uint8 RGB -> B dicts with mask (H_i, W_i) uint8 class indices."""
        if not images:
            return []
        samples = [{"image": self.transform(image=im)["image"], "mask": np.zeros(im.shape[:2], np.uint8), "name": ""}
                   for im in images]
        batch = collate(samples, eval_size=self.eval_size)
        device = next(self.module.parameters()).device
        preds = self.module.predict_labels(batch["images"].to(device)).to(torch.uint8).cpu().numpy()
        return [{"mask": np.ascontiguousarray(p[:h, :w])} for p, (h, w) in zip(preds, batch["sizes"].tolist())]


class ExportedSegPredictor:
    """An exported segmenter (``ExportedModel``: metadata ``input_size`` [H, W], ``normalize``, ``palette``,
    ``class_names``; ``__call__`` on (B, 3, H, W) float32 0..255 RGB -> ``mask (B, H, W)`` or ``logits
    (B, K, h, w)``)."""

    task = "seg"

    def __init__(self, model: Any, score_threshold: float = 0.0) -> None:
        meta = dict(model.metadata)
        self.model = model
        self.class_names = [str(n) for n in meta.get("class_names") or []]
        self.palette = np.asarray(meta["palette"], np.uint8).reshape(-1, 3) if meta.get("palette") else seg_palette()
        self.input_size = tuple(int(v) for v in meta["input_size"])
        self.align_corners = bool(meta.get("align_corners", False))
        if meta.get("resize", "pad") != "pad":
            raise DataError(getattr(model, "path", "ckpt_path"), f"seg export with resize={meta.get('resize')!r}: "
                            "predict knows only 'pad' (the eval pipeline's)", "re-export with tools/export.py")
        if meta.get("pad_value") is not None:  # the contract's own fill (backbone.export.metadata)
            self.fill = np.asarray(meta["pad_value"], np.float32).reshape(3)
        else:  # the mean pixel: 0 after the model's normalisation, what evaluation pads with
            mean, _ = resolve_normalization(meta.get("normalize", "imagenet"))
            self.fill = np.array([m * 255.0 for m in mean], np.float32)
        self._warned_large = False

    def predict_batch(self, images: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        if not images:
            return []
        H, W = self.input_size
        x = np.empty((len(images), 3, H, W), np.float32)
        x[:] = self.fill[None, :, None, None]
        fitted = []  # (h, w) of each image inside the input
        for i, im in enumerate(images):  # per image: sizes differ (a resize at most, no per-pixel loop)
            h, w = im.shape[:2]
            s = min(1.0, H / h, W / w)
            if s < 1.0:
                if not self._warned_large:
                    self._warned_large = True
                    log.warning("an image (%dx%d) is larger than the exported model's input %dx%d: scaled down to "
                                "fit, so its mask differs from the checkpoint's (which pads to a larger size) -- "
                                "re-export with tools/export.py input_size=N (N >= the largest side) to avoid it",
                                h, w, H, W)
                h, w = max(1, int(h * s)), max(1, int(w * s))
                im = cv2.resize(im, (w, h), interpolation=cv2.INTER_LINEAR)
            x[i, :, :h, :w] = im.transpose(2, 0, 1)
            fitted.append((h, w))
        out = self.model(x)
        if "mask" in out:
            masks = np.asarray(out["mask"])
        else:
            logits = torch.from_numpy(np.asarray(out["logits"], np.float32))
            if tuple(logits.shape[-2:]) != (H, W):
                logits = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=self.align_corners)
            masks = logits.argmax(1).numpy()
        results = []
        for im, (h, w), m in zip(images, fitted, masks):
            m = np.ascontiguousarray(m[:h, :w].astype(np.uint8))
            if (h, w) != im.shape[:2]:
                m = cv2.resize(m, (im.shape[1], im.shape[0]), interpolation=cv2.INTER_NEAREST)
            results.append({"mask": m})
        return results


def from_checkpoint(module: Any, info: dict[str, Any], score_threshold: float = 0.0) -> Predictor:
    """The predictor of a loaded checkpoint (``info``: its ``mnv2`` entry: class names, palette, eval_size)."""
    meta = info.get("meta") or {}
    data = (info.get("config") or {}).get("data") or {}
    palette = np.asarray(meta["palette"], np.uint8) if meta.get("palette") else None
    return CheckpointSegPredictor(module, meta.get("class_names") or module.class_names, palette,
                                  data.get("eval_size", 513))


def from_exported(model: Any, score_threshold: float = 0.0) -> Predictor:
    return ExportedSegPredictor(model, score_threshold)


class ResultWriter:
    """``OUT/masks/<name>.png`` (palette PNG at the original size) + ``OUT/overlays/<name>.jpg`` (with legend)."""

    def __init__(self, out_dir: Path, predictor: Predictor) -> None:
        self.out_dir = Path(out_dir)
        self.class_names = list(predictor.class_names)
        self.palette = np.asarray(getattr(predictor, "palette", seg_palette()), np.uint8)
        flat = np.zeros((256, 3), np.uint8)
        flat[: min(256, len(self.palette))] = self.palette[:256]
        self.png_palette = flat.ravel().tolist()

    def write(self, item: InputItem, image: np.ndarray, result: dict[str, np.ndarray]) -> None:
        mask = np.asarray(result["mask"], np.uint8)
        png = Image.fromarray(mask)  # "L": values are the class indices
        png.putpalette(self.png_palette)  # -> "P", indices kept
        path = self.out_dir / "masks" / f"{item.name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        png.save(path)
        overlay = overlay_mask(image, mask, self.class_names, self.palette)
        path = self.out_dir / "overlays" / f"{item.name}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(overlay).save(path, quality=90)

    def close(self) -> None:
        pass
