"""The model's settings: read from the graph (`inspect_graph` -> `TFModelInfo`), filled from a
pipeline.config (`apply_pipeline_config`), turned into our SSDLite config (`model_config`) and
class names (`class_meta`).
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from backbone.errors import DataError
from mnv2det.tf_import.graph import FE, TFGraph, _const_input
from mnv2det.tf_import.textproto import _find, parse_textproto, read_label_map

LIGHTNING_TARGET = "mnv2det.lightning_module.SSDLiteModule"
WIDTH_CANDIDATES = (1.0, 0.75, 0.5, 0.35, 1.3, 1.4)
NMS_OPS = ("NonMaxSuppression", "NonMaxSuppressionV2", "NonMaxSuppressionV3", "NonMaxSuppressionV4",
           "NonMaxSuppressionV5")


# ============================================================================= settings from the graph
@dataclass
class TFModelInfo:
    """What the graph says about the model (None: not found; see `notes`)."""

    num_classes: int | None = None
    score_converter: str | None = None  # sigmoid | softmax | identity
    logit_scale: float = 1.0
    nms_iou: float | None = None
    score_threshold: float | None = None
    max_detections_per_class: int | None = None
    max_detections: int | None = None
    image_size: tuple[int, int] | None = None  # (h, w)
    input_scale: float | None = None  # preprocessed = raw * input_scale - input_offset
    input_offset: float | None = None
    width_mult: float | None = None
    extra_depths: list[int] | None = None
    anchors_per_location: list[int] | None = None
    anchor_layers: list[list[tuple[float, float]]] | None = None  # per map: (scale, aspect ratio)
    anchor: dict[str, Any] | None = None  # DefaultBoxGenerator kwargs
    box_coder_weights: list[float] | None = None  # (y, x, h, w) as TF's Decode divides
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def inspect_graph(graph: TFGraph) -> TFModelInfo:
    """Read every setting the graph holds (see the mnv2det.tf_import docstring); missing ones are None + a note."""
    info = TFModelInfo()
    variables = graph.variables()
    _predictor_layout(graph, variables, info)
    _score_converter(graph, info)
    _nms_settings(graph, info)
    _input_settings(graph, info)
    _backbone_width(variables, info)
    _extra_depths(variables, info)
    _anchor_settings(graph, info)
    _box_coder(graph, info)
    return info


def _predictor_layout(graph: TFGraph, variables: dict[str, np.ndarray], info: TFModelInfo) -> None:
    per_loc, classes = [], set()
    i = 0
    while f"BoxPredictor_{i}/BoxEncodingPredictor/biases" in variables:
        box = variables[f"BoxPredictor_{i}/BoxEncodingPredictor/biases"].size
        n = box // 4
        per_loc.append(n)
        cls = variables.get(f"BoxPredictor_{i}/ClassPredictor/biases")
        if cls is not None and n:
            classes.add(cls.size // n - 1)
        i += 1
    if not per_loc:
        info.notes.append("no BoxPredictor_*/BoxEncodingPredictor/biases: not a TF OD API SSD box predictor")
        return
    info.anchors_per_location = per_loc
    if len(classes) == 1:
        info.num_classes = classes.pop()
    else:
        info.notes.append(f"class predictors disagree on the number of classes: {sorted(classes)}")


def _score_converter(graph: TFGraph, info: TFModelInfo) -> None:
    node = graph.nodes.get("Postprocessor/convert_scores")
    if node is None:
        cands = graph.find_ops(("Sigmoid", "Softmax"), "Postprocessor/")
        node = cands[0] if cands else None
    if node is None:
        info.notes.append("no score converter op (Postprocessor/convert_scores) found")
        return
    info.score_converter = {"Sigmoid": "sigmoid", "Softmax": "softmax", "Identity": "identity"}.get(node.op)
    if info.score_converter is None:
        info.notes.append(f"unknown score converter op {node.op}")
    scale = graph.get("Postprocessor/scale_logits/y")
    if scale is not None:
        info.logit_scale = float(scale)


def _clean(v: Any) -> float:
    """float32 constant -> the decimal it was written as (0.6000000238 -> 0.6)."""
    return float(f"{float(v):.7g}")


def _nms_settings(graph: TFGraph, info: TFModelInfo) -> None:
    nms = graph.find_ops(NMS_OPS)
    if not nms:
        info.notes.append("no NonMaxSuppression op found")
        return
    node = nms[0]
    iou = _const_input(graph, node.input[3]) if len(node.input) > 3 else None
    score = _const_input(graph, node.input[4]) if len(node.input) > 4 else None
    per_class = _const_input(graph, node.input[2])
    if iou is not None:
        info.nms_iou = _clean(iou)
    if score is not None:
        info.score_threshold = _clean(score)
    if per_class is not None:
        info.max_detections_per_class = int(per_class)
    # total: TF OD API's `max_total_size = tf.minimum(max_total_detections, num_boxes)` (Minimum_1),
    # else the PadOrClipBoxList target size
    prefix = node.name.rsplit("/non_max_suppression", 1)[0]
    total = graph.get(f"{prefix}/Minimum_1/x")
    if total is not None:
        info.max_detections = int(total)
    if info.max_detections is None:
        pads = [n.name for n in graph.graph_def.node if n.op == "Const" and n.name.endswith("PadOrClipBoxList/sub/y")]
        if pads:
            info.max_detections = int(graph.value(pads[0]))
    if info.max_detections is None and info.max_detections_per_class is not None:
        info.max_detections = info.max_detections_per_class
        info.notes.append("max total detections not found; using max detections per class")


def _input_settings(graph: TFGraph, info: TFModelInfo) -> None:
    resize = graph.find_ops(("ResizeBilinear", "ResizeNearestNeighbor", "ResizeBicubic", "ResizeArea"), "Preprocessor/")
    if resize:
        size = _const_input(graph, resize[0].input[1])
        if size is not None and size.size == 2:
            info.image_size = (int(size[0]), int(size[1]))
        if resize[0].op != "ResizeBilinear":
            info.notes.append(f"input resize is {resize[0].op}; tf_resize_bilinear reproduces ResizeBilinear only")
        if resize[0].attr["align_corners"].b or resize[0].attr["half_pixel_centers"].b:
            info.notes.append("resize uses align_corners/half_pixel_centers; tf_resize_bilinear is the legacy mode")
    else:
        info.notes.append("no resize op under Preprocessor/: input size unknown")
    mul, sub = graph.get("Preprocessor/mul/x"), graph.get("Preprocessor/sub/y")
    if mul is not None and sub is not None and mul.size == 1 and sub.size == 1:
        info.input_scale, info.input_offset = _clean(mul), _clean(sub)
    else:
        info.notes.append("Preprocessor/mul, Preprocessor/sub not found: input normalisation unknown")


def _backbone_width(variables: dict[str, np.ndarray], info: TFModelInfo) -> None:
    from backbone.mobilenet_v2 import layer_specs

    def tf_channels(spec_index: int) -> int | None:
        if spec_index == 0:
            w = variables.get(f"{FE}/Conv/weights")
        elif spec_index == 18:
            w = variables.get(f"{FE}/Conv_1/weights")
        else:
            block = "expanded_conv" if spec_index == 1 else f"expanded_conv_{spec_index - 1}"
            w = variables.get(f"{FE}/{block}/project/weights")
        return None if w is None else int(w.shape[-1])

    found = {i: tf_channels(i) for i in range(19)}
    found = {i: c for i, c in found.items() if c is not None}
    if not found:
        info.notes.append(f"no {FE} weights: backbone width unknown")
        return
    for width in WIDTH_CANDIDATES:
        specs = layer_specs(width)
        if all(specs[i].out_channels == c for i, c in found.items()):
            info.width_mult = width
            return
    info.notes.append(f"backbone channels {sorted(found.items())} match no width multiplier in {WIDTH_CANDIDATES} "
                      "(TF shrinks the last 1x1 conv below 1280 for width < 1; ours keeps 1280)")


def _extra_depths(variables: dict[str, np.ndarray], info: TFModelInfo) -> None:
    pat = re.compile(rf"^{FE}/layer_19_2_Conv2d_(\d+)_3x3_s2_(\d+)/weights$")
    depths = {}
    for name, w in variables.items():
        m = pat.match(name)
        if m:
            depths[int(m.group(1))] = int(w.shape[-1])
    if depths:
        info.extra_depths = [depths[j] for j in sorted(depths)]
    else:
        info.notes.append("no extra feature layers (layer_19_2_Conv2d_*) found")


def _anchor_settings(graph: TFGraph, info: TFModelInfo) -> None:
    """Per-layer (scale, ratio) from MultipleGridAnchorGenerator's constants, then the generator kwargs.

    For layer k TF builds `Sqrt_k/x` = aspect ratios and `truediv_m/x` = scales (one vector each,
    in layer order); heights = scales / sqrt(ratios) * base, widths = scales * sqrt(ratios) * base.
    """
    ratio_pat = re.compile(r"^MultipleGridAnchorGenerator/Sqrt(_\d+)?/x$")
    ratios, scales = [], []
    for n in graph.graph_def.node:
        if n.op != "Const" or not n.name.startswith("MultipleGridAnchorGenerator/"):
            continue
        if ratio_pat.match(n.name):
            ratios.append(graph.value(n.name).astype(np.float64).ravel())
        elif re.match(r"^MultipleGridAnchorGenerator/truediv_\d+/x$", n.name):
            v = graph.value(n.name)
            if v.ndim == 1 and v.dtype.kind == "f":
                scales.append(v.astype(np.float64))
    if not ratios or len(ratios) != len(scales) or any(len(r) != len(s) for r, s in zip(ratios, scales)):
        info.notes.append("MultipleGridAnchorGenerator scales/aspect ratios not found: anchors unknown")
        return
    layers = [list(zip(s.tolist(), r.tolist())) for s, r in zip(scales, ratios)]
    info.anchor_layers = layers
    first, second = layers[0], layers[1] if len(layers) > 1 else layers[0]
    reduce = len(first) == 3 and abs(first[0][0] - 0.1) < 1e-6 and [a for _, a in first] == [1.0, 2.0, 0.5]
    min_scale = first[1][0] if reduce else first[0][0]
    max_scale = layers[-1][0][0]
    # the interpolated box is the last one at a different scale (sqrt(s_k s_k+1))
    interp = len(second) > 1 and abs(second[-1][0] - second[0][0]) > 1e-6
    ratios_main = [round(a, 6) for _, a in (second[:-1] if interp else second)]
    info.anchor = {
        "min_scale": round(min_scale, 6), "max_scale": round(max_scale, 6), "aspect_ratios": ratios_main,
        "reduce_boxes_in_lowest_layer": bool(reduce),
        "interpolated_scale_aspect_ratio": round(second[-1][1], 6) if interp else 0.0,
        "num_layers": len(layers),
    }


def _box_coder(graph: TFGraph, info: TFModelInfo) -> None:
    names = [f"Postprocessor/Decode/truediv{s}/y" for s in ("", "_1", "_2", "_3")]
    vals = [graph.get(n) for n in names]
    if all(v is not None for v in vals):
        info.box_coder_weights = [float(v) for v in vals]  # ty, tx, th, tw divisors
    else:
        info.notes.append("Postprocessor/Decode scales not found: box coder scales unknown")


# ============================================================================= pipeline.config
def apply_pipeline_config(info: TFModelInfo, path: str | Path) -> None:
    """Fill what the graph did not tell from a TF OD API pipeline.config; note disagreements (graph wins)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(path, "pipeline config not found", "pass the pipeline.config next to the frozen graph")
    try:
        tree = parse_textproto(path.read_text())
    except (ValueError, IndexError) as e:
        raise DataError(path, f"not a protobuf text file ({e})", "pass the model's pipeline.config") from None

    def first(key: str) -> Any:
        vals = _find(tree, key)
        return vals[0] if vals else None

    def put(attr: str, value: Any) -> None:
        if value is None:
            return
        current = getattr(info, attr)
        if current is None:
            setattr(info, attr, value)
        elif current != value and not (isinstance(value, float) and math.isclose(current, value, rel_tol=1e-5)):
            info.notes.append(f"pipeline.config {attr}={value!r} differs from the graph's {current!r}; using the graph's")

    put("num_classes", first("num_classes"))
    conv = {"SIGMOID": "sigmoid", "SOFTMAX": "softmax", "IDENTITY": "identity"}
    put("score_converter", conv.get(str(first("score_converter"))))
    put("nms_iou", first("iou_threshold"))
    put("score_threshold", first("score_threshold"))
    put("max_detections_per_class", first("max_detections_per_class"))
    put("max_detections", first("max_total_detections"))
    resizer = first("fixed_shape_resizer")
    if isinstance(resizer, dict) and "height" in resizer and "width" in resizer:
        put("image_size", (int(resizer["height"][0]), int(resizer["width"][0])))
    coder = first("faster_rcnn_box_coder")
    if isinstance(coder, dict):
        put("box_coder_weights", [float(coder.get(k, [d])[0]) for k, d in
                                  (("y_scale", 10.0), ("x_scale", 10.0), ("height_scale", 5.0), ("width_scale", 5.0))])
    gen = first("ssd_anchor_generator")
    if isinstance(gen, dict) and info.anchor is None:
        info.anchor = {
            "min_scale": float(gen.get("min_scale", [0.2])[0]), "max_scale": float(gen.get("max_scale", [0.95])[0]),
            "aspect_ratios": [float(a) for a in gen.get("aspect_ratios", [1.0, 2.0, 0.5, 3.0, 0.3333])],
            "reduce_boxes_in_lowest_layer": bool(gen.get("reduce_boxes_in_lowest_layer", [True])[0]),
            "interpolated_scale_aspect_ratio": float(gen.get("interpolated_scale_aspect_ratio", [1.0])[0]),
            "num_layers": int(gen.get("num_layers", [6])[0]),
        }
    depth = first("depth_multiplier")
    if depth is not None:
        put("width_mult", float(depth))


