"""MoBA: Mixture of Block Attention for Long-Context LLMs (arXiv 2502.13189).

Keys are cut into blocks; a parameter-free router scores every block by its mean key and
each query attends, at token level, only inside its top-k blocks. Causal: the query's own
block is always selected (causally masked inside) and blocks past the query are never
candidates; the top-k budget counts the own block (paper section 2.2).

Backends (``ak.explain("moba_attention", q, k, v, block_size=.., topk=..)`` shows the choice):

* ``dispatch`` -- token routing on the paper's key-major dispatch (``attnkit.kernels.dispatch``):
  fused CPU op without autograd, differentiable matmul softmax with it (``explain`` shows which);
* ``fused`` -- block routing without autograd on the fused CPU op (own block + each query block's
  gathered past blocks, merged by log-sum-exp); whole blocks, self-attention, ``Dv == D``;
* ``gather`` -- block routing on the block-gather engine (``attnkit.kernels.gather``);
* ``reference`` -- the naive per-query mask of ``attnkit.reference.naive_routed`` (never automatic).
"""


from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from attnkit._validate import check_qkv, int_arg, resolve_scale
from attnkit.kernels import alloc
from attnkit.kernels.dispatch import _diag, routed_block_attention
from attnkit.kernels.fused import fused_ops
from attnkit.kernels.gather import block_gather_attention, compute_dtype, needs_grad
from attnkit.kernels.merge import merge_partials
from attnkit.masks.causal import causal as causal_mask
from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.ops.routed._common import (
    cpu_only,
    dispatch_detail,
    dispatch_engine,
    gather_detail,
    grad_words,
    no_grad_fused_check,
    reference_dtype,
    upcast_words,
)
from attnkit.reference.naive_dense import naive_masked_attention
from attnkit.reference.naive_routed import naive_moba_mask


