"""ONNX export (torch.onnx dynamo exporter, opset 18, dynamic batch) with the contract in ``metadata_props``.

The dynamo exporter (torch >= 2.9 default) is used: the detection wrapper's NMS is a custom op with
fixed output shapes lowered through ``custom_translation_table`` (the wrapper's ``onnx_translations()``),
so no data-dependent shape reaches torch.export. See :mod:`backbone.export` for the common signature.

OpenCV's ``cv2.dnn`` (4.x) reads a ``Resize`` only with constant sizes or scales; the exporter writes
the seg mask's resize as ``sizes = Concat(Shape(x)[:2], [H, W])`` (the batch is dynamic), which 4.14
refuses (``parseResize: HCHW layout is expected``). :func:`constant_resize_scales` rewrites such a
Resize to constant ``scales`` where the spatial sizes are static, leaving the output sizes (and ONNX
Runtime's outputs) unchanged. (OpenCV 4's Shape ignores opset 15's ``start`` / ``end``, hence its 6 sizes.)
OpenCV 4.10 / 4.14 also compute a depthwise 3x3 Conv (pads 1) of a 1x1 input wrong (errors of the
order of the outputs; 4.14 reads garbage for some channel counts): SSDLite's last head level.
:func:`center_tap_convs` gives such a Conv its one tap that meets the input, a 1x1 kernel, the same
function exactly.
"""
from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from backbone.export.metadata import METADATA_KEY, encode

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18


def export(module: torch.nn.Module, example: torch.Tensor, metadata: dict[str, Any], output: Path, *,
           int8: bool = False, calibration: Iterable[np.ndarray] | None = None, opset: int = DEFAULT_OPSET,
           calibrate_method: str = "minmax") -> Path:
    """Write ``output`` (.onnx): input ``images`` (B dynamic), outputs ``metadata["outputs"]``; with
    ``int8`` the fp32 graph is quantised (:func:`backbone.export.quantize.quantize_onnx`)."""
    import onnx

    if opset < 17:
        raise ValueError(f"opset must be >= 17, got {opset}")
    output = Path(output)
    module = module.eval()
    if example.shape[0] == 1:  # torch.export specialises a size-1 dim: a batch-1 example loses the dynamic batch
        example = example.repeat(2, 1, 1, 1)
    names = list(metadata["outputs"])
    translations = module.onnx_translations() if hasattr(module, "onnx_translations") else None
    for name in ("onnx_ir", "onnxscript", "torch.onnx"):  # their INFO lines drown the tool's output
        logging.getLogger(name).setLevel(logging.WARNING)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, (example,), dynamo=True, opset_version=opset, input_names=["images"], output_names=names,
            dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1, max=1024)}},
            custom_translation_table=translations, verbose=False, optimize=True)
    fp32 = center_tap_convs(constant_resize_scales(program.model_proto))
    meta = {**metadata, "format": "onnx", "int8": False, "opset": opset}
    _set_metadata(fp32, meta)
    if not int8:
        onnx.save(fp32, str(output))
        return output
    from backbone.export.quantize import SCHEME, quantize_onnx

    if calibration is None:
        raise ValueError("int8 export needs calibration images")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "fp32.onnx"
        onnx.save(fp32, str(src))
        quantize_onnx(src, output, calibration, calibrate_method=calibrate_method)
    q = onnx.load(str(output))
    _set_metadata(q, {**meta, "int8": True, "quantization": {**SCHEME, "calibrate_method": calibrate_method}})
    onnx.save(q, str(output))
    return output


