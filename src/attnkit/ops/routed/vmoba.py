"""VMoBA: Mixture-of-Block Attention for Video Diffusion Models (arXiv 2506.23858).

Non-causal MoBA on a video token grid ``(T, Y, X)`` (raster order) with three changes:
successive layers cycle the key-block partition 1-D (``s_T`` whole frames: contiguous in the
flattened sequence), 2-D (an ``s_Y x s_X`` tile over all frames) and 3-D (an ``s_T x s_Y x s_X``
cube); blocks are selected globally over all ``(query, key block)`` pairs of a head instead of
per query; and the number of pairs is set by a cumulative-similarity threshold ``tau``. Every
query always attends its own block. The partition is a token permutation that makes blocks
contiguous; routing reuses ``moba.block_means`` / ``route_topk`` / ``_TokenRoutes``.

Backends (``ak.explain("vmoba_attention", q, k, v, grid_shape=..)`` shows the choice):

* ``dispatch`` -- the key-major dispatch engine (``attnkit.kernels.dispatch.routed_block_attention``:
  the own block as its diagonal part in partition order, each other selected block attended by
  the queries that chose it); fused CPU op without autograd, matmul softmax with it;
* ``gather`` -- the block-gather engine (``attnkit.kernels.gather``) on the union of the routes of
  each query tile plus a per-token route mask (slow when routes diverge);
* ``reference`` -- the naive selection and mask of ``attnkit.reference.naive_routed`` (never automatic).
"""


from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from attnkit._validate import check_qkv, int_arg, resolve_scale
from attnkit.kernels.dispatch import routed_block_attention
from attnkit.kernels.gather import block_gather_attention, compute_dtype, needs_grad
from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.ops.routed._common import (
    cpu_only,
    dispatch_detail,
    dispatch_engine,
    gather_detail,
    grad_words,
    no_grad_fused_check,
    reference_dtype,
)
from attnkit.ops.routed.moba import _TokenRoutes, block_means, route_topk
from attnkit.reference.naive_dense import naive_masked_attention
from attnkit.reference.naive_routed import naive_block_ids, naive_vmoba_selection

MODES = ("1d", "2d", "3d")



SELECTIONS = ("threshold", "topk", "local")



@dataclass(frozen=True)
class VMoBAConfig:
    """Per-mode block extents: ``block_1d`` frames, ``block_2d = (s_Y, s_X)``, ``block_3d = (s_T, s_Y, s_X)``."""

    block_1d: int = 2
    block_2d: tuple[int, int] = (8, 8)
    block_3d: tuple[int, int, int] = (2, 8, 8)



def layer_mode(layer_idx: int) -> str:
    """The paper's recurrent cycle: layer ``l`` uses ``("1d", "2d", "3d")[l % 3]``."""
    return MODES[int_arg("layer_idx", layer_idx, 0) % 3]



def _pos(name: str, value: object, n: int) -> tuple[int, ...]:
    """``value`` (an int, or a sequence of ``n`` ints) as ``n`` positive ints; ValueError on a wrong
    count, ``int_arg``'s TypeError / ValueError on an entry."""
    if isinstance(value, int) and not isinstance(value, bool):
        vals: tuple = (value,)
    elif isinstance(value, (tuple, list, torch.Size)):
        vals = tuple(value)
    else:
        raise TypeError(f"{name} must be {n} positive int(s), got {value!r}")
    if len(vals) != n:
        raise ValueError(f"{name} must be {n} positive int(s), got {value!r}")
    return tuple(int_arg(name, x, 1) for x in vals)



