"""Cross-attention with additive per-pair logits: RelationNet++'s appearance + geometry attention.

"RelationNet++: Bridging Visual Representations for Object Detection via Transformer Decoder",
arXiv 2010.15831, §3.2: the logit of query ``i`` and key ``j`` is the scaled appearance product plus a
geometry term ``G(p_j - p_i)`` per head, ``softmax_j(q_i . k_j / sqrt(d) + G_ij) v_j``. ``ak.attention``
takes boolean masks only, so this op carries the float bias. :func:`relative_geometry` computes the
geometry term ``G(p_j - p_i)`` itself: per pair (``reference``), or, for integer positions on a known grid,
by the paper's shared location embedding (§3.3): ``G`` evaluated once per integer offset and gathered.

Also the pointer distribution of Pointer Networks and OAT ("OAT: Object-Level Attention Transformer for
Gaze Scanpath Prediction", arXiv 2407.13335): the attention weights themselves are the output, a
distribution over the keys (objects), with no values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from attnkit._validate import check_qkv, int_arg, resolve_scale
from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.reference.naive_cross import naive_biased_attention


@dataclass(frozen=True, eq=False)
class BiasedCall:
    """A validated ``biased_attention`` call."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    bias: torch.Tensor
    scale: float

    def describe(self) -> str:
        return f"q {tuple(self.q.shape)} k {tuple(self.k.shape)} {self.q.dtype}, bias {tuple(self.bias.shape)}"


def make_call(q, k, v, bias, *, scale=None) -> BiasedCall:
    hq, hkv = check_qkv(q, k, v)
    if hq != hkv:
        raise ValueError(f"biased_attention: needs as many K/V heads as query heads, got {hq} and {hkv}")
    want = (q.shape[0], hq, q.shape[1], k.shape[1])
    if not isinstance(bias, torch.Tensor) or not bias.is_floating_point() or bias.dim() != 4 or any(
            s not in (1, w) for s, w in zip(bias.shape, want)):
        raise ValueError(f"biased_attention: bias must be a float tensor broadcastable to (B, H, Nq, Nk) = {want}, "
                         f"got {getattr(bias, 'shape', type(bias).__name__)}")
    return BiasedCall(q, k, v, bias, resolve_scale(scale, q.shape[-1]))


def _einsum(c: BiasedCall) -> torch.Tensor:
    work = torch.float32 if c.q.dtype in (torch.float16, torch.bfloat16) else c.q.dtype
    s = torch.einsum("bqhd,bkhd->bhqk", c.q.to(work), c.k.to(work)) * c.scale + c.bias.to(work)   # (B, H, Nq, Nk)
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), c.v.to(work)).to(c.q.dtype)


def _reference(c: BiasedCall) -> torch.Tensor:
    return naive_biased_attention(c.q, c.k, c.v, c.bias, c.scale)


DISPATCHER = Dispatcher("biased_attention", [
    Backend("einsum", _einsum, suits=lambda c: (True, "scores materialised with the bias"),
            note="scores + bias, softmax, product (fp32 for half inputs)"),
    Backend("reference", _reference, auto=False, note="naive_biased_attention"),
])
register_op("biased_attention", make_call, DISPATCHER)


