"""What machine a result came from, and its matmul roof.

The roof is the GFLOP/s of a large square matmul measured in the same run, in the
same kind of worker process, with the same thread count and dtype as the cases:
every "% of roof" figure divides by it.
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


def measure_roof(dtype: str, *, n: int = 2048, seconds: float = 1.0) -> float:
    """Matmul GFLOP/s of this process for ``dtype``: the best of repeated ``n x n @ n x n``.

    The best (not the median) sample, because a roof is what the machine *can* do; a busy
    neighbour only ever makes a sample slower.

    Args:
        dtype: ``"float32"``, ``"float64"``, ``"bfloat16"`` or ``"float16"``.
        n: matrix size (2048: large enough to reach the BLAS kernel's steady state).
        seconds: time spent sampling after one warm-up call (at least three samples).

    Returns:
        ``2 n^3 / best_time / 1e9``.
    """
    t = DTYPES[dtype]
    a = torch.randn(n, n).to(t)  # (n, n)
    b = torch.randn(n, n).to(t)  # (n, n)
    a @ b
    samples = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(samples) < 3:
        t0 = time.perf_counter()
        a @ b
        samples.append(time.perf_counter() - t0)
    return 2.0 * n**3 / min(samples) / 1e9


def default_threads() -> int:
    """Threads the benchmark uses: ``OMP_NUM_THREADS`` if set, else the physical cores."""
    env = os.environ.get("OMP_NUM_THREADS")
    if env and env.isdigit():
        return int(env)
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1