def block_means(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean over each block of ``block`` tokens of ``x (B, N, H, D)`` -> ``(B, n, H, D)``; a partial
    last block is divided by its real token count."""
    B, N, H, D = x.shape
    n = math.ceil(N / block)
    pad = n * block - N
    xp = torch.cat([x, x.new_zeros(B, pad, H, D)], 1) if pad else x
    counts = torch.full((n,), float(block), dtype=x.dtype, device=x.device)
    counts[-1] = block - pad
    return xp.view(B, n, block, H, D).sum(2) / counts.view(1, n, 1, 1)  # (B, n, H, D)



def route_topk(scores: torch.Tensor, own: torch.Tensor | None, topk: int, causal: bool) -> torch.Tensor:
    """MoBA's router on gate scores ``(..., R, n)`` (R query rows, n key blocks) -> bool selection.

    ``own`` (R,) is each row's own block (forced in; causal: later blocks excluded) or None.
    Ties go to the lower block index (stable sort), so exactly ``min(topk, #candidates)`` are chosen.
    """
    n = scores.shape[-1]
    s = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores.clone()
    if own is not None:
        j = torch.arange(n, device=s.device)
        if causal:
            s = s.masked_fill(j > own.unsqueeze(-1), float("-inf"))
        s = s.masked_fill(j == own.unsqueeze(-1), float("inf"))
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :topk]
    chosen = torch.gather(s, -1, order) > float("-inf")  # never count an excluded block as chosen
    return torch.zeros_like(s, dtype=torch.bool).scatter_(-1, order, chosen)



@dataclass(frozen=True)
class _TokenRoutes:
    """Element mask of per-token routing: query ``t`` may see key ``u`` iff its route table selects
    ``u``'s block (and ``u <= t`` when causal). Has the ``mask_mod`` protocol of ``ak.masks``."""

    table: torch.Tensor  # (B, H, N, n) bool
    block: int
    causal: bool

    def mask_mod(self, b, h, q_idx, kv_idx):
        ok = self.table[b, h, q_idx, kv_idx // self.block]
        return ok & (q_idx >= kv_idx) if self.causal else ok



def _Causal():
    return causal_mask()



@dataclass(frozen=True)
class MoBACall:
    """A validated ``moba_attention`` call (what backends and ``explain`` see)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    block_size: int
    topk: int
    causal: bool
    routing: str  # "token" | "block"
    scale: float
    return_layout: bool
    needs_grad: bool  # autograd will record the attention (read once, when the call is built)

    @property
    def self_attn(self) -> bool:
        return self.q.shape[1] == self.k.shape[1]

    def describe(self) -> str:
        kind = ("causal" if self.causal else "non-causal") + (" self" if self.self_attn else " cross")
        return (f"q {tuple(self.q.shape)} k {tuple(self.k.shape)} v {tuple(self.v.shape)} {self.q.dtype}, "
                f"{kind}, routing={self.routing}, block_size={self.block_size}, topk={self.topk}, "
                f"scale={self.scale:.4g}, {grad_words(self.needs_grad)}")


def make_call(q, k, v, block_size, topk, *, causal=True, routing="token", scale=None,
              return_layout=False) -> MoBACall:
    """Validate a ``moba_attention`` call; errors name the argument."""
    check_qkv(q, k, v)
    if routing not in ("token", "block"):
        raise ValueError(f"routing must be 'token' or 'block', got {routing!r}")
    int_arg("block_size", block_size, 1)
    N, Nk = q.shape[1], k.shape[1]
    n = math.ceil(Nk / block_size)
    if int_arg("topk", topk, 1) > n:
        raise ValueError(f"topk must be in [1, number of key blocks = ceil({Nk} / {block_size}) = {n}], got {topk}")
    if causal and N != Nk:
        raise ValueError(f"causal MoBA needs self-attention (Nq == Nk), got Nq={N}, Nk={Nk}")
    return MoBACall(q, k, v, block_size, topk, bool(causal), routing, resolve_scale(scale, q.shape[-1]),
                    bool(return_layout), needs_grad(q, k, v))


def _route(call: MoBACall) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The router: ``(sel (B, Hq, rows, n) bool, own (rows,) or None)``; rows are queries (token
    routing) or query blocks (block routing). No gradient flows through routing."""
    q, k = call.q, call.k
    hq, hkv, bs = q.shape[2], k.shape[2], call.block_size
    cdt = compute_dtype(q.dtype)
    kbar = block_means(k.detach().to(cdt), bs).repeat_interleave(hq // hkv, dim=2)  # (B, n, Hq, D)
    qr = q.detach().to(cdt)
    if call.routing == "block":
        qr = block_means(qr, bs)  # (B, nqb, Hq, D): one route per query block
    scores = torch.einsum("bqhd,bnhd->bhqn", qr, kbar)  # (B, Hq, rows, n)
    rows = scores.shape[2]
    own = None
    if call.self_attn:
        own = torch.arange(rows, device=q.device) // (1 if call.routing == "block" else bs)
    return route_topk(scores, own, call.topk, call.causal), own


def _finish(call: MoBACall, out: torch.Tensor, sel: torch.Tensor):
    return (out, sel) if call.return_layout else out


def _dispatch_fused(call: MoBACall) -> tuple[bool, str]:
    return no_grad_fused_check(call.q, call.v, call.needs_grad)


def _run_dispatch(call: MoBACall):
    # the paper's dispatch: own block as one batched (causal) block-diagonal part, every other
    # selected block attended in full by the queries that chose it, merged by log-sum-exp
    sel, own = _route(call)
    routes = sel
    if own is not None:
        n = sel.shape[-1]
        routes = sel & (torch.arange(n, device=sel.device) != own.unsqueeze(-1))  # (B, Hq, N, n)
    out = routed_block_attention(call.q, call.k, call.v, routes, call.block_size, scale=call.scale,
                                 diag=None if own is None else ("causal" if call.causal else "full"),
                                 fused=_dispatch_engine(call))
    return _finish(call, out, sel)


def _dispatch_supports(call: MoBACall) -> tuple[bool, str]:
    if call.routing != "token":
        return False, "block routing runs on 'fused' or 'gather' (the dispatch engine takes per-token routes)"
    return True, ""


def _dispatch_engine(call) -> bool | None:
    return dispatch_engine(call.q, call.block_size, call.k.shape[1], _dispatch_fused(call))


def _dispatch_detail(call) -> str:
    return dispatch_detail(call.q, call.block_size, call.k.shape[1], _dispatch_fused(call))


def _fused_supports(call: MoBACall) -> tuple[bool, str]:
    if call.routing != "block":
        return False, "token routing: the fused block path routes per query block (use 'dispatch')"
    if not call.self_attn:
        return False, "cross attention: the fused block path needs self-attention (Nq == Nk)"
    if call.q.shape[1] % call.block_size:
        return False, f"partial last block: N={call.q.shape[1]} is not a multiple of block_size={call.block_size}"
    return no_grad_fused_check(call.q, call.v, call.needs_grad)


def _run_fused(call: MoBACall):
    sel, _ = _route(call)
    out = _block_routed_fused(call.q, call.k, call.v, sel, call.block_size, call.causal, call.scale)
    return _finish(call, out, sel)


def _gather_supports(call: MoBACall) -> tuple[bool, str]:
    if call.routing != "block":
        return False, "token routing runs on 'dispatch' (the gather engine takes one route per query block)"
    return True, ""


def _run_gather(call: MoBACall):
    sel, _ = _route(call)
    out = block_gather_attention(call.q, call.k, call.v, sel, call.block_size, scale=call.scale,
                                 extra_mask=_Causal() if call.causal else None, reuse_buffers=not call.needs_grad)
    return _finish(call, out, sel)


def _run_reference(call: MoBACall):
    """The naive per-query mask (float32 for half inputs); the layout is read back from that mask."""
    dt = reference_dtype(call.q.dtype)
    q, k, v = (t.to(dt) for t in (call.q, call.k, call.v))
    bs = call.block_size
    allowed = naive_moba_mask(q.detach(), k.detach(), bs, call.topk, call.causal, call.routing)  # (B, H, N, Nk)
    out = naive_masked_attention(q, k, v, allowed, call.scale)[0].to(call.q.dtype)
    if not call.return_layout:
        return out
    B, H, N, Nk = allowed.shape
    n = math.ceil(Nk / bs)
    padded = torch.cat([allowed, allowed.new_zeros(B, H, N, n * bs - Nk)], -1)  # (B, H, N, n*bs)
    # a selected block always shows a visible key (the query itself, or a wholly past block)
    sel = padded.view(B, H, N, n, bs).any(-1)  # (B, H, N, n)
    if call.routing == "block":
        sel = sel[:, :, ::bs]  # (B, H, nqb, n): a query block's first row carries its route
    return out, sel


DISPATCHER = Dispatcher("moba_attention", [
    Backend("dispatch", _run_dispatch, _dispatch_supports,
            lambda call: (True, "work ~ selected (query, block) pairs, no per-token mask"), detail=_dispatch_detail,
            note="token routing: per key block, the queries that chose it, merged by log-sum-exp"),
    Backend("fused", _run_fused, _fused_supports, lambda call: (True, "no autograd: fused op, no element mask"),
            note="block routing without autograd on the fused CPU op",
            detail=lambda call: "own block + gathered past blocks on the fused CPU op, merged by log-sum-exp"
            + upcast_words(call.q.dtype)),
    Backend("gather", _run_gather, _gather_supports, lambda call: (True, "any block routing, differentiable"),
            detail=lambda c: gather_detail(c, c.block_size, c.causal), note="block routing on the block-gather engine"),
    Backend("reference", _run_reference, cpu_only, auto=False, note="naive per-query mask (the oracle)"),
])

register_op("moba_attention", make_call, DISPATCHER)


def moba_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, topk: int, *,
                   causal: bool = True, routing: str = "token", scale: float | None = None,
                   return_layout: bool = False, backend: str | None = None):
    """Mixture of block attention.

    Args:
        q: ``(B, N, Hq, D)``; k: ``(B, Nk, Hkv, D)``; v: ``(B, Nk, Hkv, Dv)`` (GQA: keys pooled per KV
            head, routed per query head).
        block_size: key block ``Bk`` (and query block of the engine); the last block may be partial.
        topk: selected blocks per query, the own block included (``1 <= topk <= ceil(Nk / Bk)``).
        causal: causal self-attention (``N == Nk``); non-causal self forces the own block,
            non-causal cross (``N != Nk``) is plain top-k.
        routing: ``"token"`` (paper: every query scores blocks) or ``"block"`` (the mean query of
            each query block routes for the block; cheaper and exactly ``topk`` blocks per row).
        scale: logit scale, default ``D ** -0.5``.
        return_layout: also return the selection.
        backend: ``"dispatch"`` (token routing), ``"fused"`` (block routing, no autograd),
            ``"gather"`` (block routing), ``"reference"`` or None (the first that can run, in
            that order). A forced backend that cannot run raises ValueError with the reason.

    Returns:
        ``(B, N, Hq, Dv)``; with ``return_layout`` also the bool selection ``(B, Hq, rows, n)``.

    Example:
        >>> q = k = v = torch.randn(1, 1024, 4, 32)
        >>> out = moba_attention(q, k, v, block_size=128, topk=3)
        >>> print(ak.explain("moba_attention", q, k, v, block_size=128, topk=3, routing="block"))
    """
    call = make_call(q, k, v, block_size, topk, causal=causal, routing=routing, scale=scale,
                     return_layout=return_layout)
    return DISPATCHER.run(call, backend)


def _block_routed_fused(q, k, v, sel, bs: int, causal: bool, scale: float) -> torch.Tensor:
    """Block-routed MoBA without autograd on torch's fused CPU flash-attention op.

    The own block is one batched (causal) block-diagonal call; each query block's other selected
    blocks are gathered into one key run and attended in full (query blocks with equal counts in one
    call); the two partials merge by log-sum-exp. ``sel (B, Hq, nqb, n)`` includes the own block.
    """
    fwd = fused_ops()[0]
    B, N, hq, D = q.shape
    hkv, n = k.shape[2], sel.shape[-1]
    g, cdt = hq // hkv, compute_dtype(q.dtype)
    qh = q.to(cdt).transpose(1, 2).contiguous()  # (B, Hq, N, D)
    kh, vh = (t.to(cdt).transpose(1, 2).contiguous() for t in (k, v))  # (B, Hkv, N, D)
    od, ld = _diag(fwd, qh, kh, vh, "causal" if causal else "full", bs, n, scale)  # (B*Hq*N, D), (B*Hq*N,)
    past = sel & ~torch.eye(n, dtype=torch.bool, device=q.device)  # (B, Hq, n, n): other selected blocks
    rows = past.flatten(0, 2)  # (R, n), R = B*Hq*n query blocks
    cnt = rows.sum(-1)  # (R,)
    qb = qh.view(-1, bs, D)  # (R, bs, D)
    kb, vb = kh.view(-1, bs, D), vh.view(-1, bs, D)  # (B*Hkv*n, bs, D)
    r_all = torch.arange(rows.shape[0], device=q.device)
    kv_base = (r_all // (hq * n) * hkv + r_all // n % hq // g) * n  # (R,) first key block of the row's KV head
    op = torch.zeros(rows.shape[0], bs, D, dtype=cdt, device=q.device)
    lp = torch.full((rows.shape[0], bs), float("-inf"), dtype=cdt, device=q.device)
    for c in torch.unique(cnt).tolist():
        if c == 0:
            continue
        r = torch.nonzero(cnt == c).squeeze(1)  # (Rc,)
        blk = torch.sort(rows[r].byte(), dim=-1, descending=True, stable=True).indices[:, :c]  # (Rc, c)
        ids = kv_base[r].unsqueeze(1) + blk  # (Rc, c) flat key blocks
        step = max(1, alloc.CHUNK_BYTES // (c * bs * 2 * D * qb.element_size()))
        for i0 in range(0, r.numel(), step):
            rr, ii = r[i0:i0 + step], ids[i0:i0 + step].reshape(-1)
            kg = kb.index_select(0, ii).view(rr.numel(), 1, c * bs, D)  # (Rc', 1, c*bs, D)
            vg = vb.index_select(0, ii).view(rr.numel(), 1, c * bs, D)
            o, l = fwd(qb.index_select(0, rr).unsqueeze(1), kg, vg, scale=scale)  # (Rc', 1, bs, D), (Rc', 1, bs)
            op.index_copy_(0, rr, o.squeeze(1))
            lp.index_copy_(0, rr, l.squeeze(1))
    lp, op = lp.view(-1), op.view(-1, D)  # (B*Hq*N,), (B*Hq*N, D)
    out, _ = merge_partials(od, ld, op, lp)  # the own block is never empty: ld is finite
    return out.view(B, hq, N, D).transpose(1, 2).to(q.dtype)  # (B, N, Hq, D)

