"""Cross-family pooling modules (registered as pooling specs) and the cross papers kept out of the registry.

The registry's modules map ``x (B, N, C)`` (and a context) to an output of ``x``'s shape, unless the spec
registers ``output_shape`` (a pooling spec: no output position per token, ``noncausal-*`` patterns only).
Three papers' layers are registered that way:

* :class:`FILIPLateInteraction` (``filip``) — FILIP ("FILIP: Fine-grained Interactive Language-Image
  Pre-Training", arXiv 2111.07783): image-text similarities stacked ``(2, BI, BT)``, op ``filip_similarity``;
* :class:`ZeroParamPooling` (``greenplm_pool``) — GreenPLM ("More Text, Less Point: Towards 3D
  Data-Efficient Point-Language Understanding", arXiv 2408.15966): ``(B, N, C)`` pooled into ``(B, 3, C)``,
  op ``zero_param_pool``;
* :class:`SpatialVisionAggregator` (``cambrian_sva``) — Cambrian-1 ("Cambrian-1: A Fully Open,
  Vision-Centric Exploration of Multimodal LLMs", arXiv 2406.16860): an encoder's square ``(B, mL, mL, C)``
  map pooled into ``(B, L*L, C)`` grid tokens, op ``cell_local_attention``.

:data:`NOT_REGISTERED` (empty) would record a cross-family paper without a registry entry; the papers that add no
operator (Vision Remember, Conditional Cross Attention Network, TransVG, OAT) are named in the notes of the
mechanism they build on (``cambrian_sva``, ``mha``, ``bvr``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from attnkit.ops.cross.cell_local import cell_local_attention
from attnkit.ops.cross.filip import filip_similarity
from attnkit.ops.cross.pooling import QUERIES, zero_param_pool
from attnkit.reference.naive_cross2 import naive_cambrian_sva_module
from attnkit.reference.naive_pooling_modules import naive_filip_module, naive_greenplm_module
from attnkit.registry import Family, Paper, check_input, divisible, int_option, register

# Every cross-family paper is a registered mechanism or named (with its arXiv id) in the notes of the
# registered mechanism it builds on; nothing is left out of the registry.
NOT_REGISTERED: dict[str, str] = {}


def _filip_flops(c: dict) -> float:
    b, n, p = c["batch"], c["seq_len"], c["proj_dim"]
    m = c.get("context_len", n)
    # the two projections, then every image-text token pair
    return float(2 * b * (n * c["image_dim"] + m * c["text_dim"]) * p + 2 * b * b * n * m * p)


def _filip_out(c: dict) -> tuple[int, ...]:
    return (2, c.get("batch", 1), c.get("batch", 1))  # the context has x's batch in the registry's examples


@register(
    name="filip", family=Family.CROSS,
    paper=Paper("FILIP: Fine-grained Interactive Language-Image Pre-Training", "2111.07783", 2021),
    patterns=("noncausal-cross",), complexity="O(BI BT n1 n2 d)", flops=_filip_flops,
    options=lambda c: {"image_dim": c["image_dim"], "text_dim": c["text_dim"], "proj_dim": c["proj_dim"]},
    reference=naive_filip_module, functional=filip_similarity,
    shape=lambda c: (c.get("batch", 1), c["seq_len"], c["image_dim"]),
    default_config={"image_dim": 512, "text_dim": 512, "proj_dim": 256}, default_input={"batch": 16, "seq_len": 196},
    tiny_config={"image_dim": 6, "text_dim": 6, "proj_dim": 5}, tiny_input={"batch": 3, "seq_len": 4},
    output_shape=_filip_out,
    notes="A pooling spec: image tokens x (BI, n1, C) and text tokens context (BT, n2, C) -> (2, BI, BT), "
          "s_i2t = mean over patches of the best word, s_t2i = mean over words of the best patch (max then mean, "
          "L2-normalised projections without bias, Eq. 4-5); stacked so one tensor comes out "
          "(s_i2t, s_t2i = module(x, context) unpacks it). context=None scores x against itself (the registry's "
          "single-input call). Text padding via context_mask (BT, n2) bool; image-side masks are not used. "
          "The symmetric InfoNCE with learned temperature is module.loss. The registry's examples draw the "
          "context with x's width, so their configs keep image_dim = text_dim; the module takes two.",
)
class FILIPLateInteraction(nn.Module):
    """FILIP's token-wise late interaction head: projections, L2 normalisation, max-then-mean similarities.

    Args:
        image_dim, text_dim: widths of the encoders' tokens; proj_dim: shared width (256 in the paper);
        temperature: initial softmax temperature (learned in log space).

    Shapes:
        image tokens ``x (BI, n1, Ci)``, text tokens ``context (BT, n2, Ct)`` (None: ``x`` itself, which needs
        ``Ci == Ct``), optional ``context_mask (BT, n2)`` bool (True = real token) -> ``(2, BI, BT)``:
        ``s_i2t`` then ``s_t2i``.

    Example:
        >>> head = FILIPLateInteraction(768, 512)
        >>> s_i2t, s_t2i = head(img, txt, txt_mask)
        >>> loss = head.loss(s_i2t, s_t2i)
    """

    def __init__(self, image_dim: int, text_dim: int, *, proj_dim: int = 256, temperature: float = 0.07):
        super().__init__()
        int_option(self, "image_dim", image_dim, 1)
        int_option(self, "text_dim", text_dim, 1)
        self.image_proj = nn.Linear(image_dim, int_option(self, "proj_dim", proj_dim, 1), bias=False)
        self.text_proj = nn.Linear(text_dim, proj_dim, bias=False)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Image tokens ``x (BI, n1, Ci)``, text tokens ``context (BT, n2, Ct)`` -> ``(2, BI, BT)``."""
        check_input(self, x, "(B, N, C)", channels=self.image_proj.in_features)
        if context is None:
            context = x
        check_input(self, context, "(B, M, C)", channels=self.text_proj.in_features, name="context")
        s_i2t, s_t2i = filip_similarity(self.image_proj(x), self.text_proj(context), y_mask=context_mask)
        return torch.stack([s_i2t, s_t2i])  # (2, BI, BT)

    def loss(self, s_i2t: torch.Tensor, s_t2i: torch.Tensor) -> torch.Tensor:
        """The symmetric InfoNCE of the paper: image ``i`` matches text ``i`` (``BI == BT``)."""
        t = self.log_temperature.exp()
        target = torch.arange(s_i2t.shape[0], device=s_i2t.device)
        return 0.5 * (F.cross_entropy(s_i2t / t, target) + F.cross_entropy(s_t2i.T / t, target))