# ============================================================================= labels
def class_meta(num_classes: int, class_names: Sequence[str] | None = None,
               label_map: str | Path | None = None) -> dict[str, list]:
    """meta {class_names, category_ids} for TF's classes 1..K (TF class k+1 <-> our label k+1).

    With a label map, ids 1..K missing from it are named `unused_<id>` (COCO's 90-slot layout).
    """
    ids = list(range(1, num_classes + 1))
    if label_map is not None:
        map_ids, map_names = read_label_map(label_map)
        by_id = dict(zip(map_ids, map_names))
        extra = [i for i in map_ids if i > num_classes]
        if extra:
            raise DataError(label_map, f"has ids {extra[:5]} beyond the graph's {num_classes} classes",
                            "use the label map the model was trained with")
        names = [by_id.get(i, f"unused_{i}") for i in ids]
    elif class_names:
        names = [str(n) for n in class_names]
        if len(names) != num_classes:
            raise DataError("--class-names", f"{len(names)} names for a graph with {num_classes} classes",
                            f"give exactly {num_classes} comma-separated names")
    else:
        names = [f"class_{i}" for i in ids]
    return {"class_names": names, "category_ids": ids}


# ============================================================================= model config
# TF ssdlite_mobilenet_v2_coco values, used only to build a model for diagnosis when the graph lacks them
DEFAULTS: dict[str, Any] = {
    "num_classes": 90, "score_converter": "sigmoid", "image_size": (300, 300), "width_mult": 1.0,
    "extra_depths": [512, 256, 256, 128], "box_coder_weights": [10.0, 10.0, 5.0, 5.0],
    "anchor": {"min_scale": 0.2, "max_scale": 0.95, "aspect_ratios": [1.0, 2.0, 0.5, 3.0, 0.3333],
               "reduce_boxes_in_lowest_layer": True, "interpolated_scale_aspect_ratio": 1.0, "num_layers": 6},
}


