"""ST-LINK: Spatially-Aware Large Language Models for Spatio-Temporal Forecasting (arXiv 2509.13753) — SE-attention.

Multi-head attention over spatio-temporal tokens laid out time-major (token ``n`` = node ``n % num_nodes`` at time
``n // num_nodes``) with rotary embeddings over time and over the nodes' coordinates; the module holds the
projections and the node coordinates and calls :func:`~attnkit.ops.sequence.se_rope.se_attention`.
"""

from __future__ import annotations

import torch
from torch import nn

from attnkit.ops.sequence.se_rope import grid_coords, se_attention
from attnkit.reference.naive_sequence3 import naive_se_module
from attnkit.registry import Family, Paper, check_input, divisible, float_option, int_option, register


def _flops(cfg: dict) -> float:
    b, n, c = cfg["batch"], cfg["seq_len"], cfg["dim"]
    pairs = n * (n + 1) / 2 if cfg["causal"] else n * n
    return float(b * (8 * n * c * c + 4 * pairs * c + 6 * n * c))


_DEFAULT = {"dim": 256, "num_heads": 4, "num_nodes": 16, "coord_dim": 2, "spatial_frac": 0.5, "causal": False}


@register(
    name="se_attention", family=Family.DENSE,
    paper=Paper("ST-LINK: Spatially-Aware Large Language Models for Spatio-Temporal Forecasting", "2509.13753", 2025),
    patterns=("noncausal-self", "causal-self"), complexity="O(N^2 C)", flops=_flops,
    options=lambda c: {k: c[k] for k in _DEFAULT}, reference=naive_se_module, functional=se_attention,
    default_config=_DEFAULT, tiny_config={"dim": 16, "num_heads": 2, "num_nodes": 3},
    default_input={"batch": 4, "seq_len": 192}, tiny_input={"batch": 2, "seq_len": 7},
    notes="Tokens are (time, node) pairs laid out time-major: token n is node n % num_nodes at time n // num_nodes "
          "(forward(x, coords=, time_pos=) overrides both). The head dim is split: the first D - spatial_dim "
          "channel pairs carry RoPE over time (base 10000), the last spatial_dim = 2 round(spatial_frac D / 2) "
          "turn with the node coordinates, pair f on axis f % S with frequency 100^(-(f // S) / ceil(Ps / S)). "
          "The exact spatial angle construction of ST-LINK was not readable: this split and the bases are our "
          "choice, built so the score depends on time offsets and coordinate differences only. Node coordinates "
          "default to a near-square grid (grid_coords); laplacian_coords(adjacency, S) gives the spectral "
          "coordinates of a road graph (pass them as node_coords). The memory-retrieval FFN is not part of it. "
          "causal=True (ST-LINK runs inside a causal LLM): token-order causal mask.",
)
class SEAttention(nn.Module):
    """Spatially-enhanced attention.

    Args:
        dim: ``C``; num_heads: ``H``; num_nodes: ``V`` nodes per time step; coord_dim: ``S``;
        spatial_frac: share of each head's channels turned by the coordinates; causal: token-order mask;
        node_coords: ``(V, S)`` coordinates (default: :func:`~attnkit.ops.sequence.se_rope.grid_coords`);
        time_base, spatial_base: rotary bases.

    Shapes:
        ``x (B, N, C)`` (optional ``coords (N, S)`` / ``(B, N, S)``, ``time_pos (N,)`` / ``(B, N)``) -> ``(B, N, C)``.

    Example:
        >>> y = SEAttention(256, 4, num_nodes=16, causal=True)(torch.randn(2, 192, 256))   # 12 steps x 16 nodes
    """

    def __init__(self, dim: int, num_heads: int = 4, num_nodes: int = 16, coord_dim: int = 2,
                 spatial_frac: float = 0.5, causal: bool = False, node_coords: torch.Tensor | None = None,
                 time_base: float = 10000.0, spatial_base: float = 100.0):
        super().__init__()
        self.dim = int_option(self, "dim", dim, 1)
        self.num_heads = int_option(self, "num_heads", num_heads, 1)
        head = divisible(self, dim, num_heads)
        if head % 2:
            raise ValueError(f"{type(self).__name__}: the head width dim / num_heads = {head} must be even")
        self.num_nodes = int_option(self, "num_nodes", num_nodes, 1)
        self.coord_dim = int_option(self, "coord_dim", coord_dim, 1)
        frac = float_option(self, "spatial_frac", spatial_frac, minimum=0.0)
        if frac > 1:
            raise ValueError(f"{type(self).__name__}: spatial_frac must be in [0, 1], got {spatial_frac}")
        self.spatial_frac = frac
        self.spatial_dim = 2 * round(frac * head / 2)
        if not isinstance(causal, bool):
            raise TypeError(f"{type(self).__name__}: causal must be a bool, got {type(causal).__name__}")
        self.causal = causal
        self.time_base = float_option(self, "time_base", time_base, minimum=0.0, exclusive=True)
        self.spatial_base = float_option(self, "spatial_base", spatial_base, minimum=0.0, exclusive=True)
        if node_coords is None:
            node_coords = grid_coords(num_nodes, coord_dim)
        if not isinstance(node_coords, torch.Tensor) or tuple(node_coords.shape) != (num_nodes, coord_dim):
            raise ValueError(f"{type(self).__name__}: node_coords must be a (num_nodes, coord_dim) = "
                             f"{(num_nodes, coord_dim)} tensor, got {getattr(node_coords, 'shape', node_coords)}")
        self.register_buffer("node_coords", node_coords.detach().float().clone())
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, coords: torch.Tensor | None = None,
                time_pos: torch.Tensor | None = None) -> torch.Tensor:
        check_input(self, x, "(B, N, C)", channels=self.dim)
        B, N, C = x.shape
        n = torch.arange(N, device=x.device)
        if coords is None:
            coords = self.node_coords.to(x.device)[n % self.num_nodes]  # (N, S)
        if time_pos is None:
            time_pos = n // self.num_nodes
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).unbind(2)  # (B, N, H, D)
        o = se_attention(q, k, v, time_pos, coords, spatial_dim=self.spatial_dim, causal=self.causal,
                         time_base=self.time_base, spatial_base=self.spatial_base)
        return self.proj(o.reshape(B, N, C))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.num_heads}, nodes={self.num_nodes}, coord_dim={self.coord_dim}, "
                f"spatial_dim={self.spatial_dim}, causal={self.causal}")
