"""Worker for the multi-process tests of ring / Ulysses / USP (tests/test_distributed_softmax.py).

It lives in the package so that processes spawned by ``run_local`` can import it. One call runs a
whole list of cases on this rank: shard the full float64 inputs for the case's layout, run the op
in the case's dtype, backpropagate the given upstream gradients, and return this rank's output,
lse and gradient shards (or the ValueError text for cases meant to fail). The parent unshards them
and compares with the single-process ``ak.attention`` oracle.
"""

from __future__ import annotations

import torch

from attnkit.distributed import zigzag
from attnkit.distributed.ring import ring_attention
from attnkit.distributed.ulysses import ulysses_attention
from attnkit.distributed.usp import make_usp_groups, usp_attention, usp_shard


def case_mask(name: str | None):
    """The ``ak.masks`` mask a case names (the oracle uses the same)."""
    from attnkit import masks

    return {None: None, "causal": masks.causal(),
            "causal_window": masks.causal() & masks.sliding_window(5)}[name]


def shard_for(case: dict, x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    if case["method"] == "usp":
        return usp_shard(x, rank, case["pu"], case["pr"], case.get("layout", "contiguous"))
    return zigzag.shard(x, rank, world, case.get("layout", "contiguous"))


def _run_one(case: dict, rank: int, world: int, groups: dict):
    dt = case["dtype"]
    t = {n: shard_for(case, case[n], rank, world) for n in ("q", "k", "v", "gout", "glse")}
    if case.get("uneven") and rank == world - 1:  # one rank with a shorter shard: must be rejected
        t = {n: x[:, :-1] for n, x in t.items()}
    # frozen_on_last: the last rank's inputs need no gradient (ranks disagree: must be rejected)
    grad = not (case.get("frozen_on_last") and rank == world - 1)
    q, k, v = (t[n].to(dt).requires_grad_(grad) for n in ("q", "k", "v"))
    lse_wanted = case.get("return_lse", True)
    m = case["method"]
    if m == "ring":
        res = ring_attention(q, k, v, causal=case.get("causal", False), layout=case.get("layout", "contiguous"),
                             return_lse=lse_wanted)
    elif m == "ulysses":
        res = ulysses_attention(q, k, v, case_mask(case.get("mask")), return_lse=lse_wanted)
    else:
        key = (case["pu"], case["pr"])
        if key not in groups:  # new_group is collective: every rank reaches this case in one order
            groups[key] = make_usp_groups(*key)
        ug, rg = groups[key]
        res = usp_attention(q, k, v, causal=case.get("causal", False), ulysses_group=ug, ring_group=rg,
                            layout=case.get("layout", "contiguous"), return_lse=lse_wanted)
    out, lse = res if lse_wanted else (res, None)
    loss = (out.double() * t["gout"]).sum()
    if lse is not None:
        loss = loss + (lse.double() * t["glse"]).sum()
    loss.backward()
    return {"out": out.detach(), "lse": None if lse is None else lse.detach(),
            "dq": q.grad, "dk": k.grad, "dv": v.grad}


def run_cases(rank: int, world: int, cases: list[dict]) -> list:
    """``run_local`` entry point: every case on this rank, results in case order."""
    groups: dict = {}
    results = []
    for case in cases:
        if case.get("expect_error"):
            try:
                _run_one(case, rank, world, groups)
                results.append("no error")
            except ValueError as e:
                results.append(f"ValueError: {e}")
            continue
        results.append(_run_one(case, rank, world, groups))
    return results
