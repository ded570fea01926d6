"""TFLite's builtin custom op ``TFLite_Detection_PostProcess`` (decode + NMS in one native kernel) grafted
onto a converted network.

TF's own SSD exports end in this op, and every TFLite client registers it with the builtin ops (LiteRT /
tflite-runtime's ``BuiltinOpResolver``, MediaPipe Tasks, the TFLite Task Library): the detection runs in
native code instead of the unrolled static-shape NMS (:mod:`backbone.export.static_nms`), which
litert-torch lowers to a few hundred small ops. The converter cannot emit the op, so
:func:`graft_detection_postprocess` adds it to the flatbuffer after conversion.

What the kernel computes (``tflite/kernels/detection_postprocess.cc`` of LiteRT, read for this module),
with ``use_regular_nms`` (per-class NMS, as :class:`mnv2det.postprocess.PostProcessor`):

- decode in double: ``ycenter = ty / y_scale * ha + ya``, ``h = exp(th / h_scale) * ha`` (likewise x, w);
  anchors are ``(ycenter, xcenter, h, w)`` normalised;
- per class: candidates with ``score >= nms_score_threshold``, stably sorted by score, greedy NMS
  suppressing ``IoU > nms_iou_threshold`` (0 for a box of area <= 0), at most ``detections_per_class``;
  then the top ``max_detections`` over the classes; boxes are not clipped.

**One op per class.** The regular NMS's multi-threaded path hands classes to its threads with
``std::atomic<int> next_col(num_threads)`` and ``col = (++next_col)``: the first class a thread takes
after its own is ``num_threads + 1``, so class ``num_threads`` is never processed. Measured here
(ai-edge-litert 2.3, the default detector, 6 classes): with 2 threads the third class's detections are
all missing (mAP 0.262 instead of 0.299); with 1 thread they are right. A client picks its own thread
count, so the file cannot avoid that class; instead each class gets its own op (``num_classes`` 1: the
first thread does it, whatever their number), on its own (1, A, 1) slice of the scores. A small tail
graph (converted by litert-torch like the network) merges the per-class results: clip to the image,
drop boxes the clip empties, top ``max_detections`` by score. Each op keeps ``max_detections +
EMPTY_MARGIN`` boxes, so the result is exact unless more than that margin of one class's kept boxes
lie wholly outside the image (as :mod:`backbone.export.static_nms`).
"""
from __future__ import annotations

from typing import Any

import numpy as np

OP_NAME = "TFLite_Detection_PostProcess"
_CUSTOM = 32  # BuiltinOperator.CUSTOM
_FLOAT32 = 0  # TensorType.FLOAT32


def op_options(*, max_detections: int, iou_threshold: float, score_threshold: float,
               scales: tuple[float, float, float, float]) -> dict[str, Any]:
    """The flexbuffer options (the names the op's ``Init`` reads) of a one-class op keeping
    ``max_detections`` boxes; ``scales``: the (y, x, h, w) code scales."""
    y, x, h, w = (float(s) for s in scales)
    return {"max_detections": int(max_detections), "max_classes_per_detection": 1,
            "detections_per_class": int(max_detections), "use_regular_nms": True,
            "nms_score_threshold": float(score_threshold), "nms_iou_threshold": float(iou_threshold),
            "num_classes": 1, "y_scale": y, "x_scale": x, "h_scale": h, "w_scale": w}


