"""NiNformer's token-mixing MLP: a two-layer MLP along the token axis, the inner Mixer block's token half.

"NiNformer: A Network in Network Transformer with Token Mixing Generated Gating Function", arXiv 2403.02411
(2024), §3.

For every image and channel ``c`` the ``N`` token values are mixed by ``W2 GELU(W1 x[:, c] + b1) + b2`` with
``W1 (d, N)`` and ``W2 (N, d)``: MLP-Mixer's token MLP. The weights are ``N``-sized, so the op (and NiNformer)
is tied to one resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.ops.vision.common import check_image
from attnkit.reference.naive_vision_b import naive_token_mixing_mlp


@dataclass(frozen=True, eq=False)
class TokenMLPCall:
    x: torch.Tensor
    w1: torch.Tensor
    b1: torch.Tensor | None
    w2: torch.Tensor
    b2: torch.Tensor | None

    def describe(self) -> str:
        return f"x {tuple(self.x.shape)} {self.x.dtype}, hidden {self.w1.shape[0]}"


def make_token_mlp_call(x, w1, b1, w2, b2) -> TokenMLPCall:
    fn = "token_mixing_mlp"
    x = check_image(fn, "x", x, rank=3, layout="(B, N, C)")
    N = x.shape[1]
    for name, t in (("w1", w1), ("w2", w2)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{fn}: {name} must be a 2-D tensor")
    d = w1.shape[0]
    if w1.shape != (d, N) or w2.shape != (N, d):
        raise ValueError(f"{fn}: w1 must be (d, N) and w2 (N, d) for N = {N} tokens, got w1 {tuple(w1.shape)} and "
                         f"w2 {tuple(w2.shape)}; the token MLP is tied to the token count it was built for")
    for name, b, n in (("b1", b1, d), ("b2", b2, N)):
        if b is not None and (not isinstance(b, torch.Tensor) or b.shape != (n,)):
            raise ValueError(f"{fn}: {name} must be ({n},) or None")
    return TokenMLPCall(x, w1, b1, w2, b2)


def _addmm(c: TokenMLPCall) -> torch.Tensor:
    # (d, N) @ (B, N, C): the token axis is contracted in place, no transpose of x or of the output
    h = torch.matmul(c.w1.to(c.x.dtype), c.x)                                       # (B, d, C)
    if c.b1 is not None:
        h = h + c.b1.to(c.x.dtype)[:, None]
    out = torch.matmul(c.w2.to(c.x.dtype), F.gelu(h))                               # (B, N, C)
    return out if c.b2 is None else out + c.b2.to(c.x.dtype)[:, None]


def _reference(c: TokenMLPCall) -> torch.Tensor:
    return naive_token_mixing_mlp(c.x, c.w1, c.b1, c.w2, c.b2)


TOKEN_MLP_DISPATCHER = Dispatcher("token_mixing_mlp", [
    Backend("matmul", _addmm, note="two batched matmuls contracting the token axis of x (B, N, C) in place"),
    Backend("reference", _reference, auto=False, note="naive_token_mixing_mlp: channel by channel"),
])
register_op("token_mixing_mlp", make_token_mlp_call, TOKEN_MLP_DISPATCHER)


def token_mixing_mlp(x, w1, b1, w2, b2, *, backend: str | None = None) -> torch.Tensor:
    """MLP-Mixer / NiNformer token MLP along the token axis.

    Args:
        x: ``(B, N, C)`` (flatten an image ``(B, Y, X, C)`` to ``N = Y X`` tokens).
        w1: ``(d, N)``; b1: ``(d,)`` or None; w2: ``(N, d)``; b2: ``(N,)`` or None.
        backend: None / ``"matmul"`` or ``"reference"``.

    Returns:
        ``(B, N, C)``: ``out[b, :, c] = w2 GELU(w1 x[b, :, c] + b1) + b2``.
    """
    return TOKEN_MLP_DISPATCHER.run(make_token_mlp_call(x, w1, b1, w2, b2), backend)
