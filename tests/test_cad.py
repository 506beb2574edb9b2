"""CAD (arXiv 2510.18121): the planner balances attention FLOPs; the execution on gloo equals one process."""

from __future__ import annotations

import pytest
import torch

from attnkit.distributed.cad import (
    DOCUMENTED_LENGTHS,
    Task,
    cad_attention,
    contiguous_plan,
    plan_cad,
    simulate,
)
from attnkit.distributed.launch import run_local
from attnkit.reference.naive_dense import naive_masked_attention
from tolerances import assert_close

LENGTHS = (5, 11, 3, 13)  # 32 tokens: splits into 2 and 4 ranks


def _covered(plan):
    seen = []
    for ts in plan.tasks:
        for t in ts:
            seen.extend(range(t.start + t.a, t.start + t.b))
    return sorted(seen)


@pytest.mark.parametrize("world", [2, 4, 8])
def test_plan_covers_every_query_once_and_balances_the_documented_batch(world):
    c, p = contiguous_plan(DOCUMENTED_LENGTHS, world), plan_cad(DOCUMENTED_LENGTHS, world)
    n = sum(DOCUMENTED_LENGTHS)
    assert _covered(c) == _covered(p) == list(range(n))
    sc, sp = simulate(c), simulate(p)
    total = sum(ln * (ln + 1) // 2 for ln in DOCUMENTED_LENGTHS) * 4.0
    assert sum(sc.flops) == sum(sp.flops) == total  # task FLOPs add up to the documents' FLOPs
    assert sp.imbalance < 1.01
    # max per-rank FLOPs drop by 35 % (2 ranks), 46 % (4), 67 % (8) on this batch
    assert 1 - sp.max_flops / sc.max_flops > {2: 0.34, 4: 0.45, 8: 0.66}[world]


def test_task_pairs_and_errors():
    assert Task(0, 0, 0, 4).pairs == 10 and Task(0, 0, 2, 4).pairs == 7
    with pytest.raises(ValueError, match="world must"):
        plan_cad((3, 4), 2)
    with pytest.raises(ValueError, match="lengths"):
        plan_cad((0, 4), 2)


def _reference(q, k, v):
    n = q.shape[1]
    doc = torch.repeat_interleave(torch.arange(len(LENGTHS)), torch.tensor(LENGTHS))
    allowed = (doc[:, None] == doc[None, :]) & torch.ones(n, n, dtype=torch.bool).tril()
    return naive_masked_attention(q, k, v, allowed)[0]


def _inputs():
    g = torch.Generator().manual_seed(0)
    q, k, v, go = (torch.randn(2, sum(LENGTHS), 2, 4, generator=g, dtype=torch.float64) for _ in range(4))
    return q, k, v, go


def _rank(rank, world, kind):
    q, k, v, go = _inputs()
    n = q.shape[1] // world
    sl = slice(rank * n, (rank + 1) * n)
    ql, kl, vl = (t[:, sl].clone().requires_grad_() for t in (q, k, v))
    plan = plan_cad(LENGTHS, world, block=4) if kind == "cad" else contiguous_plan(LENGTHS, world)
    o = cad_attention(ql, kl, vl, plan)
    o.backward(go[:, sl])
    return o.detach(), ql.grad, kl.grad, vl.grad


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_execution_on_gloo_equals_one_process(world):
    q, k, v, go = _inputs()
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    ref = _reference(q, k, v)
    ref.backward(go)
    outs = run_local(_rank, world, "cad", timeout_s=240)
    for i, (name, expected) in enumerate([("o", ref), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)]):
        assert_close(torch.cat([r[i] for r in outs], 1), expected.detach(), torch.float64, f"{name} P={world}")


def test_single_process_plan_equals_reference():
    # world 1 without a process group is not supported by rank_world; the tasks themselves are checked here
    q, k, v, _ = _inputs()
    plan = plan_cad(LENGTHS, 1, block=4)
    out = torch.zeros_like(v)
    from attnkit.masks import causal
    from attnkit.ops.dense.call import attention

    for t in plan.tasks[0]:
        out[:, t.start + t.a:t.start + t.b] = attention(q[:, t.start + t.a:t.start + t.b], k[:, t.start:t.start + t.b],
                                                        v[:, t.start:t.start + t.b], causal(t.a))
    assert_close(out, _reference(q, k, v), torch.float64, "tasks")
