"""run_local: results in rank order, the failing rank's traceback first (promptly, the others torn down),
no hang past the timeout, a named cause when ranks ran different collectives, and the main-module guard."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.distributed as dist

from attnkit.distributed import _comm
from attnkit.distributed.launch import run_local, unguarded_line


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


def _boom_while_peer_ignores_sigterm(rank, world):
    if rank == 1:
        time.sleep(0.5)
        raise ValueError("bad input on rank 1")
    # a rank busy elsewhere that does not react to SIGTERM (as one stuck in C++ code while a Python handler
    # is installed): torch's own teardown waits 30 s for it before SIGKILL
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(90)
    return rank


def _grad_on_rank0_only(rank, world):
    from attnkit.distributed.ring import ring_attention

    torch.manual_seed(0)
    q = torch.randn(1, 8, 2, 4, requires_grad=rank == 0)  # (B, N_local, H, D)
    out = ring_attention(q, q, q, causal=True)
    if out.requires_grad:
        out.sum().backward()  # a collective that rank 1 never joins
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


@pytest.mark.slow
def test_a_raising_rank_is_reported_promptly_and_the_others_torn_down():
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"(?s)rank 1 of 2 failed first:.*bad input on rank 1"):
        run_local(_boom_while_peer_ignores_sigterm, 2, timeout_s=120)
    assert time.monotonic() - t0 < 25  # spawning two workers + 0.5 s; torch's teardown alone takes 30 s


@pytest.mark.slow
def test_requires_grad_on_some_ranks_only_is_named():
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="requires_grad"):
        run_local(_grad_on_rank0_only, 2, timeout_s=120)
    assert time.monotonic() - t0 < 60


def test_unguarded_line():
    src = textwrap.dedent("""\
        import x
        def main():
            run_local(f, 2)
        main()
        if __name__ == "__main__":
            main()
        if "__main__" == __name__ and True:
            for i in range(2):
                main()
        try:
            main()
        except Exception:
            pass
        """)
    assert unguarded_line(src, 4)
    assert not unguarded_line(src, 6)
    assert not unguarded_line(src, 9)
    assert unguarded_line(src, 11)
    assert not unguarded_line("def (:", 1)  # cannot tell: no complaint


def test_an_unguarded_script_is_refused_before_spawning(tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent("""\
        from attnkit.distributed.launch import run_local

        def work(rank, world):
            return rank

        print(run_local(work, 2))
        """))
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode != 0
    assert "at line 6 at the top level of the main module" in p.stderr
    assert 'if __name__ == "__main__":' in p.stderr
