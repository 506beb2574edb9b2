"""Let glibc recycle chunk-sized work buffers instead of mapping fresh pages for each.

glibc serves allocations above its mmap threshold (128 KiB at start) with fresh ``mmap``'d pages,
and every first touch of such a page faults (~3 us per 4 KiB page on the 2-core VMs we measure
on). The threshold rises dynamically to the size of any mmap'd block that is freed, up to
32 MiB; from then on blocks up to that size come from the heap and are reused. Many programs
reach that state by accident (they free a large tensor); a fresh process running only our tiled
kernels never does, because their chunk buffers are all below 32 MiB and are freed from the heap
top. Freeing one 31 MiB block once puts the process in the reused-heap state. Nothing is touched,
so this costs one mmap/munmap pair; other allocators (jemalloc, tcmalloc) are unaffected.

Measured on the 2-D neighborhood fwd+bwd (64x64, kernel 13): page faults 23 -> 2 MiB per call,
wall 218 -> 190 ms.
"""

from __future__ import annotations

import sys

import torch

_BLOCK = 31 << 20  # below glibc's DEFAULT_MMAP_THRESHOLD_MAX (32 MiB on 64-bit), header included
_done = False


def recycle_work_buffers() -> None:
    """Once per process: allocate and free one untouched 31 MiB block (see the module docstring)."""
    global _done
    if _done or not sys.platform.startswith("linux"):
        return
    _done = True
    torch.empty(_BLOCK, dtype=torch.uint8)  # mmap'd, never touched, freed at once
