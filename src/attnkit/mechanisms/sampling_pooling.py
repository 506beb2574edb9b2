"""Pooling modules: spatial pyramid pooling and slot attention.

"Spatial Pyramid Pooling in Deep Convolutional Networks for Visual Recognition", arXiv 1406.4729 (ECCV 2014);
"Object-Centric Learning with Slot Attention", arXiv 2006.15055 (NeurIPS 2020), as Slot-MLLM's tokenizer uses it
("Slot-MLLM: Object-Centric Visual Tokenization for Multimodal LLM", arXiv 2505.17726).

Both map an input to an output of another shape (a fixed-length vector; K slots): they are registered as
pooling specs (``output_shape`` given, ``noncausal-self`` only; see ``docs/architecture.md``), so the generic
tests check their outputs against that shape.
"""

from __future__ import annotations

import torch
from torch import nn

from attnkit.ops.channel import check_channels_first
from attnkit.ops.sampling import slot_attention_step, spatial_pyramid_pool
from attnkit.reference.naive_pooling_modules import naive_slot_attention_module, naive_spp_module
from attnkit.registry import Family, InputKind, Paper, check_input, choice_option, float_option, int_option, register


def _spp_flops(c: dict) -> float:
    y, x = c["input_size"]
    return float(c["batch"] * c["channels"] * y * x * len(c["levels"]))  # one compare (or add) per element per level


@register(
    name="spp", family=Family.CHANNEL,
    paper=Paper("Spatial Pyramid Pooling in Deep Convolutional Networks for Visual Recognition", "1406.4729", 2014),
    patterns=("noncausal-self",), complexity="O(B C H W L)", flops=_spp_flops,
    options=lambda c: {"channels": c["channels"], "levels": tuple(c["levels"]), "mode": c["mode"]},
    reference=naive_spp_module, functional=spatial_pyramid_pool, input_kind=InputKind.CNN,
    shape=lambda c: (c.get("batch", 1), c["channels"], *c["input_size"]),
    default_config={"channels": 256, "levels": (4, 2, 1), "mode": "max"},
    default_input={"batch": 8, "input_size": (13, 13)},
    tiny_config={"channels": 3, "levels": (2, 1)}, tiny_input={"batch": 2, "input_size": (5, 4)},
    output_shape=lambda c: (c.get("batch", 1), c["channels"] * sum(n * n for n in c["levels"])),
    notes="A pooling spec: (B, C, H, W) -> (B, C * sum(n^2)), channel-major per level, levels concatenated "
          "coarse-last as given; bins are adaptive-pooling bins [floor(iH/n), ceil((i+1)H/n)) (the paper's "
          "window ceil(a/n), stride floor(a/n) recipe equals them when n divides a). Defaults (4, 2, 1) and max "
          "(paper: ZF-5 uses (6, 3, 2, 1)); mode='avg' as an option. No parameters.",
)


