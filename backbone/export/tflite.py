"""TFLite (LiteRT) export with litert-torch, run with ai-edge-litert's interpreter.

torch.export -> the detection NMS custom op replaced by the static-shape greedy NMS
(:mod:`backbone.export.static_nms`) -> ``litert_torch.convert`` -> ``.tflite``. The graph has a fixed
batch of 1 (what a phone runs); :func:`load`'s model runs a batch image by image. litert-torch
downcasts int64 to int32 (``enable_x64=False``, what on-device runtimes support): the loader casts
labels / num_detections / mask back to int64, as the contract says.

The metadata JSON is in the flatbuffer's own ``metadata`` table (name ``mnv2``), so the file is
self-contained. A mobile-layout file (:mod:`backbone.export.layout`, the tool's default for this
format) also carries the TFLite Support metadata that MediaPipe and the Task Library read
(:mod:`backbone.export.tflite_support`). See :mod:`backbone.export` for the common signature.
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from backbone.errors import ArgumentError
from backbone.export.layout import from_mobile, to_file_input
from backbone.export.metadata import METADATA_KEY, decode, encode

log = logging.getLogger(__name__)

#: detection NMS inside a .tflite: TFLite's native custom op, or the static-shape greedy NMS in plain ops
NMS_OPS = ("detection_postprocess", "static")


def export(module: torch.nn.Module, example: torch.Tensor, metadata: dict[str, Any], output: Path, *,
           int8: bool = False, calibration: Iterable[np.ndarray] | None = None, nms_steps: int | None = None,
           nms_op: str = "detection_postprocess", calibrate_method: str = "minmax") -> Path:
    """Write ``output`` (.tflite): input ``images`` (1, 3, H, W), outputs ``metadata["outputs"]``.

    Options: ``nms_op`` (detection with NMS inside): ``detection_postprocess`` ends a mobile-layout file in
    TFLite's native ``TFLite_Detection_PostProcess`` (:mod:`backbone.export.tflite_postprocess`) where the
    wrapper's post-processing allows it, else (and with ``static``) the static NMS, whose ``nms_steps``:
    see :mod:`backbone.export.static_nms`. ``int8`` is refused (not implemented for this format yet);
    ``calibrate_method`` is accepted for the tool's sake.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import litert_torch

    from backbone.export.static_nms import contiguous_copy, decompose_nms, nms_settings

    if int8:
        raise ArgumentError("int8", "is not implemented for the tflite format yet", "export fp32 (int8=false)")
    if nms_op not in NMS_OPS:
        raise ArgumentError("nms_op", f"must be one of {list(NMS_OPS)}, got {nms_op!r}",
                            "options.nms_op=detection_postprocess (native, fast) or static")
    output = Path(output)
    post = None
    if nms_op == "detection_postprocess" and hasattr(module, "tflite_postprocess_op"):
        post = module.tflite_postprocess_op()
    nms = None if post is not None else nms_settings(module, nms_steps)
    example = example[:1]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.export.export(contiguous_copy(post["network"] if post is not None else module), (example,))
        if nms is not None:
            program = decompose_nms(program, **nms)
        # litert-torch 0.10 lowers expand to a BROADCAST_TO that fails in the interpreter ("Output shape
        # must be broadcastable from input shape", the seg head's image-pooling branch): an ADD broadcasts
        program = program.run_decompositions({torch.ops.aten.expand.default: _expand_by_add})
        edge = litert_torch.convert(program.module(), (example,))
        if post is not None:
            tail = litert_torch.convert(post["tail"], post["tail_example"]).model_content()
    meta = {**metadata, "format": "tflite", "int8": False, "batch": 1}
    if nms is not None:
        meta["static_nms"] = nms
    content = edge.model_content()
    if post is not None:
        from backbone.export.tflite_postprocess import OP_NAME, graft_detection_postprocess

        content = graft_detection_postprocess(content, tail, post["anchors"], post["options"])
        meta["nms_op"] = {"op": OP_NAME, "per_class": True, "keep_per_class": post["options"]["max_detections"]}
    if meta.get("layout") == "mobile":
        content = order_output_tensors(content)
    content = add_metadata(content, encode(meta))
    if meta.get("layout") == "mobile":
        content = _with_support_metadata(content, meta)
    output.write_bytes(content)
    return output


def _with_support_metadata(content: bytes, meta: dict[str, Any]) -> bytes:
    from backbone.export import tflite_support

    if not tflite_support.available():
        log.warning("mediapipe is not installed: the file has no TFLite Support metadata, so MediaPipe and the "
                    "Task Library will refuse it (pip install -e '.[export]')")
        return content
    try:
        return tflite_support.add_support_metadata(content, meta)
    except ValueError as e:
        log.warning("no TFLite Support metadata written: %s", e)
        return content


def _expand_by_add(x: torch.Tensor, size: list[int], implicit: bool = False) -> torch.Tensor:
    shape = [x.shape[i - (len(size) - x.dim())] if s == -1 else s for i, s in enumerate(size)]
    return x + torch.zeros(shape, dtype=x.dtype, device=x.device)


