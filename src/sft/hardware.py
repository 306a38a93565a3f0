"""What this machine can do, measured: large-matmul peak rate per dtype and peak memory of a stretch of work.

Shared by the planner (`sft plan`), the precision choice on CPU and the benchmarks, so that every number about
speed or memory is measured the same way.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


def matmul_peak(dtype: torch.dtype = torch.float32, n: int = 2048, seconds: float = 0.5) -> float:
    """Measured FLOP/s of an n x n x n matmul in `dtype` on the current device, using all the cores torch uses."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.matmul(a, b)  # warm-up: kernel selection, AMX tile setup
    _sync()
    runs, start = 0, time.perf_counter()
    while True:
        torch.matmul(a, b)
        runs += 1
        _sync()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return 2 * n**3 * runs / elapsed


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@dataclass
class Peak:
    """Peak memory in bytes over a `peak_memory()` block, above what the process held when it began."""

    bytes: int = 0
    kind: str = ""  # "cuda allocated" or "cpu resident"


@contextmanager
def peak_memory() -> Iterator[Peak]:
    """Peak memory of the work inside the block: CUDA allocated bytes on a GPU, resident set size on a CPU.

    On a CPU the kernel's high-water mark (VmHWM) is reset at the start (`/proc/self/clear_refs`), so the result is
    the peak resident size during the block minus the resident size when it began.
    """
    result = Peak()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        yield result
        torch.cuda.synchronize()
        result.bytes, result.kind = torch.cuda.max_memory_allocated() - base, "cuda allocated"
        return
    base = proc_bytes("/proc/self/status", "VmRSS")
    _reset_high_water_mark()
    yield result
    result.bytes, result.kind = max(0, proc_bytes("/proc/self/status", "VmHWM") - base), "cpu resident"


def proc_bytes(file: str, field: str) -> int:
    """A `Field: N kB` line of a /proc file (/proc/self/status, /proc/meminfo), in bytes; 0 where /proc is missing
    (e.g. macOS)."""
    try:
        with open(file, encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_high_water_mark() -> None:
    try:
        with open(f"/proc/{os.getpid()}/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        pass
