"""The shared foundation of both tasks.

Network: ``mobilenet_v2`` (architecture, TF-slim tap names, output stride via dilation),
``layers`` (the conv-BN-act block), ``padding`` (TF 'SAME'), ``weights`` (pretrained loading),
``builder`` (``build_backbone``), ``normalization`` (input normalisation presets),
``complexity`` (params, MAdds), ``errors``. Training support shared by ``mnv2det`` and
``mnv2seg``: ``backbone.training`` (runner, base LightningModule / DataModule, optimiser
schedules, data loading, checkpoints, synthetic data, downloads, VOC label conventions).

Backbone contract: ``build_backbone(**cfg.model.backbone) -> MobileNetV2``; its
``forward(x: (B, 3, H, W)) -> {tap: (B, C, H / s, W / s)}`` returns one entry per requested tap
(``layer_1 .. layer_19``, ``layer_N/expansion_output``), with ``out_channels`` and ``out_strides``
per tap. Module names equal torchvision's ``features.N`` so its state dicts load as they are.
"""
from backbone.builder import build_backbone
from backbone.layers import ConvBNAct
from backbone.mobilenet_v2 import InvertedResidual, LayerSpec, MobileNetV2, layer_specs, make_divisible, valid_tap_names
from backbone.weights import imagenet_weights_path, load_pretrained, load_torchvision_state_dict

__all__ = [
    "ConvBNAct",
    "InvertedResidual",
    "LayerSpec",
    "MobileNetV2",
    "build_backbone",
    "imagenet_weights_path",
    "layer_specs",
    "load_pretrained",
    "load_torchvision_state_dict",
    "make_divisible",
    "valid_tap_names",
]
