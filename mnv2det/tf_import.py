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
bilinear resize (`tf_resize_bilinear`, align_corners=False without half-pixel centres).

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
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from backbone.errors import DataError

FE = "FeatureExtractor/MobilenetV2"
LIGHTNING_TARGET = "mnv2det.lightning_module.SSDLiteModule"
WIDTH_CANDIDATES = (1.0, 0.75, 0.5, 0.35, 1.3, 1.4)
BN_SUFFIX = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}
VARIABLE_SUFFIXES = ("weights", "biases", "depthwise_weights", "gamma", "beta", "moving_mean", "moving_variance")
NMS_OPS = ("NonMaxSuppression", "NonMaxSuppressionV2", "NonMaxSuppressionV3", "NonMaxSuppressionV4",
           "NonMaxSuppressionV5")


# ============================================================================= graph reading
class TFGraph:
    """A frozen GraphDef: nodes by name, Const values as numpy arrays (decoded on demand)."""

    def __init__(self, graph_def: Any, source: str = "<graph>") -> None:
        self.graph_def = graph_def
        self.source = source
        self.nodes = {n.name: n for n in graph_def.node}
        self.order = {n.name: i for i, n in enumerate(graph_def.node)}
        self._values: dict[str, np.ndarray] = {}
        self.consumers: dict[str, list[str]] = {}
        for n in graph_def.node:
            for inp in n.input:
                self.consumers.setdefault(_node_name(inp), []).append(n.name)

    @classmethod
    def load(cls, path: str | Path) -> "TFGraph":
        """Parse a frozen `.pb` GraphDef (DataError if it is not one)."""
        from tensorboard.compat.proto.graph_pb2 import GraphDef

        path = Path(path).expanduser()
        if not path.is_file():
            raise DataError(path, "frozen graph not found", "pass the path of a TF OD API frozen_inference_graph.pb")
        graph_def = GraphDef()
        try:
            graph_def.ParseFromString(path.read_bytes())
        except Exception as e:  # noqa: BLE001 -- protobuf raises DecodeError and friends
            raise DataError(path, f"not a binary TensorFlow GraphDef ({type(e).__name__})",
                            "pass a frozen_inference_graph.pb (a SavedModel or checkpoint is not supported)") from None
        if not graph_def.node:
            raise DataError(path, "GraphDef has no nodes", "pass a frozen_inference_graph.pb")
        return cls(graph_def, str(path))

    def is_const(self, name: str) -> bool:
        node = self.nodes.get(name)
        return node is not None and node.op == "Const"

    def value(self, name: str) -> np.ndarray:
        """The Const node's value (follows Identity nodes)."""
        name = self.resolve(name)
        if name not in self._values:
            from tensorboard.util.tensor_util import make_ndarray

            node = self.nodes[name]
            if node.op != "Const":
                raise KeyError(f"{name} is a {node.op}, not a Const")
            self._values[name] = make_ndarray(node.attr["value"].tensor)
        return self._values[name]

    def get(self, name: str) -> np.ndarray | None:
        """value(name) or None when there is no such Const."""
        try:
            return self.value(name)
        except KeyError:
            return None

    def resolve(self, name: str) -> str:
        """Node name of an input reference (drops ':k' / '^'), through Identity nodes."""
        name = _node_name(name)
        seen = 0
        while name in self.nodes and self.nodes[name].op == "Identity" and seen < 100:
            name = _node_name(self.nodes[name].input[0])
            seen += 1
        if name not in self.nodes:
            raise KeyError(name)
        return name

    def find_ops(self, ops: Sequence[str], prefix: str = "") -> list[Any]:
        return [n for n in self.graph_def.node if n.op in ops and n.name.startswith(prefix)]

    def variables(self) -> dict[str, np.ndarray]:
        """Former variables: float Consts read through `<name>/read` or named like weights / BN params."""
        out = {}
        for n in self.graph_def.node:
            if n.op != "Const":
                continue
            read = any(c == f"{n.name}/read" for c in self.consumers.get(n.name, []))
            if not (read or n.name.rsplit("/", 1)[-1] in VARIABLE_SUFFIXES):
                continue
            if n.attr["dtype"].type not in (1, 2, 19):  # float, double, half
                continue
            out[n.name] = self.value(n.name)
        return out


def _node_name(ref: str) -> str:
    return ref.lstrip("^").split(":")[0]