def model_config(info: TFModelInfo) -> tuple[dict[str, Any], list[str]]:
    """(SSDLite / SSDLiteModule config reproducing the graph, settings the graph did not give).

    Missing settings are filled with TF's ssdlite_mobilenet_v2_coco values so that a model can
    still be built (to list what does not map); `import_graph` refuses to finish if any are missing.
    """
    missing = [k for k in DEFAULTS if getattr(info, k) is None]
    for k in missing:
        setattr(info, k, DEFAULTS[k])
    if info.score_converter not in ("sigmoid", "softmax"):
        raise DataError("graph", f"score converter {info.score_converter!r} is not supported",
                        "only sigmoid and softmax SSD heads can be imported")
    width = float(info.width_mult)
    h, w = info.image_size
    if info.input_scale is not None and math.isclose(info.input_scale, 2 / 255, rel_tol=1e-6) \
            and math.isclose(info.input_offset, 1.0, rel_tol=1e-6):
        normalize: Any = "tf"
    elif info.input_scale is not None:
        # raw * a - b on 0..255 == (x01 - mean) / std on 0..1 with std = 1 / (255 a), mean = b * std
        std = 1.0 / (255.0 * info.input_scale)
        normalize = {"mean": [info.input_offset * std] * 3, "std": [std] * 3}
    else:
        normalize = "tf"
        info.notes.append("input normalisation unknown: assuming TF's x / 127.5 - 1")
    max_det = info.max_detections or 100
    return {
        "_target_": LIGHTNING_TARGET,
        "num_classes": int(info.num_classes),
        "backbone": {
            "width_mult": width, "output_stride": 32, "padding": "tf", "bn_eps": 1e-3,
            "bn_momentum": 0.003,  # TF batch_norm decay 0.997 (only matters when fine-tuning)
            "pretrained": "none", "frozen_stages": 0, "norm_eval": False,
        },
        # SSDLite scales these by width_mult (min 16): store the unscaled depths
        "extra_depths": [int(round(d / width)) for d in info.extra_depths],
        "anchor": dict(info.anchor),
        "box_coder_weights": [float(v) for v in info.box_coder_weights],
        "box_code_order": "yx",
        "score_converter": info.score_converter,
        "image_size": h if h == w else [h, w],
        "normalize": normalize,
        "resize": "tf_bilinear",  # the Preprocessor's ResizeBilinear (legacy, no half-pixel centres): data.resize
        "postprocess": {
            "score_threshold": float(info.score_threshold if info.score_threshold is not None else 1e-8),
            "nms_iou": float(info.nms_iou if info.nms_iou is not None else 0.6),
            "max_detections": int(max_det),
            "pre_nms_top_k": None,  # TF runs NMS over all anchors
        },
    }, missing


def ssdlite_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """The SSDLite constructor's keyword arguments within a model config (drops _target_)."""
    import inspect

    from mnv2det.ssdlite import SSDLite

    params = set(inspect.signature(SSDLite.__init__).parameters) - {"self"}
    return {k: v for k, v in config.items() if k in params}
