"""CSA: class-semantics-based attention for temporal action detection.

"Class Semantics-based Attention for Action Detection", arXiv 2109.02613 (ICCV 2021), Sec. 3: the attention
weights are computed from the class-semantic features ``R`` of the action-recognition encoder and applied to
the encoded features ``F`` of the localisation encoder, along channels and along (local) time, and the two
attended copies of ``F`` are fused. Sequences are channels-last ``(B, T, C)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.reference.naive_vision_c import naive_class_semantic_attention

FUSES = ("concat", "sum")


@dataclass(frozen=True, eq=False)
class CsaCall:
    """A validated ``class_semantic_attention`` call."""

    f: torch.Tensor
    r: torch.Tensor
    w1: torch.Tensor
    b1: torch.Tensor | None
    w2: torch.Tensor
    b2: torch.Tensor | None
    wt: torch.Tensor
    bt: torch.Tensor | None
    wf: torch.Tensor | None
    bf: torch.Tensor | None
    fuse: str

    def describe(self) -> str:
        return f"f {tuple(self.f.shape)}, r {tuple(self.r.shape)} {self.f.dtype}, temporal kernel " \
               f"{self.wt.shape[-1]}, fuse {self.fuse}"


def _check(op: str, name: str, t, shape: tuple, optional: bool = False) -> None:
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{op}: {name} must be {shape}{' or None' if optional else ''}, got {got}")


def make_csa_call(f, r, w1, b1, w2, b2, wt, bt, wf=None, bf=None, fuse="concat") -> CsaCall:
    op = "class_semantic_attention"
    for name, t in (("f", f), ("r", r)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor (B, T, C), got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.dim() != 3 or t.numel() == 0:
            raise ValueError(f"{op}: {name} must be a non-empty (B, T, C), got shape {tuple(t.shape)}")
    if r.shape[:2] != f.shape[:2]:
        raise ValueError(f"{op}: r must be (B, T, C_r) with the B, T of f {tuple(f.shape)}, got {tuple(r.shape)}")
    if fuse not in FUSES:
        raise ValueError(f"{op}: fuse must be one of {FUSES}, got {fuse!r}")
    C, Cr = f.shape[-1], r.shape[-1]
    if not isinstance(w1, torch.Tensor) or w1.dim() != 2 or w1.shape[1] != Cr:
        raise ValueError(f"{op}: w1 must be (hidden, C_r={Cr})")
    h = w1.shape[0]
    _check(op, "b1", b1, (h,), True)
    _check(op, "w2", w2, (C, h))
    _check(op, "b2", b2, (C,), True)
    if not isinstance(wt, torch.Tensor) or wt.dim() != 3 or wt.shape[:2] != (1, Cr) or wt.shape[2] % 2 == 0:
        raise ValueError(f"{op}: wt must be (1, C_r={Cr}, k) with an odd k, got "
                         f"{tuple(wt.shape) if isinstance(wt, torch.Tensor) else type(wt).__name__}")
    _check(op, "bt", bt, (1,), True)
    if fuse == "concat":
        _check(op, "wf", wf, (C, 2 * C))
        _check(op, "bf", bf, (C,), True)
    return CsaCall(f, r, w1, b1, w2, b2, wt, bt, wf, bf, fuse)


def _torch(c: CsaCall) -> torch.Tensor:
    a_c = torch.sigmoid(F.linear(F.relu(F.linear(c.r.mean(1), c.w1, c.b1)), c.w2, c.b2))  # (B, C) from R
    k = c.wt.shape[-1]
    a_t = torch.sigmoid(F.conv1d(c.r.transpose(1, 2), c.wt, c.bt, padding=k // 2))  # (B, 1, T) from R
    by_channel = c.f * a_c[:, None, :]  # (B, T, C)
    by_time = c.f * a_t.transpose(1, 2)  # (B, T, C)
    if c.fuse == "sum":
        return by_channel + by_time
    return F.linear(torch.cat([by_channel, by_time], -1), c.wf, c.bf)  # (B, T, 2C) -> (B, T, C)


def _reference(c: CsaCall) -> torch.Tensor:
    return naive_class_semantic_attention(c.f, c.r, c.w1, c.b1, c.w2, c.b2, c.wt, c.bt, c.wf, c.bf, c.fuse)


CSA_DISPATCHER = Dispatcher("class_semantic_attention", [
    Backend("torch", _torch, suits=lambda c: (True, "the fast path"),
            note="mean over time + MLP (channel gate), conv1d (temporal gate), two products, a 1x1 fusion"),
    Backend("reference", _reference, auto=False, note="naive_class_semantic_attention: step by step"),
])
register_op("class_semantic_attention",
            lambda f, r, w1, b1=None, w2=None, b2=None, wt=None, bt=None, wf=None, bf=None, fuse="concat":
            make_csa_call(f, r, w1, b1, w2, b2, wt, bt, wf, bf, fuse), CSA_DISPATCHER)


def class_semantic_attention(f: torch.Tensor, r: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None,
                             w2: torch.Tensor, b2: torch.Tensor | None, wt: torch.Tensor, bt: torch.Tensor | None,
                             wf: torch.Tensor | None = None, bf: torch.Tensor | None = None, fuse: str = "concat",
                             *, backend: str | None = None) -> torch.Tensor:
    """CSA (arXiv 2109.02613 Sec. 3): gates computed from ``r``, applied to ``f`` along channels and time, fused.

    ``a_c = sigmoid(W2 relu(W1 mean_T(r) + b1) + b2)`` (channel gate, ``(B, C)``),
    ``a_t = sigmoid(conv1d_k(r) + bt)`` (local temporal gate, ``(B, T)``, zero padding ``k // 2``),
    ``out = Wf [f * a_c ; f * a_t] + bf`` (``fuse="concat"``) or ``f * a_c + f * a_t`` (``fuse="sum"``).

    Args:
        f: encoded features ``(B, T, C)``. r: class-semantic features ``(B, T, C_r)``.
        w1: ``(hidden, C_r)``; b1: ``(hidden,)`` or None; w2: ``(C, hidden)``; b2: ``(C,)`` or None.
        wt: temporal kernel ``(1, C_r, k)``, k odd; bt: ``(1,)`` or None.
        wf: fusion ``(C, 2 C)`` and bf ``(C,)`` (``fuse="concat"`` only).
        backend: None / ``"torch"`` or ``"reference"``.

    Returns:
        ``(B, T, C)``.
    """
    return CSA_DISPATCHER.run(make_csa_call(f, r, w1, b1, w2, b2, wt, bt, wf, bf, fuse), backend)
