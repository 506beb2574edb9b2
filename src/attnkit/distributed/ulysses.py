"""DeepSpeed Ulysses: System Optimizations for Enabling Training of Extreme Long Sequence
Transformer Models, arXiv 2309.14509.

An all-to-all turns this rank's sequence shard of all heads into the full sequence of H/P heads,
any single-device attention runs there under the unchanged GLOBAL mask, and a second all-to-all
returns this rank's sequence shard of all heads. The all-to-alls are differentiable
(``_comm.all_to_all_diff``: backward is the all-to-all with the dims swapped), so autograd composes
them with ``ak.attention`` and no custom Function is needed.
"""

from __future__ import annotations

import torch

from attnkit._validate import check_qkv
from attnkit.distributed import _comm


def kv_replication(hq: int, hkv: int, world: int, op: str = "ulysses_attention") -> int:
    """How many copies of each KV head make ``Hkv`` split over ``world`` ranks with every query
    head's KV head on the same rank (1 when ``Hkv % P == 0``). Raises when ``Hq % P != 0``."""
    if hq % world:
        raise ValueError(f"{op}: H={hq} query heads do not split over P={world} ranks (all-to-all over heads "
                         f"needs H % P == 0)")
    g = hq // hkv
    # the smallest r dividing the group size G with (Hkv * r) % P == 0; r = G always works since P | Hq
    return next(r for r in range(1, g + 1) if g % r == 0 and (hkv * r) % world == 0)


def replicate_kv(x: torch.Tensor, r: int) -> torch.Tensor:
    """``(B, N, Hkv, X)`` -> ``(B, N, Hkv*r, X)``, head ``j`` copied to ``j*r .. j*r+r-1`` (GQA order kept)."""
    return x if r == 1 else x.repeat_interleave(r, dim=2)


def heads_to_seq(x: torch.Tensor, group=None) -> torch.Tensor:
    """``(B, N/P, H, X)`` sequence shard -> ``(B, N, H/P, X)`` head shard (differentiable)."""
    return _comm.all_to_all_diff(x, 2, 1, group)


def seq_to_heads(x: torch.Tensor, group=None) -> torch.Tensor:
    """Inverse of :func:`heads_to_seq`: ``(B, N, H/P, ...)`` -> ``(B, N/P, H, ...)``."""
    return _comm.all_to_all_diff(x, 1, 2, group)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None, *,
                      scale: float | None = None, group=None, return_lse: bool = False,
                      backend: str | None = None):
    """Softmax attention over a contiguously sharded sequence by all-to-all over heads.

    Every rank of ``group`` passes its contiguous shard (rank r holds tokens ``[r*n, (r+1)*n)``);
    shards are equal across ranks.

    Args:
        q: ``(B, Nq_local, Hq, D)``; ``Hq % P == 0``.
        k: ``(B, Nk_local, Hkv, D)``, ``Hq % Hkv == 0``. When ``Hkv % P != 0`` (GQA/MQA with few KV
            heads) each KV head is replicated ``r`` times (the smallest ``r`` dividing ``Hq/Hkv`` with
            ``P | Hkv*r``) before the all-to-all; their gradients sum back through the copy.
        v: ``(B, Nk_local, Hkv, Dv)``.
        mask: any ``ak.masks`` mask or None, over the GLOBAL ``(Nq, Nk)`` sequence (it is applied to
            the full sequence of the local heads, unchanged). Masks that depend on the head index see
            local head indices; bool tensor masks must broadcast over heads.
        scale: score scale, default ``D ** -0.5``.
        group: process group, None = the default group.
        return_lse: also return the lse ``(B, Nq_local, Hq)``.
        backend: passed to ``ak.attention`` for the local heads.

    Returns:
        ``out (B, Nq_local, Hq, Dv)`` in the input dtype (and the lse with ``return_lse``).

    Example:
        >>> out = ulysses_attention(q, k, v, ak.masks.causal())   # inside torchrun / run_local
    """
    from attnkit.ops.dense.call import attention

    return around_heads("ulysses_attention", q, k, v, group, return_lse,
                        lambda qf, kf, vf: attention(qf, kf, vf, mask, scale=scale, backend=backend,
                                                     return_lse=return_lse))


def around_heads(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group, return_lse: bool, inner):
    """The Ulysses shell shared with USP: check the shards, replicate KV heads if ``Hkv % P != 0``,
    all-to-all to ``(B, N, H/P, X)``, run ``inner(q, k, v)`` (``out`` or ``(out, lse)``) there, and
    all-to-all the result back to this rank's ``(B, N_local, H, ...)``."""
    hq, hkv = check_qkv(q, k, v)
    _, world = _comm.rank_world(group)
    r = kv_replication(hq, hkv, world, op=op)
    _comm.check_same_shapes(op, group, q=q, k=k, v=v)
    k, v = replicate_kv(k, r), replicate_kv(v, r)
    res = inner(heads_to_seq(q, group), heads_to_seq(k, group), heads_to_seq(v, group))  # on (B, N, H/P, X)
    if not return_lse:
        return seq_to_heads(res, group)                                    # (B, Nq_local, Hq, Dv)
    out, lse = res
    return seq_to_heads(out, group), seq_to_heads(lse, group)              # lse (B, Nq_local, Hq)
