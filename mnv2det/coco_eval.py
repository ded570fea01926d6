"""COCO box evaluation with pycocotools, DDP-aware.

Usage per validation epoch::

    ev = COCOEvaluator(coco_gt, category_ids)      # category_ids[k-1] = dataset id of label k
    ev.update(image_ids, detections)               # every batch, on every rank
    metrics = ev.compute()                         # every rank; identical results everywhere
    ev.report                                      # the 12-line COCO table as a string
    ev.save(out_dir)                               # metrics.json + detections.json

``compute`` gathers the detections of all ranks (``all_gather_object``), keeps the first copy of
each image id (DistributedSampler pads the last batch with repeated images) and scores them over
every image of the evaluated set (``img_ids``, default: all images of the GT file) -- images
without detections count as misses. Detections are rounded (boxes 0.01 px, scores 1e-5) once,
and the same rounded numbers are both scored and written to ``detections.json``, so re-scoring
the file with pycocotools reproduces ``metrics.json`` exactly.

Scoring runs ``faster_coco_eval.COCOeval_faster`` (a C++ port of COCOeval: the same stats and
precision arrays, several times faster) when it is installed, else ``pycocotools.cocoeval.COCOeval``;
the summary table is written here in pycocotools' format either way (tests/test_det_eval.py).
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist

from backbone.errors import DataError

# Names of COCOeval.stats in order (bbox): AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl.
STAT_NAMES = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large",
              "mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large")


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class COCOEvaluator:
    """Accumulates detections and scores them with ``pycocotools.cocoeval.COCOeval`` (bbox).

    Args:
        coco_gt: a ``pycocotools.coco.COCO`` or the path of an instances json.
        category_ids: the category id of each contiguous label ``1..K`` (``category_ids[k-1]``): the
            model's ids, matched with the ground truth's by id. Scoring is over the ground truth's
            categories: one the model does not have scores as missed (AP 0 where it has annotations),
            detections of an id the ground truth does not have are not scored.
        img_ids: the image ids evaluated (default: every image in ``coco_gt``).
        class_names: names of labels ``1..K`` (default: GT names); the per-class lines of the report
            use the GT's names of its categories.
    """

    def __init__(self, coco_gt: Any, category_ids: Sequence[int], img_ids: Sequence[int] | None = None,
                 class_names: Sequence[str] | None = None) -> None:
        if isinstance(coco_gt, (str, Path)):
            from mnv2det.dataset import load_coco

            if not Path(coco_gt).is_file():
                raise DataError(coco_gt, "ground-truth annotation file not found", "pass the instances_*.json path")
            coco_gt = load_coco(coco_gt)
        self.coco_gt = coco_gt
        self.category_ids = [int(c) for c in category_ids]
        self.img_ids = sorted(int(i) for i in (img_ids if img_ids is not None else coco_gt.getImgIds()))
        self.class_names = list(class_names) if class_names is not None else [
            str(coco_gt.cats.get(c, {}).get("name", c)) for c in self.category_ids]
        self.metrics: dict[str, float] = {}
        self.report: str = ""
        self.results: list[dict[str, Any]] = []
        self.reset()

    def reset(self) -> None:
        """Forget the detections of the previous epoch (metrics/report of the last compute stay)."""
        self._local: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def update(self, image_ids: torch.Tensor | Sequence[int], detections: Sequence[dict[str, torch.Tensor]]) -> None:
        """One batch: image_ids (B,) and per image dict(boxes (N, 4) xyxy original px, scores (N,),
        labels (N,) in 1..K). Moved to CPU now so GPU memory is not held across the epoch."""
        ids = image_ids.tolist() if isinstance(image_ids, torch.Tensor) else [int(i) for i in image_ids]
        if len(ids) != len(detections):
            raise ValueError(f"{len(ids)} image ids but {len(detections)} detection dicts")
        if not ids:
            return
        counts = [int(d["scores"].numel()) for d in detections]
        # One device->host copy per field for the whole batch, then split per image.
        boxes = torch.cat([d["boxes"].detach().reshape(-1, 4).float() for d in detections]).cpu().numpy()
        scores = torch.cat([d["scores"].detach().reshape(-1).float() for d in detections]).cpu().numpy()
        labels = torch.cat([d["labels"].detach().reshape(-1).long() for d in detections]).cpu().numpy()
        ends = np.cumsum(counts)
        for img_id, e, n in zip(ids, ends.tolist(), counts):
            if img_id in self._local:  # padded duplicate within this rank
                continue
            self._local[int(img_id)] = (boxes[e - n:e], scores[e - n:e], labels[e - n:e])

    def _gathered(self) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        if not _is_distributed():
            return dict(self._local)
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, self._local)
        merged: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for part in parts:  # rank order: deterministic choice among duplicates
            for img_id, det in part.items():
                merged.setdefault(img_id, det)
        return merged

    def to_coco_results(self, dets: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> list[dict[str, Any]]:
        """COCO results format: [{image_id, category_id, bbox: [x, y, w, h], score}], sorted by image."""
        known = set(self.img_ids)
        cat = np.asarray(self.category_ids, dtype=np.int64)
        out: list[dict[str, Any]] = []
        for img_id in sorted(dets):
            if img_id not in known:
                raise DataError(f"image id {img_id}", "has detections but is not in the evaluated ground truth",
                                "validate on the dataset whose annotation file the evaluator was built from")
            boxes, scores, labels = dets[img_id]
            if len(boxes) == 0:
                continue
            if labels.min() < 1 or labels.max() > len(cat):
                raise ValueError(f"image {img_id}: labels must be in 1..{len(cat)}, got {labels.min()}..{labels.max()}")
            xywh = np.round(np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).astype(np.float64), 2)
            sc = np.round(scores.astype(np.float64), 5)
            cids = cat[labels - 1]
            out += [{"image_id": img_id, "category_id": int(c), "bbox": b, "score": s}
                    for c, b, s in zip(cids.tolist(), xywh.tolist(), sc.tolist())]
        return out

    def compute(self) -> dict[str, float]:
        """Gather, dedupe, score. Returns ``{map, map_50, ..., mar_large}`` as fractions (COCO's -1 =
        no ground truth in that size range); all 0 when there are no detections at all."""
        dets = self._gathered()
        self.num_images = len(self.img_ids)
        self.num_images_with_detections = len(set(dets) & set(self.img_ids))
        self.results = self.to_coco_results(dets)
        names = {**dict(zip(self.category_ids, self.class_names)),
                 **{int(c): str(cat.get("name", c)) for c, cat in self.coco_gt.cats.items()}}
        self.pr: dict[str, Any] = {}  # filled by score_results: the PR curves TensorBoard draws
        self.metrics, self.report = score_results(self.coco_gt, self.results, self.img_ids, names, pr=self.pr)
        return dict(self.metrics)

    def save(self, out_dir: str | Path, extra: dict[str, Any] | None = None) -> None:
        """Write ``metrics.json`` (metrics + ``extra``) and ``detections.json`` (COCO results)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.json").write_text(json.dumps({**self.metrics, **(extra or {})}, indent=2) + "\n")
        with open(out_dir / "detections.json", "w") as f:
            json.dump(self.results, f, separators=(",", ":"))


