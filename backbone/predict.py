"""The predict flow both tasks share: find the inputs, read them, batch them, predict, write results.

``python tools/predict.py ckpt_path=CKPT input=PATH [output=DIR] [batch_size=8] [score_threshold=0.3]``

- Inputs (:func:`discover_inputs`): one image, a folder (its images, recursively, sorted), a glob
  (``'photos/*.jpg'``), or a video file (read with ``cv2.VideoCapture``; frames numbered 0, 1, ...).
  Images are read with :func:`backbone.image_io.decode_image` (EXIF orientation applied, grayscale,
  RGBA, CMYK, 16-bit repaired). An unreadable file is reported by name and skipped; the run goes on
  and ends with a summary (N written, M skipped, with their names).
- The model (:func:`load_predictor`): a ``.ckpt`` (task, architecture, classes, input contract from the
  checkpoint) or an exported model (``.onnx`` / ``.tflite`` / ``.pte``, :mod:`backbone.export.runtime`)
  -- two implementations of one small interface, :class:`Predictor`. The preprocessing is the
  evaluation's own (the task modules reuse the eval transforms), so predictions cannot drift from
  what ``tools/evaluate.py`` scores.
- Outputs (the task's :class:`ResultWriter`): det, ``predictions.jsonl`` (one line per image, boxes in
  original pixels) + one picture per image; seg, palette PNG masks at the original size + overlays
  with a legend.
"""
from __future__ import annotations

import glob
import importlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np

from backbone.errors import ConfigError, DataError

log = logging.getLogger("mnv2")

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
                            ".jfif"})
VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv"})
CHECKPOINT_SUFFIXES = frozenset({".ckpt", ".pt", ".pth"})
EXPORTED_SUFFIXES = frozenset({".onnx", ".tflite", ".pte"})
#: the module holding each task's predictors and writer (``from_checkpoint``, ``from_exported``, ``ResultWriter``)
TASK_MODULES = {"det": "mnv2det.predictor", "seg": "mnv2seg.predictor"}


# ------------------------------------------------------------------------------ the interface
class Predictor(Protocol):
    """A model that predicts on images of any size and answers in their original pixels.

    ``task``: "det" | "seg"; ``class_names``: det, K names of labels 1..K; seg, K names of classes 0..K-1.
    ``predict_batch(images)``: images, a list of (H_i, W_i, 3) uint8 RGB -> one result per image:
    det ``{boxes (N, 4) float32 xyxy original px, scores (N,) float32, labels (N,) int64 1..K}``
    (scores >= the predictor's threshold, highest first); seg ``{mask (H_i, W_i) uint8 class indices}``.
    """

    task: str
    class_names: list[str]

    def predict_batch(self, images: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]: ...


class ResultWriter(Protocol):
    """Writes one image's result (``write``) and closes its files at the end (``close``)."""

    def write(self, item: "InputItem", image: np.ndarray, result: dict[str, np.ndarray]) -> None: ...

    def close(self) -> None: ...


# ---------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class InputItem:
    """One input picture: ``name`` (relative output name without suffix, e.g. ``sub/img`` or
    ``clip/000012``), ``path`` (its file), ``frame`` (video frame number, None for images)."""

    name: str
    path: Path
    frame: int | None = None

    @property
    def label(self) -> str:
        """How the item is named in messages: the file, with the frame for videos."""
        return f"{self.path} frame {self.frame}" if self.frame is not None else str(self.path)


def _has_magic(spec: str) -> bool:
    return any(c in spec for c in "*?[")


def _is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_SUFFIXES


def discover_inputs(spec: str | Path) -> list[tuple[Path, Path]]:
    """The files ``spec`` names, as (file, base folder its output name is relative to), sorted.

    ``spec``: an image or video file, a folder (every image and video under it, recursively), or a glob.
    Raises DataError when nothing matches.
    """
    spec = str(spec)
    path = Path(spec).expanduser()
    fix = "pass input= an image, a folder of images, a glob such as 'dir/*.jpg' (quoted), or a video file"
    if _has_magic(spec) and not path.exists():
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(spec, "the glob matches no file", fix)
        return [(f, _glob_base(path)) for f in files]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES)
        if not files:
            raise DataError(path, f"no image or video file in this folder (looked for {sorted(IMAGE_SUFFIXES)})", fix)
        return [(f, path) for f in files]
    if path.is_file():
        return [(path, path.parent)]
    raise DataError(path, "input not found", fix)


def _glob_base(pattern: Path) -> Path:
    """The longest leading folder of ``pattern`` without wildcards."""
    parts = []
    for part in pattern.parts:
        if _has_magic(part):
            break
        parts.append(part)
    return Path(*parts) if parts else Path(".")


def iter_items(files: list[tuple[Path, Path]]) -> Iterator[tuple[InputItem, Callable[[], np.ndarray]]]:
    """(item, read) per picture: images once, videos frame by frame; ``read()`` -> (H, W, 3) uint8 RGB
    or raises :class:`backbone.image_io.UnreadableImage` (a DataError)."""
    from backbone.image_io import decode_image

    for file, base in files:
        rel = file.relative_to(base) if file.is_relative_to(base) else Path(file.name)
        stem = rel.with_suffix("").as_posix()
        if _is_video(file):
            yield from _video_frames(file, stem)
        else:
            yield InputItem(stem, file), (lambda f=file: decode_image(f, exif=True).pixels)


