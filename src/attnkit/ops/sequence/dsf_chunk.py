"""Understanding the differences in Foundation Models: Attention, State Space Models, and Recurrent Neural
Networks (arXiv 2405.15731) — a two-level scan for the DSF recurrence with a hand-written backward.

The DSF of section 2, ``h_i = diag(lambda_i) h_{i-1} + b_i u_i^T``, ``y_i = h_i^T c_i``, for S6 and RNN heads
(section 3.2: one head per channel, value width ``d = 1``) has almost no work per step, so a step loop's cost is
its ``N`` Python steps and, under autograd, ``N`` tiny graph nodes per tensor. Here the sequence is cut into
``K`` chunks of ``T`` steps and the linear scan runs in two levels:

1. a local scan inside every chunk from a zero state, all ``K`` chunks (and every batch, head and state row)
   at once: ``T`` in-place steps;
2. the chunks' end states carried across chunks (``K`` small steps), each chunk corrected by its running decay
   product ``prod_{s <= t} lambda_s`` (a cumulative product of values in ``[0, 1]``: it only ever shrinks, so it
   cannot overflow, and a decay of exactly 0 is exact, unlike a log-space form that would meet ``log 0``).

``T ~ sqrt(N)`` balances the two loops (``2 sqrt(N)`` steps instead of ``N``); on CPU one chunk (``T = N``) is
faster, see :func:`scan_chunk`. Either way autograd sees one node instead of ``N`` per tensor. The backward is the same
scan run in reverse, ``g_i = c_i dy_i^T + lambda_{i+1} g_{i+1}``, with the gradients read off elementwise from
``g`` and the saved states.
"""

from __future__ import annotations

import math

import torch

__all__ = ["dsf_two_level_scan", "scan_chunk"]


