"""Real ImageNet weights: our backbone + torchvision's classifier == torchvision's mobilenet_v2.

Uses torchvision's IMAGENET1K_V1 file from torch's hub cache (`python tools/download.py
imagenet`) and a real photograph (scikit-image's `chelsea`, a tabby cat).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backbone import build_backbone

CAT_CLASSES = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def _photo() -> torch.Tensor:
    """chelsea (300x451 RGB) -> (1, 3, 224, 224) ImageNet-normalised (resize 256, centre crop 224)."""
    skimage_data = pytest.importorskip("skimage.data")
    img = torch.from_numpy(np.ascontiguousarray(skimage_data.chelsea())).permute(2, 0, 1)[None].float() / 255
    h, w = img.shape[-2:]
    s = 256 / min(h, w)
    img = F.interpolate(img, size=(round(h * s), round(w * s)), mode="bilinear", align_corners=False, antialias=True)
    top, left = (img.shape[-2] - 224) // 2, (img.shape[-1] - 224) // 2
    img = img[..., top:top + 224, left:left + 224]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (img - mean) / std


@torch.no_grad()
def test_backbone_with_imagenet_weights_matches_torchvision(imagenet_weights):
    import torchvision

    state = torch.load(imagenet_weights, map_location="cpu", weights_only=True)
    reference = torchvision.models.mobilenet_v2(weights=None)
    reference.load_state_dict(state)
    reference.eval()

    ours = build_backbone(out_features=["layer_19"], pretrained=str(imagenet_weights)).eval()
    classifier = reference.classifier  # Dropout + Linear(1280, 1000), from the same file

    x = _photo()
    expected = reference(x)
    features = ours(x)["layer_19"]  # (1, 1280, 7, 7)
    logits = classifier(features.mean(dim=(2, 3)))

    diff = (logits - expected).abs().max().item()
    assert diff < 1e-4, f"max |logit difference| {diff:.2e}"
    top5 = set(logits[0].topk(5).indices.tolist())
    assert top5 & CAT_CLASSES, f"chelsea is a cat, but top-5 ImageNet classes are {sorted(top5)}"
    assert logits[0].argmax().item() in CAT_CLASSES


def _photo_named(name: str) -> torch.Tensor:
    skimage_data = pytest.importorskip("skimage.data")
    img = torch.from_numpy(np.ascontiguousarray(getattr(skimage_data, name)())).permute(2, 0, 1)[None].float() / 255
    img = F.interpolate(img, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (img - mean) / std


# seg: output stride 32 here, so the features are torchvision's (the point is the BatchNorm settings)
@pytest.mark.parametrize("overrides", [
    ["task=det"], ["experiment=ssdlite_mnv2_coco", "data.root=/unused", "data.num_classes=80"],
    ["task=seg", "model.backbone.output_stride=32"],
    ["experiment=deeplabv3_mnv2_voc", "data.root=/unused", "model.backbone.output_stride=32"]])
@torch.no_grad()
def test_shipped_configs_keep_the_imagenet_features(imagenet_weights, overrides):
    """The backbone each shipped config builds with pretrained=imagenet classifies real photos as
    torchvision does: its BatchNorm settings fit the weights (at eps 1e-3 the features are wrecked)."""
    import torchvision
    from hydra import compose, initialize_config_dir

    from backbone.training.runner import build, resolve_num_classes
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, "model.backbone.pretrained=imagenet", "paths.output_dir=/tmp/x"])
    if cfg.data.num_classes == "auto":
        resolve_num_classes(cfg, build(cfg.data, "data"))
    module = build(cfg.model, "model").eval()
    backbone = module.model.backbone
    reference = torchvision.models.mobilenet_v2(weights=None)
    reference.load_state_dict(torch.load(imagenet_weights, map_location="cpu", weights_only=True))
    reference.eval()
    for photo, expected_class in (("chelsea", CAT_CLASSES), ("coffee", {967})):  # 967: espresso
        x = _photo_named(photo)
        expected = reference(x).softmax(-1)
        last = backbone.features[:18](x) if "layer_19" not in backbone.out_features else backbone(x)["layer_19"]
        if last.shape[1] != 1280:  # DeepLab stops at layer_18 (MNet V2*): run torchvision's last conv
            last = reference.features[18](last)
        probs = reference.classifier(last.mean(dim=(2, 3))).softmax(-1)
        assert probs.argmax().item() in expected_class, (photo, probs.argmax().item())
        assert probs.argmax().item() == expected.argmax().item()
        assert probs.max().item() == pytest.approx(expected.max().item(), abs=0.02), photo
