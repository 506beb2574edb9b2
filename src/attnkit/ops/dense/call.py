"""Softmax attention under any mask: ``ak.attention``. Validate -> choose backend -> run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property

import torch

from attnkit._validate import assert_finite, check_qkv, resolve_scale
from attnkit.masks import Mask, as_mask
from attnkit.masks.base import EMPTY
from attnkit.ops.base import Dispatcher, register_op
from attnkit.ops.decode import split_kv
from attnkit.ops.dense import blocked, flex, reference, sdpa
from attnkit.ops.dense import gather as block_gather_backend


@dataclass(frozen=True, eq=False)
class AttentionCall:
    """A validated ``ak.attention`` call, as backends see it."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: Mask | None
    scale: float
    return_lse: bool

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def nq(self) -> int:
        return self.q.shape[1]

    @property
    def nk(self) -> int:
        return self.k.shape[1]

    @property
    def hq(self) -> int:
        return self.q.shape[2]

    @property
    def hkv(self) -> int:
        return self.k.shape[2]

    @property
    def needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(t.requires_grad for t in (self.q, self.k, self.v))

    def mask_tensor(self) -> torch.Tensor | None:
        """The dense boolean mask, broadcastable to ``(B, H, Nq, Nk)``; None for full attention."""
        return None if self.mask is None else self.mask.to_dense(self.nq, self.nk, device=self.q.device)

    def mask_elements(self) -> int:
        if self.mask is None:
            return 0
        lead = self.batch * self.hq if self.mask.head_dependent else 1
        return lead * self.nq * self.nk

    @cached_property
    def _tile_fraction(self) -> float:
        if self.mask is None:
            return 1.0
        bq, bk, _ = blocked.tile_sizes(self.nq, self.nk)
        cls = self.mask.blocks(self.nq, self.nk, bq, bk)
        return (cls != EMPTY).float().mean().item()

    def tile_fraction(self) -> float:
        """Fraction of the blocked backend's tiles that are not empty."""
        return self._tile_fraction

    def describe(self) -> str:
        gqa = f" GQA {self.hq}:{self.hkv}" if self.hq != self.hkv else ""
        mask = "none" if self.mask is None else repr(self.mask)
        dens = "" if self.mask is None else f" (density {self.mask.density(self.nq, self.nk):.3f})"
        return (f"q {tuple(self.q.shape)} k {tuple(self.k.shape)} v {tuple(self.v.shape)} {self.q.dtype}"
                f"{gqa} mask={mask}{dens}{' grad' if self.needs_grad else ''}")


def _check_mask(mask: object, b: int, hq: int, nq: int, nk: int) -> Mask | None:
    if mask is None:
        return None
    if isinstance(mask, torch.Tensor):
        if mask.dtype != torch.bool:
            raise TypeError(f"mask tensor must be bool (True = attend), got {mask.dtype}")
        if not 2 <= mask.dim() <= 4:
            raise ValueError(f"mask must broadcast to (B, H, Nq, Nk) = ({b}, {hq}, {nq}, {nk}); "
                             f"got {tuple(mask.shape)}")
        lead = (1,) * (4 - mask.dim()) + tuple(mask.shape)
        if lead[0] not in (1, b) or lead[1] not in (1, hq) or lead[2] not in (1, nq) or lead[3] not in (1, nk):
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to "
                             f"(B, H, Nq, Nk) = ({b}, {hq}, {nq}, {nk})")
    m = as_mask(mask)
    m.validate(nq, nk)
    mb, mh = m.lead_shape
    if mb not in (1, b) or mh not in (1, hq):
        raise ValueError(f"mask batch/head dims {(mb, mh)} do not match (B, H) = ({b}, {hq})")
    return m