def block_shape(grid_shape, mode: str, cfg: VMoBAConfig) -> tuple[int, int, int]:
    """The 3-D extent ``(b_T, b_Y, b_X)`` of one block of ``mode`` on ``grid_shape = (T, Y, X)``.

    1-D blocks may be ragged in time (the last one is partial: it is still the last block of the
    flattened sequence); 2-D and 3-D blocks must tile the grid exactly (ValueError naming the field).
    """
    T, Y, X = _pos("grid_shape", grid_shape, 3)
    if mode == "1d":
        (bt,) = _pos("block_1d", cfg.block_1d, 1)
        return min(bt, T), Y, X
    if mode == "2d":
        by, bx = _pos("block_2d", cfg.block_2d, 2)
        if Y % by or X % bx:
            raise ValueError(f"block_2d {(by, bx)} must divide the grid's (Y, X) = {(Y, X)}")
        return T, by, bx
    if mode == "3d":
        bt, by, bx = _pos("block_3d", cfg.block_3d, 3)
        if T % bt or Y % by or X % bx:
            raise ValueError(f"block_3d {(bt, by, bx)} must divide grid_shape {(T, Y, X)}")
        return bt, by, bx
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")



def partition_ids(grid_shape, bshape, device=None) -> torch.Tensor:
    """Block id of every raster token: ``((t // b_T) * n_Y + y // b_Y) * n_X + x // b_X`` -> ``(N,)`` long."""
    T, Y, X = grid_shape
    bt, by, bx = bshape
    ny, nx = math.ceil(Y / by), math.ceil(X / bx)
    t = torch.arange(T, device=device).view(T, 1, 1) // bt
    y = torch.arange(Y, device=device).view(1, Y, 1) // by
    x = torch.arange(X, device=device).view(1, 1, X) // bx
    return ((t * ny + y) * nx + x).reshape(-1)  # (N,)



