"""What the benchmark scripts share: timing, the machine's description, BENCHMARKS.md sections."""

from __future__ import annotations

import os
import platform
import re
import shutil
import statistics
import subprocess
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timeit(fn, repeats: int, warmup: int) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    return {"median": statistics.median(times), "p95": times[min(len(times) - 1, int(0.95 * len(times)))]}


def machine() -> str:
    cpu = "unknown CPU"
    try:
        m = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    import onnxruntime
    import torch

    return (f"{cpu}, {os.cpu_count()} cores visible, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), onnxruntime {onnxruntime.__version__}, "
            f"Python {platform.python_version()}")


def shown(path: Path) -> Path:
    """``path`` relative to the repository when it lies inside it (given relative or absolute; not
    resolved, so a data folder linked into the checkout keeps its name)."""
    path = path.absolute()
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def write_section(path: Path, heading: str, section: str) -> None:
    """Replace the section starting at ``heading`` in BENCHMARKS.md (or append it)."""
    text = path.read_text() if path.is_file() else "# Benchmarks\n\nEvery table here is written by a script in `benchmarks/`.\n\n"
    start = text.find(heading)
    if start >= 0:
        end = text.find("\n## ", start + len(heading))
        rest = text[end + 1:] if end >= 0 else ""
        text = text[:start] + section.rstrip("\n") + ("\n\n" + rest if rest else "\n")
    else:
        text = text.rstrip() + "\n\n" + section
    path.write_text(text)


def wait_http(url: str, seconds: float = 180) -> None:
    """Poll ``url`` until it answers 200 (a server's readiness route)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} not ready within {seconds} s")


def source_at(ref: str, work: Path) -> Path:
    """The package as it was at git ``ref``, from a ``git archive`` laid out as it installs
    (``export/`` -> ``fbnet.export``, ``runtime/`` -> ``fbnet.runtime``): put it on PYTHONPATH."""
    src = work / f"baseline-{ref}"
    if not src.is_dir():
        tmp = work / f"baseline-{ref}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "fbnet", "export", "runtime"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
        for sub in ("export", "runtime"):
            (tmp / sub).rename(tmp / "fbnet" / sub)
        tmp.rename(src)
    return src