def order_output_tensors(model: bytes) -> bytes:
    """``model`` with its subgraph's tensors renumbered so that the outputs' tensor indices increase in
    output order. The TFLite Support writers and TF's detection post-processing convention give
    the output roles by tensor index (location, category, score, count: the ports of
    ``TFLITE_DETECTION_POST_PROCESS``), whereas the converter numbers tensors as it meets them."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    m = schema.ModelT.InitFromPackedBuf(bytearray(model), 0)
    if len(m.subgraphs) != 1:
        raise ValueError(f"expected one subgraph, found {len(m.subgraphs)}")
    sg = m.subgraphs[0]
    old = [int(i) for i in sg.outputs]
    if old == sorted(old):
        return model
    new_of = dict(zip(old, sorted(old)))  # a permutation of the output tensors' indices only
    renumber = lambda idx: None if idx is None else [new_of.get(int(i), int(i)) for i in idx]  # noqa: E731
    tensors = list(sg.tensors)
    for o, n in new_of.items():
        tensors[n] = sg.tensors[o]
    sg.tensors = tensors
    for op in sg.operators:
        op.inputs, op.outputs, op.intermediates = renumber(op.inputs), renumber(op.outputs), renumber(op.intermediates)
    sg.inputs, sg.outputs = renumber(sg.inputs), renumber(sg.outputs)
    for sig in m.signatureDefs or []:
        for t in (sig.inputs or []) + (sig.outputs or []):
            t.tensorIndex = new_of.get(int(t.tensorIndex), int(t.tensorIndex))
    builder = flatbuffers.Builder(len(model) + 1024)
    builder.Finish(m.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def add_metadata(model: bytes, text: str, name: str = METADATA_KEY) -> bytes:
    """The .tflite flatbuffer ``model`` with ``text`` in its metadata table under ``name``."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    m = schema.ModelT.InitFromPackedBuf(bytearray(model), 0)
    buf = schema.BufferT()
    buf.data = np.frombuffer(text.encode(), np.uint8)
    m.buffers.append(buf)
    entry = schema.MetadataT()
    entry.name, entry.buffer = name.encode(), len(m.buffers) - 1
    m.metadata = [e for e in (m.metadata or []) if e.name != name.encode()] + [entry]
    builder = flatbuffers.Builder(len(model) + len(text) + 1024)
    builder.Finish(m.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def read_metadata(model: bytes, name: str = METADATA_KEY) -> str | None:
    """The text stored under ``name`` in a .tflite flatbuffer's metadata table (None if absent)."""
    from ai_edge_litert import schema_py_generated as schema

    m = schema.Model.GetRootAs(model, 0)
    for i in range(m.MetadataLength()):
        entry = m.Metadata(i)
        if entry.Name() == name.encode():
            return m.Buffers(entry.Buffer()).DataAsNumpy().tobytes().decode()
    return None


class TFLiteModel:
    """An exported .tflite run with ai-edge-litert: ``.metadata``, ``__call__(images) -> {name: array}``."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.path = Path(path)
        data = self.path.read_bytes()
        text = read_metadata(data)
        if text is None:
            raise ValueError(f"{path} carries no '{METADATA_KEY}' metadata (not written by backbone.export.tflite)")
        self.metadata: dict[str, Any] = decode(text)
        # LiteRT runs one thread unless told (measured: the default det network 6.3 ms on 1 thread, 3.2 ms on 2);
        # every core, as ONNX Runtime and ExecuTorch use by default
        self.threads = int(threads or os.cpu_count() or 1)
        self.interpreter = Interpreter(model_content=data, num_threads=self.threads)
        self.interpreter.allocate_tensors()
        self.runner = self.interpreter.get_signature_runner()
        self.input_name = next(iter(self.runner.get_input_details()))
        # the signature names outputs output_0..; the metadata names them in order
        keys = sorted(self.runner.get_output_details(), key=lambda k: int(k.rsplit("_", 1)[-1]))
        self.output_keys = dict(zip(self.metadata["outputs"], keys))

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """images: (B, 3, H, W) float32 RGB 0..255 -> {name: array} (int outputs as int64), in the nchw
        contract's names and forms whatever the file's layout."""
        images = to_file_input(images, self.metadata)
        per_image = [self.runner(**{self.input_name: images[i:i + 1]}) for i in range(len(images))]
        out = {}
        for name, key in self.output_keys.items():
            if name == "anchors":  # (A, 4): the same for every image, no batch dimension
                out[name] = per_image[0][key]
                continue
            batched = np.concatenate([r[key] for r in per_image])
            out[name] = batched.astype(np.int64) if np.issubdtype(batched.dtype, np.integer) else batched
        return from_mobile(out, self.metadata)


def load(path: str | Path) -> TFLiteModel:
    return TFLiteModel(path)