def partition_perm(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(perm, inv)``: ``x[:, perm]`` lists blocks contiguously (raster order inside), ``y[:, inv]`` undoes it."""
    perm = torch.sort(ids, stable=True).indices  # (N,)
    return perm, torch.argsort(perm)



def select_pairs(scores: torch.Tensor, own: torch.Tensor, selection: str, threshold: float = 0.25,
                 topk: float | None = None) -> torch.Tensor:
    """VMoBA's routing on gate scores ``(B, H, N, n)`` (one pool per batch and head) -> bool ``(B, H, N, n)``.

    ``own (N,)`` is each query's own block, always selected. ``threshold``: min-max normalise the
    pool, own pairs' mass counts first, then the other pairs in descending order (ties: lower
    token, then lower block) are kept while the mass before them is below ``tau * total``; ``tau = 1``
    keeps all. ``topk``: keep ``round(topk * N)`` pairs in total, own pairs included. ``local``:
    MoBA's per-query top-k (own block counted).
    """
    B, H, N, n = scores.shape
    own_m = torch.zeros(N, n, dtype=torch.bool, device=scores.device)
    own_m[torch.arange(N, device=scores.device), own] = True
    if selection == "local":
        return route_topk(scores, own, int(topk), causal=False)
    s = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores
    flat = s.reshape(B, H, N * n)  # (B, H, N*n): the head's whole pool
    own_f = own_m.reshape(-1)
    if selection == "threshold":
        if threshold >= 1.0:
            return torch.ones_like(scores, dtype=torch.bool)
        lo, hi = flat.amin(-1, keepdim=True), flat.amax(-1, keepdim=True)
        rng = hi - lo
        # a constant pool has no ranking: every pair gets unit mass (guard against 0 / 0)
        mass = torch.where(rng > 0, (flat - lo) / torch.where(rng > 0, rng, 1.0), torch.ones_like(flat))
        need = threshold * mass.sum(-1, keepdim=True) - (mass * own_f).sum(-1, keepdim=True)
        cand = mass.masked_fill(own_f, -1.0)  # own pairs sort last with no mass; never "kept" here
        sel = _threshold_prefix(cand, need)
        if sel is not None:
            return (sel | own_f).view(B, H, N, n)
        vals, order = torch.sort(cand, dim=-1, descending=True, stable=True)
        vals = vals.clamp_min(0.0)
        before = torch.cumsum(vals, -1) - vals  # mass of the pairs ahead of each one
        keep = (before < need) & ~own_f[order]
    elif selection == "topk":
        vals, order = torch.sort(flat.masked_fill(own_f, float("-inf")), dim=-1, descending=True, stable=True)
        budget = round(topk * N) - N
        keep = (torch.arange(N * n, device=s.device) < budget) & ~own_f[order]
        keep = keep.expand(B, H, -1)
    else:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    sel = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, order, keep) | own_f
    return sel.view(B, H, N, n)



def _threshold_prefix(cand: torch.Tensor, need: torch.Tensor) -> torch.Tensor | None:
    """The threshold rule's kept pairs without sorting the whole pool, or None to sort it.

    ``cand (B, H, P)`` (own pairs at -1) in descending stable order keeps the shortest prefix whose
    mass before each pair stays ``< need``. A top-``K`` gives the same leading values (so the same
    prefix sums); when they reach ``need`` the prefix ends inside them, at value ``theta``: keep
    every pair above ``theta`` and, of the pairs equal to it, the first ones in index order (what
    the stable sort keeps). Escalates ``K`` (a quarter, then half the pool) before giving up.
    """
    P = cand.shape[-1]
    for K in (P // 4, P // 2):
        if K < 1:
            return None
        vals = torch.topk(cand, K, dim=-1, sorted=True).values.clamp_min(0.0)  # (B, H, K)
        before = torch.cumsum(vals, -1) - vals
        if not bool((before[..., -1:] + vals[..., -1:] >= need).all()):
            continue  # some head's prefix runs past K
        kcount = (before < need).sum(-1, keepdim=True)  # (B, H, 1) pairs kept (a prefix: before rises)
        theta = torch.gather(vals, -1, (kcount - 1).clamp_min(0))  # (B, H, 1) smallest kept value
        above = cand > theta
        ties = (cand == theta) & (cand >= 0)
        room = kcount - above.sum(-1, keepdim=True)  # tied pairs still kept, in index order
        keep = above | (ties & (torch.cumsum(ties, -1) <= room))
        return keep & (kcount > 0)
    return None



@dataclass(frozen=True)
class VMoBACall:
    """A validated ``vmoba_attention`` call (what backends and ``explain`` see)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    grid: tuple[int, int, int]
    mode: str
    config: VMoBAConfig
    bshape: tuple[int, int, int]  # one block's (b_T, b_Y, b_X)
    selection: str
    threshold: float
    topk: float | None
    query_block: int  # the gather engine's query tile
    scale: float
    return_layout: bool
    needs_grad: bool  # autograd will record the attention (read once, when the call is built)

    @property
    def block(self) -> int:
        return math.prod(self.bshape)

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.q.shape[1] / self.block)

    def describe(self) -> str:
        sel = f"threshold={self.threshold:g}" if self.selection == "threshold" else f"{self.selection} {self.topk:g}"
        return (f"q {tuple(self.q.shape)} k {tuple(self.k.shape)} v {tuple(self.v.shape)} {self.q.dtype}, "
                f"grid {self.grid}, mode={self.mode}, block {self.bshape} ({self.n_blocks} blocks), {sel}, "
                f"scale={self.scale:.4g}, {grad_words(self.needs_grad)}")


def make_call(q, k, v, grid_shape, *, mode="3d", config=VMoBAConfig(), selection="threshold", threshold=0.25,
              topk=None, query_block=None, scale=None, return_layout=False) -> VMoBACall:
    """Validate a ``vmoba_attention`` call; errors name the argument."""
    check_qkv(q, k, v)
    T, Y, X = _pos("grid_shape", grid_shape, 3)
    N = q.shape[1]
    if N != T * Y * X or k.shape[1] != N:
        raise ValueError(f"grid_shape {(T, Y, X)} has {T * Y * X} tokens; q has {N}, k has {k.shape[1]} "
                         "(self-attention)")
    if not isinstance(config, VMoBAConfig):
        raise TypeError(f"config must be a VMoBAConfig, got {type(config).__name__}")
    bshape = block_shape((T, Y, X), mode, config)
    n = math.ceil(N / math.prod(bshape))
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    if selection == "threshold":
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    elif isinstance(topk, bool) or not isinstance(topk, (int, float)) or not 1 <= topk <= n:
        raise ValueError(f"topk must be in [1, number of blocks = {n}] for mode {mode!r}, got {topk!r}")
    if selection == "local" and topk != int(topk):
        raise ValueError(f"topk must be an int for local selection, got {topk!r}")
    bq = math.prod(bshape) if query_block is None else int_arg("query_block", query_block, 1)
    return VMoBACall(q, k, v, (T, Y, X), mode, config, bshape, selection, float(threshold), topk, bq,
                     resolve_scale(scale, q.shape[-1]), bool(return_layout), needs_grad(q, k, v))