def score_results(coco_gt: Any, results: list[dict[str, Any]], img_ids: Sequence[int] | None = None,
                  names: dict[int, str] | None = None, pr: dict[str, Any] | None = None) -> tuple[dict[str, float], str]:
    """Run COCOeval (bbox) over ``img_ids``; returns (metrics, report). Quiet.

    ``pr``: a dict that receives the precision-recall curves at IoU 0.5 (area all, most detections):
    ``recall`` (R,) COCO's recall thresholds, ``precision`` (R, K) per category (-1: no ground truth),
    ``category_ids`` (K,); left empty when there are no detections.

    The report is pycocotools' 12-line summary followed by per-class AP and AP50 (area all, 100
    detections; ``-`` where the class has no ground truth), named by ``names`` (category id -> name).
    """
    COCOeval = _cocoeval_class()
    img_ids = sorted(int(i) for i in (img_ids if img_ids is not None else coco_gt.getImgIds()))
    if not results:
        metrics = {name: 0.0 for name in STAT_NAMES}
        return metrics, f"no detections on {len(img_ids)} images: every metric is 0"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        # loadRes adds keys (area, id, segmentation) to what it is given: pass copies.
        coco_dt = coco_gt.loadRes([dict(r) for r in results])
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.params.imgIds = img_ids
        ev.evaluate()
        ev.accumulate()
    with contextlib.redirect_stdout(io.StringIO()):
        ev.summarize()
    metrics = {name: float(v) for name, v in zip(STAT_NAMES, ev.stats)}
    table = io.StringIO(summary_table(ev.stats, list(ev.params.maxDets)) + "\n")
    if pr is not None:
        iou50 = int(np.argmin(np.abs(np.asarray(ev.params.iouThrs) - 0.5)))
        pr.update(recall=np.asarray(ev.params.recThrs), precision=ev.eval["precision"][iou50, :, :, 0, -1].copy(),
                  category_ids=list(ev.params.catIds))
    return metrics, table.getvalue().rstrip("\n") + "\n" + _per_class_table(ev, names or {})


