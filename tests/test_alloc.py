"""recycle_work_buffers: afterwards a chunk loop's buffers are reused from the heap, not re-faulted."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest

_CHILD = """
import resource, sys, torch
from attnkit.kernels.alloc import recycle_work_buffers
if sys.argv[1] == "nudge":
    recycle_work_buffers()
    recycle_work_buffers()  # idempotent
n = 6 << 20
def chunk_loop():  # a chunk loop's working set: four 6 MiB buffers live at once, then all freed
    bufs = [torch.ones(n, dtype=torch.uint8) for _ in range(4)]
    del bufs
chunk_loop(); chunk_loop()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
chunk_loop()  # fresh pages would fault up to 4 * 1536 of them again
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
    # a fresh process (the allocator state is per process). Without the nudge glibc's threshold
    # only rises to 6 MiB and its trim threshold to 12 MiB, so the 24 MiB freed at the heap top is
    # returned to the OS and faulted in again (1536 to 6144 faults seen); with it, none
    assert _faults("plain") >= 1024
    assert _faults("nudge") < 256
