"""Orion-MSP: Multi-Scale Sparse Attention for Tabular In-Context Learning (arXiv 2511.02818).

The row-interaction attention of one scale: the first ``num_special`` tokens (CLS and global tokens) see and
are seen by every token, the others attend a window ``|i - j| <= window`` on the token index, the diagonal,
and ``num_random`` BigBird-style random links (section 3, "block-sparse attention"). The structure is static
given the length and a seed, so it is one ``ak.masks`` mask
(``global_tokens | sliding_window | block_sparse(random layout)``), and ``ak.attention`` runs it on the
compiled tile kernel over the tiles the mask leaves non-empty.

Backends (``ak.explain("orion_msp_attention", q, k, v, num_special=.., window=..)``):

* ``mask`` -- ``ak.attention`` with the mask (its own choice inside: the tile kernel for float32 / half CPU
  inputs, exact paths otherwise);
* ``reference`` -- the naive twin of ``attnkit.reference.naive_sparse2`` (never automatic).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from attnkit._validate import check_qkv, int_arg, resolve_scale
from attnkit.masks.base import Mask
from attnkit.masks.block_sparse import block_sparse
from attnkit.masks.prefix import global_tokens
from attnkit.masks.window import sliding_window
from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.ops.dense.call import attention
from attnkit.ops.routed._common import cpu_only, reference_dtype
from attnkit.reference.naive_sparse2 import naive_orion_msp


def random_layout(n: int, num_special: int, num_random: int, random_block: int = 1, seed: int = 0) -> torch.Tensor:
    """Bool ``(ceil(N / b), ceil(N / b))`` block layout of the random links, ``b = random_block``.

    Query block ``I``, from the block holding position ``num_special`` on, links ``num_random`` distinct key
    blocks among the same range, drawn with ``torch.randperm`` from a generator seeded with ``seed`` (one
    draw per query block, in order). With ``b = 1`` and the global generator seeded alike, this is the
    released builder's draw (``randperm(L - num_special)[:num_random] + num_special`` per query).
    """
    nb = math.ceil(n / random_block)
    lay = torch.zeros(nb, nb, dtype=torch.bool)
    first = num_special // random_block
    if num_random <= 0 or n <= num_special + 1:
        return lay
    g = torch.Generator().manual_seed(seed)
    for i in range(first, nb):
        lay[i, torch.randperm(nb - first, generator=g)[:num_random] + first] = True
    return lay


@lru_cache(maxsize=32)
def orion_msp_mask(n: int, num_special: int, window: int, num_random: int = 0, random_block: int = 1,
                   seed: int = 0) -> Mask:
    """Orion-MSP's connectivity for ``N`` tokens as an ``ak.masks`` mask (True = attend).

    ``global_tokens(num_special) | sliding_window(window, window) | block_sparse(random_layout(...))``;
    the window includes the diagonal. Cached, so repeated calls reuse the kernel's tile list.
    """
    m: Mask = global_tokens(num_special) | sliding_window(window, window)
    if num_random > 0 and n > num_special + 1:
        m = m | block_sparse(random_layout(n, num_special, num_random, random_block, seed), random_block)
    return m


@dataclass(frozen=True)
class OrionCall:
    """A validated ``orion_msp_attention`` call (what backends and ``explain`` see)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    num_special: int
    window: int
    num_random: int
    random_block: int
    seed: int
    scale: float

    def mask(self) -> Mask:
        return orion_msp_mask(self.q.shape[1], self.num_special, self.window, self.num_random, self.random_block,
                              self.seed)

    def describe(self) -> str:
        return (f"q {tuple(self.q.shape)} k {tuple(self.k.shape)} v {tuple(self.v.shape)} {self.q.dtype}, "
                f"num_special={self.num_special}, window={self.window}, num_random={self.num_random} "
                f"(block {self.random_block}, seed {self.seed}), scale={self.scale:.4g}")


def make_call(q, k, v, *, num_special, window, num_random=0, random_block=1, seed=0, scale=None) -> OrionCall:
    """Validate an ``orion_msp_attention`` call; errors name the argument."""
    hq, hkv = check_qkv(q, k, v, same_extent=True)
    if hq != hkv:
        raise ValueError(f"orion_msp_attention: q and k must have the same heads, got {hq} and {hkv}")
    int_arg("orion_msp_attention: num_special", num_special, 0)
    int_arg("orion_msp_attention: window", window, 0)
    int_arg("orion_msp_attention: num_random", num_random, 0)
    int_arg("orion_msp_attention: random_block", random_block, 1)
    int_arg("orion_msp_attention: seed", seed, 0)
    return OrionCall(q, k, v, num_special, window, num_random, random_block, seed, resolve_scale(scale, q.shape[-1]))


def _run_mask(call: OrionCall) -> torch.Tensor:
    if call.q.is_meta:  # the structure is static: the output shape is all a meta run needs
        return call.q.new_empty(*call.q.shape[:-1], call.v.shape[-1])
    return attention(call.q, call.k, call.v, mask=call.mask(), scale=call.scale)


def _mask_detail(call: OrionCall) -> str:
    n = call.q.shape[1]
    what = f"global_tokens({call.num_special}) | sliding_window({call.window})"
    if call.num_random:
        what += f" | {call.num_random} random {call.random_block}-blocks per query block"
    return f"ak.attention with {what} (density {call.mask().density(n, n):.4f}); its own backend choice inside"


def _run_reference(call: OrionCall) -> torch.Tensor:
    dt = reference_dtype(call.q.dtype)
    q, k, v = (t.to(dt) for t in (call.q, call.k, call.v))
    return naive_orion_msp(q, k, v, num_special=call.num_special, window=call.window, num_random=call.num_random,
                           random_block=call.random_block, seed=call.seed, scale=call.scale).to(call.q.dtype)


DISPATCHER = Dispatcher("orion_msp_attention", [
    Backend("mask", _run_mask, suits=lambda c: (True, "static mask: ak.attention visits its non-empty tiles"),
            detail=_mask_detail, note="ak.attention with the composed mask"),
    Backend("reference", _run_reference, cpu_only, auto=False, note="naive dense-mask twin (the oracle)"),
])

register_op("orion_msp_attention", make_call, DISPATCHER)


def orion_msp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_special: int, window: int,
                        num_random: int = 0, random_block: int = 1, seed: int = 0, scale: float | None = None,
                        backend: str | None = None) -> torch.Tensor:
    """Orion-MSP's sparse self-attention over one scale's token sequence.

    Args:
        q, k: ``(B, L, H, D)``; v: ``(B, L, H, Dv)``; the first ``num_special`` positions are the CLS and
            global tokens.
        num_special: tokens with full rows and columns; window: ``|i - j| <= window`` is attended (0: only
            the diagonal, which is what the released builder's window term amounts to).
        num_random: random links per query block; random_block: their block size (1: per query and key,
            as released; 64 aligns them with the kernel's tiles); seed: their generator's seed.
        scale: logit scale, default ``D ** -0.5``.
        backend: ``"mask"``, ``"reference"`` or None (mask).

    Returns:
        ``(B, L, H, Dv)``.

    Example:
        >>> q = k = v = torch.randn(2, 70, 4, 16)
        >>> out = orion_msp_attention(q, k, v, num_special=6, window=4)
    """
    call = make_call(q, k, v, num_special=num_special, window=window, num_random=num_random,
                     random_block=random_block, seed=seed, scale=scale)
    return DISPATCHER.run(call, backend)
