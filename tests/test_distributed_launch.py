"""run_local: results in rank order, the failing rank's traceback first, and no hang past the timeout."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from attnkit.distributed import _comm
from attnkit.distributed.launch import run_local


def _ranks(rank, world):
    return rank, world, _comm.all_gather_stack(torch.tensor([float(rank)])).flatten().tolist()


def _boom(rank, world):
    if rank == 1:
        raise ValueError("bad input on rank 1")
    dist.barrier()
    return rank


def _stall(rank, world):
    if rank == 0:
        time.sleep(60)
    dist.barrier()
    return rank


@pytest.mark.slow
def test_results_in_rank_order():
    assert run_local(_ranks, 3) == [(r, 3, [0.0, 1.0, 2.0]) for r in range(3)]


@pytest.mark.slow
def test_the_failing_rank_is_reported_first():
    with pytest.raises(RuntimeError, match=r"(?s)rank 1 of 2 failed first:.*ValueError: bad input on rank 1"):
        run_local(_boom, 2)


@pytest.mark.slow
def test_a_stalled_rank_times_out():
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="did not finish within 5 s"):
        run_local(_stall, 2, timeout_s=5)
    assert time.monotonic() - t0 < 30


def test_bad_world_size():
    with pytest.raises(ValueError, match="world_size"):
        run_local(_ranks, 0)


def test_collectives_need_a_group():
    with pytest.raises(RuntimeError, match="not initialised"):
        _comm.rank_world()
