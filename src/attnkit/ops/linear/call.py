"""``ak.linear_attention``: kernelized / decayed linear attention with three algorithms, one contract.

Papers: "Transformers are RNNs" (arXiv 2006.16236), "Various Lengths, Constant Speed: Efficient
Language Modeling with Lightning Attention" (arXiv 2405.17381), "Lightning Attention-2"
(arXiv 2401.04658). Definition: ``docs/design.md`` §3.

Backends (the algorithms, as in flash-linear-attention):

* ``recurrent`` — one step per token (decoding; chosen automatically for causal N <= 16),
* ``chunk`` — Lightning-style tiles: intra-chunk masked matmul with the decay matrix, inter-chunk
  through the carried state; hand-written backward, memory O(N D) (see ``linear_chunk``),
* ``reference`` — the materialised O(N^2) oracle of ``reference/naive_linear.py`` (never automatic).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from attnkit._validate import assert_finite, check_qkv, int_arg, resolve_scale
from attnkit.kernels import native as _native
from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.ops.linear.chunk import chunk_linear_attention, native_reason
from attnkit.ops.linear.feature_maps import resolve_feature_map
from attnkit.ops.linear.recurrent import recurrent_linear_attention
from attnkit.reference.naive_linear import naive_linear_attention

RECURRENT_MAX_N = 16  # below this the per-token loop beats setting up chunks (and it is the decode path)
DEFAULT_CHUNK = 64


@dataclass(frozen=True)
class LinearCall:
    """A validated ``linear_attention`` call (what backends and ``explain`` see)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    causal: bool
    feature_map: str
    phi: Callable[[torch.Tensor], torch.Tensor]
    decay: torch.Tensor | None
    decay_kind: str  # "none" | "per-head" | "per-token"
    normalize: bool
    scale: float
    initial_state: Any
    return_state: bool
    chunk_size: int
    eps: float
    out_dtype: torch.dtype | None = None  # None: q's dtype

    def describe(self) -> str:
        mode = "causal" if self.causal else "non-causal"
        state = f"{'in' if self.initial_state is not None else '-'}/{'out' if self.return_state else '-'}"
        return (f"q {tuple(self.q.shape)} k {tuple(self.k.shape)} v {tuple(self.v.shape)} {self.q.dtype}, "
                f"{mode}, phi={self.feature_map}, decay={self.decay_kind}, "
                f"normalize={self.normalize}, scale={self.scale:.4g}, state={state}")


def _check_bool(name: str, x: object) -> bool:
    if not isinstance(x, bool):
        raise TypeError(f"{name} must be a bool, got {type(x).__name__}")
    return x


def _check_decay(decay: object, B: int, N: int, H: int) -> tuple[torch.Tensor | None, str]:
    if decay is None:
        return None, "none"
    if isinstance(decay, (int, float)) and not isinstance(decay, bool):
        decay = torch.full((H,), float(decay))
    if not isinstance(decay, torch.Tensor) or not decay.is_floating_point():
        raise TypeError("decay must be None, a float or a floating tensor (H,) or (B, N, H), "
                        f"got {type(decay).__name__}")
    if tuple(decay.shape) == (H,):
        kind = "per-head"
    elif tuple(decay.shape) == (B, N, H):
        kind = "per-token"
    else:
        raise ValueError(f"decay must have shape (H,) = ({H},) or (B, N, H) = ({B}, {N}, {H}), "
                         f"got {tuple(decay.shape)}")
    with torch.no_grad():
        if not bool(((decay > 0) & (decay <= 1)).all()):
            raise ValueError("decay must be a multiplicative factor in (0, 1] (use exp(-slope) for slopes)")
    return decay, kind


def _check_state(st: object, normalize: bool, B: int, H: int, Dp: int | None, Dv: int) -> None:
    def one(name, t, shape):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"initial_state {name} must be a floating tensor of shape {shape}")
        want = tuple(x if x is not None else t.shape[i] for i, x in enumerate(shape))
        if t.dim() != len(shape) or tuple(t.shape) != want:
            raise ValueError(f"initial_state {name} must have shape {shape}, got {tuple(t.shape)}")

    if normalize:
        if not isinstance(st, (tuple, list)) or len(st) != 2:
            raise TypeError("with normalize=True, initial_state must be the pair "
                            "(S (B, H, Dphi, Dv), z (B, H, Dphi))")
        one("S", st[0], (B, H, Dp, Dv))
        one("z", st[1], (B, H, Dp))
    else:
        one("S", st, (B, H, Dp, Dv))


