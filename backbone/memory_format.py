"""The ``memory_format`` model option: the tensor layout the networks run in.

``channels_last`` (NHWC) lets oneDNN / cuDNN run the depthwise-separable convs without layout
reorders. The default: a quick try on a quiet 2-thread CPU gave the SSDLite train step 8.6 img/s
channels_last vs 7.2 contiguous; in-process A/B runs on a loaded machine were mixed (Mobile DeepLab
train step faster, eval slower), so re-check with ``tools/benchmark.py model.memory_format=contiguous``.
Values are the same up to float rounding (tests/test_fast_paths.py).
"""
from __future__ import annotations

import torch

from backbone.errors import ArgumentError

MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def resolve_memory_format(name: str) -> torch.memory_format:
    """``channels_last`` | ``contiguous`` -> the torch memory format (ArgumentError ``memory_format`` otherwise)."""
    if name not in MEMORY_FORMATS:
        raise ArgumentError("memory_format", f"must be one of {list(MEMORY_FORMATS)}, got {name!r}",
                            "channels_last (faster on CPU and GPU) or contiguous")
    return MEMORY_FORMATS[name]
