"""Per-head mask groups: the op S2-Attention and MoA share.

"S2-Attention: Hardware-Aware Context Sharding Among Attention Heads" (arXiv 2407.17678) and
"MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression" (arXiv 2406.14909)
both give every head (or head group) its own token-level mask. The query heads are split into
groups with one mask each; the op runs every group and puts the outputs back in head order.

Paths (``backend=``):

* ``masked`` (default) — one ``ak.attention`` call per group, its backend chosen automatically;
  a group made of whole GQA groups keeps its shared K/V heads, otherwise each query head gets a
  copy of its K/V head. With gradients the group outputs are concatenated and re-ordered; without,
  each is written in place into the output (``explain`` shows which).
* ``sdpa`` / ``blocked`` / ``flex`` — the masked path with every group's call forced onto that
  ``ak.attention`` backend.
* ``gather`` — the per-head block layout on the block-gather engine (only when the op supplies a
  layout, as ``s2_attention`` and ``moa_attention`` do; opt-in).
* ``reference`` — naive attention under the per-head element mask (never automatic).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from attnkit._validate import check_qkv, resolve_scale
from attnkit.kernels.gather import block_gather_attention
from attnkit.masks import Mask
from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.ops.dense.call import DISPATCHER as ATTENTION
from attnkit.ops.dense.call import attention
from attnkit.ops.dense.call import make_call as attention_call
from attnkit.reference.naive_dense import naive_attention

FORCED_INNER = ("sdpa", "blocked", "flex")  # ak.attention backends the masked path can be forced onto


@dataclass(frozen=True)
class HeadGroup:
    """Query heads that share one token-level mask (None = full attention)."""

    heads: tuple[int, ...]
    mask: Mask | None


@dataclass(frozen=True)
class GatherPlan:
    """What the block-gather engine runs: ``layout (1, Hq, nb, nb)`` at ``block_size`` tokens, and the
    element-level ``extra_mask`` (``mask_mod`` protocol) applied inside the selected blocks."""

    layout: torch.Tensor
    block_size: int
    extra_mask: object | None


@dataclass(frozen=True, eq=False)
class PerHeadCall:
    """A validated per-head call, as backends and ``explain`` see it.

    ``gather`` and ``reference_mask`` are thunks: the layout and the naive element mask
    ``(1, Hq, N, N)`` are built only by the path that needs them.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    groups: tuple[HeadGroup, ...]
    scale: float
    reference_mask: Callable[[], torch.Tensor]
    gather: Callable[[], GatherPlan] | None = None
    label: str = ""

    @property
    def needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(t.requires_grad for t in (self.q, self.k, self.v))

    def describe(self) -> str:
        hq, hkv = self.q.shape[2], self.k.shape[2]
        gqa = f" GQA {hq}:{hkv}" if hq != hkv else ""
        label = f" {self.label}," if self.label else ""
        return (f"q {tuple(self.q.shape)} k {tuple(self.k.shape)} v {tuple(self.v.shape)} {self.q.dtype}{gqa},"
                f"{label} {len(self.groups)} head group(s){' grad' if self.needs_grad else ''}")


