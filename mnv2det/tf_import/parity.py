"""Parity check against TensorFlow's own outputs stored in a make_reference.py .npz
(tests/fixtures/tf_ssdlite/reference.npz): raw outputs, anchors, preprocessing, detections.
"""
from __future__ import annotations

import numpy as np
import torch

from mnv2det.tf_import.resize import tf_resize_bilinear


def preprocess_photo(photo: np.ndarray, model: torch.nn.Module) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (1, 3, h, w) network input: TF resize, then the model's normalisation."""
    x = torch.from_numpy(np.ascontiguousarray(photo)).permute(2, 0, 1)[None].float()
    x = tf_resize_bilinear(x, model.image_size) / 255.0
    mean = torch.tensor(model.normalize_mean).view(1, 3, 1, 1)
    std = torch.tensor(model.normalize_std).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def reference_diffs(model: torch.nn.Module, reference: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Max |ours - TF| per photo of a make_reference.py .npz, fed TF's own preprocessed input.

    Returns {photo: {box_encodings, class_logits, anchors, input (our preprocessing vs TF's)}}.
    """
    out = {}
    anchors_tf = torch.from_numpy(reference["anchors"])
    for name in [str(p) for p in reference["photos"]]:
        key = f"{name}__input"
        if key not in reference:
            continue
        x = torch.from_numpy(reference[key]).permute(2, 0, 1)[None]
        res = model(x)
        d = {
            "box_encodings": (res["bbox_regression"][0] - torch.from_numpy(reference[f"{name}__box_encodings"])).abs().max().item(),
            "class_logits": (res["cls_logits"][0] - torch.from_numpy(reference[f"{name}__class_logits"])).abs().max().item(),
            "anchors": (res["anchors"][:, [1, 0, 3, 2]] - anchors_tf).abs().max().item(),
        }
        photo = reference_photo(name)
        if photo is not None:
            d["input"] = (preprocess_photo(photo, model) - x).abs().max().item()
        out[name] = d
    return out


def reference_photo(name: str) -> np.ndarray | None:
    """scikit-image's photo ``name`` as (H, W, 3) uint8 RGB; None without scikit-image (dev extra)."""
    try:
        import skimage.data
    except ImportError:
        return None
    photo = getattr(skimage.data, name)()
    return np.repeat(photo[..., None], 3, axis=2) if photo.ndim == 2 else photo[..., :3]


def match_detections(tf_boxes: np.ndarray, tf_scores: np.ndarray, our_boxes: np.ndarray, our_scores: np.ndarray,
                     min_score: float = 0.05) -> dict[str, float]:
    """Pair TF's and our detections above `min_score` in score order.

    tf_boxes: (N, 4) normalised (ymin, xmin, ymax, xmax) as TF outputs them; our_boxes: (M, 4)
    normalised xyxy. Returns n_tf, n_ours (above min_score), min_iou (over pairs; 1 if none),
    max_score_diff (0 if none).
    """
    import torchvision

    t_keep, o_keep = tf_scores >= min_score, our_scores >= min_score
    tb = torch.as_tensor(tf_boxes[t_keep][:, [1, 0, 3, 2]], dtype=torch.float64)
    ob = torch.as_tensor(our_boxes[o_keep], dtype=torch.float64)
    ts, os_ = tf_scores[t_keep], our_scores[o_keep]
    n = min(len(tb), len(ob))
    ious = torchvision.ops.box_iou(tb[:n], ob[:n]).diagonal() if n else torch.ones(0, dtype=torch.float64)
    return {"n_tf": int(t_keep.sum()), "n_ours": int(o_keep.sum()),
            "min_iou": float(ious.min()) if n else 1.0,
            "max_score_diff": float(np.abs(ts[:n] - os_[:n]).max()) if n else 0.0}


@torch.no_grad()
def reference_detections(model: torch.nn.Module, reference: dict[str, np.ndarray], min_score: float = 0.05,
                         from_photo: bool = False) -> dict[str, dict[str, float]]:
    """match_detections of our post-processed detections vs TF's for each photo of the reference.

    from_photo=False feeds TF's preprocessed input; True runs our own preprocessing
    (`preprocess_photo`) on the raw scikit-image photo.
    """
    out = {}
    for name in [str(p) for p in reference["photos"]]:
        photo = reference_photo(name) if from_photo else None
        if from_photo and photo is None:
            continue  # no scikit-image (dev extra): no raw photo to run, and TF's input is not one
        if photo is not None:
            x = preprocess_photo(photo, model)
        elif f"{name}__input" in reference:
            x = torch.from_numpy(reference[f"{name}__input"]).permute(2, 0, 1)[None]
        else:
            continue
        det = model.postprocess(model(x), torch.tensor([[1.0, 1.0]]))[0]  # normalised boxes
        out[name] = match_detections(reference[f"{name}__detection_boxes"], reference[f"{name}__detection_scores"],
                                     det["boxes"].numpy(), det["scores"].numpy(), min_score)
    return out
