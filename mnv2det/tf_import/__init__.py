"""Import a TF Object Detection API SSDLite-MobileNetV2 frozen graph into our SSDLite, without TensorFlow.

The frozen GraphDef is read with TensorBoard's protobuf classes (`tensorboard.compat.proto`), and
`Const` nodes become numpy arrays with `tensorboard.util.tensor_util.make_ndarray`. From the graph:

- weights: every former variable (a Const with a `<name>/read` Identity, or named like one) is
  mapped by name onto our modules (tables below); conv HWIO -> OIHW, depthwise (kh, kw, C, m)
  -> (C*m, 1, kh, kw), BatchNorm gamma/beta/moving_mean/moving_variance -> weight/bias/running_*;
- settings: number of classes (class predictor width), score converter (the Sigmoid/Softmax op
  in the Postprocessor, and its logit scale), NMS IoU / score threshold / max detections (the NMS
  nodes' constants), box coder scales (Decode's divisors), anchors (MultipleGridAnchorGenerator's
  per-layer scales and aspect ratios), input size (the resize op), input normalisation
  (Preprocessor mul/sub), width multiplier (channel counts), extra-layer depths (names/shapes).

TF specifics kept: 'SAME' padding (backbone padding="tf"), BatchNorm eps 1e-3, box codes in
(ty, tx, th, tw) order (box_code_order="yx"), normalisation x / 127.5 - 1, and TF's legacy
bilinear resize (`tf_resize_bilinear`, align_corners=False without half-pixel centres), written
into the model config as `resize: tf_bilinear` so that the data pipeline of `tools/evaluate.py`
resizes as TF does (uint8 -> float -> resize -> normalise).

Name tables (prefix FE = FeatureExtractor/MobilenetV2):
    FE/Conv                               backbone.features.0.{0 conv, 1 bn}
    FE/expanded_conv/{depthwise,project}  backbone.features.1.conv.{0.0/0.1, 1/2}
    FE/expanded_conv_N/{expand,depthwise,project}
                                          backbone.features.{N+1}.conv.{0.0/0.1, 1.0/1.1, 2/3}
    FE/Conv_1                             backbone.features.18.{0, 1}
    FE/layer_19_1_Conv2d_J_1x1_D          extras.{J-2}.reduce.{0,1}
    FE/layer_19_2_Conv2d_J_3x3_s2_D_depthwise  extras.{J-2}.depthwise.{0,1}
    FE/layer_19_2_Conv2d_J_3x3_s2_D       extras.{J-2}.pointwise.{0,1}
    BoxPredictor_I/{BoxEncodingPredictor,ClassPredictor}_depthwise
                                          head.{box,cls}_head.I.depthwise.{0,1}
    BoxPredictor_I/{BoxEncodingPredictor,ClassPredictor}/{weights,biases}
                                          head.{box,cls}_head.I.pointwise.{weight,bias}
An unknown or partial graph raises DataError listing the TF tensors it could not map and the
parameters it could not fill.

Modules: `graph` (reading the GraphDef), `textproto` (protobuf text format, label maps), `config`
(settings -> `TFModelInfo` -> model config), `weights` (name tables, layouts), `resize` (TF's
bilinear resize), `parity` (comparison with TF's stored outputs); here `import_graph` and
`checkpoint_dict`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from backbone.errors import DataError
from mnv2det.tf_import.config import (
    DEFAULTS,
    LIGHTNING_TARGET,
    TFModelInfo,
    apply_pipeline_config,
    class_meta,
    inspect_graph,
    model_config,
    ssdlite_kwargs,
)
from mnv2det.tf_import.graph import FE, TFGraph
from mnv2det.tf_import.parity import match_detections, preprocess_photo, reference_detections, reference_diffs
from mnv2det.tf_import.resize import tf_resize_bilinear
from mnv2det.tf_import.textproto import parse_textproto, read_label_map
from mnv2det.tf_import.weights import _conv, _depthwise, map_weights, tf_name_table

__all__ = [
    "DEFAULTS",
    "FE",
    "LIGHTNING_TARGET",
    "ImportResult",
    "TFGraph",
    "TFModelInfo",
    "apply_pipeline_config",
    "checkpoint_dict",
    "class_meta",
    "import_graph",
    "inspect_graph",
    "map_weights",
    "match_detections",
    "model_config",
    "parse_textproto",
    "preprocess_photo",
    "read_label_map",
    "reference_detections",
    "reference_diffs",
    "ssdlite_kwargs",
    "tf_name_table",
    "tf_resize_bilinear",
    "_conv",  # the layout converters, tested on their own
    "_depthwise",
]


@dataclass
class ImportResult:
    model: torch.nn.Module  # SSDLite in eval mode, weights loaded
    config: dict[str, Any]  # model config (with _target_)
    meta: dict[str, Any]  # class_names, category_ids
    info: TFModelInfo


def import_graph(graph_path: str | Path, pipeline: str | Path | None = None,
                 class_names: Sequence[str] | None = None, label_map: str | Path | None = None) -> ImportResult:
    """Read a TF OD API SSDLite frozen graph and return our SSDLite with its weights and config."""
    from mnv2det.ssdlite import SSDLite

    graph = TFGraph.load(graph_path)
    info = inspect_graph(graph)
    if pipeline is not None:
        apply_pipeline_config(info, pipeline)
    if not graph.variables():
        raise DataError(graph.source, "graph holds no weights (no Const variables)",
                        "pass a FROZEN graph (frozen_inference_graph.pb)")
    config, missing = model_config(info)
    unread = (f"could not read {', '.join(missing)} from the graph ({'; '.join(info.notes)})" if missing else "")
    fix = "pass --pipeline pipeline.config, or use a TF OD API SSDLite-MobileNetV2 frozen graph"
    try:
        model = SSDLite(**ssdlite_kwargs(config))
    except Exception as err:  # noqa: BLE001 -- settings read from the graph that SSDLite rejects
        raise DataError(graph.source, f"cannot build SSDLite from the graph's settings ({err})"
                        + (f"; {unread}" if unread else ""), fix) from None
    if info.anchors_per_location is not None and \
            model.anchor_generator.num_anchors_per_location() != info.anchors_per_location:
        raise DataError(graph.source, f"graph has {info.anchors_per_location} anchors per location, the anchor "
                        f"settings read from it give {model.anchor_generator.num_anchors_per_location()}", fix)
    try:
        state = map_weights(model, graph, info.logit_scale)
    except DataError as err:
        raise DataError(graph.source, err.problem + (f" | {unread}" if unread else ""), err.fix) from None
    if missing:
        raise DataError(graph.source, unread, fix)
    model.load_state_dict(state, strict=True)
    model.eval()
    meta = class_meta(int(info.num_classes), class_names, label_map)
    return ImportResult(model=model, config=config, meta=meta, info=info)


def checkpoint_dict(result: ImportResult, source: str | Path | None = None) -> dict[str, Any]:
    """What `tools/import_tf.py` saves: {"state_dict": {"model.<key>": tensor}, "mnv2": {...}, "tf_import": {...}}.

    "mnv2" is `backbone.training.checkpoint.run_info("det", {"model": config}, meta)`, so tools/evaluate.py
    rebuilds SSDLiteModule from it and loads the state dict into `self.model`.
    """
    from backbone.training.checkpoint import run_info

    state = {f"model.{k}": v.detach().cpu().clone() for k, v in result.model.state_dict().items()}
    info = result.info.as_dict()
    info.pop("anchor_layers", None)
    extra: dict[str, Any] = {"info": info}
    if source is not None:
        from backbone.training.downloads import sha256_file

        extra.update(graph=str(source), graph_sha256=sha256_file(source))
    return {"state_dict": state, "mnv2": run_info("det", {"model": result.config}, result.meta), "tf_import": extra}
