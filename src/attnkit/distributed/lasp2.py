"""LASP-2: sequence (context) parallelism for linear attention.

Paper: Sun, Lan, Zhong, Qu, Cheng, "LASP-2: Rethinking Sequence Parallelism for Linear Attention and
Its Hybrid", arXiv 2502.07563 (2025). Contract: ``docs/design.md`` §3 (the op), §8 (distributed).

Each rank holds one contiguous piece of the sequence (ranks in sequence order). The only thing a
piece needs from the others is a ``(Dphi, Dv)`` memory state per head, so:

1. every rank runs the single-process chunk kernel on its piece from a zero state: the output is the
   intra term and the final state is ``M_t`` (decayed to the piece's end); ``G_t`` is the piece's total
   log-decay;
2. ONE all-gather exchanges ``[M_t, G_t]`` (size independent of the sequence length, §8.6);
3. causal: rank t folds the states of the ranks before it, ``A_s = exp(G_s) A_{s-1} + M_s`` (its own
   ``M_t`` is NOT added: the intra term covers it, §8.8) and adds the inter term
   ``scale exp(gc_r) phi(q_r) A_{t-1}`` (``gc_r`` the log-decay through token r of the piece).
   Non-causal: ``O_t = phi(Q_t) sum_s M_s`` (its own state included).

The backward of the exchange (:class:`_StateExchange`) all-gathers the gradients of the folded
states and each rank takes the suffix fold ``D_u = dP_{u+1} + exp(G_{u+1}) D_{u+1}`` as the gradient of
its own ``M_u`` (and ``exp(G_u) <A_{u-1}, D_u>`` for ``G_u``): one all-gather each way, as in §8.3. The
kernel takes ``dM_t`` as the gradient of its final state inside its own backward walk; the rest is autograd.
(Folding ``A_{t-1}`` in as the kernel's initial state instead needs ``M_t`` by a separate pass before
the kernel, whose backward is the costlier one: at N=32768, H=8, D=64 fp32 on P=2 / P=4 CPU ranks the
step took the same forward and 6% longer forward+backward, 1133 vs 1065 ms / 1182 vs 1110 ms.)

Because only states travel, the pieces may have different lengths (no padding needed).
"""

from __future__ import annotations

import torch

import attnkit as ak
from attnkit.distributed._comm import all_gather_stack, check_group_shapes, needs_grad, rank_world
from attnkit.ops.linear.call import _finish, make_call


class _StateExchange(torch.autograd.Function):
    """All-gather every rank's state ``M_s`` (and log-decay ``G_s``) and fold them for this rank.

    forward: causal -> ``A_{t-1}`` (the state entering this rank's piece), else ``sum_s M_s``.
    backward: all-gather the gradients of the folded states, suffix-fold them (§8.3 / §8.4).
    """

    @staticmethod
    def forward(ctx, M, G, causal, group):
        rank, world = rank_world(group)
        n = M.numel()
        pack = M.reshape(-1) if G is None else torch.cat([M.reshape(-1), G.reshape(-1)])  # (n [+ B*Hs],)
        rows = all_gather_stack(pack, group) if world > 1 else pack[None]  # (P, n [+ B*Hs])
        Ms = rows[:, :n].view(world, *M.shape)  # (P, B, Hs, Dphi, Dv')
        Gs = None if G is None else rows[:, n:].view(world, *G.shape)  # (P, B, Hs)
        if causal:
            out = torch.zeros_like(M)
            for s in range(rank):  # A_s = exp(G_s) A_{s-1} + M_s; rank t needs A_{t-1}
                out = out if Gs is None else out * Gs[s].exp()[..., None, None]
                out = out + Ms[s]
        else:
            out = Ms.sum(0)
        ctx.causal, ctx.group = causal, group
        ctx.save_for_backward(out if (causal and Gs is not None) else None, Gs)
        return out

    @staticmethod
    def backward(ctx, dP):
        rank, world = rank_world(ctx.group)
        prefix, Gs = ctx.saved_tensors
        dP = dP.contiguous()
        dPs = all_gather_stack(dP, ctx.group) if world > 1 else dP[None]  # (P, B, Hs, Dphi, Dv')
        if not ctx.causal:
            return dPs.sum(0), None, None, None
        # dM_u = sum_{t > u} exp(G_{u+1} + ... + G_{t-1}) dP_t, by the suffix recurrence
        dM = torch.zeros_like(dP)
        for u in range(world - 2, rank - 1, -1):
            dM = dM if Gs is None else dM * Gs[u + 1].exp()[..., None, None]
            dM = dM + dPs[u + 1]
        dG = None
        if Gs is not None:  # A_u = exp(G_u) A_{u-1} + M_u and dL/dA_u = dM_u
            dG = Gs[rank].exp() * (prefix * dM).sum((-2, -1))  # (B, Hs)
        return dM, dG, None, None