class SpatialPyramidPooling(nn.Module):
    """SPP on ``(B, C, H, W)`` -> ``(B, C * sum(n^2))`` (no parameters).

    Args:
        channels: ``C``. levels: bins per side per level (default ``(4, 2, 1)``; the paper's ZF-5: ``(6, 3, 2, 1)``).
        mode: ``"max"`` (paper) or ``"avg"``.
    """

    def __init__(self, channels: int, levels: tuple[int, ...] = (4, 2, 1), mode: str = "max"):
        super().__init__()
        self.channels = int_option(self, "channels", channels, 1)
        if not isinstance(levels, (tuple, list)) or not levels:
            raise TypeError(f"{type(self).__name__}: levels must be a non-empty tuple of ints, got {levels!r}")
        self.levels = tuple(int_option(self, "levels", n, 1) for n in levels)
        self.mode = choice_option(self, "mode", mode, ("max", "avg"))

    @property
    def out_features(self) -> int:
        return self.channels * sum(n * n for n in self.levels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, C, H, W)`` -> ``(B, C * sum(n^2))``."""
        check_channels_first(self, x, self.channels)
        return spatial_pyramid_pool(x, self.levels, self.mode)


def _slot_flops(c: dict) -> float:
    b, n, d, k = c["batch"], c["seq_len"], c["dim"], c["num_slots"]
    hidden = c.get("hidden") or 2 * d
    per_iter = 4 * b * n * k * d + 2 * b * k * d * d + 12 * b * k * d * d + 4 * b * k * d * hidden
    return float(4 * b * n * d * d + c["iterations"] * per_iter)  # k, v projections + T rounds


@register(
    name="slot_attention", family=Family.VISION,
    paper=Paper("Slot-MLLM: Object-Centric Visual Tokenization for Multimodal LLM", "2505.17726", 2025),
    patterns=("noncausal-self",), complexity="O(T N K C + T K C^2)", flops=_slot_flops,
    options=lambda c: {"dim": c["dim"], "num_slots": c["num_slots"], "iterations": c["iterations"],
                       "init": c["init"]},
    reference=naive_slot_attention_module, functional=slot_attention_step,
    default_config={"dim": 256, "num_slots": 8, "iterations": 3, "init": "learned"},
    default_input={"batch": 8, "seq_len": 256},
    tiny_config={"dim": 6, "num_slots": 3, "iterations": 2}, tiny_input={"batch": 2, "seq_len": 7},
    output_shape=lambda c: (c.get("batch", 1), c["num_slots"], c["dim"]),
    notes="Slot attention (Locatello et al., arXiv 2006.15055, Alg. 1) as Slot-MLLM's tokenizer uses it. A pooling "
          "spec: (B, N, C) -> (B, K, C). Softmax over slots, weighted mean with eps 1e-8, GRU and residual MLP per "
          "round. init='learned' (registered default): K learned initial slots, deterministic, as Slot-MLLM's "
          "Q-Former-style learned queries; init='gaussian' (the 2020 paper): shared learned mean plus learned-sigma "
          "noise in training, the mean alone in eval (then every slot starts equal and stays equal, which is why "
          "the registered module uses 'learned'). Slot-MLLM's residual VQ of the slots is not part of this op.",
)
class SlotAttention(nn.Module):
    """Slot attention: ``num_slots`` slots read a set ``(B, N, C)`` for ``iterations`` rounds -> ``(B, K, C)``.

    Per round (arXiv 2006.15055, Alg. 1): ``A = softmax over slots (k(x) q(s)^T / sqrt(D))``, per-slot weighted
    mean ``u = (A / sum_N A)^T v(x)``, ``s = GRU(u, s)``, ``s = s + MLP(LN(s))``. Slots start from learned
    means plus noise scaled by a learned sigma in training, the means alone in eval (deterministic), with
    ``init="gaussian"``; ``init="learned"`` starts from ``K`` learned slot vectors (deterministic always, as
    learned queries); pass ``slots=`` to start elsewhere.

    Args:
        dim: ``C``. num_slots: ``K``. iterations: ``T`` (paper: 3). hidden: the MLP width (default ``2 C``).
        eps: the attention's additive epsilon. init: ``"gaussian"`` (arXiv 2006.15055) or ``"learned"``.

    Shapes:
        ``x (B, N, C)`` (optional ``slots (B, K, C)``) -> ``(B, K, C)``.
    """

    def __init__(self, dim: int, num_slots: int = 8, iterations: int = 3, hidden: int | None = None,
                 eps: float = 1e-8, init: str = "gaussian"):
        super().__init__()
        self.dim = int_option(self, "dim", dim, 1)
        self.num_slots = int_option(self, "num_slots", num_slots, 1)
        self.iterations = int_option(self, "iterations", iterations, 1)
        hidden = int_option(self, "hidden", 2 * dim if hidden is None else hidden, 1)
        self.eps = float_option(self, "eps", eps, minimum=0.0)
        self.init = choice_option(self, "init", init, ("gaussian", "learned"))
        # gaussian: one mean shared by the slots (1, 1, C); learned: one vector per slot (1, K, C)
        self.slots_mu = nn.Parameter(torch.randn(1, 1 if init == "gaussian" else num_slots, dim) * dim ** -0.5)
        if init == "gaussian":
            self.slots_log_sigma = nn.Parameter(torch.zeros(1, 1, dim))
        else:
            self.register_parameter("slots_log_sigma", None)  # learned slots draw no noise
        self.norm_input, self.norm_slots, self.norm_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.gru = nn.GRUCell(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def initial_slots(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        mu = self.slots_mu.to(like.dtype).expand(batch, self.num_slots, -1)  # (B, K, C)
        if not self.training or self.init == "learned":
            return mu
        return mu + self.slots_log_sigma.to(like.dtype).exp() * torch.randn_like(mu)

    def forward(self, x: torch.Tensor, slots: torch.Tensor | None = None) -> torch.Tensor:
        """``x (B, N, C)`` (and optional initial ``slots (B, K, C)``) -> slots ``(B, K, C)``."""
        check_input(self, x, "(B, N, C)", channels=self.dim)
        B = x.shape[0]
        if slots is None:
            slots = self.initial_slots(B, x)
        else:
            check_input(self, slots, "(B, K, C)", channels=self.dim, name="slots")
        x = self.norm_input(x)
        k, v = self.to_k(x), self.to_v(x)  # (B, N, C)
        for _ in range(self.iterations):
            prev = slots
            q = self.to_q(self.norm_slots(slots))  # (B, K, C)
            updates = slot_attention_step(q, k, v, eps=self.eps)  # (B, K, C)
            slots = self.gru(updates.reshape(-1, self.dim), prev.reshape(-1, self.dim)).view(B, -1, self.dim)
            slots = slots + self.mlp(self.norm_mlp(slots))
        return slots
