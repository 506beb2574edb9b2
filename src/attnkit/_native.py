"""Optional compiled CPU kernels (``csrc/``), built on first use with ``torch.utils.cpp_extension``.

Every kernel here has a torch-ops twin that runs when the kernel is unavailable, so a machine
without a C++ compiler (or with ``ATTNKIT_NATIVE=0``) gets the same results, only slower;
``status()`` says which and why, and ``ak.explain`` repeats it. The build (~1 min, once per
machine and torch version) goes to torch's extension cache (``TORCH_EXTENSIONS_DIR`` moves it)
and registers the ops under ``torch.ops.attnkit_native``.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

_SOURCES = [Path(__file__).parent / "csrc" / "linear_chunk_cpu.cpp"]
_lock = threading.Lock()
_state: dict[str, object] = {"ops": None, "error": None}


def _disabled() -> str | None:
    if os.environ.get("ATTNKIT_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return "disabled by ATTNKIT_NATIVE=0"
    return None


def ops():
    """``torch.ops.attnkit_native`` once built and loaded, else None (the reason is in ``status()``)."""
    if _disabled():
        return None
    if _state["ops"] is not None or _state["error"] is not None:
        return _state["ops"]
    with _lock:
        if _state["ops"] is None and _state["error"] is None:
            try:
                from torch.utils.cpp_extension import load

                # -fopenmp: at::parallel_for is inline OpenMP; without it the heads would run serially
                load(name="attnkit_native", sources=[str(s) for s in _SOURCES], extra_cflags=["-O3", "-fopenmp"],
                     extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
                _state["ops"] = torch.ops.attnkit_native
            except Exception as e:  # no compiler, no headers, a failed build: fall back, say why
                lines = str(e).strip().splitlines() or [""]
                first = next((ln for ln in lines if "error" in ln.lower()), lines[-1])
                _state["error"] = f"build failed: {type(e).__name__}: {first.strip()[:200]}"
    return _state["ops"]


def status() -> str:
    """One line: ``"loaded"``, ``"not built yet (builds on first use)"``, or why it is unavailable."""
    off = _disabled()
    if off:
        return off
    if _state["ops"] is not None:
        return "loaded"
    return str(_state["error"]) if _state["error"] is not None else "not built yet (builds on first use)"


def available() -> bool:
    """Build/load the kernels if needed; True when they can run."""
    return ops() is not None