def _log_decay(call, cdt: torch.dtype, n: int):
    """Cumulative log-decay ``gc (B, n, H)`` through each token of this piece (its own included) and the
    piece's total ``G (B, H)``; ``(None, None)`` without decay."""
    if call.decay is None:
        return None, None
    lg = torch.log(call.decay.to(cdt))
    if call.decay_kind == "per-head":
        B, H = call.q.shape[0], call.q.shape[2]
        steps = torch.arange(1, n + 1, dtype=cdt, device=lg.device)  # r = 1..n
        return (steps[:, None] * lg).expand(B, n, H), (lg * n).expand(B, H)  # (B, n, H), (B, H)
    gc = lg.cumsum(1)  # (B, n, H)
    return gc, gc[:, -1]


def _local_state(call, cdt: torch.dtype):
    """This piece's final state from a zero state, ``M = sum_j w_j phi(k_j)^T [v_j, 1]``, and its total
    log-decay ``G`` (``None`` without decay). ``w_j = exp(G - gcum_j)`` is the decay from token j to the end.

    Without decay the state is kept per KV head (GQA: fewer elements to send); with decay per query head.
    """
    pk = call.phi(call.k).to(cdt)  # (B, C, Hkv, Dphi)
    v = call.v.to(cdt)
    if call.normalize:  # z is the state of a value column of ones
        v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # (B, C, Hkv, Dv + 1)
    if call.decay is None:
        return torch.einsum("bnhd,bnhe->bhde", pk, v), None  # (B, Hkv, Dphi, Dv')
    B, C, Hkv, Dp = pk.shape
    H = call.q.shape[2]
    rep = H // Hkv
    gc, G = _log_decay(call, cdt, C)  # (B, C, H), (B, H)
    w = torch.exp(G[:, None] - gc)  # (B, C, H), <= 1
    pkw = pk[:, :, :, None] * w.view(B, C, Hkv, rep, 1)  # (B, C, Hkv, rep, Dphi): query head = g*rep + r
    M = torch.einsum("bngrd,bnge->bgrde", pkw, v)  # (B, Hkv, rep, Dphi, Dv')
    return M.reshape(B, H, Dp, v.shape[-1]), G  # (B, H, Dphi, Dv')


def _in_graph(M: torch.Tensor, inputs) -> torch.Tensor:
    """The exchange's backward is a collective every rank must join: keep it in the graph whenever the
    output needs a gradient (e.g. a rank whose k, v are frozen but q is not)."""
    if not M.requires_grad and torch.is_grad_enabled() and any(
            isinstance(t, torch.Tensor) and t.requires_grad for t in inputs):
        return M.detach().requires_grad_()
    return M


class _Join(torch.autograd.Function):
    """``o`` unchanged, with ``p`` in its graph (a zero gradient): rank 0's prefix is zero and unused, but
    its exchange must still run backward with the others."""

    @staticmethod
    def forward(ctx, o, p):
        ctx.p = (p.shape, p.dtype, p.device)
        return o.view_as(o)

    @staticmethod
    def backward(ctx, g):
        shape, dtype, device = ctx.p
        return g, torch.zeros(shape, dtype=dtype, device=device)


def _causal(call, q, k, v, decay, rank, group, cdt):
    """Causal LASP-2 (§8.2): the chunk kernel from a zero state gives the intra term and, as its final
    state, ``M_t`` (no extra pass, and its backward takes ``dM_t`` inside the kernel's reverse walk);
    the exchange folds the earlier ranks' states; the inter term ``scale exp(gc_r) phi(q_r) A_{t-1}`` is
    one batched matmul (ranks > 0 only)."""
    _, n, H, _ = q.shape
    rep = H // k.shape[2]
    vv = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1) if call.normalize else v  # (B, n, Hkv, Dv')
    o, S = ak.linear_attention(q, k, vv, causal=True, feature_map=call.phi, decay=decay, normalize=False,
                               scale=call.scale, return_state=True, chunk_size=call.chunk_size)
    # o (B, n, H, Dv'), S (B, H, Dphi, Dv'); with normalize the last column is the normaliser's
    gc, G = _log_decay(call, cdt, n)
    # without decay the heads of a KV group hold the same state: send one per group (GQA: less traffic)
    M = S if G is not None or rep == 1 else S[:, ::rep]  # (B, Hs, Dphi, Dv')
    P = _StateExchange.apply(_in_graph(M.contiguous(), (q, k, v, decay)),
                             None if G is None else G.contiguous(), True, group)  # A_{t-1}
    if P.shape[1] != H:
        P = P.repeat_interleave(rep, dim=1)  # (B, H, Dphi, Dv')
    if rank == 0:  # A_0 = 0: no inter term
        o = _Join.apply(o, P).to(cdt)
    else:
        inter = torch.matmul(call.phi(q).to(cdt).transpose(1, 2), P).transpose(1, 2)  # (B, n, H, Dv') view
        if gc is None:
            o = o.to(cdt).add(inter, alpha=call.scale)
        else:  # row r decays by prod_{j <= r} decay_j; one fused pass (measured 1.2x over mul-then-add)
            o = torch.addcmul(o.to(cdt), inter, (call.scale * gc.exp())[..., None])
    return _finish(call, o, S + (P if G is None else G.exp()[..., None, None] * P))  # M_t + exp(G_t) A_{t-1}


