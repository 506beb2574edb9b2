"""Titans: Learning to Memorize at Test Time (arXiv 2501.00663) — the neural long-term memory.

The memory ``M`` is a per-head linear map (depth 1, ``M(x) = x W``) or a two-layer MLP (depth 2,
``M(x) = act(x W1) W2``) whose weights are trained while the sequence is read (section 3.1):

    u_t = grad_W || M_{W}(k_t) - v_t ||^2            surprise, taken at the chunk's first state
    S_t = eta_t S_{t-1} - theta_t u_t                momentum (past surprise)
    W_t = (1 - alpha_t) W_{t-1} + S_t                forgetting gate
    y_t = M_{W_t}(q_t)                               retrieval (no update)

Chunked parallel form (section 3.2): inside a chunk of ``chunk_size`` tokens every gradient is taken
at the chunk's first state, so ``u_i = a_i^T g_i`` per layer (layer input ``a_i``, output gradient
``g_i``) and the two linear recurrences unroll into lower-triangular ``(b, b)`` transfer matrices:
``W_t = cA_t W_0 + cS_t S_0 - sum_i w_ti a_i^T g_i``. A layer applied to ``x_t`` is then
``cA_t x_t W_0 + cS_t x_t S_0 - sum_i w_ti (x_t . a_i) g_i``: a few matmuls per chunk, linear in N.
``chunk_size = 1`` is the exact token-by-token recurrence.

Backends (``ak.explain("titans_memory", q, k, v, alpha=.., eta=.., theta=.., weights=..)``):

* ``chunked`` -- the parallel form above (automatic);
* ``recurrent`` -- the same function token by token (closed-form gradients, per-token state);
* ``reference`` -- ``naive_titans_memory``: token loop, inner gradient by autograd (never automatic).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnkit._validate import check_qkv, int_arg
from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.reference.naive_sequence import naive_titans_memory

ACTIVATIONS = ("silu", "gelu", "relu")


@dataclass(frozen=True, eq=False)
class TitansCall:
    """A validated ``titans_memory`` call."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    alpha: torch.Tensor
    eta: torch.Tensor
    theta: torch.Tensor
    weights: tuple[torch.Tensor, ...]
    momentum: tuple[torch.Tensor, ...] | None
    chunk_size: int
    activation: str
    return_state: bool

    def describe(self) -> str:
        depth = len(self.weights)
        return (f"q {tuple(self.q.shape)} k {tuple(self.k.shape)} v {tuple(self.v.shape)} {self.q.dtype}, "
                f"memory depth {depth}{f' ({self.activation})' if depth == 2 else ''}, chunk_size={self.chunk_size}, "
                f"{'with' if self.momentum is not None else 'no'} initial momentum")


def _per_batch(w: torch.Tensor, B: int, H: int, name: str, shape: tuple[int, int]) -> torch.Tensor:
    if w.dim() == 3:
        w = w.unsqueeze(0)
    if w.dim() != 4 or w.shape[1] != H or tuple(w.shape[2:]) != shape or w.shape[0] not in (1, B):
        raise ValueError(f"titans_memory: {name} must be (H, {shape[0]}, {shape[1]}) or (B, H, {shape[0]}, "
                         f"{shape[1]}) with H={H}, B={B}; got {tuple(w.shape)}")
    return w.expand(B, *w.shape[1:])


