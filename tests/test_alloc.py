"""recycle_work_buffers: afterwards chunk-sized buffers are reused from the heap, not re-faulted."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest

_CHILD = """
import resource, sys, torch
from attnkit._alloc import recycle_work_buffers
if sys.argv[1] == "nudge":
    recycle_work_buffers()
    recycle_work_buffers()  # idempotent
n = 8 << 20  # 8 MiB: above glibc's initial 128 KiB mmap threshold, below the raised one
torch.ones(n, dtype=torch.uint8)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(n, dtype=torch.uint8)  # fresh mmap'd pages would fault all 2048 of them again
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _glibc() -> bool:
    try:
        return bool(ctypes.CDLL("libc.so.6").gnu_get_libc_version)
    except (OSError, AttributeError):
        return False


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _glibc(), reason="glibc's mmap threshold only")
def test_second_allocation_of_a_chunk_buffer_does_not_fault():
    # a fresh process (the allocator state is per process): without the nudge every 8 MiB
    # allocation maps and faults fresh pages; with it the freed buffer is reused
    assert _faults("plain") > 1500
    assert _faults("nudge") < 256
