"""ExecuTorch export (.pte, XNNPACK delegate) with the contract inside the program.

torch.export (batch 1, or a dynamic batch up to ``max_batch``) -> the detection NMS custom op replaced by
the static-shape greedy NMS (:mod:`backbone.export.static_nms`) -> ``to_edge_transform_and_lower`` with the
XNNPACK partitioner (the convolutions and the NMS's float arithmetic; its max, gathers and top-k run on
ExecuTorch's portable kernels) -> ``.pte``.

The metadata JSON is a constant method of the program, ``mnv2_metadata`` (a string), so the file is
self-contained: :func:`load` reads it with ``executorch.runtime``. See :mod:`backbone.export` for the
common signature.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from backbone.errors import ArgumentError
from backbone.export.metadata import decode, encode

log = logging.getLogger(__name__)

METADATA_METHOD = "mnv2_metadata"
#: the default largest batch: 1, a static program (what a phone runs; dynamic shapes cost the unrolled NMS's
#: portable kernels their resizing on every call: 4.37 vs 2.15 ms, the default detector's NMS alone); ExecuTorch
#: plans memory for the largest batch
MAX_BATCH = 1
CALL_CHUNK = 8  # images per runtime call (see ExecuTorchModel.__call__)


def _export_program(module: torch.nn.Module, example: torch.Tensor, max_batch: int,
                    nms_steps: int | None) -> tuple[torch.export.ExportedProgram, dict[str, Any] | None]:
    from backbone.export.static_nms import contiguous_copy, decompose_nms, nms_settings

    nms = nms_settings(module, nms_steps)
    dynamic = None
    if int(max_batch) > 1:
        dynamic = {"images": {0: torch.export.Dim("batch", min=1, max=int(max_batch))}}
        if example.shape[0] == 1:  # torch.export specialises a size-1 dimension: trace with two images
            example = example.repeat(2, 1, 1, 1)
    else:
        example = example[:1]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        ep = torch.export.export(contiguous_copy(module), (example,), dynamic_shapes=dynamic)
        if nms is not None:
            ep = decompose_nms(ep, **nms)
    return ep, nms


def export(module: torch.nn.Module, example: torch.Tensor, metadata: dict[str, Any], output: Path, *,
           int8: bool = False, calibration: Iterable[np.ndarray] | None = None, max_batch: int = MAX_BATCH,
           nms_steps: int | None = None, calibrate_method: str = "minmax") -> Path:
    """Write ``output`` (.pte): input ``images`` (batch 1..``max_batch``), outputs ``metadata["outputs"]``.

    Options: ``max_batch`` (the largest batch the program accepts; 1, the default: static shapes, else
    a dynamic batch 1..max_batch), ``nms_steps`` (detection with
    NMS: the greedy NMS's unrolled steps, see :mod:`backbone.export.static_nms`). ``int8`` is refused
    (not implemented for this format yet); ``calibrate_method`` is accepted for the tool's sake.
    """
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    if int8:
        raise ArgumentError("int8", "is not implemented for the executorch format yet", "export fp32 (int8=false)")
    if int(max_batch) < 1:
        raise ArgumentError("max_batch", f"must be >= 1, got {max_batch}")
    output = Path(output)
    ep, nms = _export_program(module, example, max_batch, nms_steps)
    meta = {**metadata, "format": "executorch", "int8": False, "max_batch": int(max_batch)}
    if nms is not None:
        meta["static_nms"] = nms
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()],
                                           constant_methods={METADATA_METHOD: encode(meta)})
        program = edge.to_executorch()
    output.write_bytes(program.buffer)
    return output


class ExecuTorchModel:
    """An exported .pte run with ``executorch.runtime``: ``.metadata``, ``__call__(images) -> {name: array}``."""

    def __init__(self, path: str | Path) -> None:
        from executorch.runtime import Runtime

        self.path = Path(path)
        self.program = Runtime.get().load_program(str(self.path))
        if METADATA_METHOD not in self.program.method_names:
            raise ValueError(f"{path} has no '{METADATA_METHOD}' method (not written by backbone.export.executorch)")
        self.metadata: dict[str, Any] = decode(self.program.load_method(METADATA_METHOD).execute([])[0])
        self.method = self.program.load_method("forward")
        self.output_names = list(self.metadata["outputs"])

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """images: (B, 3, H, W) float32 RGB 0..255 -> {output name: array} (B <= metadata max_batch)."""
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        # Calls of 16+ images fail in executorch 1.5.1 (set_inputs error 0x10) although the program's batch
        # dimension is 1..max_batch (15 works: measured on a det .pte), so large batches run in chunks.
        chunk = max(1, min(CALL_CHUNK, int(self.metadata.get("max_batch", CALL_CHUNK))))
        chunks = [self.method.execute([c.contiguous()]) for c in torch.split(x, chunk)]
        # anchors (A, 4) have no batch dimension: the same in every call
        return {n: chunks[0][k].numpy() if n == "anchors" else np.concatenate([out[k].numpy() for out in chunks])
                for k, n in enumerate(self.output_names)}


def load(path: str | Path) -> ExecuTorchModel:
    return ExecuTorchModel(path)
