"""Models for tests whose checks need power by construction, not by luck of a short training run.

A parity check of masks (or detections) says nothing on a model that predicts one class everywhere,
and whether a few SGD steps get past that changes with every torch release. These helpers set a
model's last bias so that the property the test needs holds on the given inputs, on any version.
"""
from __future__ import annotations

import torch


def min_share_class_bias(logits: torch.Tensor, share: float, valid: torch.Tensor | None = None,
                         rounds: int = 20) -> torch.Tensor:
    """Per-class offsets (only raised, never lowered) that make every class the argmax of at least
    about `share` of the valid pixels, moving the scores no more than that takes.

    Coordinate-wise: a class short of `share` gets the offset that makes it win exactly `share` of the
    pixels against the others' current scores; a few rounds settle it. A constant offset commutes with
    bilinear upsampling, so it can go into the classifier's bias of a model that upsamples after it.

    Args:
        logits: (N, K, H, W) scores.
        share: in (0, 1 / K].
        valid: (N, H, W) bool, the pixels that count (e.g. not padding); None: all.
    Returns:
        (K,) float64 offsets to add to the scores (or to the classifier's bias).
    """
    if logits.dim() != 4:
        raise ValueError(f"logits must be (N, K, H, W), got {tuple(logits.shape)}")
    K = logits.shape[1]
    if not 0 < share <= 1 / K:
        raise ValueError(f"share must be in (0, 1/K = {1 / K:.4f}], got {share}")
    scores = logits.double().permute(1, 0, 2, 3).reshape(K, -1)
    if valid is not None:
        scores = scores[:, valid.reshape(-1)]
    bias = torch.zeros(K, dtype=torch.float64)
    for _ in range(rounds):
        shifted = scores + bias[:, None]
        won = torch.bincount(shifted.argmax(0), minlength=K).double() / shifted.shape[1]
        if won.min() >= share * 0.999:
            break
        for k in torch.nonzero(won < share).flatten().tolist():
            shifted = scores + bias[:, None]
            others = torch.cat([shifted[:k], shifted[k + 1:]]).max(0).values
            # the class wins where scores[k] + b > others: b at the `share` quantile of the gap
            bias[k] = max(float(bias[k]), float(torch.quantile(others - scores[k], share)))
    return bias


def class_shares(logits: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(K,) share of the (valid) pixels where each class is the argmax of (N, K, H, W) `logits`."""
    labels = logits.argmax(1)
    labels = labels[valid] if valid is not None else labels.reshape(-1)
    return torch.bincount(labels, minlength=logits.shape[1]).double() / max(1, labels.numel())


def raise_seg_class_bias(model: torch.nn.Module, images: torch.Tensor, normalize: dict, share: float,
                         valid: torch.Tensor | None = None) -> torch.Tensor:
    """Raise a Mobile DeepLabv3's classifier bias (in place) so that each class is the argmax of at least
    about `share` of the valid pixels of `images`; returns the classes' shares after it.

    Args:
        model: a ``mnv2seg.deeplabv3.DeepLabV3`` in eval mode (logits upsampled to the input).
        images: (N, 3, H, W) float 0..255, as the exported model takes them.
        normalize: {"mean": [3], "std": [3]} of 0..1 pixels (the export metadata's ``normalize``).
        valid: (N, H, W) bool, the pixels that count (e.g. not padding); None: all.
    """
    mean, std = (torch.tensor(normalize[k], dtype=torch.float32).view(1, 3, 1, 1) for k in ("mean", "std"))
    x = (images.float() / 255 - mean) / std
    with torch.no_grad():
        model.head.classifier.bias += min_share_class_bias(model(x), share, valid).float()
        return class_shares(model(x), valid)


def random_det_ckpt(K: int = 3, size: int = 96, balanced: bool = False) -> dict:
    """A small random-weight SSDLite checkpoint (width 0.35, K classes, size px) with non-trivial BN statistics
    and a post-processing that keeps a dozen detections per image (what the export parity tests need);
    ``balanced``: the classifier biases shifted so that every class's top logits are alike (random
    weights otherwise favour one class, and a test of per-class work sees only it)."""
    from backbone.training.checkpoint import run_info
    from mnv2det.lightning_module import SSDLiteModule

    torch.manual_seed(0)
    cfg = {"_target_": "mnv2det.lightning_module.SSDLiteModule", "num_classes": K, "image_size": size,
           "backbone": {"width_mult": 0.35, "pretrained": "none"},
           "postprocess": {"pre_nms_top_k": 60, "max_detections": 12, "score_threshold": 0.27, "nms_iou": 0.45}}
    module = SSDLiteModule(**{k: v for k, v in cfg.items() if k != "_target_"}).eval()
    for m in module.modules():  # non-trivial BN statistics, so normalisation mistakes show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    if balanced:
        x = torch.randn(8, 3, size, size)
        with torch.no_grad():
            for _ in range(4):  # softmax couples the classes: a few multiplicative corrections
                scores = module.model(x)["cls_logits"].softmax(-1).reshape(-1, K + 1)
                top = scores.quantile(0.995, dim=0)  # the candidates that become detections
                shift = torch.zeros(K + 1)
                shift[1:] = (top[1:].max() / top[1:]).log()
                for predictor in module.model.head.cls_head:
                    predictor.pointwise.bias.view(-1, K + 1).add_(shift)  # anchor-major, K + 1 columns each
            for predictor in module.model.head.cls_head:  # more foreground overall: confident detections
                predictor.pointwise.bias.view(-1, K + 1)[:, 1:] += 0.3
    info = run_info("det", {"model": cfg}, {"class_names": [f"c{i}" for i in range(K)]})
    return {"state_dict": module.state_dict(), "mnv2": info}
