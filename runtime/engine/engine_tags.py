"""How TensorRT engine files are tagged to the host that built them (TensorRT version, GPU)."""

from __future__ import annotations

import shutil
import subprocess


def gpu_compute_capability() -> str | None:
    """``"90"`` for an H100, from nvidia-smi (no CUDA library needed); None without a GPU."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout.split()
    except (subprocess.SubprocessError, OSError):
        return None
    return out[0].replace(".", "") if out else None


def engine_name(graph: str, trt_version: str, cc: str) -> str:
    return f"{graph}.trt{trt_version}.sm{cc}.engine"