# ============================================================================= settings
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
    """Read every setting the graph holds (see module docstring); missing ones are None + a note."""
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


def _const_input(graph: TFGraph, ref: str) -> np.ndarray | None:
    """Value of an input: a Const, or the Const operand of a Minimum (max_output_size = min(k, n))."""
    try:
        name = graph.resolve(ref)
    except KeyError:
        return None
    node = graph.nodes[name]
    if node.op == "Const":
        return graph.value(name)
    if node.op == "Minimum":
        for inp in node.input:
            try:
                if graph.is_const(graph.resolve(inp)):
                    return graph.value(inp)
            except KeyError:
                continue
    return None


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
def parse_textproto(text: str) -> dict[str, list[Any]]:
    """Minimal protobuf text-format reader: {field: [values or nested dicts]} (enough for pipeline.config)."""
    tokens = re.findall(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|[{}:<>]|[^\s{}:<>#"\']+|#[^\n]*', text)
    tokens = [t for t in tokens if not t.startswith("#")]
    pos = 0

    def value(tok: str) -> Any:
        if tok[0] in "\"'":
            return tok[1:-1]
        if tok in ("true", "false"):
            return tok == "true"
        try:
            return int(tok)
        except ValueError:
            pass
        try:
            return float(tok)
        except ValueError:
            return tok  # enum

    def block(end: str | None) -> dict[str, list[Any]]:
        nonlocal pos
        out: dict[str, list[Any]] = {}
        while pos < len(tokens):
            tok = tokens[pos]
            if tok == end:
                pos += 1
                return out
            name = tok
            pos += 1
            if pos < len(tokens) and tokens[pos] == ":":
                pos += 1
            if pos < len(tokens) and tokens[pos] in ("{", "<"):
                close = "}" if tokens[pos] == "{" else ">"
                pos += 1
                out.setdefault(name, []).append(block(close))
            else:
                out.setdefault(name, []).append(value(tokens[pos]))
                pos += 1
        if end is not None:
            raise ValueError("unbalanced braces")
        return out

    return block(None)


def _find(tree: Any, key: str) -> list[Any]:
    """All values of `key` anywhere in a parse_textproto tree (depth-first)."""
    found = []
    if isinstance(tree, dict):
        for k, vals in tree.items():
            if k == key:
                found.extend(vals)
            for v in vals:
                found.extend(_find(v, key))
    return found


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
def read_label_map(path: str | Path) -> tuple[list[int], list[str]]:
    """(ids, names) of a TF OD API label map (.pbtxt: item { id: N display_name/name: "..." })."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(path, "label map not found", "pass a TF OD API .pbtxt label map")
    items = _find(parse_textproto(path.read_text()), "item")
    pairs = sorted((int(it["id"][0]), str((it.get("display_name") or it.get("name") or [""])[0])) for it in items
                   if isinstance(it, dict) and "id" in it)
    if not pairs:
        raise DataError(path, "no `item { id: ... }` entries", "pass a TF OD API .pbtxt label map")
    return [i for i, _ in pairs], [n for _, n in pairs]


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
        "postprocess": {
            "score_threshold": float(info.score_threshold if info.score_threshold is not None else 1e-8),
            "nms_iou": float(info.nms_iou if info.nms_iou is not None else 0.6),
            "max_detections": int(max_det),
            "pre_nms_top_k": None,  # TF runs NMS over all anchors
        },
    }, missing


def ssdlite_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """The SSDLite constructor's keyword arguments within a model config (drops _target_)."""
    from mnv2det.ssdlite import SSDLite
    import inspect

    params = set(inspect.signature(SSDLite.__init__).parameters) - {"self"}
    return {k: v for k, v in config.items() if k in params}


# ============================================================================= weight mapping
def _conv(w: np.ndarray) -> np.ndarray:
    """HWIO -> OIHW."""
    return w.transpose(3, 2, 0, 1)


def _depthwise(w: np.ndarray) -> np.ndarray:
    """(kh, kw, C, m) -> (C*m, 1, kh, kw); TF output channel c*m + j is torch's group c, filter j."""
    kh, kw, c, m = w.shape
    return w.reshape(kh, kw, c * m).transpose(2, 0, 1)[:, None]


def _same(w: np.ndarray) -> np.ndarray:
    return w


def _bn(prefix: str, ours: str, table: dict[str, tuple[str, Callable]]) -> None:
    for p, t in BN_SUFFIX.items():
        table[f"{ours}.{p}"] = (f"{prefix}/BatchNorm/{t}", _same)


def tf_name_table(model: torch.nn.Module) -> dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]]:
    """{our state-dict key: (TF tensor name, layout conversion)} for an SSDLite model."""
    table: dict[str, tuple[str, Callable]] = {}
    features = model.backbone.features
    for idx, layer in enumerate(features):
        ours = f"backbone.features.{idx}"
        if isinstance(layer, torch.nn.Identity):
            continue
        if idx in (0, len(features) - 1):
            tf = f"{FE}/Conv" if idx == 0 else f"{FE}/Conv_1"
            table[f"{ours}.0.weight"] = (f"{tf}/weights", _conv)
            _bn(tf, f"{ours}.1", table)
            continue
        tf = f"{FE}/expanded_conv" if idx == 1 else f"{FE}/expanded_conv_{idx - 1}"
        k = 0
        if layer.has_expansion:
            table[f"{ours}.conv.0.0.weight"] = (f"{tf}/expand/weights", _conv)
            _bn(f"{tf}/expand", f"{ours}.conv.0.1", table)
            k = 1
        table[f"{ours}.conv.{k}.0.weight"] = (f"{tf}/depthwise/depthwise_weights", _depthwise)
        _bn(f"{tf}/depthwise", f"{ours}.conv.{k}.1", table)
        table[f"{ours}.conv.{k + 1}.weight"] = (f"{tf}/project/weights", _conv)
        _bn(f"{tf}/project", f"{ours}.conv.{k + 2}", table)

    for j, block in enumerate(model.extras):
        ours, n = f"extras.{j}", j + 2
        mid, out = block.reduce.out_channels, block.out_channels
        for part, tf, fn in (("reduce", f"{FE}/layer_19_1_Conv2d_{n}_1x1_{mid}", _conv),
                             ("depthwise", f"{FE}/layer_19_2_Conv2d_{n}_3x3_s2_{out}_depthwise", _depthwise),
                             ("pointwise", f"{FE}/layer_19_2_Conv2d_{n}_3x3_s2_{out}", _conv)):
            wname = "depthwise_weights" if fn is _depthwise else "weights"
            table[f"{ours}.{part}.0.weight"] = (f"{tf}/{wname}", fn)
            _bn(tf, f"{ours}.{part}.1", table)

    for head, tf_head in (("box_head", "BoxEncodingPredictor"), ("cls_head", "ClassPredictor")):
        for i, _ in enumerate(getattr(model.head, head)):
            ours, tf = f"head.{head}.{i}", f"BoxPredictor_{i}/{tf_head}"
            table[f"{ours}.depthwise.0.weight"] = (f"{tf}_depthwise/depthwise_weights", _depthwise)
            _bn(f"{tf}_depthwise", f"{ours}.depthwise.1", table)
            table[f"{ours}.pointwise.weight"] = (f"{tf}/weights", _conv)
            table[f"{ours}.pointwise.bias"] = (f"{tf}/biases", _same)
    return table