def make_call(q, k, v, alpha=None, eta=None, theta=None, weights=None, *, momentum=None, chunk_size=64,
              activation="silu", return_state=False) -> TitansCall:
    """Validate a ``titans_memory`` call; errors name the argument."""
    check_qkv(q, k, v, same_extent=True)
    B, N, H, D = q.shape
    Dv = v.shape[-1]
    if k.shape[2] != H:
        raise ValueError(f"titans_memory: q and k must have the same heads, got {H} and {k.shape[2]}")
    for name, g in (("alpha", alpha), ("eta", eta), ("theta", theta)):
        if not isinstance(g, torch.Tensor) or g.shape != (B, N, H):
            raise ValueError(f"titans_memory: {name} must be a tensor (B, N, H) = {(B, N, H)}, "
                             f"got {tuple(getattr(g, 'shape', ())) or type(g).__name__}")
    if not isinstance(weights, (tuple, list)) or len(weights) not in (1, 2):
        raise ValueError("titans_memory: weights must be a tuple (W,) of a linear memory (H, D, Dv) or "
                         "(W1, W2) of an MLP memory (H, D, E), (H, E, Dv)")
    if activation not in ACTIVATIONS:
        raise ValueError(f"titans_memory: activation must be one of {ACTIVATIONS}, got {activation!r}")
    int_arg("titans_memory: chunk_size", chunk_size, 1)
    if len(weights) == 1:
        shapes = [(D, Dv)]
    else:
        shapes = [(D, weights[0].shape[-1]), (weights[0].shape[-1], Dv)]
    ws = tuple(_per_batch(w, B, H, f"weights[{i}]", s) for i, (w, s) in enumerate(zip(weights, shapes)))
    ms = None
    if momentum is not None:
        if not isinstance(momentum, (tuple, list)) or len(momentum) != len(ws):
            raise ValueError("titans_memory: momentum must be a tuple shaped like weights")
        ms = tuple(_per_batch(m, B, H, f"momentum[{i}]", s) for i, (m, s) in enumerate(zip(momentum, shapes)))
    return TitansCall(q, k, v, alpha, eta, theta, ws, ms, int(chunk_size), activation, bool(return_state))


# ------------------------------------------------------------------------------------------- pieces


def _act(x: torch.Tensor, name: str) -> torch.Tensor:
    return {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}[name](x)


def _act_grad(x: torch.Tensor, name: str) -> torch.Tensor:
    """Derivative of the activation at ``x`` (closed form, so the outer loop differentiates through it)."""
    if name == "silu":
        s = torch.sigmoid(x)
        return s * (1 + x * (1 - s))
    if name == "relu":
        return (x > 0).to(x.dtype)
    cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))  # exact GELU: d/dx x Phi(x) = Phi(x) + x phi(x)
    return cdf + x * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _surprise(ws, k, v, act):
    """Layer inputs ``a`` and output gradients ``g`` of ``||M(k) - v||^2`` at weights ``ws``.

    ``k (B, H, b, D)``, ``v (B, H, b, Dv)``, ``ws[l] (B, H, d_in, d_out)`` -> lists ``a[l] (B, H, b, d_in)``,
    ``g[l] (B, H, b, d_out)`` with ``grad_{W_l} = a[l]^T g[l]`` per token.
    """
    if len(ws) == 1:
        return [k], [2 * (k @ ws[0] - v)]
    z = k @ ws[0]  # (B, H, b, E)
    h = _act(z, act)
    e = 2 * (h @ ws[1] - v)  # (B, H, b, Dv)
    dz = (e @ ws[1].transpose(-1, -2)) * _act_grad(z, act)  # (B, H, b, E)
    return [k, h], [dz, e]


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    # the inner loop accumulates gradients over the whole sequence: half inputs run it in float32
    return torch.promote_types(dtype, torch.float32)


def _heads_first(c: TitansCall):
    wd = _work_dtype(c.q.dtype)
    q, k, v = (t.to(wd).transpose(1, 2) for t in (c.q, c.k, c.v))  # (B, H, N, D)
    alpha, eta, theta = (t.to(wd).transpose(1, 2) for t in (c.alpha, c.eta, c.theta))  # (B, H, N)
    ws = [w.to(wd) for w in c.weights]
    ms = [m.to(wd) for m in c.momentum] if c.momentum is not None else [torch.zeros_like(w) for w in ws]
    return q, k, v, alpha, eta, theta, ws, ms


def _finish(c: TitansCall, y: torch.Tensor, ws, ms):
    out = y.transpose(1, 2).to(c.q.dtype)  # (B, N, H, Dv)
    if not c.return_state:
        return out
    return out, (tuple(w.to(c.q.dtype) for w in ws), tuple(m.to(c.q.dtype) for m in ms))