def _video_frames(file: Path, stem: str) -> Iterator[tuple[InputItem, Callable[[], np.ndarray]]]:
    import cv2

    cap = cv2.VideoCapture(str(file))
    try:
        if not cap.isOpened():
            def fail() -> np.ndarray:
                raise DataError(file, "cannot open this video (cv2.VideoCapture)", "check the file or its codec")

            yield InputItem(stem, file), fail
            return
        index = 0
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            rgb = np.ascontiguousarray(frame[..., ::-1])  # OpenCV decodes BGR
            yield InputItem(f"{stem}/{index:06d}", file, index), (lambda rgb=rgb: rgb)
            index += 1
    finally:
        cap.release()


# ---------------------------------------------------------------------------------- the flow
@dataclass
class PredictSummary:
    """What a predict run did: ``written`` pictures, ``skipped`` (label, reason) pairs, ``output`` dir."""

    output: Path
    written: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        text = f"{self.written} written to {self.output}, {len(self.skipped)} skipped"
        if self.skipped:
            text += ": " + "; ".join(f"{name} ({why})" for name, why in self.skipped)
        return text


def run_predict(predictor: Predictor, writer: ResultWriter, files: list[tuple[Path, Path]], batch_size: int = 8,
                progress: bool = True, output: Path | None = None) -> PredictSummary:
    """Read every input, predict in batches of ``batch_size``, write each result; skip unreadable files."""
    from tqdm import tqdm

    summary = PredictSummary(Path(output) if output is not None else Path("."))
    batch: list[tuple[InputItem, np.ndarray]] = []

    def flush() -> None:
        results = predictor.predict_batch([image for _, image in batch])
        for (item, image), result in zip(batch, results):
            writer.write(item, image, result)
            summary.written += 1
        batch.clear()

    with tqdm(desc="predicting", unit="img", disable=not progress) as bar:
        for item, read in iter_items(files):
            try:
                image = read()
            except DataError as e:  # UnreadableImage, or a video cv2 cannot open
                summary.skipped.append((item.label, getattr(e, "problem", str(e))))
                log.warning("skipping %s: %s", item.label, e)
                bar.update(1)
                continue
            batch.append((item, image))
            if len(batch) >= batch_size:
                flush()
            bar.update(1)
        if batch:
            flush()
    writer.close()
    return summary


# ---------------------------------------------------------------------------------- models
def resolve_device(device: str) -> str:
    """``auto`` -> cuda when available, else cpu; anything else as given."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def task_module(task: str) -> Any:
    """The task's predictor module (:data:`TASK_MODULES`)."""
    if task not in TASK_MODULES:
        raise ConfigError("ckpt_path", f"holds a model of unknown task {task!r}", f"use a {list(TASK_MODULES)} model")
    return importlib.import_module(TASK_MODULES[task])


def load_predictor(ckpt_path: str | Path, score_threshold: float = 0.3, device: str = "auto",
                   model_overrides: list[Any] | None = None) -> Predictor:
    """A :class:`Predictor` for a checkpoint (``.ckpt``) or an exported model (``.onnx``/``.tflite``/``.pte``).

    model_overrides: parsed Hydra overrides of ``model.*`` keys (checkpoints only), as tools/evaluate.py.
    """
    path = Path(ckpt_path).expanduser()
    suffix = path.suffix.lower()
    if suffix in EXPORTED_SUFFIXES:
        if not path.is_file():
            raise DataError(path, "exported model not found", "pass ckpt_path= a file written by the export tool")
        from backbone.export.runtime import load_exported

        model = load_exported(path)
        task = str(model.metadata.get("task"))
        return task_module(task).from_exported(model, score_threshold=score_threshold)
    if suffix not in CHECKPOINT_SUFFIXES:
        raise ConfigError("ckpt_path", f"{path.name}: unknown model file type {suffix or '(no suffix)'!r}",
                          f"pass a checkpoint ({sorted(CHECKPOINT_SUFFIXES)}) or an exported model "
                          f"({sorted(EXPORTED_SUFFIXES)})")
    from backbone.training.checkpoint import load_checkpoint, model_config_from_checkpoint
    from backbone.training.runner import build

    ckpt = load_checkpoint(path)
    info = ckpt["mnv2"]
    mod = task_module(str(info.get("task")))
    module = build(model_config_from_checkpoint(info, model_overrides or []), "model")
    missing, unexpected = module.load_state_dict(ckpt["state_dict"], strict=False)
    if missing or unexpected:
        raise DataError(path, f"weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}",
                        "predict with the checkpoint's own model config (drop model.* overrides that change the "
                        "architecture)")
    module.eval().to(resolve_device(device))
    return mod.from_checkpoint(module, info, score_threshold=score_threshold)


def predict(ckpt_path: str | Path, input: str | Path, output: str | Path, batch_size: int = 8,
            score_threshold: float = 0.3, device: str = "auto", progress: bool = True,
            model_overrides: list[Any] | None = None) -> PredictSummary:
    """The whole flow: load the model, find the inputs, predict, write; returns the summary."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError("batch_size", f"must be an integer >= 1, got {batch_size!r}", "e.g. batch_size=8")
    if not 0.0 <= float(score_threshold) <= 1.0:
        raise ConfigError("score_threshold", f"must be in [0, 1], got {score_threshold!r}", "e.g. 0.3")
    files = discover_inputs(input)  # before the model: a wrong path fails fast
    predictor = load_predictor(ckpt_path, float(score_threshold), device, model_overrides)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    writer = task_module(predictor.task).ResultWriter(out, predictor)
    return run_predict(predictor, writer, files, batch_size, progress, out)