def map_weights(model: torch.nn.Module, graph: TFGraph, logit_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Our state dict filled from the graph's variables.

    Raises DataError listing TF tensors nothing maps to, parameters nothing fills and shape
    mismatches. A missing BatchNorm gamma (TF `scale: false`) is filled with ones. A logit scale
    s != 1 is folded into the class predictors (logits / s).
    """
    variables = graph.variables()
    table = tf_name_table(model)
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    unfilled, shapes = [], []
    for key, target in state.items():
        if key.endswith("num_batches_tracked"):
            out[key] = target.clone()
            continue
        if key not in table:
            unfilled.append(key)
            continue
        tf_name, convert = table[key]
        if tf_name not in variables:
            if tf_name.endswith("/BatchNorm/gamma") and tf_name.replace("/gamma", "/beta") in variables:
                out[key] = torch.ones_like(target)  # slim batch_norm(scale=False): gamma is 1
                continue
            unfilled.append(f"{key} (TF {tf_name})")
            continue
        value = convert(variables[tf_name])
        used.add(tf_name)
        if tuple(value.shape) != tuple(target.shape):
            shapes.append(f"{key} {tuple(target.shape)} vs TF {tf_name} {tuple(value.shape)}")
            continue
        out[key] = torch.from_numpy(np.ascontiguousarray(value)).to(target.dtype)
    unmapped = sorted(set(variables) - used)
    if unmapped or unfilled or shapes:
        parts = []
        if unmapped:
            parts.append(f"{len(unmapped)} unmapped TF tensors: {', '.join(unmapped[:8])}"
                         + (" ..." if len(unmapped) > 8 else ""))
        if unfilled:
            parts.append(f"{len(unfilled)} unfilled parameters: {', '.join(unfilled[:8])}"
                         + (" ..." if len(unfilled) > 8 else ""))
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches: {'; '.join(shapes[:4])}")
        raise DataError(graph.source, "graph does not match SSDLite-MobileNetV2: " + " | ".join(parts),
                        "only TF OD API ssdlite_mobilenet_v2 frozen graphs can be imported")
    if logit_scale != 1.0:
        for i, _ in enumerate(model.head.cls_head):
            for p in ("weight", "bias"):
                out[f"head.cls_head.{i}.pointwise.{p}"] = out[f"head.cls_head.{i}.pointwise.{p}"] / logit_scale
    return out


# ============================================================================= import
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

    "mnv2" is `mnv2.checkpoint.run_info("det", {"model": config}, meta)`, so tools/evaluate.py
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


# ============================================================================= TF preprocessing
def tf_resize_bilinear(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """TF1 `ResizeBilinear(align_corners=False, half_pixel_centers=False)`, as in TF OD API graphs.

    images: (B, C, H, W) float -> (B, C, h, w) float32. Source coordinate of output pixel i is
    i * (H / h) (no half-pixel offset, unlike torch/cv2), interpolated in float32 like TF's kernel.
    """
    x = images.to(torch.float32)
    H, W = x.shape[-2:]
    h, w = size

    def weights(n_out: int, n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scale = torch.tensor(n_in / n_out, dtype=torch.float32)
        src = torch.arange(n_out, dtype=torch.float32, device=x.device) * scale.to(x.device)
        lo = src.floor().long()
        hi = torch.clamp(lo + 1, max=n_in - 1)
        return lo, hi, src - lo.to(torch.float32)

    y0, y1, ly = weights(h, H)
    x0, x1, lx = weights(w, W)
    top_left, top_right = x[..., y0, :][..., x0], x[..., y0, :][..., x1]
    bottom_left, bottom_right = x[..., y1, :][..., x0], x[..., y1, :][..., x1]
    top = top_left + (top_right - top_left) * lx
    bottom = bottom_left + (bottom_right - bottom_left) * lx
    return top + (bottom - top) * ly[:, None]


def preprocess_photo(photo: np.ndarray, model: torch.nn.Module) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (1, 3, h, w) network input: TF resize, then the model's normalisation."""
    x = torch.from_numpy(np.ascontiguousarray(photo)).permute(2, 0, 1)[None].float()
    x = tf_resize_bilinear(x, model.image_size) / 255.0
    mean = torch.tensor(model.normalize_mean).view(1, 3, 1, 1)
    std = torch.tensor(model.normalize_std).view(1, 3, 1, 1)
    return (x - mean) / std


# ============================================================================= parity check
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
        try:
            import skimage.data

            photo = getattr(skimage.data, name)()
            if photo.ndim == 2:
                photo = np.repeat(photo[..., None], 3, axis=2)
            ours = preprocess_photo(photo[..., :3], model)
            d["input"] = (ours - x).abs().max().item()
        except ImportError:
            pass
        out[name] = d
    return out


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
        if from_photo:
            import skimage.data

            photo = getattr(skimage.data, name)()
            if photo.ndim == 2:
                photo = np.repeat(photo[..., None], 3, axis=2)
            x = preprocess_photo(photo[..., :3], model)
        elif f"{name}__input" in reference:
            x = torch.from_numpy(reference[f"{name}__input"]).permute(2, 0, 1)[None]
        else:
            continue
        det = model.postprocess(model(x), torch.tensor([[1.0, 1.0]]))[0]  # normalised boxes
        out[name] = match_detections(reference[f"{name}__detection_boxes"], reference[f"{name}__detection_scores"],
                                     det["boxes"].numpy(), det["scores"].numpy(), min_score)
    return out
