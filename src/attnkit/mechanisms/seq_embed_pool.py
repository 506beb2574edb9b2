"""Pooling And Attention: What Are Effective Designs For LLM-Based Embedding Models? (arXiv 2409.02727).

Multi-Layers Trainable Pooling: learned latents cross-attend the per-layer sentence states ``(B, L, C)`` plus a
learned layer embedding; the module holds the projections and calls
:func:`~attnkit.ops.sequence.embed_pool.latent_attention_pool` (build the stack with
:func:`~attnkit.ops.sequence.embed_pool.layer_states`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attnkit.ops.sequence.embed_pool import latent_attention_pool
from attnkit.reference.naive_sequence3 import naive_embedding_pool_module
from attnkit.registry import Family, Paper, check_input, divisible, int_option, register


def _flops(cfg: dict) -> float:
    b, L, c, r = cfg["batch"], cfg["seq_len"], cfg["dim"], cfg["num_latents"]
    o = cfg.get("out_dim") or c
    return float(b * (4 * L * c * c + 4 * r * L * c + 2 * r * c * c + 2 * r * c * (c + o)))


_DEFAULT = {"dim": 896, "num_layers": 25, "num_latents": 1, "num_heads": 8, "out_dim": None, "normalize": True}


@register(
    name="embedding_pooling", family=Family.CROSS,
    paper=Paper("Pooling And Attention: What Are Effective Designs For LLM-Based Embedding Models?",
                "2409.02727", 2024),
    patterns=("noncausal-self",), complexity="O(L r C + L C^2)", flops=_flops,
    options=lambda c: {k: c[k] for k in _DEFAULT}, reference=naive_embedding_pool_module,
    functional=latent_attention_pool, default_config=_DEFAULT,
    tiny_config={"dim": 6, "num_layers": 8, "num_latents": 2, "num_heads": 2},
    default_input={"batch": 32, "seq_len": 25}, tiny_input={"batch": 2, "seq_len": 3},
    output_shape=lambda c: (c.get("batch", 1), c.get("out_dim") or c["dim"]),
    notes="A pooling spec: the stack of per-layer sentence states x (B, L, C) (seq_len = L entries, one per "
          "layer; layer_states builds it from a model's hidden states, EOS-last or mean) -> one embedding "
          "(B, out_dim). Learned layer embedding added to layer l (rows of a table of num_layers >= L; an input "
          "with fewer layers uses the first L rows), r learned latent queries, separate K and V projections, "
          "per-head softmax over the layers, output projection, a GELU MLP, mean over the latents, L2 "
          "normalisation (normalize=False drops it). The abstract fixes 'cross-attention over all hidden layers "
          "with learnable layer weighting'; the exact block (separate K/V, one MLP, r = 1 by default, 8 heads) "
          "is our reading. Defaults sized for Qwen2-0.5B (hidden 896, 24 blocks + embeddings = 25 states). "
          "Non-causal only (it pools).",
)
class MultiLayerTrainablePooling(nn.Module):
    """Multi-layer trainable pooling: latents cross-attend the per-layer states.

    Args:
        dim: ``C``; num_layers: rows of the layer embedding (the most layers an input may stack);
        num_latents: ``r`` learned queries; num_heads: ``H``; out_dim: embedding width (default ``C``);
        normalize: L2-normalise the embedding.

    Shapes:
        ``x (B, L, C)`` with ``L <= num_layers`` -> ``(B, out_dim)``.

    Example:
        >>> emb = MultiLayerTrainablePooling(896)(layer_states(out.hidden_states, attention_mask))
    """

    def __init__(self, dim: int, num_layers: int = 25, num_latents: int = 1, num_heads: int = 8,
                 out_dim: int | None = None, normalize: bool = True):
        super().__init__()
        self.dim = int_option(self, "dim", dim, 1)
        self.num_layers = int_option(self, "num_layers", num_layers, 1)
        self.num_latents = int_option(self, "num_latents", num_latents, 1)
        self.num_heads = int_option(self, "num_heads", num_heads, 1)
        divisible(self, dim, num_heads)
        self.out_dim = int_option(self, "out_dim", dim if out_dim is None else out_dim, 1)
        if not isinstance(normalize, bool):
            raise TypeError(f"{type(self).__name__}: normalize must be a bool, got {type(normalize).__name__}")
        self.normalize = normalize
        self.layer_embed = nn.Parameter(torch.zeros(num_layers, dim))  # starts neutral: plain states
        self.latents = nn.Parameter(torch.randn(num_latents, dim) * 0.02)
        self.to_kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, self.out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, "(B, N, C)", channels=self.dim)
        B, L, C = x.shape
        if L > self.num_layers:
            raise ValueError(f"{type(self).__name__}: x stacks {L} layers, more than num_layers={self.num_layers}")
        H = self.num_heads
        k, v = self.to_kv(x + self.layer_embed[:L]).view(B, L, 2, H, C // H).unbind(2)  # (B, L, H, D)
        z = latent_attention_pool(self.latents.view(-1, H, C // H), k, v).reshape(B, -1, C)  # (B, r, C)
        emb = self.mlp(self.proj(z)).mean(1)  # (B, out_dim)
        return F.normalize(emb, dim=-1) if self.normalize else emb

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_layers={self.num_layers}, num_latents={self.num_latents}, "
                f"heads={self.num_heads}, out_dim={self.out_dim}, normalize={self.normalize}")