def make_call(q, k, v, mask=None, *, scale=None, return_lse=False) -> AttentionCall:
    check_qkv(q, k, v)
    assert_finite("attention", q=q, k=k, v=v)  # only under the debug switch: no host sync by default
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    m = _check_mask(mask, q.shape[0], q.shape[2], q.shape[1], k.shape[1])
    return AttentionCall(q, k, v, m, resolve_scale(scale, q.shape[-1]), return_lse)


# split-KV decoding comes first: for decode shapes (<= 16 queries, >= 256 keys, inference, interval masks) its
# compiled kernel measured 2-2.5x faster than SDPA on CPU; every other call passes over it with the reason
_SPLIT_KV = dataclasses.replace(split_kv.BACKEND, note="Lean Attention / flash-decoding: compiled split-KV decode "
                                "kernel, partials merged by LSE")
_BACKENDS = [_SPLIT_KV, sdpa.BACKEND, block_gather_backend.BACKEND, blocked.BACKEND, flex.BACKEND, reference.BACKEND]
# inside torch.compile only backends made of traceable tensor ops are chosen automatically: the
# blocked and gather tile walks plan with data-dependent Python loops (graph breaks)
_TRACEABLE = ("sdpa", "reference")
_COMPILE_NOTE = ("under torch.compile, backend=None chooses among " + ", ".join(_TRACEABLE)
                 + " (the tile walks plan with data-dependent Python loops)")


class _AttentionDispatcher(Dispatcher):
    def choose(self, call, backend=None):
        if backend is None and torch.compiler.is_compiling():
            for b in self.backends:
                if b.name in _TRACEABLE and b.supports(call)[0]:
                    return b
        return super().choose(call, backend)

    def explain(self, call, backend=None) -> str:
        return super().explain(call, backend) + "\n  " + _COMPILE_NOTE


DISPATCHER = _AttentionDispatcher("attention", _BACKENDS)
register_op("attention", make_call, DISPATCHER)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Mask | torch.Tensor | None = None,
    *,
    scale: float | None = None,
    backend: str | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention, heads-last, under any mask.

    Args:
        q: ``(B, Nq, Hq, D)``.
        k: ``(B, Nk, Hkv, D)`` with ``Hq % Hkv == 0`` (GQA/MQA share K/V heads across groups).
        v: ``(B, Nk, Hkv, Dv)``; ``Dv`` may differ from ``D``.
        mask: an ``ak.masks`` pattern, a bool tensor broadcastable to ``(B, Hq, Nq, Nk)``
            (True = attend), or None. Causal is top-left aligned (``ak.masks.causal(offset)`` shifts it).
        scale: score scale, default ``D ** -0.5``.
        backend: None picks automatically (see ``ak.explain``); ``"sdpa"``, ``"blocked"``,
            ``"gather"`` (routed block-sparse), ``"flex"`` or ``"reference"`` force one (ValueError
            with the reason if it cannot run).
        return_lse: also return the natural-log sum-exp of the scaled, masked scores.

    Returns:
        ``out (B, Nq, Hq, Dv)`` in the input dtype; with ``return_lse`` also ``lse (B, Nq, Hq)``
        (float32, float64 for float64 inputs; ``-inf`` where a row has no allowed key — its output is 0).

    Non-finite inputs: NaN or infinity propagates to exactly the outputs that depend on it (a query
    row with a NaN, every query allowed to see a NaN key or value) and no further; a fully masked row
    stays 0. ``ak.check_finite(True)`` or ``ATTNKIT_CHECK_FINITE=1`` raises ``ValueError`` instead,
    naming the argument (off by default: no host sync). Inside ``torch.compile``, ``backend=None``
    chooses ``sdpa`` or ``reference`` (see ``ak.explain``).

    Example:
        >>> q = k = v = torch.randn(1, 1024, 8, 64)
        >>> out = ak.attention(q, k, v, mask=ak.masks.causal() & ak.masks.sliding_window(128))
    """
    call = make_call(q, k, v, mask, scale=scale, return_lse=return_lse)
    return DISPATCHER.run(call, backend)
