"""What machine a result came from, and its matmul roof.

The roof is the best GFLOP/s of square matmuls of several sizes, measured in the same run,
in the same kind of worker process, with the same thread count and dtype as the cases:
every "% of roof" figure divides by it (and is capped at 100, see
:func:`attnkit.bench.results.roof_share`).
"""

from __future__ import annotations

import os
import platform
import time
from typing import Any

import psutil
import torch

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(threads: int) -> dict[str, Any]:
    """Machine, software and thread count, recorded once per run."""
    info = {
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "logical_cores": psutil.cpu_count(logical=True),
        "physical_cores": psutil.cpu_count(logical=False),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": threads,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def measure_roof(dtype: str, *, sizes: tuple[int, ...] = (1024, 2048, 3072), seconds: float = 1.0) -> dict[str, Any]:
    """Matmul GFLOP/s of this process for ``dtype``: the best sample over several sizes and repeats.

    The best (not the median) sample, because a roof is what the machine *can* do; a busy
    neighbour only ever makes a sample slower. Several sizes, because which size a BLAS runs
    fastest depends on the machine (caches, threads): one size alone under-estimates the roof,
    and a case then shows more than 100% of it. Sizes run smallest first; a size whose call
    would take longer than ``seconds`` (extrapolated as n^3 from the previous one) is skipped.

    Args:
        dtype: ``"float32"``, ``"float64"``, ``"bfloat16"`` or ``"float16"``.
        sizes: square matrix sizes ``n`` of ``(n, n) @ (n, n)``.
        seconds: sampling time per dtype, shared by the sizes (each size: one warm-up call, then
            at least two samples).

    Returns:
        ``{"gflops": best 2 n^3 / time / 1e9 over all samples, "by_size": {n: best GFLOP/s}}``.
    """
    t = DTYPES[dtype]
    by_size: dict[int, float] = {}
    per_call = None
    prev = None
    for n in sorted(sizes):
        if per_call is not None and prev is not None and per_call * (n / prev) ** 3 > seconds:
            break  # this size's calls would eat the whole budget: the smaller ones stand
        a = torch.randn(n, n).to(t)  # (n, n)
        b = torch.randn(n, n).to(t)  # (n, n)
        t0 = time.perf_counter()
        a @ b  # warm-up: first touch of the output, BLAS packing buffers
        per_call = time.perf_counter() - t0
        samples: list[float] = []
        end = time.perf_counter() + seconds / len(sizes)
        while time.perf_counter() < end or len(samples) < 2:
            t0 = time.perf_counter()
            a @ b
            samples.append(time.perf_counter() - t0)
        per_call, prev = min(samples), n
        by_size[n] = 2.0 * n**3 / per_call / 1e9
    return {"gflops": max(by_size.values()), "by_size": by_size}


def default_threads() -> int:
    """Threads the benchmark uses: ``OMP_NUM_THREADS`` if set, else the physical cores."""
    env = os.environ.get("OMP_NUM_THREADS")
    if env and env.isdigit():
        return int(env)
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1