def graft_detection_postprocess(network: bytes, tail: bytes, anchors: np.ndarray, options: dict[str, Any]) -> bytes:
    """One model: ``network`` -> one ``TFLite_Detection_PostProcess`` per class -> ``tail``.

    network: one subgraph, outputs ``codes (1, A, 4)`` (ty, tx, th, tw) then the K classes' scores, each
    ``(1, A, 1)``; anchors: (A, 4) float32 (ycenter, xcenter, h, w) normalised; options: :func:`op_options`
    (D = its ``max_detections``); tail: one subgraph whose 3K inputs are the K ops' boxes (1, D, 4), then
    their scores (1, D), then their counts (1,); its outputs become the model's.
    """
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema
    from flatbuffers import flexbuffers

    m = schema.ModelT.InitFromPackedBuf(bytearray(network), 0)
    t = schema.ModelT.InitFromPackedBuf(bytearray(tail), 0)
    if len(m.subgraphs) != 1 or len(t.subgraphs) != 1:
        raise ValueError(f"expected one subgraph each, found {len(m.subgraphs)} and {len(t.subgraphs)}")
    sg, tsg = m.subgraphs[0], t.subgraphs[0]
    codes, *scores = (int(i) for i in sg.outputs)
    K, A = len(scores), int(sg.tensors[codes].shape[1])
    anchors = np.ascontiguousarray(anchors, dtype=np.float32)
    if anchors.shape != (A, 4):
        raise ValueError(f"anchors must be ({A}, 4), got {anchors.shape}")
    if len(tsg.inputs) != 3 * K:
        raise ValueError(f"the tail must take 3 x {K} inputs, takes {len(tsg.inputs)}")
    D = int(options["max_detections"])

    def new_tensor(name: str, shape: list[int], data: np.ndarray | None = None) -> int:
        tensor = schema.TensorT()
        tensor.name, tensor.shape, tensor.type, tensor.buffer = name.encode(), np.array(shape, np.int32), _FLOAT32, 0
        if data is not None:  # a constant: its own buffer (buffer 0 is every model's empty one)
            b = schema.BufferT()
            b.data = np.frombuffer(data.tobytes(), np.uint8)
            m.buffers.append(b)
            tensor.buffer = len(m.buffers) - 1
        sg.tensors.append(tensor)
        return len(sg.tensors) - 1

    code = schema.OperatorCodeT()
    code.builtinCode, code.deprecatedBuiltinCode, code.version, code.customCode = _CUSTOM, _CUSTOM, 1, OP_NAME.encode()
    m.operatorCodes.append(code)
    post_code = len(m.operatorCodes) - 1
    flex = np.frombuffer(flexbuffers.Dumps(options), np.uint8)
    anchor_t = new_tensor("anchors", [A, 4], anchors)
    boxes, det_scores, counts = [], [], []
    for c, s in enumerate(scores):
        outs = [new_tensor(f"class{c}_boxes", [1, D, 4]), new_tensor(f"class{c}_classes", [1, D]),
                new_tensor(f"class{c}_scores", [1, D]), new_tensor(f"class{c}_count", [1])]
        op = schema.OperatorT()
        op.opcodeIndex, op.inputs, op.outputs = post_code, np.array([codes, s, anchor_t], np.int32), np.array(outs, np.int32)
        op.customOptions, op.customOptionsFormat = flex, 0  # FLEXBUFFERS
        sg.operators.append(op)
        boxes.append(outs[0]), det_scores.append(outs[2]), counts.append(outs[3])
    outputs = _splice(m, sg, t, tsg, boxes + det_scores + counts)
    sg.outputs = np.array(outputs, np.int32)
    for sig in m.signatureDefs or []:
        sig.outputs = []
        for k, idx in enumerate(outputs):
            entry = schema.TensorMapT()
            entry.name, entry.tensorIndex = f"output_{k}".encode(), int(idx)
            sig.outputs.append(entry)
    builder = flatbuffers.Builder(len(network) + len(tail) + anchors.nbytes + 4096)
    builder.Finish(m.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _splice(m: Any, sg: Any, t: Any, tsg: Any, feeds: list[int]) -> list[int]:
    """Append the tail model ``t`` (subgraph ``tsg``) to ``m``'s subgraph ``sg``, its inputs fed by the
    tensors ``feeds`` of ``sg``; returns the indices in ``sg`` of the tail's outputs."""
    buffer_of = {0: 0}
    for i, b in enumerate(t.buffers):
        if i:
            m.buffers.append(b)
            buffer_of[i] = len(m.buffers) - 1
    for i, f in zip(tsg.inputs, feeds):
        if list(tsg.tensors[int(i)].shape) != list(sg.tensors[f].shape):
            raise ValueError(f"tail input {tsg.tensors[int(i)].name!r} {list(tsg.tensors[int(i)].shape)} cannot take "
                             f"{sg.tensors[f].name!r} {list(sg.tensors[f].shape)}")
    tensor_of = {int(i): f for i, f in zip(tsg.inputs, feeds)}
    for i, tensor in enumerate(tsg.tensors):
        if i not in tensor_of:
            tensor.buffer = buffer_of[int(tensor.buffer)]
            sg.tensors.append(tensor)
            tensor_of[i] = len(sg.tensors) - 1
    code_of = {}
    for i, c in enumerate(t.operatorCodes):
        key = (max(int(c.builtinCode), int(c.deprecatedBuiltinCode)), c.customCode, int(c.version))
        same = [j for j, d in enumerate(m.operatorCodes)
                if (max(int(d.builtinCode), int(d.deprecatedBuiltinCode)), d.customCode, int(d.version)) == key]
        if not same:
            m.operatorCodes.append(c)
            same = [len(m.operatorCodes) - 1]
        code_of[i] = same[0]
    remap = lambda idx: None if idx is None else np.array([tensor_of[int(i)] if int(i) >= 0 else -1 for i in idx], np.int32)  # noqa: E731
    for op in tsg.operators:
        op.opcodeIndex = code_of[int(op.opcodeIndex)]
        op.inputs, op.outputs, op.intermediates = remap(op.inputs), remap(op.outputs), remap(op.intermediates)
        sg.operators.append(op)
    return [tensor_of[int(i)] for i in tsg.outputs]
