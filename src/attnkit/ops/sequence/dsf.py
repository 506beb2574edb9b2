"""Understanding the differences in Foundation Models: Attention, State Space Models, and Recurrent Neural
Networks (arXiv 2405.15731) — the Dynamical Systems Framework (DSF).

Section 2 of the paper writes every causal sequence mixer as one linear time-varying system; per head, with a
state of ``n`` rows shared by the ``d`` value channels,

    h_i = diag(lambda_i) h_{i-1} + b_i u_i^T        y_i = h_i^T c_i / eta_i        (h_i: (n, d))

and, unrolled, as one "attention matrix" ``y = Phi u / eta`` with
``Phi_ij = sum_s c_is b_js prod_{l=j+1..i} lambda_ls`` for ``j <= i``. Converters map each family onto it:
linear attention (``lambda = 1`` or a decay, ``b = phi(k)``, ``c = phi(q)``, ``u = v``, ``eta`` its
normaliser), S6 (one head per channel, ``lambda = exp(delta A)``, ``b = delta B``, ``c = C``, ``u = x``,
section 3.2) and a diagonal gated RNN (``n = 1``, ``lambda = f``, ``b = 1 - f``, ``c = 1``).

Backends of :func:`dsf_scan`:
* ``linear_attention`` (automatic for a per-head scalar ``lambda``): ``ak.linear_attention`` with a gated decay.
* ``scan`` (automatic for a narrow value width ``d <= chunk / 8``: S6 and RNN heads): the in-place two-level
  scan of :mod:`attnkit.ops.sequence.dsf_chunk`, one autograd node with a hand-written reverse-scan backward.
* ``recurrent``: a step loop under autograd (``N`` graph nodes per tensor).
* ``chunked`` (automatic otherwise): intra-chunk ``Phi`` blocks and a state carried across chunks.
* ``reference``: :func:`~attnkit.reference.naive_sequence2.naive_dsf_scan`, one step at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit._validate import int_arg
from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.ops.linear.call import linear_attention
from attnkit.ops.sequence.dsf_chunk import dsf_two_level_scan
from attnkit.reference.naive_sequence2 import naive_dsf_scan

CHUNK = 64


@dataclass(frozen=True)
class DSF:
    """One DSF: ``decay (B, N, H)`` (scalar per head) or ``(B, N, H, n)`` (diagonal), ``b, c (B, N, H, n)``,
    ``u (B, N, H, d)``, ``norm (B, N, H)`` or None."""

    decay: torch.Tensor
    b: torch.Tensor
    c: torch.Tensor
    u: torch.Tensor
    norm: torch.Tensor | None = None


@dataclass(frozen=True, eq=False)
class DSFCall:
    decay: torch.Tensor
    b: torch.Tensor
    c: torch.Tensor
    u: torch.Tensor
    norm: torch.Tensor | None
    chunk: int

    @property
    def scalar(self) -> bool:
        return self.decay.dim() == 3

    def describe(self) -> str:
        B, N, H, n = self.b.shape
        kind = "scalar" if self.scalar else "diagonal"
        normed = ", normalised" if self.norm is not None else ""
        return f"b {(B, N, H, n)} u {tuple(self.u.shape)} {self.u.dtype}, {kind} transition{normed}"


def make_call(decay, b, c, u, norm=None, *, chunk=CHUNK) -> DSFCall:
    for name, t in (("decay", decay), ("b", b), ("c", c), ("u", u)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"dsf_scan: {name} must be a floating tensor, got {type(t).__name__}")
    if b.dim() != 4 or b.numel() == 0:
        raise ValueError(f"dsf_scan: b must be a non-empty (B, N, H, n) tensor, got {tuple(b.shape)}")
    B, N, H, n = b.shape
    if tuple(c.shape) != (B, N, H, n):
        raise ValueError(f"dsf_scan: c must be (B, N, H, n) = {(B, N, H, n)}, got {tuple(c.shape)}")
    if u.dim() != 4 or tuple(u.shape[:3]) != (B, N, H):
        raise ValueError(f"dsf_scan: u must be (B, N, H, d) with (B, N, H) = {(B, N, H)}, got {tuple(u.shape)}")
    if tuple(decay.shape) not in ((B, N, H), (B, N, H, n)):
        raise ValueError(f"dsf_scan: decay must be (B, N, H) or (B, N, H, n) = {(B, N, H, n)}, "
                         f"got {tuple(decay.shape)}")
    if norm is not None and (not isinstance(norm, torch.Tensor) or tuple(norm.shape) != (B, N, H)):
        raise ValueError(f"dsf_scan: norm must be None or (B, N, H) = {(B, N, H)}, "
                         f"got {tuple(getattr(norm, 'shape', ())) or norm}")
    int_arg("dsf_scan: chunk", chunk, 1)
    return DSFCall(decay, b, c, u, norm, chunk)


def _normed(c: DSFCall, y: torch.Tensor) -> torch.Tensor:
    return y if c.norm is None else y / c.norm.unsqueeze(-1)


def _linear(c: DSFCall) -> torch.Tensor:
    # S_i = lambda_i S_{i-1} + b_i u_i^T, y_i = S_i^T c_i: ak.linear_attention with identity features, scale 1
    y = linear_attention(c.c, c.b, c.u, causal=True, feature_map="identity", decay=c.decay, scale=1.0)
    return _normed(c, y)


def _chunked(c: DSFCall) -> torch.Tensor:
    B, N, H, n = c.b.shape
    d = c.u.shape[-1]
    # a scalar transition stays one column (B, N, H, 1): the Phi block is then (c b^T) * decay ratios
    logd = torch.log(c.decay.unsqueeze(-1) if c.scalar else c.decay)  # (B, N, H, n or 1)
    h = c.u.new_zeros(B, H, n, d)
    ys = []
    for s0 in range(0, N, c.chunk):
        sl = slice(s0, min(N, s0 + c.chunk))
        T = sl.stop - s0
        lc = logd[:, sl].cumsum(1)  # (B, T, H, n|1): log prod of lambda from the chunk start to i, inclusive
        bj, ci, uj = c.b[:, sl], c.c[:, sl], c.u[:, sl]
        y = torch.einsum("bthn,bhnd->bthd", ci * lc.exp(), h)  # carried state
        tri = torch.ones(T, T, dtype=torch.bool, device=h.device).tril()
        lt = lc.permute(0, 2, 3, 1)  # (B, H, n|1, T)
        ratio = (lt.unsqueeze(-1) - lt.unsqueeze(-2)).masked_fill(~tri, float("-inf")).exp()  # (B, H, n|1, T, T)
        if c.scalar:
            phi = torch.einsum("bthn,bshn->bhts", ci, bj) * ratio.squeeze(2)  # (B, H, T, T)
        else:
            cb = ci.permute(0, 2, 3, 1).unsqueeze(-1) * bj.permute(0, 2, 3, 1).unsqueeze(-2)  # (B, H, n, T, T)
            phi = (cb * ratio).sum(2)  # (B, H, T, T)
        y = y + torch.einsum("bhts,bshd->bthd", phi, uj)
        last = lc[:, -1:]  # (B, 1, H, n|1)
        h = last.squeeze(1).exp().unsqueeze(-1) * h + torch.einsum("bshn,bshd->bhnd", bj * (last - lc).exp(), uj)
        ys.append(y)
    return _normed(c, torch.cat(ys, 1))  # (B, N, H, d)


def _recurrent(c: DSFCall) -> torch.Tensor:
    # inputs b_i u_i^T formed at once; the Python loop only carries the (n, d) state. unbind, not lam[:, i]:
    # each indexing node's backward would write a full-size zero gradient, O(N^2) work over the sequence
    lam = (c.decay.unsqueeze(-1) if c.scalar else c.decay).unsqueeze(-1).unbind(1)  # N x (B, H, n|1, 1)
    bu = (c.b.unsqueeze(-1) * c.u.unsqueeze(-2)).unbind(1)  # N x (B, H, n, d)
    h = torch.zeros_like(bu[0])
    states = []
    for lam_i, bu_i in zip(lam, bu):
        h = lam_i * h + bu_i
        states.append(h)
    y = torch.einsum("bthnd,bthn->bthd", torch.stack(states, 1), c.c)  # (B, N, H, d)
    return _normed(c, y)


def _scan(c: DSFCall) -> torch.Tensor:
    return _normed(c, dsf_two_level_scan(c.decay, c.b, c.c, c.u))


def _narrow(c: DSFCall):
    d = c.u.shape[-1]
    if d * 8 <= c.chunk:
        return True, (f"value width {d} <= chunk / 8: a step scan does less work than Phi blocks; one autograd "
                      f"node (S6 shape B=2 N=1024 H=128 n=16 d=1, CPU fwd+bwd: 0.27 s vs 0.32 s for the "
                      f"recurrent loop, 31 s before its unbind fix)")
    return False, f"value width {d} > chunk / 8: the chunked form batches more work per step"


def _scan_passed_over(c: DSFCall):
    return False, "the scan backend runs the same steps in place with one autograd node (faster fwd+bwd)"


def _reference(c: DSFCall) -> torch.Tensor:
    return naive_dsf_scan(c.decay, c.b, c.c, c.u, c.norm)


def _scalar_only(c: DSFCall):
    if c.u.device.type == "meta":
        return False, "meta tensors: ak.linear_attention checks the decay's values"
    return (True, "") if c.scalar else (False, "a diagonal transition has no single linear-attention decay")


DISPATCHER = Dispatcher("dsf_scan", [
    Backend("linear_attention", _linear, supports=_scalar_only, note="ak.linear_attention with a gated decay"),
    Backend("scan", _scan, suits=_narrow, note="in-place (two-level) scan, hand-written reverse-scan backward"),
    Backend("recurrent", _recurrent, suits=_scan_passed_over,
            note="step loop over the (n, d) state under autograd, inputs formed at once"),
    Backend("chunked", _chunked, note="intra-chunk Phi blocks + carried state, any diagonal transition"),
    Backend("reference", _reference, auto=False, note="naive_dsf_scan: one step at a time"),
])
register_op("dsf_scan", make_call, DISPATCHER)


def dsf_scan(decay: torch.Tensor, b: torch.Tensor, c: torch.Tensor, u: torch.Tensor,
             norm: torch.Tensor | None = None, *, chunk: int = CHUNK, backend: str | None = None) -> torch.Tensor:
    """Run a DSF: ``h_i = diag(decay_i) h_{i-1} + b_i u_i^T``, ``y_i = h_i^T c_i / norm_i``, ``h_0 = 0``.

    Args:
        decay: ``(B, N, H)`` (one scalar per head and step) or ``(B, N, H, n)``, in ``(0, 1]`` (used in log space).
        b, c: ``(B, N, H, n)``; u: ``(B, N, H, d)``; norm: ``(B, N, H)`` or None.
        chunk: chunk length of the ``chunked`` backend.
        backend: None, ``"linear_attention"``, ``"scan"``, ``"recurrent"``, ``"chunked"`` or ``"reference"``.

    Returns:
        ``(B, N, H, d)``.

    Example:
        >>> sys = dsf_from_gated_rnn(torch.randn(2, 64, 8), torch.rand(2, 64, 8))
        >>> y = dsf_scan(sys.decay, sys.b, sys.c, sys.u)  # (2, 64, 8, 1)
    """
    return DISPATCHER.run(make_call(decay, b, c, u, norm, chunk=chunk), backend)


def run_dsf(sys: DSF, *, backend: str | None = None) -> torch.Tensor:
    """:func:`dsf_scan` on a :class:`DSF`: ``(B, N, H, d)``."""
    return dsf_scan(sys.decay, sys.b, sys.c, sys.u, sys.norm, backend=backend)


# ------------------------------------------------------------------------------------------ converters


def dsf_from_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, feature_map=None,
                              decay: torch.Tensor | float | None = None, normalize: bool = False,
                              eps: float = 1e-6) -> DSF:
    """Causal linear attention as a DSF (section 3.1): ``lambda = decay`` (1 without), ``b = phi(k)``,
    ``c = phi(q)``, ``u = v``, ``eta_i = phi(q_i) . z_i + eps`` with ``z_i = lambda_i z_{i-1} + phi(k_i)``.

    ``q, k (B, N, H, D)``, ``v (B, N, H, Dv)``; ``feature_map`` a callable (None: identity); ``decay`` a float,
    ``(H,)`` or ``(B, N, H)``. Scale 1 (scale ``q`` first for another).
    """
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"dsf_from_linear_attention: q, k must be (B, N, H, D) and v (B, N, H, Dv) alike, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    fq, fk = (q, k) if feature_map is None else (feature_map(q), feature_map(k))
    B, N, H, _ = q.shape
    lam = torch.ones(B, N, H, dtype=q.dtype, device=q.device) if decay is None else (
        torch.as_tensor(decay, dtype=q.dtype, device=q.device).expand(B, N, H))
    norm = None
    if normalize:  # the normaliser is the same system driven by u = 1
        norm = dsf_scan(lam, fk, fq, torch.ones(B, N, H, 1, dtype=q.dtype, device=q.device)).squeeze(-1) + eps
    return DSF(lam, fk, fq, v, norm)


def dsf_from_s6(x: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor) -> DSF:
    """S6 (selective SSM, Euler input ``B_bar = delta B``) as a DSF with one head per channel (section 3.2):
    ``x, delta (B, N, Ch)``, ``A (Ch, n)``, ``Bm, Cm (B, N, n)`` -> heads ``Ch``, state ``n``, ``d = 1``."""
    if x.dim() != 3 or delta.shape != x.shape or A.dim() != 2 or A.shape[0] != x.shape[-1]:
        raise ValueError(f"dsf_from_s6: x, delta must be (B, N, Ch) and A (Ch, n), got {tuple(x.shape)}, "
                         f"{tuple(delta.shape)}, {tuple(A.shape)}")
    Bt, N, Ch = x.shape
    n = A.shape[-1]
    if Bm.shape != (Bt, N, n) or Cm.shape != (Bt, N, n):
        raise ValueError(f"dsf_from_s6: Bm, Cm must be (B, N, n) = {(Bt, N, n)}, got {tuple(Bm.shape)}, "
                         f"{tuple(Cm.shape)}")
    dt = delta.unsqueeze(-1)  # (B, N, Ch, 1)
    return DSF(torch.exp(dt * A), dt * Bm.unsqueeze(2), Cm.unsqueeze(2).expand(Bt, N, Ch, n), x.unsqueeze(-1))


def dsf_from_gated_rnn(x: torch.Tensor, f: torch.Tensor) -> DSF:
    """``h_i = f_i h_{i-1} + (1 - f_i) x_i``, ``y = h`` as a DSF: ``x, f (B, N, Ch)`` -> heads ``Ch``, ``n = d = 1``."""
    if x.dim() != 3 or f.shape != x.shape:
        raise ValueError(f"dsf_from_gated_rnn: x and f must be (B, N, Ch) alike, got {tuple(x.shape)}, "
                         f"{tuple(getattr(f, 'shape', ()))}")
    one = torch.ones_like(x).unsqueeze(-1)
    return DSF(f, (1 - f).unsqueeze(-1), one, x.unsqueeze(-1))


def dsf_matrix(sys: DSF) -> torch.Tensor:
    """The unrolled form: ``Phi (B, H, N, N)`` with ``y_i = sum_j Phi_ij u_j`` (the normaliser folded in)."""
    lam = sys.decay if sys.decay.dim() == 4 else sys.decay.unsqueeze(-1)
    L = torch.log(lam).cumsum(1)  # (B, N, H, n or 1)
    N = L.shape[1]
    tri = torch.ones(N, N, dtype=torch.bool, device=L.device).tril()
    diff = (L[:, :, None] - L[:, None, :]).masked_fill(~tri[None, :, :, None, None], float("-inf"))
    phi = torch.einsum("bihn,bjhn,bijhn->bhij", sys.c, sys.b, diff.exp().expand(-1, -1, -1, -1, sys.b.shape[-1]))
    if sys.norm is not None:
        phi = phi / sys.norm.transpose(1, 2).unsqueeze(-1)
    return phi


__all__ = [
    "DSF",
    "dsf_from_gated_rnn",
    "dsf_from_linear_attention",
    "dsf_from_s6",
    "dsf_matrix",
    "dsf_scan",
    "run_dsf",
]
