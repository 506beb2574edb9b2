"""Pointer Networks (arXiv 1506.03134) — the pointer head: a distribution over the input positions.

The module holds ``W1``, ``W2`` and ``v`` and calls :func:`~attnkit.ops.sequence.pointer.pointer_attention`.
"""

from __future__ import annotations

import torch
from torch import nn

from attnkit.ops.sequence.pointer import pointer_attention
from attnkit.reference.naive_sequence3 import naive_pointer_module
from attnkit.registry import Family, Paper, check_input, choice_option, int_option, register


def _flops(cfg: dict) -> float:
    b, n, c, a = cfg["batch"], cfg["seq_len"], cfg["dim"], cfg.get("hidden") or cfg["dim"]
    m = cfg.get("context_len", n)
    return float(b * (2 * (n + m) * c * a + 3 * n * m * a))  # projections, then add + tanh + dot per pair


_DEFAULT = {"dim": 256, "hidden": None, "output": "probs"}


@register(
    name="pointer_attention", family=Family.CROSS,
    paper=Paper("Pointer Networks", "1506.03134", 2015),
    patterns=("noncausal-self", "noncausal-cross"), complexity="O(Nd Ne A + (Nd + Ne) C A)", flops=_flops,
    options=lambda c: {k: c[k] for k in _DEFAULT}, reference=naive_pointer_module, functional=pointer_attention,
    default_config=_DEFAULT, tiny_config={"dim": 6, "hidden": 5},
    default_input={"batch": 128, "seq_len": 50}, tiny_input={"batch": 2, "seq_len": 5},
    output_shape=lambda c: (c.get("batch", 1), c["seq_len"], c.get("context_len", c["seq_len"])),
    notes="A pooling spec: decoder states x (B, Nd, C) point over encoder states context (B, Ne, C) (None: x "
          "itself) -> (B, Nd, Ne) probabilities (output='log_probs': log-probabilities, the training target's "
          "NLL input). Section 2.3's u = v^T tanh(W1 e_j + W2 d_i) without biases, softmax over the inputs; the "
          "LSTM encoder/decoder of the paper are not part of the head (pass their states). mask (B, Nd, Ne) bool "
          "restricts the choices (pointed_mask builds the no-repeat mask of teacher-forced decoding); masked "
          "positions are exactly 0, a row with no allowed position is all 0. hidden A defaults to C (the paper "
          "uses the LSTM width, 256 or 512). Non-causal only: step i's distribution reads every input position.",
)
class PointerAttention(nn.Module):
    """Pointer Networks' output head.

    Args:
        dim: ``C`` of the decoder and encoder states; hidden: ``A`` (default ``C``);
        output: ``"probs"`` or ``"log_probs"``.

    Shapes:
        ``x (B, Nd, C)``, ``context (B, Ne, C)`` or None (``x``), ``mask (B, Nd, Ne)`` bool or None ->
        ``(B, Nd, Ne)``.

    Example:
        >>> p = PointerAttention(256)(dec_states, enc_states)   # (B, Nd, Ne), rows sum to 1
    """

    def __init__(self, dim: int, hidden: int | None = None, output: str = "probs"):
        super().__init__()
        self.dim = int_option(self, "dim", dim, 1)
        self.hidden = int_option(self, "hidden", dim if hidden is None else hidden, 1)
        self.output = choice_option(self, "output", output, ("probs", "log_probs"))
        self.w1 = nn.Linear(dim, self.hidden, bias=False)  # encoder side
        self.w2 = nn.Linear(dim, self.hidden, bias=False)  # decoder side
        self.v = nn.Parameter(torch.randn(self.hidden) * self.hidden ** -0.5)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        check_input(self, x, "(B, N, C)", channels=self.dim)
        enc = x if context is None else check_input(self, context, "(B, M, C)", channels=self.dim, name="context")
        if enc.shape[0] != x.shape[0]:
            raise ValueError(f"{type(self).__name__}: context batch {enc.shape[0]} != x batch {x.shape[0]}")
        return pointer_attention(self.w2(x), self.w1(enc), self.v, mask, log=self.output == "log_probs")

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden={self.hidden}, output={self.output!r}"
