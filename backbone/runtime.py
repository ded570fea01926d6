"""Process-wide settings every tool applies before it runs (the ``runtime`` config group).

``cpu_allocator: tuned`` sets three glibc ``malloc`` parameters: no ``mmap`` (every block comes
from the heap), no trimming of the heap, and heap growth in 256 MiB steps. By default glibc serves
each large block with a fresh ``mmap`` and hands freed memory back to the kernel, so every training
step faults in and zeroes new pages for its large activations. Keeping the memory helps our train
steps far more than torchvision's (they have larger activations): SSDLite train 0.91x torchvision's
with ``default``, 1.18x-1.33x with ``tuned``; Mobile DeepLab vs LR-ASPP 1.27x vs 1.37x-1.71x, on
the 2-core CPU (``python tools/benchmark.py task=det|seg threads=2 runtime.cpu_allocator=...``;
README "Speed"). The price: the process keeps its peak memory instead of shrinking between steps.
Other platforms and allocators (musl, macOS, Windows; jemalloc/tcmalloc preloaded) are left alone.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform
from typing import Any

from backbone.errors import ConfigError

log = logging.getLogger("mnv2")

CPU_ALLOCATORS = ("tuned", "default")
# mallopt(3) parameter numbers (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
_TOP_PAD = 256 << 20         # grow the heap in 256 MiB steps
_TRIM_THRESHOLD = 2**31 - 1  # never give the top of the heap back
_applied: dict[str, Any] = {"cpu_allocator": "default"}


def tune_cpu_allocator() -> bool:
    """Keep freed memory in glibc's heap for reuse (see the module docstring). True when applied."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = all(mallopt(p, v) == 1 for p, v in ((_M_MMAP_MAX, 0), (_M_TOP_PAD, _TOP_PAD),
                                             (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)))
    if not ok:
        log.warning("cpu_allocator=tuned: glibc refused a mallopt setting; the allocator may be half-tuned")
    return ok


def apply_runtime(runtime: Any) -> dict[str, Any]:
    """Apply the ``runtime`` config node (None: nothing); returns what was applied."""
    if runtime is None:
        return {}
    choice = str(runtime.get("cpu_allocator", "default"))
    if choice not in CPU_ALLOCATORS:
        raise ConfigError("runtime.cpu_allocator", f"must be one of {list(CPU_ALLOCATORS)}, got {choice!r}",
                          "runtime.cpu_allocator=tuned (faster CPU training) or default (glibc as is)")
    if choice == "tuned" and tune_cpu_allocator():
        _applied["cpu_allocator"] = "tuned"
    return dict(_applied)


def applied() -> dict[str, Any]:
    """What this process runs with (``cpu_allocator``: tuned once applied, else default)."""
    return dict(_applied)
