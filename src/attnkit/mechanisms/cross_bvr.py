"""RelationNet++: Bridging Visual Representations for Object Detection via Transformer Decoder (arXiv 2010.15831).

Bridging visual representations (BVR, §3.2): features of the main representation (queries, at positions
``p_i``) attend to a few key points of auxiliary representations (object centres, corners), sampled as the
``k`` best by their heat-map score, with logits ``q_i . k_j / sqrt(d) + G(p_j - p_i)``: appearance plus a
geometry term, an MLP on a sine/cosine embedding of the relative position, per head. The ops are
:func:`~attnkit.ops.cross.biased.relative_geometry` (the geometry term, by the shared location-embedding table
for integer positions) and :func:`~attnkit.ops.cross.biased.biased_attention` (additive float logits).
"""

from __future__ import annotations

import torch
from torch import nn

from attnkit.ops.cross.biased import biased_attention, relative_geometry
from attnkit.reference.naive_cross import naive_bvr_module, sincos_embed
from attnkit.registry import Family, Paper, check_input, divisible, float_option, int_option, register


def _flops(cfg: dict) -> float:
    b, n, c, h = cfg["batch"], cfg["seq_len"], cfg["dim"], cfg["num_heads"]
    m = cfg.get("context_len") or n
    k = min(cfg["topk"], m)
    geo = 2 * b * n * k * (cfg["sincos_dim"] * cfg["geo_hidden"] + cfg["geo_hidden"] * h)
    return 2 * b * (2 * n + 2 * k) * c * c + 2 * b * m * c + geo + 4 * b * n * k * c


def _positions(n: int, like: torch.Tensor) -> torch.Tensor:
    """Default positions: token ``i`` at ``(i, 0)``, ``(N, 2)`` int64 (integer offsets: the table applies)."""
    i = torch.arange(n, device=like.device)
    return torch.stack([i, torch.zeros_like(i)], -1)


