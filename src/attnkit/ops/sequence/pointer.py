"""Pointer Networks (arXiv 1506.03134) — attention whose distribution over the input positions is the output.

Section 2.3: with encoder states ``e_j`` and decoder states ``d_i``, ``u_ij = v^T tanh(W1 e_j + W2 d_i)`` and
``p(C_i = j | C_<i, P) = softmax_j(u_ij)``: the additive (Bahdanau) scores are not used to mix values; their
softmax over the ``n`` inputs IS the prediction, so the output size follows the input length. Decoding
constraints (a permutation must not repeat an index) mask positions: they get probability exactly 0.

The op takes the projected states (``W1 e`` and ``W2 d``, the module's parameters) and ``v``. Backends:
``chunked`` and ``reference`` (the per-pair loop of the naive twin).

``chunked`` never materialises the ``(B, Nd, Ne, A)`` tanh tensor: it walks blocks of (batch, decoder rows) whose
tanh block has at most ``CHUNK_ELEMENTS`` elements, reusing one buffer so every pass (add, tanh, the ``v``
reduction as a matrix-vector product over ``A``) stays in a core's L2 cache. A whole-tensor tanh costs a fresh
multi-hundred-MB allocation (page faults) and DRAM traffic per pass, which made it slower than the per-pair loop.
Its backward is a custom autograd function that recomputes the tanh block by block instead of saving it:
with ``t = tanh(enc_j + dec_i)`` and ``g = dL/du``: ``dL/dv = sum_ij g_ij t_ij``,
``dL/ddec_i = v * sum_j g_ij (1 - t_ij^2)`` and ``dL/denc_j = v * sum_i g_ij (1 - t_ij^2)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.reference.naive_sequence3 import naive_pointer_attention

# elements of one (batch, rows, Ne, A) tanh block: 128 K (512 KB in fp32), so the block and the passes over it stay
# in a core's L2 cache (2 MB on the machine measured). Measured at B=128, Nd=Ne=50, A=256 (CPU time, one thread):
# 64 K and below pay per-op overhead on many small blocks, 1 M spills out of L2; 128 K-256 K is the flat optimum.
CHUNK_ELEMENTS = 1 << 17


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


def _plan(B: int, Nd: int, Ne: int, A: int) -> tuple[int, int]:
    """(batch elements, decoder rows) per block: whole batch elements when one fits, else rows of one."""
    per_b = Nd * Ne * A
    if per_b <= CHUNK_ELEMENTS:
        return max(1, min(B, CHUNK_ELEMENTS // per_b)), Nd
    return 1, max(1, min(Nd, CHUNK_ELEMENTS // (Ne * A)))


def _blocks(B: int, Nd: int, bb: int, rr: int):
    # either bb == 1 or rr == Nd, so u[b0:b1, i0:i1] is always one contiguous run (written with out=)
    for b0 in range(0, B, bb):
        for i0 in range(0, Nd, rr):
            yield b0, min(B, b0 + bb), i0, min(Nd, i0 + rr)


def _tanh_block(buf: torch.Tensor, dec: torch.Tensor, enc: torch.Tensor, b0: int, b1: int, i0: int,
                i1: int) -> torch.Tensor:
    """``tanh(enc_j + dec_i)`` of one block, written into the reused buffer: ``(b1-b0, i1-i0, Ne, A)``."""
    Ne, A = enc.shape[1], enc.shape[2]
    t = buf[:(b1 - b0) * (i1 - i0) * Ne * A].view(b1 - b0, i1 - i0, Ne, A)  # (bb, rows, Ne, A)
    torch.add(enc[b0:b1].unsqueeze(1), dec[b0:b1, i0:i1].unsqueeze(2), out=t)
    return t.tanh_()


def _scores(dec: torch.Tensor, enc: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``u_ij = v . tanh(enc_j + dec_i)``: ``(B, Nd, Ne)``, one L2-sized block at a time."""
    B, Nd, A = dec.shape
    Ne = enc.shape[1]
    bb, rr = _plan(B, Nd, Ne, A)
    u = dec.new_empty(B, Nd, Ne)
    buf = dec.new_empty(bb * rr * Ne * A)
    for b0, b1, i0, i1 in _blocks(B, Nd, bb, rr):
        t = _tanh_block(buf, dec, enc, b0, b1, i0, i1)
        torch.mv(t.view(-1, A), v, out=u[b0:b1, i0:i1].view(-1))  # (bb * rows * Ne,): the v-reduction over A
    return u


