"""Deconstructing Attention: Investigating Design Principles for Effective Language Modeling (arXiv 2510.11602).

One attention layer whose design principles are options: where queries and keys come from (``qk_source``: the
current hidden states, externally supplied embeddings such as the layer-0 token embeddings or fixed random
embeddings of the token ids, or position-only embeddings that make the weights input-independent), whether the
query and key projections are shared, the score form and the kind of token mixing (the op
:func:`~attnkit.ops.sequence.deconstructed.deconstructed_attention`). The defaults are standard multi-head softmax
attention.
"""

from __future__ import annotations

import torch
from torch import nn

from attnkit.ops.sequence.deconstructed import FORMS, MIXINGS, deconstructed_attention
from attnkit.reference.naive_sequence4 import naive_deconstructed_module
from attnkit.registry import Family, Paper, check_input, choice_option, divisible, int_option, register

QK_SOURCES = ("hidden", "external", "position")


def _flops(cfg: dict) -> float:
    b, n, c = cfg["batch"], cfg["seq_len"], cfg["dim"]
    proj = 2 * b * n * c * c * 2  # value and output projections
    if cfg["mixing"] != "attention":
        return proj + b * n * c
    qk = (1 if cfg["shared_qk"] else 2) * 2 * n * c * c * (1 if cfg["qk_source"] == "position" else b)
    return proj + qk + 4 * b * n * n * c


_DEFAULT = {"dim": 64, "num_heads": 4, "qk_source": "hidden", "form": "softmax", "mixing": "attention",
            "shared_qk": False, "max_len": None, "causal": False}


def _options(c: dict) -> dict:
    return {k: c[k] for k in _DEFAULT}


@register(
    name="deconstructed_attention", family=Family.DENSE,
    paper=Paper("Deconstructing Attention: Investigating Design Principles for Effective Language Modeling",
                "2510.11602", 2025),
    patterns=("noncausal-self", "causal-self"), complexity="O(N^2 C) (O(N C) for fixed mixing)", flops=_flops,
    options=_options, reference=naive_deconstructed_module, functional=deconstructed_attention,
    default_config=_DEFAULT, tiny_config={"dim": 8, "num_heads": 2}, default_input={"batch": 2, "seq_len": 64},
    tiny_input={"batch": 1, "seq_len": 6},
    notes="The paper's variants (RndEmbQK, StaticEmbQK, FixedSeqQK, Approximate / Non-approximate) are named in its "
          "summaries but their exact equations were not readable in this session; they map to options: "
          "qk_source='external' with qk_input = fixed random embeddings of the token ids (RndEmbQK) or the layer-0 "
          "token embeddings (StaticEmbQK); qk_source='position' with a learned (max_len, C) table (FixedSeqQK: "
          "weights identical for every input of a length); the mathematical-form axis is form in "
          "softmax/relu (relu(s)/n)/sigmoid (sigmoid(s - log n))/linear (s/n)/taylor (2nd-order exp, normalised) "
          "and the mixing axis mixing in attention/uniform (1/n over visible keys)/none (identity). "
          "shared_qk ties W_K = W_Q. Hybrids (standard attention every few layers) are a model-level choice: stack "
          "modules with different options. max_len defaults to 512 for qk_source='position'.",
)
class DeconstructedAttention(nn.Module):
    """Attention with its design principles as options (defaults: standard softmax MHA).

    Args:
        dim: ``C``; num_heads: ``H``; qk_source: ``"hidden"`` (q, k from ``x``), ``"external"`` (from
        ``forward``'s ``qk_input``) or ``"position"`` (from a learned position table); form, mixing: see
        :func:`~attnkit.ops.sequence.deconstructed.deconstructed_attention`; shared_qk: ``W_K = W_Q``;
        max_len: position-table length (``qk_source="position"``, default 512); causal: causal (default False).

    Shapes:
        ``x (B, N, C)`` (and ``qk_input (B, N, C)`` for ``"external"``) -> ``(B, N, C)``.

    Example:
        >>> m = DeconstructedAttention(64, 4, qk_source="position", max_len=128, causal=True)
        >>> y = m(torch.randn(2, 128, 64))
    """

    def __init__(self, dim: int, num_heads: int = 4, *, qk_source: str = "hidden", form: str = "softmax",
                 mixing: str = "attention", shared_qk: bool = False, max_len: int | None = None,
                 causal: bool = False):
        super().__init__()
        divisible(self, dim, num_heads)
        self.dim, self.num_heads = dim, num_heads
        self.qk_source = choice_option(self, "qk_source", qk_source, QK_SOURCES)
        self.form = choice_option(self, "form", form, FORMS)
        self.mixing = choice_option(self, "mixing", mixing, MIXINGS)
        self.shared_qk, self.causal = bool(shared_qk), bool(causal)
        s = dim ** -0.5
        scores = mixing == "attention"
        self.wq = nn.Parameter(torch.randn(dim, dim) * s) if scores else None
        self.wk = nn.Parameter(torch.randn(dim, dim) * s) if scores and not shared_qk else None
        self.wv = nn.Parameter(torch.randn(dim, dim) * s)
        self.wo = nn.Parameter(torch.randn(dim, dim) * s)
        self.max_len = None
        self.pos_emb = None
        if scores and qk_source == "position":
            self.max_len = int_option(self, "max_len", 512 if max_len is None else max_len, 1)
            self.pos_emb = nn.Parameter(torch.randn(self.max_len, dim))

    def forward(self, x: torch.Tensor, qk_input: torch.Tensor | None = None) -> torch.Tensor:
        check_input(self, x, "(B, N, C)", channels=self.dim)
        B, N, C = x.shape
        H = self.num_heads
        q = k = None
        if self.mixing == "attention":
            if self.qk_source == "external":
                if qk_input is None:
                    raise ValueError(f"{type(self).__name__}: qk_source='external' needs qk_input (B, N, C)")
                src = check_input(self, qk_input, "(B, N, C)", channels=C, name="qk_input")
                if src.shape[:2] != x.shape[:2]:
                    raise ValueError(f"{type(self).__name__}: qk_input must be {(B, N, C)}, got {tuple(src.shape)}")
            elif self.qk_source == "position":
                if N > self.max_len:
                    raise ValueError(f"{type(self).__name__}: sequence length {N} exceeds max_len={self.max_len}")
                src = self.pos_emb[:N].unsqueeze(0)  # (1, N, C): the same for every input
            else:
                src = x
            q = (src @ self.wq).view(-1, N, H, C // H).expand(B, N, H, C // H)  # (B, N, H, D)
            k = (src @ (self.wq if self.shared_qk else self.wk)).view(-1, N, H, C // H).expand(B, N, H, C // H)
        v = (x @ self.wv).view(B, N, H, C // H)  # (B, N, H, D)
        o = deconstructed_attention(q, k, v, form=self.form, mixing=self.mixing, causal=self.causal)
        return o.reshape(B, N, C) @ self.wo

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.num_heads}, qk_source={self.qk_source}, form={self.form}, "
                f"mixing={self.mixing}, shared_qk={self.shared_qk}, causal={self.causal}")
