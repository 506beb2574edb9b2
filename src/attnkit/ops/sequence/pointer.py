"""Pointer Networks (arXiv 1506.03134) — attention whose distribution over the input positions is the output.

Section 2.3: with encoder states ``e_j`` and decoder states ``d_i``, ``u_ij = v^T tanh(W1 e_j + W2 d_i)`` and
``p(C_i = j | C_<i, P) = softmax_j(u_ij)``: the additive (Bahdanau) scores are not used to mix values; their
softmax over the ``n`` inputs IS the prediction, so the output size follows the input length. Decoding
constraints (a permutation must not repeat an index) mask positions: they get probability exactly 0.

The op takes the projected states (``W1 e`` and ``W2 d``, the module's parameters) and ``v``. Backends:
``chunked`` (the ``tanh`` of every pair, ``(B, rows, Ne, A)``, a block of decoder rows at a time so the
working tensor stays under a fixed size) and ``reference``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.reference.naive_sequence3 import naive_pointer_attention

# elements of the (B, rows, Ne, A) tanh block per chunk: 16 M (64 MB in fp32)
CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True, eq=False)
class PointerCall:
    dec: torch.Tensor
    enc: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None
    log: bool

    def describe(self) -> str:
        return f"dec {tuple(self.dec.shape)} enc {tuple(self.enc.shape)} {self.dec.dtype}, log {self.log}"


def make_call(dec, enc, v, mask=None, *, log=False) -> PointerCall:
    fn = "pointer_attention"
    for name, t, rank in (("dec", dec, 3), ("enc", enc, 3), ("v", v, 1)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{fn}: {name} must be a floating-point tensor, got {getattr(t, 'dtype', type(t))}")
        if t.dim() != rank:
            want = {"dec": "(B, Nd, A)", "enc": "(B, Ne, A)", "v": "(A,)"}[name]
            raise ValueError(f"{fn}: {name} must be {want}, got shape {tuple(t.shape)}")
        if t.numel() == 0:
            raise ValueError(f"{fn}: {name} is empty, shape {tuple(t.shape)}")
    B, Nd, A = dec.shape
    if enc.shape[0] != B or enc.shape[2] != A or v.shape[0] != A:
        raise ValueError(f"{fn}: dec (B, Nd, A), enc (B, Ne, A) and v (A,) disagree: {tuple(dec.shape)}, "
                         f"{tuple(enc.shape)}, {tuple(v.shape)}")
    if mask is not None:
        want = (B, Nd, enc.shape[1])
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 3 or any(
                s not in (1, w) for s, w in zip(mask.shape, want)):
            raise ValueError(f"{fn}: mask must be a bool tensor broadcastable to (B, Nd, Ne) = {want}, "
                             f"got {getattr(mask, 'shape', type(mask).__name__)}")
        mask = mask.expand(want)
    if not isinstance(log, bool):
        raise TypeError(f"{fn}: log must be a bool, got {type(log).__name__}")
    return PointerCall(dec, enc, v, mask, log)


def _chunked(c: PointerCall) -> torch.Tensor:
    B, Nd, A = c.dec.shape
    Ne = c.enc.shape[1]
    rows = max(1, CHUNK_ELEMENTS // max(1, B * Ne * A))
    enc = c.enc.unsqueeze(1)  # (B, 1, Ne, A)
    u = torch.cat([torch.tanh(enc + c.dec[:, i:i + rows].unsqueeze(2)) @ c.v  # (B, rows, Ne)
                   for i in range(0, Nd, rows)], 1)  # (B, Nd, Ne)
    if c.mask is None:
        return torch.log_softmax(u, -1) if c.log else torch.softmax(u, -1)
    # a row with no allowed position is all 0 (all -inf as log): softmax over zeros, then masked, keeps it finite
    empty = ~c.mask.any(-1, keepdim=True)  # (B, Nd, 1)
    s = u.masked_fill(~c.mask, float("-inf")).masked_fill(empty, 0.0)
    if c.log:
        return torch.log_softmax(s, -1).masked_fill(~c.mask, float("-inf"))
    return torch.softmax(s, -1).masked_fill(~c.mask, 0.0)


def _reference(c: PointerCall) -> torch.Tensor:
    return naive_pointer_attention(c.dec, c.enc, c.v, c.mask, log=c.log)


DISPATCHER = Dispatcher("pointer_attention", [
    Backend("chunked", _chunked, note="tanh of every (decoder, input) pair, a block of decoder rows at a time",
            detail=lambda c: f"{max(1, CHUNK_ELEMENTS // max(1, c.dec.shape[0] * c.enc.shape[1] * c.dec.shape[2]))}"
                             f" decoder rows per block"),
    Backend("reference", _reference, auto=False, note="naive_pointer_attention"),
])
register_op("pointer_attention", make_call, DISPATCHER)


def pointer_attention(dec: torch.Tensor, enc: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, *,
                      log: bool = False, backend: str | None = None) -> torch.Tensor:
    """The pointer distribution ``softmax_j(v . tanh(enc_j + dec_i))`` over the input positions.

    Args:
        dec: ``(B, Nd, A)`` projected decoder states ``W2 d_i``.
        enc: ``(B, Ne, A)`` projected encoder states ``W1 e_j``.
        v: ``(A,)``.
        mask: bool broadcastable to ``(B, Nd, Ne)``, True = may point (see :func:`pointed_mask`), or None.
        log: return log-probabilities (``-inf`` at masked positions) instead of probabilities.
        backend: None, ``"chunked"`` or ``"reference"``.

    Returns:
        ``(B, Nd, Ne)``: each row sums to 1 over its allowed positions, masked positions are exactly 0; a row
        with no allowed position is all 0 (all ``-inf`` as log).

    Example:
        >>> p = pointer_attention(w2(d), w1(e), v, pointed_mask(targets, e.shape[1]))
    """
    return DISPATCHER.run(make_call(dec, enc, v, mask, log=log), backend)


def pointed_mask(pointers: torch.Tensor, n_inputs: int) -> torch.Tensor:
    """The no-repeat mask of teacher-forced decoding: step ``i`` may not point at ``pointers[:, :i]``.

    Args:
        pointers: ``(B, Nd)`` int64 indices in ``[0, n_inputs)``, the positions output at each step.
        n_inputs: ``Ne``.

    Returns:
        ``(B, Nd, Ne)`` bool, True = may point.
    """
    if not isinstance(pointers, torch.Tensor) or pointers.dtype != torch.int64 or pointers.dim() != 2:
        raise ValueError(f"pointed_mask: pointers must be an int64 (B, Nd) tensor, "
                         f"got {getattr(pointers, 'dtype', type(pointers).__name__)}")
    B, Nd = pointers.shape
    hit = torch.zeros(B, Nd, n_inputs, dtype=torch.bool, device=pointers.device)
    hit.scatter_(2, pointers.unsqueeze(-1), True)  # (B, Nd, Ne): step i's own pointer
    earlier = hit.cumsum(1) - hit.to(torch.int64)  # pointers of steps < i
    return earlier == 0


__all__ = ["pointed_mask", "pointer_attention"]
