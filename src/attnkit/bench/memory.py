"""Peak resident memory of one case, measured in a fresh process.

Choice (stated in every report): each case's memory is measured in its own process
forked from an idle worker (torch imported, nothing run). Linux lets a process
reset its high-water mark (``echo 5 > /proc/self/clear_refs``), so the figure is
``VmHWM - VmRSS`` at fork: the resident growth while building the inputs and
running one pass, inputs and autograd buffers included. A fresh process is what
makes it honest on CPU: in a long-lived process the allocator keeps freed memory
and a later case would look smaller than it is. For a compiled case (first call
is a one-off) the compile is run first and its residue excluded; what is reported
is inputs + one steady-state pass.
"""

from __future__ import annotations

import ctypes
import resource


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb() -> float | None:
    """Current resident set size of this process, MiB (Linux), else None."""
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024


def hwm_mb() -> float | None:
    """Peak resident set size since the last :func:`reset_peak`, MiB (Linux), else None."""
    kb = _status_kb("VmHWM")
    return None if kb is None else kb / 1024


def reset_peak() -> bool:
    """Reset this process's peak RSS to its current RSS; False where the kernel cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_free_memory() -> None:
    """Return the C allocator's free pages to the OS (glibc ``malloc_trim``), if available."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def limit_memory(limit_gb: float | None) -> None:
    """Cap this process's private memory at its current use + ``limit_gb`` (``RLIMIT_DATA``).

    An allocation beyond it fails with ENOMEM, which torch raises as a RuntimeError, so
    an oversized case is recorded as ``oom`` instead of waking the kernel's OOM killer.
    """
    if not limit_gb:
        return
    used_kb = _status_kb("VmData") or 0
    cap = int(used_kb * 1024 + limit_gb * 2**30)
    try:
        _, hard = resource.getrlimit(resource.RLIMIT_DATA)
        if hard != resource.RLIM_INFINITY:
            cap = min(cap, hard)
        resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))
    except (ValueError, OSError):
        pass


OOM_MARKERS = ("can't allocate memory", "not enough memory", "out of memory", "cannot allocate memory",
               "defaultcpuallocator")


def is_oom(exc: BaseException) -> bool:
    """Whether an exception is an allocation failure."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return any(m in text for m in OOM_MARKERS)
