"""Post-training static int8 quantisation of an ONNX graph with onnxruntime.

What runs int8: the NETWORK, i.e. every node on a path from one Conv to another (the convolutions, their
ReLU6 clips, the residual adds, the seg head's pooling, resize and concat), so activations stay int8 from
the first convolution to the last. The input normalisation before it and everything after the last
convolutions -- score conversion, box decoding, NMS, the seg logits' resize -- stay float32 (quantising
exp / decode would move every box by a quantisation step).

Form: ``QOperator`` (QLinearConv, QLinearAdd, ...) with uint8 activations and int8 per-channel weights
(U8S8). Measured on this project's default detector, onnxruntime 1.32, 2-core AVX-512 VNNI CPU: the
former setting (QDQ, int8 activations, Conv only) ran *slower* than fp32 (14.0 vs 8.7 ms): ONNX Runtime
fuses QDQ Conv into its int8 kernels only for U8S8 / U8U8 on x86, so the S8S8 convolutions ran as
dequantise -> fp32 Conv -> quantise, and the clips and adds between them in fp32 added conversions.
Activations are calibrated on images the caller draws from the TRAINING data.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

CALIBRATE_METHODS = ("minmax", "entropy", "percentile")
#: the quantisation written into the file's metadata
SCHEME = {"format": "QOperator", "activations": "uint8 per-tensor (asymmetric)", "weights": "int8 per-channel",
          "per_channel": True}


class _Reader:
    """onnxruntime CalibrationDataReader over (1, 3, H, W) float32 arrays."""

    def __init__(self, images: Iterable[np.ndarray]) -> None:
        self._it: Iterator[np.ndarray] = iter(images)

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self._it, None)
        return None if x is None else {"images": np.ascontiguousarray(x, dtype=np.float32)}


def network_nodes(model: Any) -> list[Any]:
    """The nodes of ``model`` (onnx ModelProto) on a path from a Conv to a Conv, Convs included."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    convs = [n for n in graph.node if n.op_type == "Conv"]

    def reach(start: list[Any], step) -> set[int]:
        seen, todo = set(), list(start)
        while todo:
            n = todo.pop()
            if id(n) in seen:
                continue
            seen.add(id(n))
            todo.extend(step(n))
        return seen

    after = reach(convs, lambda n: [c for o in n.output for c in consumers.get(o, [])])
    before = reach(convs, lambda n: [producer[i] for i in n.input if i in producer])
    return [n for n in graph.node if id(n) in after and id(n) in before]


def quantize_onnx(src: Path, dst: Path, calibration: Iterable[np.ndarray], calibrate_method: str = "minmax") -> Path:
    """Quantise ``src`` (fp32 .onnx) into ``dst`` calibrating on ``calibration`` images."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if calibrate_method not in CALIBRATE_METHODS:
        raise ValueError(f"calibrate_method must be one of {list(CALIBRATE_METHODS)}, got {calibrate_method!r}")
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[calibrate_method]
    nodes = network_nodes(onnx.load(str(src)))
    if any(not n.name for n in nodes):
        raise ValueError(f"{src}: unnamed nodes; cannot restrict quantisation to the network")
    quantize_static(str(src), str(dst), _Reader(calibration), quant_format=QuantFormat.QOperator, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=method,
                    op_types_to_quantize=sorted({n.op_type for n in nodes}), nodes_to_quantize=[n.name for n in nodes])
    return Path(dst)
