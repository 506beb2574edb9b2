"""ULSAM: one softmax spatial attention map per channel subspace, applied residually.

"ULSAM: Ultra-Lightweight Subspace Attention Module for Compact Convolutional Neural Networks", arXiv 2006.15102
(WACV 2020), Sec. 3, Eq. 1-3: the ``C`` channels are split into ``g`` subspaces of ``G = C / g``; subspace ``n``
gets ``A_n = softmax_{H W}(PW_{G -> 1}(maxpool_3(DW_1x1(F_n))))`` and ``out_n = F_n * A_n + F_n``. The authors'
code puts batch normalisation + ReLU after the depthwise and after the pointwise conv (both optional here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.ops.channel._common import check_map, check_param, work_dtype
from attnkit.reference.naive_vision_a import naive_ulsam_attention


@dataclass(frozen=True, eq=False)
class UlsamCall:
    """A validated ``ulsam_attention`` call."""

    x: torch.Tensor
    dw_weight: torch.Tensor
    dw_bias: torch.Tensor | None
    pw_weight: torch.Tensor
    pw_bias: torch.Tensor | None
    groups: int
    dw_norm: tuple | None
    pw_norm: tuple | None
    relu: bool
    training: bool
    momentum: float
    eps: float

    def describe(self) -> str:
        return (f"x {tuple(self.x.shape)} {self.x.dtype}, {self.groups} subspaces, "
                f"norm={self.dw_norm is not None}, relu={self.relu}")


def _check_norm(op, name, norm, n):
    if norm is None:
        return None
    if not isinstance(norm, (tuple, list)) or len(norm) != 4:
        raise TypeError(f"{op}: {name} must be None or (running_mean, running_var, weight, bias), got "
                        f"{type(norm).__name__}")
    for part, t in zip(("running_mean", "running_var", "weight", "bias"), norm, strict=True):
        check_param(op, f"{name}.{part}", t, (n,), optional=True)
    if (norm[0] is None) != (norm[1] is None):
        raise ValueError(f"{op}: {name} needs both running statistics or neither")
    return tuple(norm)


def make_call(x, dw_weight, dw_bias, pw_weight, pw_bias, groups, dw_norm=None, pw_norm=None, relu=True,
              training=False, momentum=0.1, eps=1e-5) -> UlsamCall:
    op = "ulsam_attention"
    check_map(op, x)
    C = x.shape[1]
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{op}: groups must be an int >= 1, got {groups!r}")
    if C % groups:
        raise ValueError(f"{op}: groups ({groups}) must divide the channel count C={C}")
    check_param(op, "dw_weight", dw_weight, (C,))
    check_param(op, "dw_bias", dw_bias, (C,), optional=True)
    check_param(op, "pw_weight", pw_weight, (groups, C // groups))
    check_param(op, "pw_bias", pw_bias, (groups,), optional=True)
    dw_norm = _check_norm(op, "dw_norm", dw_norm, C)
    pw_norm = _check_norm(op, "pw_norm", pw_norm, groups)
    if not training and ((dw_norm is not None and dw_norm[0] is None) or (pw_norm is not None and pw_norm[0] is None)):
        raise ValueError(f"{op}: a norm without running statistics needs training=True (batch statistics)")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps <= 0:
        raise ValueError(f"{op}: eps must be a float > 0, got {eps!r}")
    return UlsamCall(x, dw_weight, dw_bias, pw_weight, pw_bias, groups, dw_norm, pw_norm, bool(relu),
                     bool(training), float(momentum), float(eps))


def _max3(u: torch.Tensor) -> torch.Tensor:
    """3 x 3 max pool, stride 1, -inf padding. torch's CPU kernel is several times faster, forward and backward,
    on channels-last storage than on contiguous NCHW (measured: 14x14x384 and 56x56x96, B = 8), so the map is
    pooled in that memory format; ``torch.maximum`` chains are no alternative (their backward builds tie masks)."""
    if u.device.type == "cpu":
        u = u.contiguous(memory_format=torch.channels_last)
    return F.max_pool2d(u, 3, stride=1, padding=1)  # implicit -inf padding: only real neighbours compete


def _fused(c: UlsamCall) -> torch.Tensor:
    # every subspace at once: the per-channel DW and BN do not mix subspaces, the PW is a grouped 1 x 1 conv
    x = c.x
    B, C, H, W = x.shape
    g, G = c.groups, C // c.groups
    u = x * c.dw_weight.view(1, C, 1, 1)
    if c.dw_bias is not None:
        u = u + c.dw_bias.view(1, C, 1, 1)
    if c.dw_norm is not None:
        u = F.batch_norm(u, *c.dw_norm, training=c.training, momentum=c.momentum, eps=c.eps)
    if c.relu:
        u = F.relu(u)
    u = _max3(u)
    s = F.conv2d(u, c.pw_weight.view(g, G, 1, 1), c.pw_bias, groups=g)  # (B, g, H, W)
    if c.pw_norm is not None:
        s = F.batch_norm(s, *c.pw_norm, training=c.training, momentum=c.momentum, eps=c.eps)
    if c.relu:
        s = F.relu(s)
    a = torch.softmax(s.reshape(B, g, H * W), -1, dtype=work_dtype(x)).to(x.dtype)  # (B, g, H W): sums to 1
    xs = x.reshape(B, g, G, H * W)  # (B, g, G, H W): one subspace per g (a copy only for strided x)
    # x + x * A rather than x * (1 + A): 1 + A would round A (~1 / HW) away in half precision
    return torch.addcmul(xs, xs, a.view(B, g, 1, H * W)).view(B, C, H, W)  # (B, C, H, W)


DISPATCHER = Dispatcher("ulsam_attention", [
    Backend("fused", _fused, suits=lambda c: (True, "the fast path"),
            note="all subspaces at once: scale, batch norm, max pool, grouped 1x1 conv, softmax, one addcmul",
            detail=lambda c: f"softmax in {work_dtype(c.x)}; max pool on channels-last storage on CPU"),
    Backend("reference", lambda c: naive_ulsam_attention(c.x, c.dw_weight, c.dw_bias, c.pw_weight, c.pw_bias,
                                                         c.groups, c.dw_norm, c.pw_norm, c.relu, c.training,
                                                         c.momentum, c.eps),
            auto=False, note="naive_ulsam_attention: one subspace at a time"),
])
register_op("ulsam_attention", make_call, DISPATCHER)


def ulsam_attention(x: torch.Tensor, dw_weight: torch.Tensor, dw_bias: torch.Tensor | None, pw_weight: torch.Tensor,
                    pw_bias: torch.Tensor | None, groups: int, *, dw_norm: tuple | None = None,
                    pw_norm: tuple | None = None, relu: bool = True, training: bool = False, momentum: float = 0.1,
                    eps: float = 1e-5, backend: str | None = None) -> torch.Tensor:
    """ULSAM's subspace attention on a CNN map.

    Args:
        x: ``(B, C, H, W)``.
        dw_weight, dw_bias: ``(C,)``: the depthwise 1 x 1 conv (a per-channel scale and shift).
        pw_weight: ``(groups, C / groups)``; pw_bias ``(groups,)``: each subspace's pointwise conv to one map.
        groups: ``g``, the number of subspaces (must divide ``C``).
        dw_norm: None or ``(running_mean, running_var, weight, bias)`` of ``(C,)`` (``F.batch_norm``'s arguments)
            after the depthwise conv; pw_norm the same with ``(groups,)`` after the pointwise conv.
        relu: a ReLU after each norm (the authors' code); False with both norms None is the paper's Eq. 1-3.
        training, momentum, eps: as ``F.batch_norm`` (batch statistics and running-buffer updates when training).
        backend: None / ``"fused"`` or ``"reference"``.

    Returns:
        ``(B, C, H, W)``: ``x_n * A_n + x_n`` per subspace, ``A_n (B, 1, H, W)`` summing to 1 over ``H W``.

    Example:
        >>> out = ulsam_attention(torch.randn(2, 8, 5, 5), torch.randn(8), None, torch.randn(4, 2), None, 4)
    """
    return DISPATCHER.run(make_call(x, dw_weight, dw_bias, pw_weight, pw_bias, groups, dw_norm, pw_norm, relu,
                                    training, momentum, eps), backend)
