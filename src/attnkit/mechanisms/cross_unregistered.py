"""Cross-family papers whose layer does not fit the registry's module contract, or adds no new operator.

The registry's modules map ``x (B, N, C)`` (and a context) to an output of ``x``'s shape, which the generic
tests check. Three papers' layers produce something else and are kept here as modules with their ops and
naive twins, tested in ``tests/test_cross_*.py`` but not registered:

* :class:`FILIPLateInteraction` — FILIP ("FILIP: Fine-grained Interactive Language-Image Pre-Training",
  arXiv 2111.07783): image-text similarity matrices ``(BI, BT)``, op ``filip_similarity``;
* :class:`ZeroParamPooling` — GreenPLM ("More Text, Less Point: Towards 3D Data-Efficient Point-Language
  Understanding", arXiv 2408.15966): ``(B, N, C)`` pooled into ``(B, 3, C)``, op ``zero_param_pool``;
* :class:`SpatialVisionAggregator` — Cambrian-1 ("Cambrian-1: A Fully Open, Vision-Centric Exploration of
  Multimodal LLMs", arXiv 2406.16860): ``L x L`` grid queries over several encoders' square maps, whose
  sizes are tied to ``L`` (the generic cross tests draw contexts of any length), op ``cell_local_attention``.

:data:`NOT_REGISTERED` records, for every cross-family paper without a registry entry, why.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from attnkit.ops.cross.cell_local import cell_local_attention
from attnkit.ops.cross.filip import filip_similarity
from attnkit.ops.cross.pooling import QUERIES, zero_param_pool
from attnkit.registry import check_input, divisible, int_option

NOT_REGISTERED = {
    "filip": "FILIP (arXiv 2111.07783): the layer returns similarity matrices (BI, BT), not tokens; module "
             "FILIPLateInteraction, op filip_similarity.",
    "greenplm_pool": "GreenPLM (arXiv 2408.15966): pools (B, N, C) into (B, 3, C); module ZeroParamPooling, op "
                     "zero_param_pool.",
    "cambrian_sva": "Cambrian-1 SVA (arXiv 2406.16860): grid queries over square maps of sizes tied to the grid; "
                    "module SpatialVisionAggregator, op cell_local_attention.",
    "vision_remember": "Vision Remember (arXiv 2506.03928): re-uses Cambrian's cell-local cross-attention between "
                       "LLM layers (vision tokens as the grid queries, multi-level features as the maps): "
                       "SpatialVisionAggregator with queries= and cell_local_attention; no new operator.",
    "conditional_cross": "Conditional Cross Attention Network (arXiv 2307.13254): a condition embedding as the "
                         "query of plain cross-attention over ViT patch tokens (learned-query attention pooling): "
                         "ak.attention / mha with context; no new operator.",
    "transvg": "TransVG (arXiv 2104.08541): plain self-attention over [REG; visual; text] tokens; a text padding "
               "mask is key_padding on the concatenation; no new operator.",
    "oat": "OAT (arXiv 2407.13335): the decoder's output is a pointer distribution over objects (B, H, T, N_obj), "
           "not tokens; op pointer_probs (attention weights without values).",
}


class FILIPLateInteraction(nn.Module):
    """FILIP's token-wise late interaction head: projections, L2 normalisation, max-then-mean similarities.

    Args:
        image_dim, text_dim: widths of the encoders' tokens; proj_dim: shared width (256 in the paper);
        temperature: initial softmax temperature (learned in log space).

    Shapes:
        ``image_tokens (BI, n1, Ci)``, ``text_tokens (BT, n2, Ct)``, optional ``text_mask (BT, n2)`` bool ->
        ``(s_i2t, s_t2i)``, each ``(BI, BT)``.

    Example:
        >>> head = FILIPLateInteraction(768, 512)
        >>> loss = head.loss(*head(img, txt, txt_mask))
    """

    def __init__(self, image_dim: int, text_dim: int, *, proj_dim: int = 256, temperature: float = 0.07):
        super().__init__()
        int_option(self, "image_dim", image_dim, 1)
        int_option(self, "text_dim", text_dim, 1)
        self.image_proj = nn.Linear(image_dim, int_option(self, "proj_dim", proj_dim, 1), bias=False)
        self.text_proj = nn.Linear(text_dim, proj_dim, bias=False)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))

    def forward(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor | None = None):
        check_input(self, image_tokens, "(B, N, C)", channels=self.image_proj.in_features, name="image_tokens")
        check_input(self, text_tokens, "(B, M, C)", channels=self.text_proj.in_features, name="text_tokens")
        return filip_similarity(self.image_proj(image_tokens), self.text_proj(text_tokens), y_mask=text_mask)

    def loss(self, s_i2t: torch.Tensor, s_t2i: torch.Tensor) -> torch.Tensor:
        """The symmetric InfoNCE of the paper: image ``i`` matches text ``i`` (``BI == BT``)."""
        t = self.log_temperature.exp()
        target = torch.arange(s_i2t.shape[0], device=s_i2t.device)
        return 0.5 * (F.cross_entropy(s_i2t / t, target) + F.cross_entropy(s_t2i.T / t, target))


class ZeroParamPooling(nn.Module):
    """GreenPLM's 0M-Pooling: summary queries (max, mean) attend to the tokens, no parameter.

    Args:
        queries: ``("max", "mean")`` or a subset; cls: token 0 is a class token kept first.

    Shapes:
        ``x (B, N, C)`` -> ``(B, cls + len(queries), C)``.
    """

    def __init__(self, *, queries: tuple[str, ...] = QUERIES, cls: bool = True):
        super().__init__()
        self.queries, self.cls = tuple(queries), bool(cls)
        if not self.queries or any(q not in QUERIES for q in self.queries):
            raise ValueError(f"{type(self).__name__}: queries must be a non-empty tuple of {QUERIES}, got {queries}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, "(B, N, C)")
        return zero_param_pool(x, self.queries, cls=self.cls)


class SpatialVisionAggregator(nn.Module):
    """Cambrian-1's SVA: ``L x L`` learnable queries, each attending to its cell of every encoder's map.

    Args:
        dim: ``C`` of the queries; num_heads: ``H``; grid: ``L``; encoder_dims: the channels of each map.

    Shapes:
        ``maps``: a list of ``(B, m_e L, m_e L, C_e)``; optional ``queries (B, L*L, C)`` (the LLM's visual
        hidden states when the aggregator is repeated inside the LLM) -> ``(B, L*L, C)``.

    Example:
        >>> sva = SpatialVisionAggregator(1024, 16, grid=24, encoder_dims=(1152, 1024))
        >>> tokens = sva([siglip_48x48, dino_24x24])
    """

    def __init__(self, dim: int, num_heads: int, *, grid: int = 24, encoder_dims: tuple[int, ...] = (1024,)):
        super().__init__()
        divisible(self, dim, num_heads)
        self.dim, self.num_heads = dim, num_heads
        self.grid = int_option(self, "grid", grid, 1)
        dims = tuple(int_option(self, f"encoder_dims[{i}]", d, 1) for i, d in enumerate(encoder_dims))
        if not dims:
            raise ValueError(f"{type(self).__name__}: encoder_dims must name at least one encoder")
        self.queries = nn.Parameter(torch.randn(grid * grid, dim) * 0.02)
        self.q_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.k_proj = nn.ModuleList(nn.Linear(d, dim) for d in dims)
        self.v_proj = nn.ModuleList(nn.Linear(d, dim) for d in dims)

    def forward(self, maps: list[torch.Tensor], queries: torch.Tensor | None = None) -> torch.Tensor:
        if len(maps) != len(self.k_proj):
            raise ValueError(f"{type(self).__name__}: expected {len(self.k_proj)} maps, got {len(maps)}")
        for i, (f, kp) in enumerate(zip(maps, self.k_proj)):
            check_input(self, f, "(B, Y, X, C)", channels=kp.in_features, name=f"maps[{i}]")
        b, h = maps[0].shape[0], self.num_heads
        q0 = self.queries.expand(b, -1, -1) if queries is None else check_input(
            self, queries, "(B, N, C)", channels=self.dim, name="queries")
        q = self.q_proj(q0).reshape(b, q0.shape[1], h, -1)                           # (B, L*L, H, D)
        feats = [(kp(f).reshape(*f.shape[:3], h, -1), vp(f).reshape(*f.shape[:3], h, -1))   # (B, Y, X, H, D)
                 for f, kp, vp in zip(maps, self.k_proj, self.v_proj)]
        return q0 + self.out_proj(cell_local_attention(q, feats, self.grid).reshape(b, q0.shape[1], self.dim))