def make_call(q, k, v, *, causal=True, feature_map="identity", decay=None, normalize=False, scale=None,
              initial_state=None, return_state=False, chunk_size=None, eps=1e-6, out_dtype=None) -> LinearCall:
    """Validate a ``linear_attention`` call; errors name the argument."""
    H, _ = check_qkv(q, k, v)
    if out_dtype is not None and out_dtype not in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"linear_attention: out_dtype must be None or a float dtype, got {out_dtype!r}")
    assert_finite("linear_attention", q=q, k=k, v=v)  # only under the debug switch
    B, N, _, D = q.shape
    _check_bool("causal", causal)
    _check_bool("normalize", normalize)
    _check_bool("return_state", return_state)
    if causal and k.shape[1] != N:
        raise ValueError(f"causal linear attention needs aligned q and k/v lengths, got {N} and {k.shape[1]}")
    if not causal and decay is not None:
        raise ValueError("decay requires causal=True (a decay has no meaning without an order)")
    name, phi = resolve_feature_map(feature_map)
    dec, kind = _check_decay(decay, B, N, H)
    if initial_state is not None:
        # the built-in feature maps keep D; a callable's width is checked once phi has run (_prepare)
        _check_state(initial_state, normalize, B, H, D if isinstance(feature_map, str) else None, v.shape[-1])
    chunk_size = DEFAULT_CHUNK if chunk_size is None else int_arg("chunk_size", chunk_size, 1)
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    return LinearCall(q, k, v, causal, name, phi, dec, kind, normalize, resolve_scale(scale, D),
                      initial_state, return_state, chunk_size, float(eps), out_dtype)


def _cdt(call: LinearCall) -> torch.dtype:
    return torch.float64 if call.q.dtype == torch.float64 else torch.float32


def _prepare(call: LinearCall):
    """Apply phi, take log of the decay, fold the normaliser into an extra value column."""
    cdt = _cdt(call)
    pq, pk, v = call.phi(call.q), call.phi(call.k), call.v
    if pq.shape[-1] != pk.shape[-1] or pq.shape[:-1] != call.q.shape[:-1]:
        raise ValueError("feature_map must map (..., D) to (..., Dphi) alike for q and k, "
                         f"got {tuple(pq.shape)} and {tuple(pk.shape)}")
    g = None if call.decay is None else torch.log(call.decay.to(cdt))  # log-decay <= 0
    s0 = call.initial_state
    if s0 is not None:
        # make_call checked everything but a callable feature map's width Dphi
        for name, t in zip("Sz", s0 if call.normalize else (s0,)):
            if t.shape[2] != pq.shape[-1]:
                raise ValueError(f"initial_state {name} must have Dphi = {pq.shape[-1]} (the feature map's "
                                 f"width), got shape {tuple(t.shape)}")
    if call.normalize:
        # the normaliser z_t is the state of a value column of ones: one recurrence serves both
        v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # (B, M, Hkv, Dv + 1)
        if s0 is not None:
            s0 = torch.cat([s0[0].to(cdt), s0[1].to(cdt)[..., None]], dim=-1)  # (B, H, Dphi, Dv + 1)
    elif s0 is not None:
        s0 = s0.to(cdt)
    return pq, pk, v, g, s0


def _finish(call: LinearCall, o: torch.Tensor, S: torch.Tensor):
    if call.normalize:
        o = o[..., :-1] / (o[..., -1:] + call.eps)  # (B, N, H, Dv)
        S = (S[..., :-1], S[..., -1])
    o = o.to(call.out_dtype or call.q.dtype)
    return (o, S) if call.return_state else o


def _out_dtype(call: LinearCall) -> torch.dtype:
    # keep numerator and denominator in fp32 until the division; an fp32 out_dtype for half inputs
    # keeps the unnormalised sums, which outgrow fp16 long before fp32, out of half precision
    return _cdt(call) if call.normalize or call.out_dtype is not None else call.q.dtype