def _slices(call: PerHeadCall) -> list[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor, Mask | None, bool]]:
    """Per group: ``(query heads in output order, q (B, N, h', D), k, v (B, N, h'', D|Dv), mask, whole)``.

    ``whole``: the group is made of whole GQA groups, so it keeps the shared K/V heads (``h'' = h' / G``);
    otherwise every query head gets its own K/V head (a copy of O(N D) per head).
    """
    q, k, v = call.q, call.k, call.v
    g = q.shape[2] // k.shape[2]
    out = []
    for grp in call.groups:
        heads = list(grp.heads)
        kv = sorted({h // g for h in heads})
        whole = len(heads) == len(kv) * g  # every query head of these KV heads is in the group
        if whole:
            heads = [kv_h * g + i for kv_h in kv for i in range(g)]
            kv_ix = kv
        else:
            kv_ix = [h // g for h in heads]
        qs = q[:, :, heads[0]:heads[0] + 1] if len(heads) == 1 else q[:, :, heads]  # (B, N, h', D)
        ks, vs = (t[:, :, kv_ix[0]:kv_ix[0] + 1] if len(kv_ix) == 1 else t[:, :, kv_ix] for t in (k, v))
        out.append((heads, qs, ks, vs, grp.mask, whole))
    return out


def _run_masked(call: PerHeadCall, inner: str | None) -> torch.Tensor:
    q, v = call.q, call.v
    if len(call.groups) == 1:  # one mask for every head: one call, nothing to split or re-order
        return attention(q, call.k, v, call.groups[0].mask, scale=call.scale, backend=inner)
    hq = q.shape[2]
    # without autograd each group is written straight into the output (no cat / re-order copies)
    out = None if call.needs_grad else q.new_empty(*q.shape[:3], v.shape[-1])  # (B, N, Hq, Dv)
    outs, order = [], []
    for heads, qs, ks, vs, mask, _ in _slices(call):
        o = attention(qs, ks, vs, mask, scale=call.scale, backend=inner)  # (B, N, h', Dv)
        if out is not None:
            out[:, :, heads] = o
            continue
        outs.append(o)
        order += heads
    if out is not None:
        return out
    inv = torch.empty(hq, dtype=torch.long)
    inv[torch.tensor(order)] = torch.arange(hq)
    return torch.cat(outs, 2).index_select(2, inv.to(q.device))  # (B, N, Hq, Dv) in head order


def _masked_detail(inner: str | None) -> Callable[[PerHeadCall], str]:
    def detail(call: PerHeadCall) -> str:
        parts = []
        for heads, qs, ks, vs, mask, whole in _slices(call):
            chosen = ATTENTION.choose(attention_call(qs, ks, vs, mask, scale=call.scale), inner).name
            kv = "" if whole else ", K/V copied per query head"
            parts.append(f"heads {heads} mask={'none' if mask is None else repr(mask)}{kv} -> ak.attention "
                         f"{chosen!r}")
        if len(call.groups) == 1:
            return f"one group, one ak.attention call over all heads: {parts[0]}"
        assembly = ("inputs need a gradient: group outputs concatenated and put back in head order"
                    if call.needs_grad else "no input needs a gradient: each group written in place into the output")
        return f"{len(parts)} ak.attention calls ({'; '.join(parts)}); {assembly}"

    return detail


def _forced_supports(inner: str) -> Callable[[PerHeadCall], tuple[bool, str]]:
    def supports(call: PerHeadCall) -> tuple[bool, str]:
        b = ATTENTION.get(inner)
        for heads, qs, ks, vs, mask, _ in _slices(call):
            ok, why = b.supports(attention_call(qs, ks, vs, mask, scale=call.scale))
            if not ok:
                return False, f"ak.attention {inner!r} cannot run heads {heads}: {why}"
        return True, ""

    return supports


def _gather_supports(call: PerHeadCall) -> tuple[bool, str]:
    if call.gather is None:
        return False, "no block layout for these masks (s2_attention and moa_attention supply one)"
    return True, ""


def _run_gather(call: PerHeadCall) -> torch.Tensor:
    plan = call.gather()
    return block_gather_attention(call.q, call.k, call.v, plan.layout, plan.block_size, extra_mask=plan.extra_mask,
                                  scale=call.scale)


def _gather_detail(call: PerHeadCall) -> str:
    plan = call.gather()
    kmax = int(plan.layout.sum(-1).max())
    buffers = ("inputs need a gradient: autograd keeps every chunk's gathered K/V" if call.needs_grad
               else "no input needs a gradient: gather buffers reused across query-block chunks")
    return f"layout {tuple(plan.layout.shape)} of {plan.block_size}-token blocks, up to {kmax} key blocks per row; " \
           f"{buffers}"


def _run_reference(call: PerHeadCall) -> torch.Tensor:
    return naive_attention(call.q, call.k, call.v, call.reference_mask().to(call.q.device), scale=call.scale)


BACKENDS = [
    Backend("masked", lambda c: _run_masked(c, None), note="one ak.attention call per head group",
            suits=lambda c: (True, "each group's mask on the ak.attention backend chosen for it"),
            detail=_masked_detail(None)),
    *(Backend(name, lambda c, n=name: _run_masked(c, n), supports=_forced_supports(name), auto=False,
              note=f"the masked path with every group's ak.attention call forced onto {name!r}",
              detail=_masked_detail(name)) for name in FORCED_INNER),
    Backend("gather", _run_gather, supports=_gather_supports, auto=False,
            note="opt-in: per-head block layout on the block-gather engine", detail=_gather_detail),
    Backend("reference", _run_reference, auto=False, note="naive attention under the per-head element mask"),
]


def check_groups(groups: object, hq: int) -> tuple[HeadGroup, ...]:
    """``groups`` as HeadGroups; they must split the ``hq`` query heads exactly, masks head-independent."""
    if not isinstance(groups, (list, tuple)) or not groups:
        raise TypeError("groups must be a non-empty sequence of (heads, mask) pairs")
    out, seen = [], []
    for grp in groups:
        heads, mask = (grp.heads, grp.mask) if isinstance(grp, HeadGroup) else grp
        heads = tuple(int(h) for h in heads)
        if not heads:
            raise ValueError("every head group needs at least one head")
        if mask is not None and (not isinstance(mask, Mask) or mask.head_dependent):
            raise TypeError(f"a group mask must be a head-independent ak.masks pattern or None, got {mask!r}")
        out.append(HeadGroup(heads, mask))
        seen += heads
    if sorted(seen) != list(range(hq)):
        raise ValueError(f"head groups must split the query heads 0..{hq - 1} exactly once, got {sorted(seen)}")
    return tuple(out)


def group_mask(groups: Sequence[HeadGroup], hq: int, n: int) -> torch.Tensor:
    """Element mask ``(1, Hq, N, N)`` of the groups, from each group mask's dense form."""
    m = torch.ones(1, hq, n, n, dtype=torch.bool)
    for grp in groups:
        if grp.mask is not None:
            m[0, list(grp.heads)] = grp.mask.to_dense(n, n)
    return m


def make_call(q, k, v, groups, *, scale=None) -> PerHeadCall:
    hq, _ = check_qkv(q, k, v, same_extent=True)
    gs = check_groups(groups, hq)
    n = q.shape[1]
    return PerHeadCall(q, k, v, gs, resolve_scale(scale, q.shape[-1]), lambda: group_mask(gs, hq, n))


DISPATCHER = Dispatcher("per_head_attention", BACKENDS)
register_op("per_head_attention", make_call, DISPATCHER)


def per_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       groups: Sequence[HeadGroup | tuple[Sequence[int], Mask | None]], *,
                       scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """Softmax attention where each group of query heads has its own mask.

    Args:
        q: ``(B, N, Hq, D)``; k: ``(B, N, Hkv, D)``; v: ``(B, N, Hkv, Dv)``; ``Hq % Hkv == 0``.
        groups: ``(heads, mask)`` pairs (or :class:`HeadGroup`) splitting the query heads ``0..Hq-1``;
            ``mask`` is a head-independent ``ak.masks`` pattern or None (full attention).
        scale: score scale, default ``D ** -0.5``.
        backend: None (automatic: ``"masked"``), ``"masked"``, ``"sdpa"`` / ``"blocked"`` / ``"flex"``
            (the masked path forced onto that ``ak.attention`` backend) or ``"reference"``; see
            ``ak.explain("per_head_attention", ...)``.

    Returns:
        ``(B, N, Hq, Dv)``.

    Example:
        >>> q = k = v = torch.randn(1, 256, 4, 32)
        >>> out = per_head_attention(q, k, v, [((0, 1), ak.masks.causal()), ((2, 3), ak.masks.sliding_window(16))])
    """
    return DISPATCHER.run(make_call(q, k, v, groups, scale=scale), backend)


def resolve_backend(impl: str | None, backend: str | None) -> str | None:
    """The path of the older ``impl=`` spelling: ``"gather"`` is the gather path; ``"masked"`` with a
    ``backend`` is that backend (once forwarded to ``ak.attention``: ``"blocked"`` is the masked path
    forced onto it), without one the masked path."""
    if impl is None:
        return backend
    if impl not in ("masked", "gather"):
        raise ValueError(f"impl must be 'masked' or 'gather', got {impl!r}")
    if impl == "gather":
        return "gather"  # a backend given with it was only ever read by the masked path
    return backend if backend is not None else "masked"