def _log_gate(x: torch.Tensor) -> torch.Tensor:
    """``log(x)`` for a gate in [0, 1]; 0 becomes the dtype's smallest normal (its products underflow to 0)."""
    return torch.log(x.clamp_min(torch.finfo(x.dtype).tiny))


def _transfer(logs: torch.Tensor) -> torch.Tensor:
    """``T[t, s] = prod_{j=s+1..t} exp(logs_j)`` for ``s <= t``, else 0: ``(..., b)`` -> ``(..., b, b)``."""
    cum = logs.cumsum(-1)
    diff = cum.unsqueeze(-1) - cum.unsqueeze(-2)  # (..., b, b): cum_t - cum_s
    b = logs.shape[-1]
    lower = torch.ones(b, b, dtype=torch.bool, device=logs.device).tril()
    return torch.exp(torch.where(lower, diff, float("-inf")))


def _chunked(c: TitansCall):
    q, k, v, alpha, eta, theta, ws, ms = _heads_first(c)
    N = q.shape[2]
    b = c.chunk_size
    outs = []
    for t0 in range(0, N, b):
        sl = slice(t0, min(N, t0 + b))
        qc, kc, vc = q[:, :, sl], k[:, :, sl], v[:, :, sl]  # (B, H, b, .)
        la, le, th = _log_gate(1 - alpha[:, :, sl]), _log_gate(eta[:, :, sl]), theta[:, :, sl]  # (B, H, b)
        ta, te = _transfer(la), _transfer(le)  # (B, H, b, b): forgetting and momentum transfer
        c_w = torch.exp(la.cumsum(-1))  # (B, H, b): weight on W_0
        e_s = torch.exp(le.cumsum(-1))  # (B, H, b): momentum kept from S_0
        c_s = (ta @ e_s.unsqueeze(-1)).squeeze(-1)  # (B, H, b): weight on S_0
        w = (ta @ te) * th.unsqueeze(-2)  # (B, H, b, b): w[t, i] on token i's surprise
        a, g = _surprise(ws, kc, vc, c.activation)
        x = qc
        for layer, (w0, s0) in enumerate(zip(ws, ms)):
            r = c_w.unsqueeze(-1) * (x @ w0) + c_s.unsqueeze(-1) * (x @ s0) \
                - (w * (x @ a[layer].transpose(-1, -2))) @ g[layer]  # (B, H, b, d_out)
            x = _act(r, c.activation) if layer + 1 < len(ws) else r
        outs.append(x)
        # the state after the chunk's last token
        last = w[..., -1, :]  # (B, H, b)
        keep = th * te[..., -1, :]  # (B, H, b): theta_i * momentum transfer to the chunk's end
        ms_new = [e_s[..., -1, None, None] * s0 - a_l.transpose(-1, -2) @ (keep.unsqueeze(-1) * g_l)
                  for s0, a_l, g_l in zip(ms, a, g)]
        ws = [c_w[..., -1, None, None] * w0 + c_s[..., -1, None, None] * s0
              - a_l.transpose(-1, -2) @ (last.unsqueeze(-1) * g_l) for w0, s0, a_l, g_l in zip(ws, ms, a, g)]
        ms = ms_new
    return _finish(c, torch.cat(outs, 2), ws, ms)


def _recurrent(c: TitansCall):
    q, k, v, alpha, eta, theta, ws, ms = _heads_first(c)
    N = q.shape[2]
    anchor = ws
    outs = []
    for t in range(N):
        if t % c.chunk_size == 0:
            anchor = ws  # gradients of this chunk are taken at its first state
        a, g = _surprise(anchor, k[:, :, t:t + 1], v[:, :, t:t + 1], c.activation)
        at, et, tt = (z[:, :, t, None, None] for z in (alpha, eta, theta))  # (B, H, 1, 1)
        ms = [et * m - tt * (a_l.transpose(-1, -2) @ g_l) for m, a_l, g_l in zip(ms, a, g)]
        ws = [(1 - at) * w + m for w, m in zip(ws, ms)]
        x = q[:, :, t:t + 1]
        for layer, w in enumerate(ws):
            x = x @ w
            if layer + 1 < len(ws):
                x = _act(x, c.activation)
        outs.append(x)
    return _finish(c, torch.cat(outs, 2), ws, ms)