def scan_chunk(n_steps: int, device_type: str = "cpu") -> int:
    """The default chunk length ``T`` for ``n_steps``.

    CPU: ``N`` (one chunk, a plain in-place step loop): on CPU the scan is bound by memory passes over the
    ``(B, N, H, n, d)`` states, not by Python steps, and the second level costs three more passes (measured
    slower at ``N = 64`` and ``N = 1024``). Other devices, where each step is a kernel launch: near ``sqrt(N)``,
    which minimises the ``T + N / T`` steps, a divisor of ``N`` within a factor 2 of it when there is one (no
    padded tail).
    """
    if device_type == "cpu":
        return max(1, n_steps)
    root = math.isqrt(max(n_steps - 1, 0)) + 1  # ceil(sqrt(N))
    for t in sorted(range(max(1, (root + 1) // 2), 2 * root + 1), key=lambda t: abs(t - root)):
        if n_steps % t == 0:
            return t
    return root


def _scan_(x: torch.Tensor, a: torch.Tensor, reverse: bool) -> None:
    """In place on ``x (B, K, T, H, n, d)`` with multipliers ``a (B, K, T, H, m, 1)`` (``m`` in ``{1, n}``):
    forward ``x_i <- a_i x_{i-1} + x_i``; reverse ``x_i <- a_i x_{i+1} + x_i`` (``i`` over ``K * T`` steps)."""
    K, T = x.shape[1], x.shape[2]
    # level 1: every chunk from a zero state, all chunks at once
    for t in (range(T - 2, -1, -1) if reverse else range(1, T)):
        # a * h then + x, two roundings, as the step loops do (addcmul rounds once: differs in half types)
        x[:, :, t].add_(a[:, :, t] * x[:, :, t + 1 if reverse else t - 1])
    if K == 1:
        return
    # running decay products inside each chunk, towards the chunk's entry point: (B, K, T, H, m, 1)
    # (a step loop into one buffer: torch.cumprod along a middle dimension is several times slower on CPU)
    p = torch.empty_like(a)
    first = T - 1 if reverse else 0
    p[:, :, first] = a[:, :, first]
    for t in (range(T - 2, -1, -1) if reverse else range(1, T)):
        torch.mul(p[:, :, t + 1 if reverse else t - 1], a[:, :, t], out=p[:, :, t])
    # level 2: carry the state across chunk entry rows (last row forward, first row in reverse), then correct
    # the other rows of every chunk with its entering state
    edge = 0 if reverse else T - 1
    for k in (range(K - 2, -1, -1) if reverse else range(1, K)):
        x[:, k, edge].addcmul_(p[:, k, edge], x[:, k + 1 if reverse else k - 1, edge])
    if T > 1:
        if reverse:
            x[:, :-1, 1:].addcmul_(p[:, :-1, 1:], x[:, 1:, :1])
        else:
            x[:, 1:, :-1].addcmul_(p[:, 1:, :-1], x[:, :-1, -1:])


def _work_dtype(*ts: torch.Tensor) -> torch.dtype:
    dt = ts[0].dtype
    for t in ts[1:]:
        dt = torch.promote_types(dt, t.dtype)
    # half types run natively, like the other backends (a float32 scan changes a deep bf16 model's rounding
    # pattern away from the bf16 step loop's that the module tests were tolerance-checked against)
    return dt


class _TwoLevelScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, decay, b, c, u, chunk):
        B, N, H, n = b.shape
        d = u.shape[-1]
        wd = _work_dtype(decay, b, c, u)
        T = min(chunk, N)
        K = -(-N // T)
        Np = K * T
        lam = (decay.unsqueeze(-1) if decay.dim() == 3 else decay).unsqueeze(-1).to(wd)  # (B, N, H, m, 1)
        m = lam.shape[-2]
        bw, cw, uw = b.to(wd), c.to(wd), u.to(wd)
        # padded tail rows: zero input, decay 1; they come after every real step so they change nothing
        h = bw.new_zeros(B, Np, H, n, d) if Np > N else bw.new_empty(B, N, H, n, d)
        torch.mul(bw.unsqueeze(-1), uw.unsqueeze(-2), out=h[:, :N])  # b_i u_i^T: (B, N, H, n, d)
        a = lam.contiguous()
        if Np > N:
            a = torch.cat([a, a.new_ones(B, Np - N, H, m, 1)], 1)  # (B, Np, H, m, 1)
        _scan_(h.view(B, K, T, H, n, d), a.view(B, K, T, H, m, 1), reverse=False)  # (B, K, T, H, n, d) view
        h = h[:, :N]  # the states h_i: (B, N, H, n, d)
        y = torch.einsum("bthnd,bthn->bthd", h, cw)  # (B, N, H, d)
        ctx.save_for_backward(decay, b, c, u, h)
        ctx.shape = (T, K, m)
        return y.to(torch.promote_types(torch.promote_types(decay.dtype, b.dtype),
                                        torch.promote_types(c.dtype, u.dtype)))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        decay, b, c, u, h = ctx.saved_tensors
        T, K, m = ctx.shape
        B, N, H, n, d = h.shape
        wd = h.dtype
        lam = (decay.unsqueeze(-1) if decay.dim() == 3 else decay).unsqueeze(-1).to(wd)  # (B, N, H, m, 1)
        bw, cw, uw, dyw = b.to(wd), c.to(wd), u.to(wd), dy.to(wd)
        # g_i = dL/dh_i = c_i dy_i^T + lambda_{i+1} g_{i+1}: the reverse scan with the decays shifted by one
        g = h.new_zeros(B, K * T, H, n, d)
        torch.mul(cw.unsqueeze(-1), dyw.unsqueeze(-2), out=g[:, :N])  # (B, N, H, n, d)
        a = lam.new_zeros(B, K * T, H, m, 1)
        a[:, :N - 1] = lam[:, 1:]  # lambda_{i+1}; 0 after the last step (no future)
        _scan_(g.view(B, K, T, H, n, d), a.view(B, K, T, H, m, 1), reverse=True)  # (B, K, T, H, n, d) view
        g = g[:, :N]
        gd = gb = gc = gu = None
        if ctx.needs_input_grad[0]:
            # dL/dlambda_i = sum_d g_i * h_{i-1} (h_0 = 0 before the first step)
            gl = torch.zeros_like(lam)  # (B, N, H, m, 1)
            prod = (g[:, 1:] * h[:, :-1]).sum(-1, keepdim=True)  # (B, N - 1, H, n, 1)
            gl[:, 1:] = prod.sum(-2, keepdim=True) if m == 1 else prod  # a scalar decay feeds all n rows
            gd = gl.squeeze(-1)  # (B, N, H, m)
            gd = (gd.squeeze(-1) if decay.dim() == 3 else gd).to(decay.dtype)  # decay's shape
        if ctx.needs_input_grad[1]:
            gb = (g * uw.unsqueeze(-2)).sum(-1).to(b.dtype)  # (B, N, H, n)
        if ctx.needs_input_grad[2]:
            gc = (h * dyw.unsqueeze(-2)).sum(-1).to(c.dtype)  # (B, N, H, n)
        if ctx.needs_input_grad[3]:
            gu = (g * bw.unsqueeze(-1)).sum(-2).to(u.dtype)  # (B, N, H, d)
        return gd, gb, gc, gu, None


def dsf_two_level_scan(decay: torch.Tensor, b: torch.Tensor, c: torch.Tensor, u: torch.Tensor,
                       chunk: int | None = None) -> torch.Tensor:
    """``y_i = h_i^T c_i`` with ``h_i = diag(decay_i) h_{i-1} + b_i u_i^T``, ``h_0 = 0``, by the two-level scan.

    Args:
        decay: ``(B, N, H)`` or ``(B, N, H, n)``; b, c: ``(B, N, H, n)``; u: ``(B, N, H, d)`` (shapes checked by
            :func:`~attnkit.ops.sequence.dsf.dsf_scan`, which calls this as its ``scan`` backend).
        chunk: ``T``, the steps per chunk; None: :func:`scan_chunk` of ``N`` and the device.

    Returns:
        ``(B, N, H, d)``; one autograd node whose backward is the reverse two-level scan (first order only).
    """
    T = scan_chunk(b.shape[1], b.device.type) if chunk is None else int(chunk)
    if T < 1:
        raise ValueError(f"dsf_two_level_scan: chunk must be a positive int, got {chunk!r}")
    return _TwoLevelScan.apply(decay, b, c, u, T)