def _greenplm_flops(c: dict) -> float:
    return float(4 * c["batch"] * c["seq_len"] * c["dim"] * len(c["queries"]))  # scores + weighted sum per query


@register(
    name="greenplm_pool", family=Family.CROSS,
    paper=Paper("More Text, Less Point: Towards 3D Data-Efficient Point-Language Understanding", "2408.15966", 2024),
    patterns=("noncausal-self",), complexity="O(B N C)", flops=_greenplm_flops,
    options=lambda c: {"dim": c["dim"], "queries": tuple(c["queries"]), "cls": c["cls"]},
    reference=naive_greenplm_module, functional=zero_param_pool,
    default_config={"dim": 1024, "queries": QUERIES, "cls": True}, default_input={"batch": 8, "seq_len": 513},
    tiny_config={"dim": 5}, tiny_input={"batch": 2, "seq_len": 6},
    output_shape=lambda c: (c.get("batch", 1), int(c["cls"]) + len(c["queries"]), c["dim"]),
    notes="A pooling spec: (B, N, C) -> (B, cls + len(queries), C) = [class token, max-query pooled, mean-query "
          "pooled]. Parameter-free cross-attention: the channel-wise max and mean of the tokens (class token "
          "excluded) are single-head queries over K = V = the tokens, scale C^-1/2, no projection (the paper's "
          "description; its code was not checked, so the query set, the class token and the scale are options "
          "of zero_param_pool). The paper's encoder gives 512 point tokens + 1 class token (default input).",
)
class ZeroParamPooling(nn.Module):
    """GreenPLM's 0M-Pooling: summary queries (max, mean) attend to the tokens, no parameter.

    Args:
        dim: ``C``, checked on the input when given (None: any width). queries: ``("max", "mean")`` or a
        subset; cls: token 0 is a class token kept first (then ``N >= 2``).

    Shapes:
        ``x (B, N, C)`` -> ``(B, cls + len(queries), C)``.
    """

    def __init__(self, dim: int | None = None, *, queries: tuple[str, ...] = QUERIES, cls: bool = True):
        super().__init__()
        self.dim = None if dim is None else int_option(self, "dim", dim, 1)
        self.queries, self.cls = tuple(queries), bool(cls)
        if not self.queries or any(q not in QUERIES for q in self.queries):
            raise ValueError(f"{type(self).__name__}: queries must be a non-empty tuple of {QUERIES}, got {queries}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, N, C)`` -> ``(B, cls + len(queries), C)``."""
        check_input(self, x, "(B, N, C)", channels=self.dim)
        if self.cls and x.shape[1] < 2:
            raise ValueError(f"{type(self).__name__}: with cls=True token 0 is the class token and x needs at least "
                             f"one more, got shape {tuple(x.shape)}")
        return zero_param_pool(x, self.queries, cls=self.cls)


def _sva_flops(c: dict) -> float:
    b, n, d = c["batch"], c["grid"] ** 2, c["dim"]
    y, x = c["input_size"]
    ce = c["encoder_dims"][0]
    # q / out projections, the map's k / v projections, then each query's scores and sum over its cell
    return float(4 * b * n * d * d + 4 * b * y * x * ce * d + 4 * b * y * x * d)


def _sva_shape(c: dict) -> tuple[int, ...]:
    return (c.get("batch", 1), *c["input_size"], c["encoder_dims"][0])   # one encoder's (B, mL, mL, C_e) map


@register(
    name="cambrian_sva", family=Family.CROSS,
    paper=Paper("Cambrian-1: A Fully Open, Vision-Centric Exploration of Multimodal LLMs", "2406.16860", 2024),
    patterns=("noncausal-self",), complexity="O(B (L^2 C^2 + Y X C_e C))", flops=_sva_flops,
    options=lambda c: {"dim": c["dim"], "num_heads": c["num_heads"], "grid": c["grid"],
                       "encoder_dims": tuple(c["encoder_dims"])},
    reference=naive_cambrian_sva_module, functional=cell_local_attention,
    input_kind="image", shape=_sva_shape,
    default_config={"dim": 1024, "num_heads": 16, "grid": 24, "encoder_dims": (1024,)},
    default_input={"batch": 2, "input_size": (48, 48)},
    tiny_config={"dim": 4, "num_heads": 2, "grid": 2, "encoder_dims": (3,)},
    tiny_input={"batch": 2, "input_size": (4, 4)},
    output_shape=lambda c: (c.get("batch", 1), c["grid"] ** 2, c["dim"]),
    notes="A pooling spec: one encoder's map x (B, mL, mL, C_e) -> (B, L*L, C), the L x L grid of learned "
          "queries (raster order) each attending only to its m x m cell of every map, all maps' cells in one "
          "softmax, output projection and a residual on the queries (paper sec. 3.1). The registry's example feeds one "
          "encoder (a single input); the module takes a list of maps with their own m_e (encoder_dims), and "
          "queries= (B, L*L, C) for the repeated aggregation inside the LLM with the visual tokens' hidden "
          "states as queries. Maps must be square with a side divisible by grid (resize them first, as the "
          "paper does); the paper's query groups (G > 1) and the choice of LLM layers are left to the caller. "
          "Default: L = 24 (576 tokens), a 48 x 48 map (m = 2). "
          "Vision Remember (arXiv 2506.03928) adds no op: it re-runs this cell-local cross-attention between "
          "LLM layers with the visual tokens' hidden states as the grid queries and multi-level vision features "
          "as the maps, i.e. SpatialVisionAggregator(...)(maps, queries=hidden) or cell_local_attention.",
)
class SpatialVisionAggregator(nn.Module):
    """Cambrian-1's SVA: ``L x L`` learnable queries, each attending to its cell of every encoder's map.

    Args:
        dim: ``C`` of the queries; num_heads: ``H``; grid: ``L``; encoder_dims: the channels of each map.

    Shapes:
        ``maps``: one ``(B, mL, mL, C_e)`` tensor or a list of them, one per encoder (``m`` per map);
        optional ``queries (B, L*L, C)`` (the LLM's visual hidden states when the aggregator is repeated
        inside the LLM) -> ``(B, L*L, C)``.

    Example:
        >>> sva = SpatialVisionAggregator(1024, 16, grid=24, encoder_dims=(1152, 1024))
        >>> tokens = sva([siglip_48x48, dino_24x24])
    """

    def __init__(self, dim: int, num_heads: int, *, grid: int = 24, encoder_dims: tuple[int, ...] = (1024,)):
        super().__init__()
        int_option(self, "dim", dim, 1)
        int_option(self, "num_heads", num_heads, 1)
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

    def forward(self, maps: torch.Tensor | list[torch.Tensor], queries: torch.Tensor | None = None) -> torch.Tensor:
        """``maps`` ``(B, mL, mL, C_e)`` (or a list, one per encoder), ``queries (B, L*L, C)`` -> ``(B, L*L, C)``."""
        single = isinstance(maps, torch.Tensor)
        if single:
            maps = [maps]
        elif not isinstance(maps, (list, tuple)) or not all(isinstance(f, torch.Tensor) for f in maps):
            raise TypeError(f"{type(self).__name__}: maps must be a torch.Tensor (B, mL, mL, C) or a list of them, "
                            f"got {type(maps).__name__}")
        maps = list(maps)
        if len(maps) != len(self.k_proj):
            raise ValueError(f"{type(self).__name__}: expected {len(self.k_proj)} maps, got {len(maps)}")
        for i, (f, kp) in enumerate(zip(maps, self.k_proj)):
            name = "x" if single else f"maps[{i}]"   # the registry's single-map call names its input x
            check_input(self, f, "(B, Y, X, C)", channels=kp.in_features, name=name)
            if f.shape[1] != f.shape[2] or f.shape[1] % self.grid or f.shape[0] != maps[0].shape[0]:
                raise ValueError(f"{type(self).__name__}: {name} must be square (B, mL, mL, C) with a side divisible "
                                 f"by grid = {self.grid} and the batch of maps[0], got shape {tuple(f.shape)}")
        b, h = maps[0].shape[0], self.num_heads
        q0 = self.queries.expand(b, -1, -1) if queries is None else check_input(
            self, queries, "(B, N, C)", channels=self.dim, name="queries")
        if q0.shape[:2] != (b, self.grid ** 2):
            raise ValueError(f"{type(self).__name__}: queries must be (B={b}, L*L={self.grid ** 2}, C={self.dim}), "
                             f"got shape {tuple(q0.shape)}")
        q = self.q_proj(q0).reshape(b, q0.shape[1], h, -1)                           # (B, L*L, H, D)
        feats = [(kp(f).reshape(*f.shape[:3], h, -1), vp(f).reshape(*f.shape[:3], h, -1))   # (B, Y, X, H, D)
                 for f, kp, vp in zip(maps, self.k_proj, self.v_proj)]
        out = cell_local_attention(q, feats, self.grid).reshape(b, q0.shape[1], self.dim)   # (B, L*L, C)
        return q0 + self.out_proj(out)