def lasp2_linear_attention(q, k, v, *, causal=True, decay=None, feature_map="identity", normalize=False,
                           scale=None, return_state=False, chunk_size=None, eps=1e-6, group=None,
                           check_shapes=True):
    """``ak.linear_attention`` over the sequence split across the ranks of ``group`` (LASP-2).

    Call it on every rank of ``group`` with that rank's contiguous piece (rank order = sequence order);
    the result is this rank's piece of what ``ak.linear_attention`` returns for the whole sequence.

    Args:
        q: ``(B, N_t, H, D)`` this rank's queries.
        k: ``(B, N_t, Hkv, D)`` (non-causal: any ``M_t``; ``H % Hkv == 0``).
        v: ``(B, N_t, Hkv, Dv)``.
        causal, feature_map, normalize, scale, chunk_size, eps: as ``ak.linear_attention``.
        decay: None, per head ``(H,)`` (the same on every rank) or per token ``(B, N_t, H)`` for this piece.
            The gradient of a per-head decay is this rank's share: sum it over ranks (as for any
            replicated parameter) to get the single-process gradient.
        return_state: also return the state at the end of this rank's piece (the last rank's is the
            single-process final state; non-causal: the total ``phi(K)^T V``).
        group: process group (None = default). Pieces may differ in length; B, H, Hkv, D, Dv and the
            decay kind must agree.
        check_shapes: all-gather the shapes first (one tiny collective) to raise a ValueError naming the
            mismatch instead of failing inside the state exchange.

    Returns:
        ``o (B, N_t, H, Dv)``, or ``(o, state)`` with ``return_state``.

    Communication per call and rank: one all-gather of ``B*Hs*Dphi*Dv'`` (+ ``B*Hs`` log-decays) elements
    forward and one of the same size backward (``Hs = Hkv`` without decay, ``H`` with; ``Dv' = Dv + 1``
    with ``normalize``); float32 (float64 for float64 inputs).

    Example:
        >>> # on each of P ranks: the rank's piece of a (1, P*4096, 8, 64) sequence
        >>> o = lasp2_linear_attention(q_t, k_t, v_t, decay=torch.full((8,), 0.99))
    """
    call = make_call(q, k, v, causal=causal, feature_map=feature_map, decay=decay, normalize=normalize,
                     scale=scale, return_state=return_state, chunk_size=chunk_size, eps=eps)
    if not isinstance(check_shapes, bool):
        raise TypeError(f"check_shapes must be a bool, got {type(check_shapes).__name__}")
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, _, H, _ = q.shape
    Hkv = k.shape[2]
    if check_shapes:
        kinds = {"none": 0, "per-head": 1, "per-token": 2}
        check_group_shapes("lasp2_linear_attention", {
            "B": B, "H": H, "Hkv": Hkv, "D": q.shape[-1], "Dv": v.shape[-1], "causal": causal,
            "normalize": normalize, "decay kind": kinds[call.decay_kind],
            "dtype": 1 if cdt == torch.float64 else 0, "requires_grad": needs_grad(q, k, v)}, group, device=q.device,
            equal=("B", "H", "Hkv", "D", "Dv", "causal", "normalize", "decay kind", "dtype", "requires_grad"))
    rank, world = rank_world(group)
    if world == 1:  # nothing to exchange
        return ak.linear_attention(q, k, v, causal=causal, feature_map=feature_map, decay=decay,
                                   normalize=normalize, scale=call.scale, return_state=return_state,
                                   chunk_size=chunk_size, eps=eps)
    if causal:
        return _causal(call, q, k, v, decay, rank, group, cdt)
    M, _ = _local_state(call, cdt)
    P = _StateExchange.apply(_in_graph(M, (q, k, v)), None, False, group)
    if P.shape[1] != H:  # states were exchanged per KV head: each query head of a group shares its state
        P = P.repeat_interleave(H // Hkv, dim=1)  # (B, H, Dphi, Dv')
    o = torch.einsum("bnhd,bhde->bnhe", call.phi(q).to(cdt) * call.scale, P)  # (B, N_t, H, Dv')
    return _finish(call, o, P)


def lasp2_comm_elements(B: int, H: int, Hkv: int, Dphi: int, Dv: int, world: int, *, decay: bool = False,
                        normalize: bool = False) -> int:
    """Elements this rank receives in the forward all-gather of :func:`lasp2_linear_attention` (the
    backward receives as many): ``(P - 1) * B * Hs * (Dphi * Dv' + [decay])``: one all-gather of the
    memory states (arXiv 2502.07563)."""
    hs = H if decay else Hkv
    per = B * hs * Dphi * (Dv + int(normalize)) + (B * hs if decay else 0)
    return (world - 1) * per


__all__ = ["lasp2_comm_elements", "lasp2_linear_attention"]
