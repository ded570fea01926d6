"""SSDLite with a MobileNetV2 backbone, faithful to TF Object Detection API `ssdlite_mobilenet_v2_coco`.

Feature maps (TF `ssd_mobilenet_v2` feature extractor, layer_depth [-1, -1, 512, 256, 256, 128]):
    0: backbone `layer_15/expansion_output` (576 ch at width 1.0, stride 16)
    1: backbone `layer_19`                  (1280 ch, stride 32)
    2..5: extra layers on the previous map, each
          1x1 conv to depth/2 (BN, ReLU6) -> 3x3 depthwise stride 2 (BN, ReLU6) -> 1x1 conv to depth (BN, ReLU6)
Map sizes at 300: 19, 10, 5, 3, 2, 1 (1917 anchors); at 320: 20, 10, 5, 3, 2, 1 (2034 anchors).

Extra-layer names vs TF (`FeatureExtractor/MobilenetV2/...`, j = 2..5 for extras[j - 2]):
    layer_19_1_Conv2d_{j}_1x1_{depth/2}               extras[j-2].reduce.{0 conv,1 bn}
    layer_19_2_Conv2d_{j}_3x3_s2_{depth}_depthwise     extras[j-2].depthwise.{0 conv,1 bn}
    layer_19_2_Conv2d_{j}_3x3_s2_{depth}               extras[j-2].pointwise.{0 conv,1 bn}
Head names: see mnv2det/head.py. Backbone: `backbone.features.N` (torchvision layout).

Inside the model, boxes are normalised xyxy in [0, 1] of the network input; `postprocess` scales
them to original image pixels.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from backbone import build_backbone
from backbone.errors import ArgumentError, DataError, argument_scope
from backbone.layers import ConvBNAct
from backbone.memory_format import resolve_memory_format
from backbone.normalization import resolve_normalization
from mnv2det.anchor_generator import DefaultBoxGenerator
from mnv2det.box_coder import BoxCoder
from mnv2det.head import SSDLiteHead
from mnv2det.loss import SSDLoss
from mnv2det.matcher import IGNORE, match
from mnv2det.postprocess import PostProcessor, check_score_converter

# Taps SSDLite reads from the backbone (TF ssd_mobilenet_v2 feature_map_layout)
FEATURE_TAPS = ("layer_15/expansion_output", "layer_19")

def _make(cls: type, kwargs: Mapping[str, Any] | None, arg: str, **fixed: Any) -> Any:
    """cls(**kwargs, **fixed) for the sub-component built from argument ``arg``: unknown keys and the
    component's own ArgumentErrors are reported as ``arg.key``."""
    kwargs = dict(kwargs or {})
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self" and p not in fixed]
    for k in kwargs:
        if k not in params:
            raise ArgumentError(f"{arg}.{k}" if arg else k, "is not a setting", f"valid keys: {', '.join(params)}")
    with argument_scope(arg):
        return cls(**kwargs, **fixed)


class ExtraBlock(nn.Module):
    """1x1 conv to mid (BN, ReLU6) -> 3x3 depthwise stride 2 (BN, ReLU6) -> 1x1 conv to out (BN, ReLU6)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, padding: str = "torch",
                 bn_eps: float = 1e-3, bn_momentum: float = 0.03) -> None:
        super().__init__()
        bn = dict(padding=padding, bn_eps=bn_eps, bn_momentum=bn_momentum)
        self.reduce = ConvBNAct(in_channels, mid_channels, 1, **bn)
        self.depthwise = ConvBNAct(mid_channels, mid_channels, 3, stride=2, groups=mid_channels, **bn)
        self.pointwise = ConvBNAct(mid_channels, out_channels, 1, **bn)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, H, W) -> (B, C_out, ceil(H / 2), ceil(W / 2))."""
        return self.pointwise(self.depthwise(self.reduce(x)))


