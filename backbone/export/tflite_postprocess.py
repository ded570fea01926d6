"""TFLite's builtin custom op ``TFLite_Detection_PostProcess`` (decode + class-wise NMS, native C++) grafted
onto a converted network.

TF's own SSD exports end in this op, and every TFLite client registers it with the builtin ops (LiteRT /
tflite-runtime's ``BuiltinOpResolver``, MediaPipe Tasks, the TFLite Task Library): the detection runs in
one native kernel instead of the unrolled static-shape NMS (:mod:`backbone.export.static_nms`) that
litert-torch would otherwise lower to a few hundred small ops. The converter cannot emit the op, so
:func:`append_detection_postprocess` adds it to the flatbuffer after conversion: the network's two
outputs (box codes, class scores) feed it with a constant anchor tensor, and its four outputs (clipped
to the image by a MAXIMUM / MINIMUM pair) become the model's outputs, in the op's order (locations,
classes, scores, count: what the TFLite Support metadata and MediaPipe read).

What the kernel computes (``tensorflow/lite/kernels/detection_postprocess.cc``, read for this module),
with ``use_regular_nms`` (per-class NMS, as :class:`mnv2det.postprocess.PostProcessor`):

- decode in double: ``ycenter = ty / y_scale * ha + ya``, ``h = exp(th / h_scale) * ha`` (likewise x, w);
  anchors are ``(ycenter, xcenter, h, w)`` normalised;
- per class: candidates with ``score >= nms_score_threshold``, stably sorted by score, greedy NMS
  suppressing ``IoU > nms_iou_threshold`` (0 for a box of area <= 0), at most ``detections_per_class``;
- the top ``max_detections`` over the classes; ``classes`` is the 0-based column (``num_classes`` = the
  score tensor's width: no background column); boxes are NOT clipped (the MAXIMUM / MINIMUM here do it).
"""
from __future__ import annotations

from typing import Any

import numpy as np

OP_NAME = "TFLite_Detection_PostProcess"
_CUSTOM, _MAXIMUM, _MINIMUM = 32, 55, 57  # BuiltinOperator codes
_MAXIMUM_MINIMUM_OPTIONS = 39  # BuiltinOptions.MaximumMinimumOptions
_FLOAT32 = 0  # TensorType.FLOAT32


def op_options(*, max_detections: int, iou_threshold: float, score_threshold: float, num_classes: int,
               scales: tuple[float, float, float, float]) -> dict[str, Any]:
    """The op's flexbuffer options (the names its ``Init`` reads); ``scales``: (y, x, h, w) code scales."""
    y, x, h, w = (float(s) for s in scales)
    return {"max_detections": int(max_detections), "max_classes_per_detection": 1,
            "detections_per_class": int(max_detections), "use_regular_nms": True,
            "nms_score_threshold": float(score_threshold), "nms_iou_threshold": float(iou_threshold),
            "num_classes": int(num_classes), "y_scale": y, "x_scale": x, "h_scale": h, "w_scale": w}


def append_detection_postprocess(model: bytes, anchors: np.ndarray, options: dict[str, Any]) -> bytes:
    """``model`` (one subgraph, outputs ``codes (1, A, 4)`` (ty, tx, th, tw) and ``scores (1, A, K)``) with
    ``TFLite_Detection_PostProcess`` appended; its outputs ``locations (1, D, 4)`` (ymin, xmin, ymax, xmax
    in 0..1, clipped), ``classes (1, D)``, ``scores (1, D)``, ``count (1,)`` replace the model's.

    anchors: (A, 4) float32 (ycenter, xcenter, h, w) normalised; options: :func:`op_options`.
    """
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema
    from flatbuffers import flexbuffers

    m = schema.ModelT.InitFromPackedBuf(bytearray(model), 0)
    if len(m.subgraphs) != 1:
        raise ValueError(f"expected one subgraph, found {len(m.subgraphs)}")
    sg = m.subgraphs[0]
    if len(sg.outputs) != 2:
        raise ValueError(f"expected the network's 2 outputs (codes, scores), found {len(sg.outputs)}")
    codes, scores = (int(i) for i in sg.outputs)
    A = int(sg.tensors[codes].shape[1])
    anchors = np.ascontiguousarray(anchors, dtype=np.float32)
    if anchors.shape != (A, 4):
        raise ValueError(f"anchors must be ({A}, 4), got {anchors.shape}")
    D = int(options["max_detections"])

    def buffer(data: np.ndarray | None) -> int:
        b = schema.BufferT()
        if data is not None:
            b.data = np.frombuffer(np.ascontiguousarray(data, np.float32).tobytes(), np.uint8)
        m.buffers.append(b)
        return len(m.buffers) - 1

    def tensor(name: str, shape: list[int], data: np.ndarray | None = None) -> int:
        t = schema.TensorT()
        t.name, t.shape, t.type = name.encode(), np.array(shape, np.int32), _FLOAT32
        t.buffer = buffer(data) if data is not None else 0  # buffer 0: the empty one of every model
        sg.tensors.append(t)
        return len(sg.tensors) - 1

    def opcode(builtin: int, custom: str | None = None) -> int:
        for i, c in enumerate(m.operatorCodes):
            if max(int(c.builtinCode), int(c.deprecatedBuiltinCode)) == builtin and (
                    custom is None or (c.customCode or b"").decode() == custom):
                return i
        c = schema.OperatorCodeT()
        c.builtinCode, c.deprecatedBuiltinCode, c.version = builtin, builtin, 1
        if custom is not None:
            c.customCode = custom.encode()
        m.operatorCodes.append(c)
        return len(m.operatorCodes) - 1

    def operator(code: int, inputs: list[int], outputs: list[int]) -> schema.OperatorT:
        op = schema.OperatorT()
        op.opcodeIndex, op.inputs, op.outputs = code, np.array(inputs, np.int32), np.array(outputs, np.int32)
        sg.operators.append(op)
        return op

    anchor_t = tensor("anchors", [A, 4], anchors)
    raw_loc = tensor("detection_boxes_unclipped", [1, D, 4])
    classes, det_scores, count = (tensor("classes", [1, D]), tensor("scores", [1, D]), tensor("count", [1]))
    post = operator(opcode(_CUSTOM, OP_NAME), [codes, scores, anchor_t], [raw_loc, classes, det_scores, count])
    post.customOptions = np.frombuffer(flexbuffers.Dumps(options), np.uint8)
    post.customOptionsFormat = 0  # FLEXBUFFERS
    zero, one = tensor("zero", [], np.zeros((), np.float32)), tensor("one", [], np.ones((), np.float32))
    above = tensor("detection_boxes_above_0", [1, D, 4])
    locations = tensor("locations", [1, D, 4])
    for code, ins, out in ((_MAXIMUM, [raw_loc, zero], above), (_MINIMUM, [above, one], locations)):
        op = operator(opcode(code), ins, [out])
        op.builtinOptionsType, op.builtinOptions = _MAXIMUM_MINIMUM_OPTIONS, schema.MaximumMinimumOptionsT()
    sg.outputs = np.array([locations, classes, det_scores, count], np.int32)
    for sig in m.signatureDefs or []:
        outs = []
        for k, idx in enumerate(sg.outputs):
            t = schema.TensorMapT()
            t.name, t.tensorIndex = f"output_{k}".encode(), int(idx)
            outs.append(t)
        sig.outputs = outs
    builder = flatbuffers.Builder(len(model) + anchors.nbytes + 4096)
    builder.Finish(m.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())
