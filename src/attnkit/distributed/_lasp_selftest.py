"""Worker for the LASP-2 / LASP-2H multi-process tests and benchmark (importable by spawned processes).

Paper: "LASP-2: Rethinking Sequence Parallelism for Linear Attention and Its Hybrid", arXiv 2502.07563.

:func:`run_specs` runs a list of case specs on one rank: each spec carries the FULL-sequence inputs
and the piece lengths; the rank cuts its piece, runs the op forward and backward (upstream gradient
cut from the spec's ``do``) and returns its pieces of the output and gradients. The test concatenates
the pieces and compares them with the single-process op.
"""

from __future__ import annotations

import torch

import attnkit as ak
from attnkit.distributed import zigzag
from attnkit.distributed.lasp2 import _local_state, lasp2_linear_attention
from attnkit.distributed.lasp2h import lasp2h_attention
from attnkit.ops.linear.call import make_call


def _piece(x: torch.Tensor, lengths: list[int], rank: int) -> torch.Tensor:
    s = sum(lengths[:rank])
    return x[:, s:s + lengths[rank]]  # (B, N_t, ...)


def _run_one(spec: dict, rank: int, world: int) -> dict:
    dt, inp, kw = spec["dtype"], spec["inputs"], dict(spec.get("kwargs", {}))
    kv_len = spec.get("lengths") or [inp["k"].shape[1] // world] * world
    q_len = spec.get("q_lengths") or kv_len
    grads = spec.get("grads", ("q", "k", "v", "decay"))  # the inputs that get a gradient
    if kw.get("layout") == "zigzag":  # pieces cut by the zigzag order (equal lengths)
        def cut(x, lengths, rank):
            return zigzag.shard(x, rank, world, "zigzag")
    else:
        cut = _piece
    q = cut(inp["q"], q_len, rank).to(dt).requires_grad_("q" in grads)
    k = cut(inp["k"], kv_len, rank).to(dt).requires_grad_("k" in grads)
    v = cut(inp["v"], kv_len, rank).to(dt).requires_grad_("v" in grads)
    leaves = {"q": q, "k": k, "v": v}
    if "decay" in inp:
        d = inp["decay"]
        d = d.to(dt) if d.dim() == 1 else _piece(d, kv_len, rank).to(dt)
        leaves["decay"] = d.requires_grad_("decay" in grads)
        kw["decay"] = leaves["decay"]
    if spec["op"] == "local_state":  # LP2: this rank's M_t by the §8.4 formula, and the kernel's final state
        call = make_call(q, k, v, causal=True, **kw)
        M, G = _local_state(call, torch.float64 if dt == torch.float64 else torch.float32)
        _, S = ak.linear_attention(q, k, v, return_state=True, **kw)
        return {"M": M.detach(), "G": None if G is None else G.detach(), "S": S.detach()}
    res: dict = {}
    if spec["op"] == "lasp2":
        out = lasp2_linear_attention(q, k, v, return_state=True, **kw)
        o, st = out
        st = st[0] if isinstance(st, tuple) else st  # with normalize: compare/diff S, z follows the same path
        res["state"] = st.detach()
        loss = (o * _piece(inp["do"], q_len, rank).to(o.dtype)).sum()
        if rank == world - 1 and "dS" in inp:
            loss = loss + (st * inp["dS"].to(st.dtype)).sum()
    elif spec["op"] == "lasp2h":
        o, lse = lasp2h_attention(q, k, v, return_lse=True, **kw)
        res["lse"] = lse.detach()
        loss = (o * cut(inp["do"], q_len, rank).to(o.dtype)).sum()
    else:
        raise ValueError(f"unknown op {spec['op']!r}")
    loss.backward()
    res["o"] = o.detach()
    for n, t in leaves.items():
        if t.requires_grad:
            res["d" + n] = t.grad.detach()
    return res


def _run_error(spec: dict, rank: int) -> str:
    """A call whose shapes disagree across ranks: every rank must raise the same ValueError."""
    inp = spec["inputs"]
    q, k, v = inp["q"], inp["k"], inp["v"]
    if rank == 1:
        v = v[..., :-1]  # Dv differs on rank 1
    fn = lasp2_linear_attention if spec["op"] == "error_lasp2" else lasp2h_attention
    try:
        fn(q, k, v)
    except ValueError as e:
        return str(e)
    return "no error"


def run_specs(rank: int, world: int, specs: list[dict]) -> list:
    """Every spec on this rank, in order (see the module docstring)."""
    out = []
    for spec in specs:
        if spec["op"].startswith("error"):
            out.append(_run_error(spec, rank))
        else:
            out.append(_run_one(spec, rank, world))
    return out

