"""The machine under test (CPU model, device sync, matmul peak, peak memory) and how calls are timed."""
from __future__ import annotations

import contextlib
import gc
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch


# ----------------------------------------------------------------------------- machine
def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_gflops(device: torch.device, n: int = 2048, iters: int = 5) -> float:
    """Best-of-``iters`` torch.mm n x n fp32 GFLOP/s on the current threads (the machine's practical peak)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    torch.mm(a, b)
    sync(device)
    best = float("inf")
    for _ in range(iters):
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    """Yields a dict that gets ``peak_mb``: the peak memory growth over the block (CUDA: max allocated)."""
    out: dict[str, float] = {}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield out
        sync(device)
        out["peak_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
        return
    reset = _reset_hwm()
    base = _rss_kb("VmRSS")
    yield out
    out["peak_mb"] = (_rss_kb("VmHWM") - base) / 1024 if reset and base >= 0 else float("nan")


def _rss_kb(key: str) -> int:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return -1


def _reset_hwm() -> bool:
    """Reset the process's peak RSS (Linux >= 4.0); False where that is not possible."""
    with contextlib.suppress(OSError, AttributeError):  # hand freed heap back first, so the growth is real
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------- timing
def time_calls(fn: Callable[[], Any], iters: int, device: torch.device) -> float:
    """Seconds per call, averaged over ``iters`` calls."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / iters


def latencies(fn: Callable[[], Any], iters: int, device: torch.device) -> list[float]:
    out = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def p90(xs: Sequence[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(0.9 * (len(s) - 1)))]


# ----------------------------------------------------------------------------- profile
def top_ops(fn: Callable[[], Any], calls: int, rows: int, device: torch.device) -> dict[str, Any]:
    """torch.profiler over ``calls`` calls of ``fn``: the ``rows`` ops with the most self time
    (CPU, or the device's on CUDA), per call, with their share of the total."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(calls):
            fn()
        sync(device)
    events = prof.key_averages()

    def self_us(e: Any) -> float:
        return float(e.self_device_time_total if cuda else e.self_cpu_time_total)

    total = sum(self_us(e) for e in events) or 1.0
    top = sorted(events, key=self_us, reverse=True)[:rows]
    # the same ops split by input shapes: which layer an op's time goes to
    shaped = [e for e in prof.key_averages(group_by_input_shape=True) if any(e.input_shapes)]
    by_shape = sorted(shaped, key=self_us, reverse=True)[: max(1, rows // 2)]
    return {"total_ms_per_call": total / 1e3 / calls, "clock": "device" if cuda else "cpu",
            "ops": [{"op": e.key, "self_ms_per_call": self_us(e) / 1e3 / calls, "share": self_us(e) / total,
                     "calls_per_call": e.count / calls} for e in top],
            "by_shape": [{"op": e.key, "shapes": [list(x) for x in e.input_shapes if x][:2],
                          "self_ms_per_call": self_us(e) / 1e3 / calls, "share": self_us(e) / total,
                          "calls_per_call": e.count / calls} for e in by_shape]}


def format_top_ops(title: str, prof: dict[str, Any]) -> str:
    lines = [f"{title}: {prof['total_ms_per_call']:.1f} ms self {prof['clock'].upper()} time per call, top ops:"]
    for o in prof["ops"]:
        lines.append(f"  {o['op'][:44]:<44} {o['self_ms_per_call']:>8.2f} ms {100 * o['share']:>5.1f} % "
                     f"{o['calls_per_call']:>6.0f} calls")
    lines.append("  by input shapes:")
    for o in prof.get("by_shape", []):
        shapes = " ".join("x".join(map(str, sh)) for sh in o["shapes"])
        lines.append(f"  {o['op'][:30]:<30} {shapes[:44]:<44} {o['self_ms_per_call']:>8.2f} ms "
                     f"{100 * o['share']:>5.1f} % {o['calls_per_call']:>4.0f} calls")
    return "\n".join(lines)