def _scores_backward_differentiable(g: torch.Tensor, dec: torch.Tensor, enc: torch.Tensor, v: torch.Tensor):
    """The same gradients from differentiable ops on the whole pair tensor, for double backward only."""
    t = torch.tanh(enc.unsqueeze(1) + dec.unsqueeze(2))  # (B, Nd, Ne, A)
    w = g.unsqueeze(-1) * (1 - t * t)  # (B, Nd, Ne, A)
    return v * w.sum(2), v * w.sum(1), torch.einsum("bij,bija->a", g, t)


def _scores_backward(g: torch.Tensor, dec: torch.Tensor, enc: torch.Tensor, v: torch.Tensor):
    """Gradients of ``u`` for ``g = dL/du (B, Nd, Ne)``, recomputing each tanh block (nothing was saved)."""
    B, Nd, A = dec.shape
    Ne = enc.shape[1]
    bb, rr = _plan(B, Nd, Ne, A)
    g = g.contiguous()
    # the "1" of 1 - t^2 first: sum_j g_ij for dec, sum_i g_ij for enc; each block then subtracts its g * t^2
    gdec = g.sum(2, keepdim=True).expand(B, Nd, A).contiguous()  # (B, Nd, A)
    genc = g.sum(1).unsqueeze(-1).expand(B, Ne, A).contiguous()  # (B, Ne, A)
    gv = v.new_zeros(A)
    buf = dec.new_empty(bb * rr * Ne * A)
    for b0, b1, i0, i1 in _blocks(B, Nd, bb, rr):
        t = _tanh_block(buf, dec, enc, b0, b1, i0, i1)
        gb = g[b0:b1, i0:i1]  # (bb, rows, Ne)
        gv.addmv_(t.view(-1, A).t(), gb.reshape(-1))
        w = t.mul_(t).mul_(gb.unsqueeze(-1))  # g_ij t_ij^2 in place: (bb, rows, Ne, A)
        gdec[b0:b1, i0:i1] -= w.sum(2)
        genc[b0:b1] -= w.sum(1)
    return gdec.mul_(v), genc.mul_(v), gv


class _PointerScores(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dec, enc, v):
        ctx.save_for_backward(dec, enc, v)
        return _scores(dec, enc, v)

    @staticmethod
    def backward(ctx, g):
        dec, enc, v = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True (double backward): the gradient must be differentiable
            return _scores_backward_differentiable(g, dec, enc, v)
        return _scores_backward(g, dec, enc, v)


def _needs_grad(c: PointerCall) -> bool:
    return torch.is_grad_enabled() and (c.dec.requires_grad or c.enc.requires_grad or c.v.requires_grad)


def _chunked(c: PointerCall) -> torch.Tensor:
    dt = torch.promote_types(torch.promote_types(c.dec.dtype, c.enc.dtype), c.v.dtype)
    dec, enc, v = (t.to(dt) for t in (c.dec, c.enc, c.v))
    u = _PointerScores.apply(dec, enc, v) if _needs_grad(c) else _scores(dec, enc, v)  # (B, Nd, Ne)
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


def _chunked_suits(c: PointerCall) -> tuple[bool, str]:
    # the naive loop runs the same flops as Nd * Ne separate (B, A) ops plus a per-pair autograd graph; a block
    # does many pairs per op in the same cache-resident way, so it issues fewer ops at any size
    return True, ("tanh in L2-sized blocks, never the whole (B, Nd, Ne, A) tensor, backward recomputes them: "
                  "fewer ops than the per-pair loop; measured faster fwd and fwd+bwd at (B, N, A) = (128, 50, 256) "
                  "and (8, 32, 256)")


def _chunked_detail(c: PointerCall) -> str:
    B, Nd, A = c.dec.shape
    Ne = c.enc.shape[1]
    bb, rr = _plan(B, Nd, Ne, A)
    n = -(-B // bb) * -(-Nd // rr)
    blocks = f"{n} blocks of {bb} batch x {rr} decoder rows (<= {CHUNK_ELEMENTS} tanh elements each)"
    if _needs_grad(c):
        return blocks + "; training path: custom backward recomputes tanh per block instead of saving it"
    return blocks + "; inference path: no input needs a gradient"


DISPATCHER = Dispatcher("pointer_attention", [
    Backend("chunked", _chunked, suits=_chunked_suits, note="tanh of every (decoder, input) pair in L2-sized blocks",
            detail=_chunked_detail),
    Backend("reference", _reference, auto=False,
            note="naive_pointer_attention: a Python loop over Nd * Ne pairs, the specification, slower"),
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
