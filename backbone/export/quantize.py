"""Post-training static int8 quantisation of an ONNX graph with onnxruntime (QDQ, per-channel weights).

Only the network's Conv / MatMul / Gemm are quantised: the normalisation, the score conversion, box
decoding and NMS stay float32 (quantising exp/decode would move every box by a quantisation step).
Activations are calibrated on images the caller draws from the TRAINING data.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

CALIBRATE_METHODS = ("minmax", "entropy", "percentile")
QUANTIZED_OPS = ["Conv", "MatMul", "Gemm"]


class _Reader:
    """onnxruntime CalibrationDataReader over (1, 3, H, W) float32 arrays."""

    def __init__(self, images: Iterable[np.ndarray]) -> None:
        self._it: Iterator[np.ndarray] = iter(images)

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self._it, None)
        return None if x is None else {"images": np.ascontiguousarray(x, dtype=np.float32)}


def quantize_onnx(src: Path, dst: Path, calibration: Iterable[np.ndarray], calibrate_method: str = "minmax") -> Path:
    """Quantise ``src`` (fp32 .onnx) into ``dst`` calibrating on ``calibration`` images."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if calibrate_method not in CALIBRATE_METHODS:
        raise ValueError(f"calibrate_method must be one of {list(CALIBRATE_METHODS)}, got {calibrate_method!r}")
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[calibrate_method]
    quantize_static(str(src), str(dst), _Reader(calibration), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, calibrate_method=method,
                    op_types_to_quantize=QUANTIZED_OPS, extra_options={"ActivationSymmetric": False})
    return Path(dst)