def biased_attention(q, k, v, bias, *, scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """``softmax(q k^T * scale + bias) v``: attention with additive float logits per (head, query, key).

    Args:
        q: ``(B, Nq, H, D)``; k, v: ``(B, Nk, H, D)`` / ``(B, Nk, H, Dv)``.
        bias: float, broadcastable to ``(B, H, Nq, Nk)`` (RelationNet++: the geometry term).
        scale: default ``D ** -0.5``. backend: None, ``"einsum"`` or ``"reference"``.

    Returns:
        ``(B, Nq, H, Dv)``.

    Example:
        >>> out = biased_attention(q, k, v, geometry.permute(0, 3, 1, 2))
    """
    return DISPATCHER.run(make_call(q, k, v, bias, scale=scale), backend)


def pointer_probs(q, k, mask=None, *, scale: float | None = None) -> torch.Tensor:
    """The pointer distribution over keys: ``softmax_j(q . k_j * scale)`` with masked keys at 0.

    Args:
        q: ``(B, Nq, H, D)`` decoder states; k: ``(B, Nk, H, D)`` encoder outputs (objects).
        mask: bool broadcastable to ``(B, H, Nq, Nk)`` (True = may point), or None.

    Returns:
        ``(B, H, Nq, Nk)``; each row sums to 1 over its allowed keys.
    """
    check_qkv(q, k, k)
    scale = resolve_scale(scale, q.shape[-1])
    work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    s = torch.einsum("bqhd,bkhd->bhqk", q.to(work), k.to(work)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1).to(q.dtype)


@dataclass(frozen=True, eq=False)
class GeometryCall:
    """A validated ``relative_geometry`` call."""

    q_pos: torch.Tensor
    k_pos: torch.Tensor
    embed: Callable[[torch.Tensor], torch.Tensor]
    scale: float
    extent: tuple[int, int] | None
    dtype: torch.dtype

    def describe(self) -> str:
        return (f"q_pos {tuple(self.q_pos.shape)} k_pos {tuple(self.k_pos.shape)} {self.q_pos.dtype}, "
                f"extent {self.extent}, {self.dtype}")


def make_geometry_call(q_pos, k_pos, embed, *, scale=1.0, extent=None, dtype=None) -> GeometryCall:
    for name, t in (("q_pos", q_pos), ("k_pos", k_pos)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[-1] != 2 or t.dtype == torch.bool:
            raise ValueError(f"relative_geometry: {name} must be a numeric (B, N, 2) tensor, "
                             f"got {getattr(t, 'shape', type(t).__name__)}")
    if q_pos.shape[0] != k_pos.shape[0] and 1 not in (q_pos.shape[0], k_pos.shape[0]):
        raise ValueError(f"relative_geometry: q_pos and k_pos batches differ: {q_pos.shape[0]} and {k_pos.shape[0]}")
    if not callable(embed):
        raise TypeError(f"relative_geometry: embed must be callable (delta (..., 2) -> (..., H)), got {type(embed)}")
    scale = float(scale)
    if not scale > 0:
        raise ValueError(f"relative_geometry: scale must be > 0, got {scale}")
    if extent is not None:
        if len(extent) != 2:
            raise ValueError(f"relative_geometry: extent must be (E0, E1), got {extent}")
        extent = tuple(int_arg(f"relative_geometry: extent[{i}]", e, 1) for i, e in enumerate(extent))
    if dtype is None:
        dtype = q_pos.dtype if q_pos.is_floating_point() else torch.get_default_dtype()
    return GeometryCall(q_pos, k_pos, embed, scale, extent, dtype)


def _pairwise(c: GeometryCall) -> torch.Tensor:
    delta = (c.k_pos.to(c.dtype)[:, None] - c.q_pos.to(c.dtype)[:, :, None]) / c.scale      # (B, N, K, 2)
    return c.embed(delta)                                                                  # (B, N, K, H)


def _table(c: GeometryCall) -> torch.Tensor:
    e0, e1 = c.extent
    dev = c.q_pos.device
    # every integer offset a pair can have, (2 E0 - 1, 2 E1 - 1, 2), embedded once
    o0 = torch.arange(1 - e0, e0, device=dev)
    o1 = torch.arange(1 - e1, e1, device=dev)
    offs = torch.stack(torch.meshgrid(o0, o1, indexing="ij"), -1)                          # (2E0-1, 2E1-1, 2)
    table = c.embed(offs.to(c.dtype) / c.scale)                                            # (2E0-1, 2E1-1, H)
    table = table.reshape(offs.shape[0] * offs.shape[1], -1)                               # ((2E0-1)(2E1-1), H)
    inside = torch.stack([((p >= 0) & (p < torch.tensor([e0, e1], device=dev))).all()
                          for p in (c.q_pos, c.k_pos)]).all()
    if dev.type == "cpu":     # a CPU bool is no device sync
        if not bool(inside):
            raise ValueError(f"relative_geometry: q_pos and k_pos must lie in [0, extent) = [0, {c.extent}) on "
                             "each axis for the table backend")
    else:                     # checked on the device, without a host sync
        torch._assert_async(inside, "relative_geometry: positions must lie in [0, extent) on each axis")
    d = c.k_pos[:, None].long() - c.q_pos[:, :, None].long()                              # (B, N, K, 2)
    return table[(d[..., 0] + e0 - 1) * (2 * e1 - 1) + d[..., 1] + e1 - 1]                # (B, N, K, H)


def _table_ok(c: GeometryCall):
    if c.extent is None:
        return False, "no extent: the offsets' range is unknown"
    if c.q_pos.is_floating_point() or c.k_pos.is_floating_point():
        return False, "float positions: offsets are not integers"
    return True, "integer positions on a known grid"


def _table_suits(c: GeometryCall):
    rows = (2 * c.extent[0] - 1) * (2 * c.extent[1] - 1)
    pairs = max(c.q_pos.shape[0], c.k_pos.shape[0]) * c.q_pos.shape[1] * c.k_pos.shape[1]
    return (rows <= pairs, f"{rows} table rows vs {pairs} pairs")


GEOMETRY = Dispatcher("relative_geometry", [
    Backend("table", _table, supports=_table_ok, suits=_table_suits,
            note="embed every integer offset of the grid once, gather per pair (RelationNet++ §3.3)"),
    Backend("reference", _pairwise, note="embed each pair's offset (p_j - p_i) / scale"),
])
register_op("relative_geometry", make_geometry_call, GEOMETRY)


def relative_geometry(q_pos, k_pos, embed, *, scale: float = 1.0, extent: tuple[int, int] | None = None,
                      dtype: torch.dtype | None = None, backend: str | None = None) -> torch.Tensor:
    """RelationNet++'s geometry term ``embed((p_j - p_i) / scale)`` for every (query, key) pair.

    Args:
        q_pos: ``(B, N, 2)`` query positions; k_pos: ``(B, K, 2)`` key positions (``B`` may be 1 on one side).
        embed: ``delta (..., 2) -> (..., H)``, applied row-wise (e.g. an MLP on a sine/cosine embedding).
        scale: divides the offsets. extent: ``(E0, E1)``: integer positions lie in ``[0, E0) x [0, E1)``;
            with integer positions it enables the ``table`` backend, which embeds the ``(2 E0 - 1)(2 E1 - 1)``
            possible offsets once and gathers (the same values as per pair: the same offsets are embedded,
            only the batching of ``embed``'s matmuls differs). dtype: of the offsets fed to ``embed``
            (default: the positions' if float, else the default dtype).
        backend: None, ``"table"`` or ``"reference"`` (per pair).

    Returns:
        ``(B, N, K, H)``.

    Example:
        >>> g = relative_geometry(grid_xy, corner_xy, lambda d: mlp(sincos(d)), extent=(64, 64))
    """
    return GEOMETRY.run(make_geometry_call(q_pos, k_pos, embed, scale=scale, extent=extent, dtype=dtype), backend)


__all__ = ["biased_attention", "pointer_probs", "relative_geometry"]
