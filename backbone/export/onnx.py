"""ONNX export (torch.onnx dynamo exporter, opset 18, dynamic batch) with the contract in ``metadata_props``.

The dynamo exporter (torch >= 2.9 default) is used: the detection wrapper's NMS is a custom op with
fixed output shapes lowered through ``custom_translation_table`` (the wrapper's ``onnx_translations()``),
so no data-dependent shape reaches torch.export. See :mod:`backbone.export` for the common signature.
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
    fp32 = program.model_proto
    meta = {**metadata, "format": "onnx", "int8": False, "opset": opset}
    _set_metadata(fp32, meta)
    if not int8:
        onnx.save(fp32, str(output))
        return output
    from backbone.export.quantize import quantize_onnx

    if calibration is None:
        raise ValueError("int8 export needs calibration images")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "fp32.onnx"
        onnx.save(fp32, str(src))
        quantize_onnx(src, output, calibration, calibrate_method=calibrate_method)
    q = onnx.load(str(output))
    _set_metadata(q, {**meta, "int8": True, "quantization": {"format": "QDQ", "per_channel": True,
                                                             "calibrate_method": calibrate_method}})
    onnx.save(q, str(output))
    return output


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
