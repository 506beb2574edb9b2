"""LASP-2H: the softmax-attention layers of a linear/softmax hybrid under LASP-2's sequence split.

Paper: Sun, Lan, Zhong, Qu, Cheng, "LASP-2: Rethinking Sequence Parallelism for Linear Attention and
Its Hybrid", arXiv 2502.07563 (2025), its hybrid (softmax) layers; ``docs/design.md`` §8.

Every rank all-gathers K and V (one collective: K and V travel packed together), so it holds the
keys of the whole sequence, and runs ``ak.attention`` for its own queries with the causal diagonal
shifted by its start position. Causal ranks keep only the pieces of ranks <= their own. The backward
of the all-gather is a reduce-scatter of the full-length dK, dV to their owners (``_comm.all_gather_diff``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import attnkit as ak
from attnkit._validate import check_qkv
from attnkit.distributed._comm import all_gather_diff, check_group_shapes, needs_grad, rank_world
from attnkit.distributed.zigzag import LAYOUTS

_DTYPE_CODE = {torch.float64: 0, torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}


def lasp2h_attention(q, k, v, *, causal=False, scale=None, return_lse=False, backend=None, group=None,
                     check_shapes=True, layout="contiguous"):
    """Softmax attention over the sequence split across the ranks of ``group`` (LASP-2H).

    Call it on every rank with that rank's piece (``layout="contiguous"``: rank order = sequence order;
    ``"zigzag"``: chunks r and 2P-1-r of 2P, see :mod:`attnkit.distributed.zigzag`); the result is this
    rank's rows of ``ak.attention`` over the whole sequence. With a causal mask, contiguous pieces
    leave the last rank 2P-1 times the pairs of the first; zigzag gives every rank the same count
    (arXiv 2502.07563, the hybrid layers).

    Args:
        q: ``(B, Nq_t, H, D)`` this rank's queries.
        k: ``(B, Nk_t, Hkv, D)`` this rank's keys (``H % Hkv == 0``); causal needs ``Nk_t == Nq_t``.
        v: ``(B, Nk_t, Hkv, Dv)``.
        causal: global causal mask (query at global position i sees keys j <= i).
        scale: score scale, default ``D ** -0.5``.
        return_lse: also return the log-sum-exp of this rank's rows.
        backend: forwarded to ``ak.attention``.
        group: process group (None = default).
        check_shapes: all-gather the shapes first (one tiny collective): pieces of different lengths are
            then padded for the exchange (the paper's remedy); without it all pieces must be equally long.
        layout: ``"contiguous"`` or ``"zigzag"`` (equal, even-length pieces; balances causal work).

    Returns:
        ``o (B, Nq_t, H, Dv)``, or ``(o, lse (B, Nq_t, H))`` with ``return_lse``.

    Communication per call and rank: receive ``(P-1) * B * L * Hkv * (D + Dv)`` elements (L the longest
    piece) forward; the backward reduce-scatter receives as many.

    Example:
        >>> o = lasp2h_attention(q_t, k_t, v_t, causal=True)   # on every rank of the group
    """
    check_qkv(q, k, v)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if not isinstance(check_shapes, bool):
        raise TypeError(f"check_shapes must be a bool, got {type(check_shapes).__name__}")
    B, nq, H, D = q.shape
    nk, Hkv, Dv = k.shape[1], k.shape[2], v.shape[-1]
    if causal and nq != nk:
        raise ValueError(f"lasp2h_attention: causal needs this rank's q and k/v pieces equally long, "
                         f"got {nq} and {nk}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    rank, world = rank_world(group)
    if check_shapes:
        rows = check_group_shapes("lasp2h_attention", {
            "B": B, "H": H, "Hkv": Hkv, "D": D, "Dv": Dv, "N_local": nk, "causal": causal,
            "dtype": _DTYPE_CODE.get(q.dtype, 99), "requires_grad": needs_grad(q, k, v)}, group,
            equal=("B", "H", "Hkv", "D", "Dv", "causal", "dtype", "requires_grad"),
            device=q.device)
        lengths = [r["N_local"] for r in rows]
    else:
        lengths = [nk] * world
    if world == 1:  # nothing to exchange
        return ak.attention(q, k, v, ak.masks.causal() if causal else None, scale=scale, backend=backend,
                            return_lse=return_lse)
    if layout == "zigzag" and (len(set(lengths)) > 1 or nk % 2 or nq != nk):
        raise ValueError(f"lasp2h_attention: layout='zigzag' needs equal, even-length q and k/v pieces on every "
                         f"rank, got k/v lengths {lengths} and q length {nq} here")
    L = max(lengths)
    kv = torch.cat([k, v], dim=-1)  # (B, nk, Hkv, D + Dv): one collective for both
    if L > nk:  # pad to the longest piece; the padding is cut off after the exchange
        kv = F.pad(kv, (0, 0, 0, 0, 0, L - nk))  # (B, L, Hkv, D + Dv)
    if layout == "zigzag" and causal:
        return _zigzag_causal(q, kv, rank, world, D, scale, backend, return_lse, group)
    last = rank if causal else world - 1  # causal: ranks after this one hold only future keys
    rows = all_gather_diff(kv.contiguous(), group)  # (P, B, L, Hkv, D + Dv)
    full = torch.cat([rows[s, :, :lengths[s]] for s in range(last + 1)], dim=1)  # (B, Nk, Hkv, D + Dv)
    kf, vf = full[..., :D], full[..., D:]  # (B, Nk, Hkv, D), (B, Nk, Hkv, Dv)
    mask = ak.masks.causal(sum(lengths[:rank])) if causal else None  # kv <= q + start of this piece
    return ak.attention(q, kf, vf, mask, scale=scale, backend=backend, return_lse=return_lse)


def _zigzag_causal(q, kv, rank, world, D, scale, backend, return_lse, group):
    """Causal LASP-2H on zigzag pieces: rank r's query halves are chunks r and 2P-1-r of 2P; each sees
    the keys up to its own end, under the causal diagonal shifted by its global start."""
    c = kv.shape[1] // 2
    rows = all_gather_diff(kv.contiguous(), group)  # (P, B, 2c, Hkv, D + Dv)
    # chunk j < P is the first half of rank j's piece, chunk j >= P the second half of rank 2P-1-j's
    chunks = [rows[j, :, :c] if j < world else rows[2 * world - 1 - j, :, c:] for j in range(2 * world)]
    outs = []
    for half, j in enumerate((rank, 2 * world - 1 - rank)):
        keys = torch.cat(chunks[: j + 1], dim=1)  # (B, (j+1) c, Hkv, D + Dv): everything up to chunk j
        outs.append(ak.attention(q[:, half * c:(half + 1) * c], keys[..., :D], keys[..., D:],
                                 ak.masks.causal(j * c), scale=scale, backend=backend, return_lse=return_lse))
    if return_lse:
        return torch.cat([o for o, _ in outs], dim=1), torch.cat([lse for _, lse in outs], dim=1)
    return torch.cat(outs, dim=1)  # (B, 2c, H, Dv)


def lasp2h_comm_elements(B: int, N_local: int, Hkv: int, D: int, Dv: int, world: int) -> int:
    """Elements this rank receives in the forward all-gather of :func:`lasp2h_attention` (the backward
    reduce-scatter receives as many): ``(P - 1) * B * N_local * Hkv * (D + Dv)`` (the K/V all-gather)."""
    return (world - 1) * B * N_local * Hkv * (D + Dv)


__all__ = ["lasp2h_attention", "lasp2h_comm_elements"]
