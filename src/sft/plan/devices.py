"""The devices a plan is for: named GPUs (memory, vendor peaks) and this machine (its GPU, or its CPU and free RAM)."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

from sft.errors import SftError
from sft.hardware import proc_bytes

GiB, MiB = 2**30, 2**20
# A CUDA process: the context and cuBLAS/cuDNN workspaces sit outside PyTorch's allocator.
CUDA_CONTEXT = 600 * MiB
# The caching allocator reserves more than it hands out (block rounding, fragmentation).
CUDA_FRAGMENTATION = 0.05


@dataclass(frozen=True)
class Device:
    key: str
    name: str
    kind: str  # "cuda" or "cpu"
    memory: int  # bytes a run may use: GPU memory, or RAM available now
    peak_flops: dict[str, float]  # dtype -> FLOP/s
    peak_source: str = "vendor dense peak"


# nvidia-smi totals, and the vendor bf16 dense peaks of BENCHMARKS.md.
GPUS = {
    "h100": Device("h100", "NVIDIA H100 80GB (SXM)", "cuda", 81559 * MiB, {"bf16": 989e12, "fp32": 67e12}),
    "h200": Device("h200", "NVIDIA H200 141GB (SXM)", "cuda", 143771 * MiB, {"bf16": 989e12, "fp32": 67e12}),
    "a100": Device("a100", "NVIDIA A100 80GB", "cuda", 81920 * MiB, {"bf16": 312e12, "fp32": 19.5e12}),
    "a100-40gb": Device("a100-40gb", "NVIDIA A100 40GB", "cuda", 40960 * MiB, {"bf16": 312e12, "fp32": 19.5e12}),
    "l4": Device("l4", "NVIDIA L4 24GB", "cuda", 23034 * MiB, {"bf16": 121e12, "fp32": 30e12}),
}
DEVICE_NAMES = (*GPUS, "cpu")


def available_ram() -> int:
    """RAM this process could still use: MemAvailable, bounded by a cgroup limit when there is one."""
    available = proc_bytes("/proc/meminfo", "MemAvailable") or proc_bytes("/proc/meminfo", "MemFree")
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit_text = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit_text.isdigit() and int(limit_text) < 2**60:
            available = min(available, int(limit_text) - usage)
    return max(0, available)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def resolve_device(name: str | None) -> Device:
    """A named device, or this machine (its GPU when there is one, else its CPU and available RAM)."""
    import torch

    if name is not None and name.lower() not in DEVICE_NAMES:
        raise SftError(f"--device {name!r}: unknown device; expected one of {', '.join(DEVICE_NAMES)}")
    if name is not None and name.lower() in GPUS:
        return GPUS[name.lower()]
    if name is None and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        known = next((d for key, d in GPUS.items() if key.split("-")[0].upper() in props.name.upper()), None)
        peak = known.peak_flops if known else {"bf16": 0.0, "fp32": 0.0}
        return Device("cuda", props.name, "cuda", props.total_memory, peak, "vendor dense peak" if known else "")
    cores = torch.get_num_threads()
    return Device("cpu", f"{cpu_name()} ({cores} threads)", "cpu", available_ram(), {}, "measured matmul")


def budget_of(device: Device) -> int:
    if device.kind == "cuda":
        return int((device.memory - CUDA_CONTEXT) / (1 + CUDA_FRAGMENTATION))
    if device.key == "cpu":  # processes of a multi-process CPU run on this machine share its RAM
        return device.memory // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return device.memory


def bf16_gpu(device: Device) -> bool:
    """Named GPUs here all have bf16; this machine's GPU is asked."""
    if device.key in GPUS:
        return True
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def gib(n: float) -> str:
    return f"{n / GiB:,.2f} GiB" if n >= GiB else f"{n / MiB:,.1f} MiB"