def _route(call: VMoBACall):
    """``(sel (B, Hq, N, n) raster rows, sel_p (B, Hq, N, n) partition rows, perm, inv)``; no gradient."""
    q, k = call.q, call.k
    hq, hkv, bs = q.shape[2], k.shape[2], call.block
    ids = partition_ids(call.grid, call.bshape, q.device)  # (N,) raster -> block
    perm, inv = partition_perm(ids)
    cdt = compute_dtype(q.dtype)
    kbar = block_means(k[:, perm].detach().to(cdt), bs).repeat_interleave(hq // hkv, dim=2)  # (B, n, Hq, D)
    # the pool in raster order, so ties resolve by raster token (as the reference)
    scores = torch.einsum("bqhd,bnhd->bhqn", q.detach().to(cdt), kbar)  # (B, Hq, N, n)
    sel = select_pairs(scores, ids, call.selection, call.threshold, call.topk)  # (B, Hq, N, n) raster rows
    return sel, sel[:, :, perm], perm, inv


def _finish(call: VMoBACall, out: torch.Tensor, sel: torch.Tensor):
    return (out, sel) if call.return_layout else out


def _dispatch_fused(call: VMoBACall) -> tuple[bool, str]:
    return no_grad_fused_check(call.q, call.v, call.needs_grad)


def _run_dispatch(call: VMoBACall):
    sel, sel_p, perm, inv = _route(call)
    N, n, bs = call.q.shape[1], call.n_blocks, call.block
    # own block = the diagonal part in partition order (permuted row t is in block t // bs)
    own = torch.zeros(N, n, dtype=torch.bool, device=call.q.device)
    own[torch.arange(N, device=own.device), torch.arange(N, device=own.device) // bs] = True
    qp, kp, vp = call.q[:, perm], call.k[:, perm], call.v[:, perm]  # (B, N, H, D), blocks contiguous
    out = routed_block_attention(qp, kp, vp, sel_p & ~own, bs, diag="full", scale=call.scale,
                                 fused=_dispatch_engine(call))  # (B, N, Hq, Dv) permuted
    return _finish(call, out[:, inv], sel)  # raster order


def _dispatch_engine(call) -> bool | None:
    return dispatch_engine(call.q, call.block, call.k.shape[1], _dispatch_fused(call))


def _dispatch_detail(call) -> str:
    return dispatch_detail(call.q, call.block, call.k.shape[1], _dispatch_fused(call))


def _run_gather(call: VMoBACall):
    sel, sel_p, perm, inv = _route(call)
    B, N, hq = call.q.shape[:3]
    n, bs, bq = call.n_blocks, call.block, call.query_block
    nqb = math.ceil(N / bq)
    pad = nqb * bq - N
    tab = torch.cat([sel_p, sel_p.new_zeros(B, hq, pad, n)], 2) if pad else sel_p  # (B, Hq, nqb*bq, n)
    layout = tab.view(B, hq, nqb, bq, n).any(3)  # (B, Hq, nqb, n): union of the tile's routes
    qp, kp, vp = call.q[:, perm], call.k[:, perm], call.v[:, perm]  # (B, N, H, D), blocks contiguous
    out = block_gather_attention(qp, kp, vp, layout, (bq, bs), extra_mask=_TokenRoutes(sel_p, bs, False),
                                 scale=call.scale, reuse_buffers=not call.needs_grad)  # (B, N, Hq, Dv) permuted
    return _finish(call, out[:, inv], sel)  # raster order


def _run_reference(call: VMoBACall):
    """Naive block ids, naive pair selection, one masked softmax (float32 for half inputs)."""
    dt = reference_dtype(call.q.dtype)
    q, k, v = (t.to(dt) for t in (call.q, call.k, call.v))
    cfg = call.config
    ids = naive_block_ids(call.grid, call.mode, cfg.block_1d, cfg.block_2d, cfg.block_3d)  # (N,)
    sel = naive_vmoba_selection(q.detach(), k.detach(), ids, call.selection, call.threshold, call.topk)
    out = naive_masked_attention(q, k, v, sel[..., ids], call.scale)[0].to(call.q.dtype)  # (B, N, Hq, Dv)
    return _finish(call, out, sel)


DISPATCHER = Dispatcher("vmoba_attention", [
    Backend("dispatch", _run_dispatch, suits=lambda call: (True, "work ~ selected (query, block) pairs"),
            detail=_dispatch_detail, note="per key block, the queries that chose it, merged by log-sum-exp"),
    Backend("gather", _run_gather, suits=lambda call: (True, "union layout per query tile + token mask"),
            detail=gather_detail, note="block-gather engine"),
    Backend("reference", _run_reference, cpu_only, auto=False, note="naive selection and mask (the oracle)"),
])

register_op("vmoba_attention", make_call, DISPATCHER)


def vmoba_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid_shape, *, mode: str = "3d",
                    config: VMoBAConfig = VMoBAConfig(), selection: str = "threshold", threshold: float = 0.25,
                    topk: float | None = None, impl: str | None = None, query_block: int | None = None,
                    scale: float | None = None, return_layout: bool = False, backend: str | None = None):
    """VMoBA self-attention on raster-ordered video tokens.

    Args:
        q, k: ``(B, N, Hq, D)`` / ``(B, N, Hkv, D)``; v: ``(B, N, Hkv, Dv)``; ``N = T * Y * X`` raster
            order ``(t, y, x)``; GQA: keys pooled per KV head, routed per query head.
        grid_shape: ``(T, Y, X)``. mode: ``"1d"``, ``"2d"`` or ``"3d"`` (see :func:`layer_mode`).
        config: block extents per mode. selection: ``"threshold"`` (paper default, ``threshold`` in
            (0, 1]), ``"topk"`` (global, ``topk`` = average blocks per query in [1, n]) or ``"local"``
            (per-query top-k, = non-causal MoBA).
        backend: ``"dispatch"`` (the paper's varlen scheme on ``routed_block_attention``: per key block,
            tiles of the queries that chose it, merged by log-sum-exp; work ~ selected pairs; the own
            block is one batched call in partition order), ``"gather"`` (block-gather engine on the
            union of routes per query tile + a token mask; slow when routes diverge), ``"reference"``
            or None (dispatch). A forced backend that cannot run raises ValueError with the reason.
        impl: the former name of ``backend`` (``"dispatch"`` or ``"gather"``).
        query_block: the gather engine's query tile (default: the key block size).
        scale: logit scale, default ``D ** -0.5``.
        return_layout: also return the selection.

    Returns:
        ``(B, N, Hq, Dv)``; with ``return_layout`` also the selection ``(B, Hq, N, n)`` (raster rows).

    Example:
        >>> q = k = v = torch.randn(1, 4 * 16 * 16, 4, 32)
        >>> out = vmoba_attention(q, k, v, (4, 16, 16), mode="2d", config=VMoBAConfig(block_2d=(8, 8)))
    """
    if impl is not None:
        if impl not in ("dispatch", "gather"):
            raise ValueError(f"impl must be 'dispatch' or 'gather', got {impl!r}")
        if backend is not None and backend != impl:
            raise ValueError(f"impl={impl!r} and backend={backend!r} disagree (impl is the former name of backend)")
        backend = impl
    call = make_call(q, k, v, grid_shape, mode=mode, config=config, selection=selection, threshold=threshold,
                     topk=topk, query_block=query_block, scale=scale, return_layout=return_layout)
    return DISPATCHER.run(call, backend)