def constant_resize_scales(model: Any) -> Any:
    """``model`` with every Resize whose ``sizes`` input is ``Concat(Shape(x)[0:2], constant [h, w])``, x of
    static spatial size (H, W), given constant ``scales [1, 1, s_h, s_w]`` instead: each s the smallest
    float32 >= h / H exactly, so that ``floor(H * s)`` -- ONNX's output size for scales -- is h whether a
    runtime multiplies in float32 or float64 (ONNX Runtime's shape inference does the latter: the float32
    nearest h / H from below would make it declare h - 1). align_corners sampling depends on the sizes
    only; half_pixel's on s, which is within 1e-7 relative of h / H."""
    import onnx
    from onnx import numpy_helper

    inferred = onnx.shape_inference.infer_shapes(model)
    dims = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}

    def const(name: str) -> np.ndarray | None:
        if name in inits:
            return inits[name]
        node = producer.get(name)
        if node is not None and node.op_type == "Constant":
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    for node in model.graph.node:
        if node.op_type != "Resize" or len(node.input) < 4 or not node.input[3]:
            continue
        cat = producer.get(node.input[3])
        if cat is None or cat.op_type != "Concat" or len(cat.input) != 2:
            continue
        shape_node, hw = producer.get(cat.input[0]), const(cat.input[1])
        x_dims = dims.get(node.input[0])
        if (shape_node is None or shape_node.op_type != "Shape" or shape_node.input[0] != node.input[0]
                or hw is None or hw.shape != (2,) or not x_dims or len(x_dims) != 4 or None in x_dims[2:]):
            continue
        scales = [1.0, 1.0]
        for size, out in zip(x_dims[2:], hw.tolist()):
            s = np.float32(out / size)
            while float(s) * size < out:  # exact: a float32 times a small int fits a float64
                s = np.nextafter(s, np.float32(np.inf))
            scales.append(float(s))
        name = node.name + "_scales"
        model.graph.initializer.append(numpy_helper.from_array(np.array(scales, np.float32), name))
        node.input[2], node.input[3] = name, ""
        del node.input[3]
    return model


def center_tap_convs(model: Any) -> Any:
    """``model`` with every Conv of a 1x1 input (static) and 1x1 output whose kernel is larger than 1x1
    given the one tap that meets the input (the others only ever see padding) as a 1x1 kernel without
    pads: the same function, and the form OpenCV 4's depthwise convolution computes right."""
    import onnx
    from onnx import numpy_helper

    inferred = onnx.shape_inference.infer_shapes(model)
    dims = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    inits = {i.name: i for i in model.graph.initializer}
    replaced = set()
    for node in model.graph.node:
        if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        x_dims, y_dims = dims.get(node.input[0]), dims.get(node.output[0])
        if not x_dims or not y_dims or len(x_dims) != 4 or x_dims[2:] != [1, 1] or y_dims[2:] != [1, 1]:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        weight = numpy_helper.to_array(inits[node.input[1]])
        kernel = list(weight.shape[2:])
        pads = list(attrs.get("pads", [0, 0, 0, 0]))
        dilations = list(attrs.get("dilations", [1, 1]))
        if kernel == [1, 1] or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            continue
        taps = [pads[i] // dilations[i] for i in range(2)]  # tap t meets input pixel 0 at t * d - pad = 0
        if any(pads[i] % dilations[i] or taps[i] >= kernel[i] for i in range(2)):
            continue  # no tap meets the input: left as is
        name = f"{node.input[1]}_tap{taps[0]}_{taps[1]}"
        if name not in inits:  # a weight two Convs share is cropped once
            inits[name] = numpy_helper.from_array(
                np.ascontiguousarray(weight[:, :, taps[0]:taps[0] + 1, taps[1]:taps[1] + 1]), name)
            model.graph.initializer.append(inits[name])
        replaced.add(node.input[1])
        node.input[1] = name
        kept = [a for a in node.attribute if a.name not in ("pads", "kernel_shape", "strides", "dilations")]
        del node.attribute[:]
        node.attribute.extend(kept)
        node.attribute.append(onnx.helper.make_attribute("kernel_shape", [1, 1]))
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    for init in [i for i in model.graph.initializer if i.name in replaced - used]:
        model.graph.initializer.remove(init)  # the 3x3 weights no Conv reads any more
    return model


def _set_metadata(model: Any, metadata: dict[str, Any]) -> None:
    for p in list(model.metadata_props):
        if p.key == METADATA_KEY:
            model.metadata_props.remove(p)
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, encode(metadata)


class OnnxModel:
    """An exported .onnx run with onnxruntime (CPU): ``.metadata``, ``__call__(images) -> {name: array}``."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        from backbone.export.metadata import decode

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        props = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in props:
            raise ValueError(f"{path} carries no '{METADATA_KEY}' metadata (not written by backbone.export.onnx)")
        self.metadata: dict[str, Any] = decode(props[METADATA_KEY])
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """images: (B, 3, H, W) float32 RGB 0..255 -> {output name: array}."""
        outs = self.session.run(None, {"images": np.ascontiguousarray(images, dtype=np.float32)})
        return dict(zip(self.output_names, outs))


def load(path: str | Path) -> OnnxModel:
    return OnnxModel(path)