def _run_chunk(call: LinearCall):
    pq, pk, v, g, s0 = _prepare(call)
    if call.causal:
        o, S = chunk_linear_attention(pq, pk, v, g, s0, scale=call.scale, chunk_size=call.chunk_size,
                                      out_dtype=_out_dtype(call))
        return _finish(call, o, S)
    cdt = _cdt(call)
    rep = pq.shape[2] // pk.shape[2]
    S = torch.einsum("bmhd,bmhe->bhde", pk.to(cdt), v.to(cdt))  # (B, Hkv, Dphi, Dv): phi(K)^T V, no N x N
    S = S.repeat_interleave(rep, dim=1)  # (B, H, Dphi, Dv)
    if s0 is not None:
        S = S + s0
    o = torch.einsum("bnhd,bhde->bnhe", pq.to(cdt) * call.scale, S)  # (B, N, H, Dv)
    return _finish(call, o, S)


def _run_recurrent(call: LinearCall):
    pq, pk, v, g, s0 = _prepare(call)
    o, S = recurrent_linear_attention(pq, pk, v, g, s0, scale=call.scale, out_dtype=_out_dtype(call))
    return _finish(call, o, S)


def _run_reference(call: LinearCall):
    dt = torch.promote_types(call.q.dtype, torch.float32)
    st = call.initial_state
    if st is not None:
        st = tuple(t.to(dt) for t in st) if call.normalize else st.to(dt)
    res = naive_linear_attention(
        call.q.to(dt), call.k.to(dt), call.v.to(dt), causal=call.causal, feature_map=call.phi,
        decay=None if call.decay is None else call.decay.to(dt), normalize=call.normalize, scale=call.scale,
        initial_state=st, return_state=call.return_state, eps=call.eps)
    out_dtype = call.out_dtype or call.q.dtype
    if call.return_state:
        return res[0].to(out_dtype), res[1]
    return res.to(out_dtype)


def _cpu_only(call: LinearCall) -> tuple[bool, str]:
    # the causal kernels allocate their states and work buffers on the CPU
    if call.q.device.type != "cpu":
        return False, f"needs CPU tensors, got {call.q.device.type}"
    return True, ""


def _recurrent_supports(call: LinearCall) -> tuple[bool, str]:
    if not call.causal:
        return False, "non-causal attention has no recurrence (use chunk)"
    return _cpu_only(call)


def _chunk_supports(call: LinearCall) -> tuple[bool, str]:
    return _cpu_only(call) if call.causal else (True, "")  # non-causal: two einsums, any device


def _needs_grad(call: LinearCall) -> bool:
    tensors = [call.q, call.k, call.v, call.decay]
    st = call.initial_state
    tensors += list(st) if isinstance(st, (tuple, list)) else [st]
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _recurrent_detail(call: LinearCall) -> str:
    if _needs_grad(call):
        return "autograd through the token loop (one state saved per step): an input needs a gradient"
    return "token loop, nothing saved: no input needs a gradient"


def _chunk_detail(call: LinearCall) -> str:
    if not call.causal:
        return "phi(K)^T V once, then phi(Q) S; autograd backward"
    if _needs_grad(call):
        return "forward + hand-written chunked backward (segment states saved): an input needs a gradient"
    return "forward only: no input needs a gradient"


def _reference_detail(call: LinearCall) -> str:
    work = "float64" if call.q.dtype == torch.float64 else "float32"
    return f"materialised O(N^2) scores in {work}, autograd backward"


def _recurrent_suits(call: LinearCall) -> tuple[bool, str]:
    n = call.q.shape[1]
    if n <= RECURRENT_MAX_N:
        return True, f"N={n} <= {RECURRENT_MAX_N}: decoding / short input, one step per token"
    return False, f"N={n} > {RECURRENT_MAX_N}: the chunk algorithm is faster"


def _chunk_suits(call: LinearCall) -> tuple[bool, str]:
    """Always suitable; the reason says which forward kernel will run (without building it)."""
    if not call.causal:
        return True, "non-causal: phi(K)^T V once, then phi(Q) S"
    why = native_reason(call.q, call.k, call.v, build=False)
    if why is None:
        return True, f"forward: compiled CPU kernel (attnkit.kernels.native: {_native.status()})"
    return True, f"forward: torch ops, {why}"