class SSDLite(nn.Module):
    """SSDLite-MobileNetV2 detector.

    Args:
        num_classes: object classes K (COCO: 80); outputs have K+1 columns, slot 0 background.
        backbone: kwargs of `backbone.build_backbone` (out_features is set here).
        extra_depths: output channels of the extra layers (TF: 512, 256, 256, 128); their 1x1 reduce
            convs use depth / 2. Both scale with the backbone width_mult (TF depth_multiplier), min 16.
        anchor: kwargs of DefaultBoxGenerator (num_layers defaults to the number of maps).
        box_coder_weights, box_code_order: BoxCoder settings ("yx" for TF-imported weights).
        score_converter: "softmax" | "sigmoid" (TF ssdlite: sigmoid).
        image_size: network input side (int or (h, w)); informational for data pipeline / complexity.
        normalize: "imagenet" | "tf" | {mode} | {mean, std} -> attributes normalize_mean / normalize_std.
        matcher: {iou_threshold: 0.5, negative_threshold: 0.5, force_match: true}.
        loss: kwargs of SSDLoss except score_converter.
        postprocess: kwargs of PostProcessor except score_converter / box_coder.
        head: {init: "tf" | "xavier", cls_bias_prior: float | null | "auto"} ("auto": 0.01 with focal loss).
        min_depth: floor for the scaled extra-layer depths (TF: 16).
        memory_format: "channels_last" | "contiguous": layout of the weights and of the input inside
            forward (backbone/memory_format.py).
    """

    def __init__(self, num_classes: int, backbone: Mapping[str, Any] | None = None,
                 extra_depths: Sequence[int] = (512, 256, 256, 128), anchor: Mapping[str, Any] | None = None,
                 box_coder_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0), box_code_order: str = "xy",
                 score_converter: str = "softmax", image_size: int | Sequence[int] = 300,
                 normalize: Mapping[str, Any] | str | None = None, matcher: Mapping[str, Any] | None = None,
                 loss: Mapping[str, Any] | None = None, postprocess: Mapping[str, Any] | None = None,
                 head: Mapping[str, Any] | None = None, min_depth: int = 16,
                 memory_format: str = "channels_last") -> None:
        super().__init__()
        self.memory_format = resolve_memory_format(memory_format)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ArgumentError("num_classes", f"must be a positive integer, got {num_classes!r}",
                              "use the number of object classes without background (COCO: 80)")
        self.num_classes = num_classes
        self.score_converter = check_score_converter(score_converter)
        self.image_size = (int(image_size), int(image_size)) if isinstance(image_size, int) else tuple(
            int(s) for s in image_size)
        self.normalize_mean, self.normalize_std = resolve_normalization(normalize)

        bb_cfg = dict(backbone or {})
        if "out_features" in bb_cfg and tuple(bb_cfg["out_features"]) != FEATURE_TAPS:
            raise ArgumentError("backbone.out_features", f"must be {list(FEATURE_TAPS)} (the maps SSDLite reads)",
                              "remove out_features from the detection backbone config")
        bb_cfg["out_features"] = list(FEATURE_TAPS)
        with argument_scope("backbone"):
            self.backbone = build_backbone(**bb_cfg)
        padding = bb_cfg.get("padding", "torch")
        bn = dict(padding=padding, bn_eps=float(bb_cfg.get("bn_eps", 1e-5)),
                  bn_momentum=float(bb_cfg.get("bn_momentum", 0.1)))
        width = float(bb_cfg.get("width_mult", 1.0))

        def depth(d: float) -> int:
            return max(int(d * width), int(min_depth))

        in_ch = [self.backbone.out_channels[t] for t in FEATURE_TAPS]
        extras = []
        prev = in_ch[-1]
        for d in extra_depths:
            block = ExtraBlock(prev, depth(int(d) // 2), depth(d), **bn)  # TF: depth_fn(layer_depth // 2)
            extras.append(block)
            prev = block.out_channels
            in_ch.append(prev)
        self.extras = nn.ModuleList(extras)
        self.feature_channels = in_ch

        anchor_cfg = dict(anchor or {})
        anchor_cfg.setdefault("num_layers", len(in_ch))
        self.anchor_generator = _make(DefaultBoxGenerator, anchor_cfg, "anchor")
        try:
            self.box_coder = BoxCoder(box_coder_weights, box_code_order)
        except ArgumentError as e:
            raise ArgumentError({"weights": "box_coder_weights", "order": "box_code_order"}[e.arg], e.problem, e.fix) from None

        self.loss_fn = _make(SSDLoss, loss, "loss", score_converter=score_converter)
        head_cfg = dict(head or {})
        prior = head_cfg.get("cls_bias_prior", "auto")
        if prior == "auto":
            head_cfg["cls_bias_prior"] = 0.01 if self.loss_fn.cls_loss == "focal" else None
        self.head = _make(SSDLiteHead, head_cfg, "head", in_channels=in_ch,
                          num_anchors=self.anchor_generator.num_anchors_per_location(), num_classes=num_classes,
                          **bn)
        self.matcher_cfg = dict(iou_threshold=0.5, negative_threshold=0.5, force_match=True)
        for k, v in dict(matcher or {}).items():
            if k not in self.matcher_cfg:
                raise ArgumentError(f"matcher.{k}", "is not a setting", f"valid keys: {', '.join(self.matcher_cfg)}")
            self.matcher_cfg[k] = v
        self.postprocessor = _make(PostProcessor, postprocess, "postprocess",
                                   score_converter=score_converter, box_coder=self.box_coder)

        # the extras get TF's init too (the backbone keeps its own / pretrained weights)
        for m in self.extras.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.trunc_normal_(m.weight, std=0.03, a=-0.06, b=0.06)
        self.to(memory_format=self.memory_format)  # load_state_dict copies into these, keeping the layout

    # ------------------------------------------------------------------ forward
    def extract_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images: (B, 3, H, W) -> the 6 feature maps, largest first."""
        feats = self.backbone(images)
        maps = [feats[t] for t in FEATURE_TAPS]
        x = maps[-1]
        for block in self.extras:
            x = block(x)
            maps.append(x)
        return maps

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images: (B, 3, H, W) already normalised.

        Returns cls_logits (B, A, K+1), bbox_regression (B, A, 4) (codes in box_code_order),
        anchors (A, 4) normalised xyxy.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"SSDLite expects (B, 3, H, W) images, got shape {tuple(images.shape)}")
        maps = self.extract_features(images.contiguous(memory_format=self.memory_format))
        cls_logits, bbox_regression = self.head(maps)
        sizes = [tuple(m.shape[-2:]) for m in maps]
        anchors = self.anchor_generator(sizes, images.device, image_hw=tuple(images.shape[-2:]))
        return {"cls_logits": cls_logits, "bbox_regression": bbox_regression, "anchors": anchors}

    # ------------------------------------------------------------------ training
    def assign_targets(self, anchors: torch.Tensor, targets: Mapping[str, torch.Tensor]
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-anchor targets for a padded batch.

        anchors: (A, 4); targets: boxes (B, M, 4) normalised xyxy, labels (B, M) long 1..K,
        valid (B, M) bool, crowd (B, M) bool (optional, default all False).
        Returns labels (B, A) long (0 background, 1..K, -1 ignore), box_targets (B, A, 4) codes
        (zeros off positives), matched_idx (B, A) long (-1 background, -2 ignore).
        """
        boxes = targets["boxes"].to(anchors.device, torch.float32)
        gt_labels = targets["labels"].to(anchors.device).long()
        valid = targets["valid"].to(anchors.device).bool()
        crowd = targets.get("crowd")
        crowd = torch.zeros_like(valid) if crowd is None else crowd.to(anchors.device).bool()
        B, M = valid.shape
        if boxes.shape != (B, M, 4) or gt_labels.shape != (B, M) or crowd.shape != (B, M):
            raise DataError("targets", f"inconsistent shapes boxes {tuple(boxes.shape)}, labels "
                            f"{tuple(gt_labels.shape)}, valid {tuple(valid.shape)}, crowd {tuple(crowd.shape)}",
                            "collate boxes (B, M, 4) and labels/valid/crowd (B, M)")
        bad = valid & ~crowd & ((gt_labels < 1) | (gt_labels > self.num_classes))
        if bool(bad.any()):
            raise DataError("targets.labels", f"labels must be in 1..{self.num_classes}, got "
                            f"{gt_labels[bad].unique().tolist()}",
                            "map dataset ids to contiguous labels 1..K (0 is background) and match model.num_classes")
        A = anchors.shape[0]
        matched = match(boxes, valid, crowd, anchors, **self.matcher_cfg)
        if M == 0:
            return (torch.zeros(B, A, dtype=torch.long, device=anchors.device),
                    torch.zeros(B, A, 4, device=anchors.device), matched)
        pos = matched >= 0
        idx = matched.clamp(min=0)
        labels = torch.where(pos, gt_labels.gather(1, idx), torch.zeros_like(idx))
        labels = labels.masked_fill(matched == IGNORE, -1)
        gt_per_anchor = boxes.gather(1, idx[..., None].expand(B, A, 4))
        box_targets = self.box_coder.encode(gt_per_anchor, anchors[None])
        box_targets = torch.where(pos[..., None], box_targets, torch.zeros_like(box_targets))
        return labels, box_targets, matched

    def compute_loss(self, outputs: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]
                     ) -> dict[str, torch.Tensor]:
        """outputs of forward + padded targets (see assign_targets) -> dict(loss, loss_cls, loss_box, num_pos).

        With ``loss.miner_nms_iou`` the loss also gets the decoded predicted boxes (detached: they only
        steer the mining NMS, as TF's ``ssd_meta_arch._apply_hard_mining``)."""
        labels, box_targets, _ = self.assign_targets(outputs["anchors"], targets)
        decoded = None
        if self.loss_fn.miner_nms_iou is not None:
            decoded = self.box_coder.decode(outputs["bbox_regression"].detach().float(), outputs["anchors"].float())
        return self.loss_fn(outputs["cls_logits"], outputs["bbox_regression"], labels, box_targets,
                            decoded_boxes=decoded)

    # ------------------------------------------------------------------ inference
    def postprocess(self, outputs: Mapping[str, torch.Tensor], image_sizes: torch.Tensor
                    ) -> list[dict[str, torch.Tensor]]:
        """outputs of forward, image_sizes (B, 2) original (h, w) -> per image
        dict(boxes (N, 4) xyxy original pixels, scores (N,), labels (N,) long 1..K)."""
        return self.postprocessor(outputs["cls_logits"], outputs["bbox_regression"], outputs["anchors"],
                                  image_sizes)


def build_ssdlite(cfg: Mapping[str, Any]) -> SSDLite:
    """SSDLite from a plain dict of the constructor's keyword arguments (unknown keys -> ArgumentError)."""
    return _make(SSDLite, cfg, "")
