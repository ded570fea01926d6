"""Pictures of detections: predicted boxes (coloured per class, with a filled name + score tag) over
the original image, ground truth as thin white boxes; drawn by :mod:`backbone.draw`.

``python tools/evaluate.py task=det ckpt_path=CKPT save_predictions=true`` writes one JPEG per val
image into ``RUN_DIR/predictions/`` named like the input, at the image's own size.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from backbone.draw import GT_COLOUR, class_colours, draw_boxes

__all__ = ["GT_COLOUR", "class_colours", "draw_detections", "save_detection_images"]


def draw_detections(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray,
                    class_names: Sequence[str], gt_boxes: np.ndarray | None = None,
                    score_threshold: float = 0.3) -> np.ndarray:
    """Draw on a copy of ``image`` (:func:`backbone.draw.draw_boxes`: filled label tags, sizes follow the image).

    Args:
        image: (H, W, 3) uint8 RGB.
        boxes: (N, 4) xyxy in image pixels; labels: (N,) contiguous 1..K; scores: (N,).
        class_names: K names (label k -> class_names[k - 1]).
        gt_boxes: (M, 4) xyxy, drawn first, thin and white.
        score_threshold: predictions below it are not drawn.
    Returns:
        (H, W, 3) uint8.
    """
    return draw_boxes(image, boxes, labels, scores, class_names, class_colours(len(class_names)),
                      score_threshold=score_threshold, gt_boxes=gt_boxes)


def save_detection_images(dataset: Any, results: list[dict[str, Any]], out_dir: str | Path,
                          category_ids: Sequence[int], class_names: Sequence[str],
                          score_threshold: float = 0.3, progress: bool = True) -> int:
    """Write ``out_dir/<file_name>.jpg`` for every image of ``dataset`` (a COCODetection).

    Args:
        results: COCO results (``image_id``, ``category_id``, ``bbox`` xywh original px, ``score``).
        category_ids: the dataset's category id of each contiguous label 1..K.
    Returns the number of pictures written (unreadable images are skipped, as in training).
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    label_of = {int(c): k + 1 for k, c in enumerate(category_ids)}
    by_image: dict[int, list[dict[str, Any]]] = {}
    for r in results:
        by_image.setdefault(int(r["image_id"]), []).append(r)
    written = 0
    for index in tqdm(range(len(dataset)), desc="drawing detections", unit="img", disable=not progress):
        image = dataset.read_image(index)
        if image is None:
            continue
        img_id = int(dataset.ids[index])
        dets = by_image.get(img_id, [])
        xywh = np.array([d["bbox"] for d in dets], np.float32).reshape(-1, 4)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        labels = np.array([label_of[int(d["category_id"])] for d in dets], np.int64)
        scores = np.array([d["score"] for d in dets], np.float32)
        gt = dataset.target(index)["boxes"]
        picture = draw_detections(image, boxes, labels, scores, class_names, gt, score_threshold)
        name = Path(dataset.coco.imgs[img_id]["file_name"]).with_suffix(".jpg")
        (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture).save(out_dir / name, quality=90)
        written += 1
    return written
