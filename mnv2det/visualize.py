"""Pictures of detections: predicted boxes (coloured per class, with name and score) over the
original image, ground truth as thin white boxes.

``python tools/evaluate.py task=det ckpt_path=CKPT save_predictions=true`` writes one JPEG per val
image into ``RUN_DIR/predictions/`` named like the input, at the image's own size.
"""
from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes

GT_COLOUR = (255, 255, 255)


def class_colours(num_classes: int) -> list[tuple[int, int, int]]:
    """Distinct saturated colours, one per contiguous label 1..K (index 0 unused)."""
    out = [(0, 0, 0)]
    for k in range(num_classes):
        r, g, b = colorsys.hsv_to_rgb((k * 0.618033988749895) % 1.0, 0.9, 1.0)  # golden-ratio hue steps
        out.append((int(r * 255), int(g * 255), int(b * 255)))
    return out


def draw_detections(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray,
                    class_names: Sequence[str], gt_boxes: np.ndarray | None = None,
                    score_threshold: float = 0.3) -> np.ndarray:
    """Draw on a copy of ``image``.

    Args:
        image: (H, W, 3) uint8 RGB.
        boxes: (N, 4) xyxy in image pixels; labels: (N,) contiguous 1..K; scores: (N,).
        class_names: K names (label k -> class_names[k - 1]).
        gt_boxes: (M, 4) xyxy, drawn first, thin and white.
        score_threshold: predictions below it are not drawn.
    Returns:
        (H, W, 3) uint8.
    """
    canvas = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)  # a writable copy
    h, w = image.shape[:2]
    width = max(1, round(max(h, w) / 250))
    if gt_boxes is not None and len(gt_boxes):
        canvas = draw_bounding_boxes(canvas, torch.as_tensor(gt_boxes, dtype=torch.float32),
                                     colors=[GT_COLOUR] * len(gt_boxes), width=1)
    keep = np.asarray(scores) >= score_threshold
    if keep.any():
        b, lab, sc = np.asarray(boxes)[keep], np.asarray(labels)[keep], np.asarray(scores)[keep]
        order = np.argsort(sc)  # highest score drawn last, on top
        b, lab, sc = b[order], lab[order], sc[order]
        colours = class_colours(len(class_names))
        text = [f"{class_names[int(k) - 1]} {s:.2f}" for k, s in zip(lab, sc)]
        canvas = draw_bounding_boxes(canvas, torch.as_tensor(b, dtype=torch.float32), labels=text,
                                     colors=[colours[int(k)] for k in lab], width=width)
    return canvas.permute(1, 2, 0).numpy()


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