def _cocoeval_class() -> type:
    """faster_coco_eval's COCOeval when installed (identical numbers, faster), else pycocotools'."""
    try:
        import logging

        from faster_coco_eval import COCOeval_faster

        logging.getLogger("faster_coco_eval").setLevel(logging.WARNING)  # it logs its summary at INFO
        return COCOeval_faster
    except ImportError:
        from pycocotools.cocoeval import COCOeval

        return COCOeval


def summary_table(stats: Sequence[float], max_dets: Sequence[int] = (1, 10, 100)) -> str:
    """pycocotools' 12-line ``COCOeval.summarize`` table (bbox) from its ``stats``."""
    rows = [(1, "0.50:0.95", "all", 2), (1, "0.50", "all", 2), (1, "0.75", "all", 2), (1, "0.50:0.95", "small", 2),
            (1, "0.50:0.95", "medium", 2), (1, "0.50:0.95", "large", 2), (0, "0.50:0.95", "all", 0),
            (0, "0.50:0.95", "all", 1), (0, "0.50:0.95", "all", 2), (0, "0.50:0.95", "small", 2),
            (0, "0.50:0.95", "medium", 2), (0, "0.50:0.95", "large", 2)]
    lines = []
    for (ap, iou, area, m), value in zip(rows, stats):
        title, kind = ("Average Precision", "(AP)") if ap else ("Average Recall", "(AR)")
        lines.append(f" {title:<18} {kind} @[ IoU={iou:<9} | area={area:>6s} | maxDets={int(max_dets[m]):>3d} ] = "
                     f"{float(value):0.3f}")
    return "\n".join(lines)


def _per_class_table(ev: Any, names: dict[int, str]) -> str:
    """Per-category AP@[.5:.95] and AP@.5 from COCOeval's precision array (T, R, K, area, maxDets)."""
    precision = ev.eval["precision"][:, :, :, 0, -1]  # area "all", the largest maxDets
    rows = []
    for k, cat_id in enumerate(ev.params.catIds):
        p, p50 = precision[:, :, k], precision[0, :, k]
        ap = f"{p[p > -1].mean():.3f}" if (p > -1).any() else "-"
        ap50 = f"{p50[p50 > -1].mean():.3f}" if (p50 > -1).any() else "-"
        rows.append((str(names.get(cat_id, cat_id)), ap, ap50))
    width = max([len("class")] + [len(r[0]) for r in rows])
    lines = [f" {'class':<{width}}  AP     AP50"] + [f" {n:<{width}}  {a:<5}  {b}" for n, a, b in rows]
    return "\n".join(lines)
