"""Pictures of detections: colours, threshold, ground truth, and one file per val image."""
from __future__ import annotations

import numpy as np

from mnv2det.visualize import GT_COLOUR, class_colours, draw_detections


def test_draws_confident_predictions_in_class_colours_and_ground_truth_in_white() -> None:
    image = np.zeros((50, 60, 3), np.uint8)
    boxes = np.array([[10, 10, 40, 30], [0, 0, 5, 5]], np.float32)
    out = draw_detections(image, boxes, labels=np.array([2, 1]), scores=np.array([0.9, 0.1]),
                          class_names=["a", "b"], gt_boxes=np.array([[20, 5, 50, 45]], np.float32),
                          score_threshold=0.3)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert (image == 0).all()  # drawn on a copy
    assert tuple(out[20, 10]) == class_colours(2)[2]  # left edge of the label-2 box
    assert tuple(out[30, 25]) == class_colours(2)[2]  # bottom edge
    assert tuple(out[27, 30]) == (0, 0, 0)  # inside: not filled
    assert tuple(out[40, 50]) == GT_COLOUR  # right edge of the ground truth box
    assert (out[0:6, 0:6] == 0).all()  # the 0.1 detection is below the threshold


def test_class_colours_are_distinct() -> None:
    colours = class_colours(80)
    assert len(colours) == 81 and len(set(colours[1:])) == 80