@register(
    name="bvr", family=Family.CROSS,
    paper=Paper("RelationNet++: Bridging Visual Representations for Object Detection via Transformer Decoder",
                "2010.15831", 2020),
    patterns=("noncausal-self", "noncausal-cross"), complexity="O(N k d + N k h)", flops=_flops,
    options=lambda c: {"dim": c["dim"], "num_heads": c["num_heads"], "topk": c["topk"],
                       "geo_hidden": c["geo_hidden"], "sincos_dim": c["sincos_dim"]},
    reference=naive_bvr_module, functional=(relative_geometry, biased_attention),
    default_config={"dim": 64, "num_heads": 4, "topk": 50, "geo_hidden": 32, "sincos_dim": 16},
    tiny_config={"dim": 8, "num_heads": 2, "geo_hidden": 4, "sincos_dim": 8},
    default_input={"batch": 2, "seq_len": 256}, tiny_input={"batch": 1, "seq_len": 6},
    notes="Key sampling: the top-k context tokens by a linear key-score head (a stand-in for the auxiliary "
          "heat-map head, trained by its own loss in the paper: the selection passes no gradient). Geometry: "
          "G = Linear(ReLU(Linear(sincos(dp / pos_scale)))) per head (op relative_geometry). With integer "
          "positions and a known extent (the default (index, 0) positions, or integer q_pos / k_pos with "
          "extent=(E0, E1) in forward) G is the paper's shared location embedding: embedded once per integer "
          "offset, a (2 E0 - 1)(2 E1 - 1) table, and gathered per pair (backend 'table', chosen when the table "
          "has no more rows than there are pairs); float positions or no extent: per pair (backend 'reference'). "
          "Both embed the same offsets, so they agree to float rounding of the MLP's matmuls (tested); in half "
          "precision the table is the more exact one, since it forms the integer offset before the cast. "
          "Positions default to (index, 0) for queries and keys; pass q_pos (N, 2) / k_pos (M, 2) for a grid. "
          "Residual on the query features, as the paper. "
          "OAT: Object-Level Attention Transformer for Gaze Scanpath Prediction (arXiv 2407.13335) adds no "
          "attention op: its encoder/decoder are plain attention (mha) and its output head is a pointer "
          "distribution over the encoded objects, softmax(q . k / sqrt(d)) without values, which is "
          "pointer_probs in the same op module as this mechanism's biased_attention (ops/cross/biased.py).",
)
class BridgingAttention(nn.Module):
    """RelationNet++'s BVR attention: appearance + geometry logits over the top-k sampled keys.

    Args:
        dim: ``C``; num_heads: ``H``; topk: keys sampled per image (50 in the paper);
        geo_hidden, sincos_dim: sizes of the geometry MLP and of its position embedding; pos_scale: divides
        the relative positions before the embedding.

    Shapes:
        ``x (B, N, C)`` query features, ``context (B, M, C)`` auxiliary key features, optional
        ``q_pos (N, 2) | (B, N, 2)``, ``k_pos (M, 2) | (B, M, 2)`` -> ``(B, N, C)``.

    Example:
        >>> y = BridgingAttention(256, 8, topk=50)(grid_feats, corner_feats, q_pos=grid_xy, k_pos=corner_xy)
    """

    def __init__(self, dim: int, num_heads: int, *, topk: int = 50, geo_hidden: int = 32, sincos_dim: int = 16,
                 pos_scale: float = 1.0):
        super().__init__()
        divisible(self, dim, num_heads)
        self.dim, self.num_heads = dim, num_heads
        self.topk = int_option(self, "topk", topk, 1)
        self.sincos_dim = int_option(self, "sincos_dim", sincos_dim, 4)
        if self.sincos_dim % 4:
            raise ValueError(f"{type(self).__name__}: sincos_dim must be a multiple of 4, got {sincos_dim}")
        geo_hidden = int_option(self, "geo_hidden", geo_hidden, 1)
        self.pos_scale = float_option(self, "pos_scale", pos_scale, minimum=0.0, exclusive=True)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))
        self.key_score = nn.Linear(dim, 1)
        self.geo = nn.Sequential(nn.Linear(self.sincos_dim, geo_hidden), nn.ReLU(), nn.Linear(geo_hidden, num_heads))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, q_pos: torch.Tensor | None = None,
                k_pos: torch.Tensor | None = None, extent: tuple[int, int] | None = None) -> torch.Tensor:
        """``x (B, N, C)``, ``context (B, M, C)``, positions ``(N, 2) | (B, N, 2)`` / ``(M, 2) | (B, M, 2)``
        (integer positions in ``[0, E0) x [0, E1)`` with ``extent=(E0, E1)`` use the offset table) -> ``(B, N, C)``."""
        check_input(self, x, "(B, N, C)", channels=self.dim, meta="the top-k key sampling depends on the values")
        ctx = x if context is None else check_input(self, context, "(B, M, C)", channels=self.dim, name="context")
        b, n, c = x.shape
        m, h = ctx.shape[1], self.num_heads
        if q_pos is None and k_pos is None and extent is None:
            extent = (max(n, m), 1)                                                         # the default positions
        qp = _positions(n, x) if q_pos is None else q_pos
        kp = _positions(m, x) if k_pos is None else k_pos
        with torch.no_grad():
            idx = self.key_score(ctx)[..., 0].topk(min(self.topk, m), -1).indices             # (B, K)
        sel = ctx.gather(1, idx[..., None].expand(-1, -1, c))                                # (B, K, C)
        kps = kp[idx] if kp.dim() == 2 else kp.gather(1, idx[..., None].expand(-1, -1, 2))  # (B, K, 2)
        qps = qp.expand(b, n, 2) if qp.dim() == 2 else qp                                    # (B, N, 2)
        g = relative_geometry(qps, kps, self._embed, scale=self.pos_scale, extent=extent, dtype=x.dtype)  # (B,N,K,H)
        q = self.q_proj(x).reshape(b, n, h, -1)                                              # (B, N, H, D)
        k = self.k_proj(sel).reshape(b, idx.shape[1], h, -1)                                 # (B, K, H, D)
        v = self.v_proj(sel).reshape(b, idx.shape[1], h, -1)
        o = biased_attention(q, k, v, g.permute(0, 3, 1, 2))                                 # (B, N, H, D)
        return x + self.out_proj(o.reshape(b, n, c))

    def _embed(self, delta: torch.Tensor) -> torch.Tensor:
        """``delta (..., 2)`` -> ``(..., H)``: the geometry MLP on the sine/cosine embedding."""
        return self.geo(sincos_embed(delta, self.sincos_dim))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, topk={self.topk}, sincos_dim={self.sincos_dim}, pos_scale={self.pos_scale}"


