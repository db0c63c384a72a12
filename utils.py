"""Memory readings, machine facts and formatting. No ComfyUI imports."""

from __future__ import annotations

import os
import platform
import subprocess

import torch

MIB = 2**20

# The dtype names the nodes and the benchmark accept, and what they mean.
FLOAT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FP8_DTYPES = {"e4m3fn": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def format_bytes(n: int | float) -> str:
    """Bytes for a log line or a table: "93.0 MiB", "1.37 GiB"."""
    return f"{n / MIB:.1f} MiB" if abs(n) < 2**30 else f"{n / 2**30:.2f} GiB"


def mib(n: int | float | None) -> float | None:
    """Bytes as MiB rounded to 0.1, for JSON results (None stays None)."""
    return round(n / MIB, 1) if n is not None else None


def process_rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def process_anon_rss() -> int | None:
    """Anonymous resident memory of this process (RssAnon: heap, slabs, pinned buffers; not the page cache
    of mapped files), where /proc says it (Linux); None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cuda_memory(device: torch.device) -> dict[str, int]:
    """Allocated / reserved bytes now and at their peak since the last reset, for one CUDA device."""
    return {
        "allocated": torch.cuda.memory_allocated(device),
        "reserved": torch.cuda.memory_reserved(device),
        "peak_allocated": torch.cuda.max_memory_allocated(device),
        "peak_reserved": torch.cuda.max_memory_reserved(device),
    }


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def pcie_link(device_index: int = 0) -> str | None:
    """Current PCIe link of a GPU ("16.0 GT/s PCIe x16"), when nvidia-smi or sysfs can tell."""
    try:
        out = subprocess.run(
            [
                "nvidia-smi",
                f"--id={device_index}",
                "--query-gpu=pcie.link.gen.current,pcie.link.width.current,pcie.link.gen.max",
                "--format=csv,noheader",
            ],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if out.returncode == 0 and out.stdout.strip():
            gen, width, gen_max = (s.strip() for s in out.stdout.strip().split(","))
            return f"PCIe gen {gen} x{width} (max gen {gen_max})"
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    return None


def machine_info() -> dict[str, object]:
    import psutil

    info: dict[str, object] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_cores": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": None,
        "gpu_memory_gb": None,
        "cuda": None,
        "driver": None,
        "pcie_link": None,
    }
    cpuinfo = _read("/proc/cpuinfo")
    if cpuinfo:
        for line in cpuinfo.splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
        info["driver"] = _read("/proc/driver/nvidia/version")
        if info["driver"]:
            info["driver"] = info["driver"].splitlines()[0]
        info["pcie_link"] = pcie_link(0)
    return info