DISPATCHER = Dispatcher("linear_attention", [
    Backend("recurrent", _run_recurrent, _recurrent_supports, _recurrent_suits, detail=_recurrent_detail,
            note="token-by-token state update (decoding)"),
    Backend("chunk", _run_chunk, _chunk_supports, _chunk_suits, detail=_chunk_detail,
            note="Lightning-style chunks, hand-written backward"),
    Backend("reference", _run_reference, auto=False, detail=_reference_detail, note="materialised O(N^2) oracle"),
])

register_op("linear_attention", make_call, DISPATCHER)


def linear_attention(q, k, v, *, causal=True, feature_map="identity", decay=None, normalize=False, scale=None,
                     initial_state=None, return_state=False, backend=None, chunk_size=None, eps=1e-6,
                     out_dtype=None):
    """Linear attention ``o_t = scale phi(q_t) S_t``, ``S_t = decay_t S_{t-1} + phi(k_t)^T v_t``.

    The contract is ``docs/design.md`` §3.

    Args:
        q: ``(B, N, H, D)``.
        k: ``(B, M, Hkv, D)``; ``H % Hkv == 0`` (GQA); causal needs ``M == N``.
        v: ``(B, M, Hkv, Dv)``.
        causal: prefix sums (True) or ``phi(Q) (phi(K)^T V)`` over all keys (False; cross attention ok).
        feature_map: ``"identity"``, ``"elu+1"`` (alias ``"elu1"``), ``"relu"``, ``"softmax"`` (over features)
            or a callable ``(..., D) -> (..., Dphi)`` applied to q and k.
        decay: multiplicative factor in (0, 1]: None, a float, per head ``(H,)`` (Lightning / TNL) or per
            token and head ``(B, N, H)`` (gated). Used in log space; causal only. Gradients flow to it.
        normalize: divide by ``scale * phi(q_t) . z_t + eps``, ``z_t = decay_t z_{t-1} + phi(k_t)``
            (use a positive feature map).
        scale: multiplies ``phi(q)``; default ``D ** -0.5`` (cancels under ``normalize`` up to eps).
        initial_state: ``S_0 (B, H, Dphi, Dv)``; with ``normalize`` the pair ``(S_0, z_0 (B, H, Dphi))``.
        return_state: also return the final state (same form as ``initial_state``; float32, or float64).
        backend: ``"chunk"``, ``"recurrent"``, ``"reference"`` or None (recurrent for causal N <= 16, else chunk).
        chunk_size: chunk length of the chunk algorithm (default 64).
        eps: added to the normaliser.
        out_dtype: dtype of ``o``, default q's. The sums run in float32 (float64 for float64) either way;
            without ``normalize`` they grow with N and the input scale, so half-precision callers that
            normalise afterwards (RMSNorm, GroupNorm) pass ``torch.float32`` to keep ``o`` from overflowing
            (fp16 inputs around 1e4 give sums near 1e12).

    Returns:
        ``o (B, N, H, Dv)`` in ``out_dtype`` (q's dtype by default), or ``(o, state)`` with ``return_state``.

    Non-finite inputs: a NaN or infinity in ``q_t`` reaches ``o_t`` only; one in ``k_s`` or ``v_s``
    reaches every ``o_t`` whose sum holds it (``t >= s`` when causal, all when not; a decay does not
    remove it). ``ak.check_finite(True)`` or ``ATTNKIT_CHECK_FINITE=1`` raises ``ValueError`` instead.

    Example:
        >>> q, k, v = (torch.randn(1, 1024, 4, 64) for _ in range(3))
        >>> lam = torch.exp(-torch.tensor([0.5, 0.25, 0.125, 0.0625]))
        >>> o, S = ak.linear_attention(q[:, :1000], k[:, :1000], v[:, :1000], decay=lam, return_state=True)
        >>> o_next = ak.linear_attention(q[:, 1000:1001], k[:, 1000:1001], v[:, 1000:1001], decay=lam,
        ...                              initial_state=S)   # one decoding step, recurrent backend
    """
    call = make_call(q, k, v, causal=causal, feature_map=feature_map, decay=decay, normalize=normalize,
                     scale=scale, initial_state=initial_state, return_state=return_state,
                     chunk_size=chunk_size, eps=eps, out_dtype=out_dtype)
    return DISPATCHER.run(call, backend)