def _reference(c: TitansCall):
    return naive_titans_memory(c.q, c.k, c.v, c.alpha, c.eta, c.theta, c.weights, momentum=c.momentum,
                               chunk_size=c.chunk_size, activation=c.activation, return_state=c.return_state)


DISPATCHER = Dispatcher("titans_memory", [
    Backend("chunked", _chunked, note="chunk-parallel form: (b, b) transfer matrices, a few matmuls per chunk"),
    Backend("recurrent", _recurrent, auto=False, note="token by token; the speed baseline of the chunked form"),
    Backend("reference", _reference, auto=False, note="naive_titans_memory: token loop, autograd inner gradient"),
])
register_op("titans_memory", make_call, DISPATCHER)


def titans_memory(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor, eta: torch.Tensor,
                  theta: torch.Tensor, weights: tuple[torch.Tensor, ...], *,
                  momentum: tuple[torch.Tensor, ...] | None = None, chunk_size: int = 64, activation: str = "silu",
                  return_state: bool = False, backend: str | None = None):
    """Titans' neural long-term memory: write ``(k_t, v_t)`` by surprise, read with ``q_t``.

    Args:
        q, k: ``(B, N, H, D)``; v: ``(B, N, H, Dv)`` (self: the same ``N``; causal by construction).
        alpha: ``(B, N, H)`` forgetting gate in [0, 1]; eta: ``(B, N, H)`` momentum in [0, 1];
            theta: ``(B, N, H)`` inner learning rate (>= 0).
        weights: the initial memory ``M_0``: ``(W,)`` with ``W (H, D, Dv)`` (linear memory) or
            ``(W1, W2)`` with ``W1 (H, D, E)``, ``W2 (H, E, Dv)`` (MLP memory); a leading batch dim
            ``(B, H, ...)`` continues a state returned by ``return_state``.
        momentum: the initial surprise ``S_0`` shaped like ``weights``; None = zeros.
        chunk_size: gradients inside a chunk are taken at its first state (1 = the exact online rule).
        activation: the MLP memory's hidden activation (``"silu"``, ``"gelu"``, ``"relu"``).
        return_state: also return ``(weights, momentum)`` after the last token, each ``(B, H, ...)``.
        backend: None / ``"chunked"``, ``"recurrent"`` or ``"reference"``.

    Returns:
        ``y (B, N, H, Dv)`` with ``y_t = M_t(q_t)`` in q's dtype (half inputs run in float32), and the state
        if ``return_state``.

    Example:
        >>> B, N, H, D = 1, 256, 2, 16
        >>> q = k = v = torch.randn(B, N, H, D); g = torch.full((B, N, H), 0.1)
        >>> y = titans_memory(q, k, v, g, g, g, (torch.zeros(H, D, D),))
    """
    call = make_call(q, k, v, alpha, eta, theta, weights, momentum=momentum, chunk_size=chunk_size,
                     activation=activation, return_state=return_state)
    return DISPATCHER.run(call, backend)


def titans_retrieve(q: torch.Tensor, weights: tuple[torch.Tensor, ...], *, activation: str = "silu") -> torch.Tensor:
    """Read a memory without writing: ``M(q)`` for ``q (B, N, H, D)`` and weights ``(H, ...)`` or
    ``(B, H, ...)`` -> ``(B, N, H, Dv)`` (MAC's retrieval of the previous segment's memory)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"titans_retrieve: activation must be one of {ACTIVATIONS}, got {activation!r}")
    x = q.transpose(1, 2)  # (B, H, N, D)
    for layer, w in enumerate(weights):
        x = x @ w.to(x.dtype)
        if layer + 1 < len(weights):
            x = _act(x, activation)
    return x.transpose(1, 2)  # (B, N, H, Dv)
