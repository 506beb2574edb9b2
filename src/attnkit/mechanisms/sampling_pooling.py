"""Pooling modules: spatial pyramid pooling and slot attention.

"Spatial Pyramid Pooling in Deep Convolutional Networks for Visual Recognition", arXiv 1406.4729 (ECCV 2014);
"Object-Centric Learning with Slot Attention", arXiv 2006.15055 (NeurIPS 2020), as Slot-MLLM's tokenizer uses it
("Slot-MLLM: Object-Centric Visual Tokenization for Multimodal LLM", arXiv 2505.17726).

Both map an input to an output of another shape (a fixed-length vector; K slots), which the registry's generic
module checks (output shape == input shape) do not cover yet, so these two are not registered as mechanisms;
their ops, naive twins and tests are complete.
"""

from __future__ import annotations

import torch
from torch import nn

from attnkit.ops.channel import check_channels_first
from attnkit.ops.sampling import slot_attention_step, spatial_pyramid_pool
from attnkit.registry import check_input, choice_option, float_option, int_option


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


class SlotAttention(nn.Module):
    """Slot attention: ``num_slots`` slots read a set ``(B, N, C)`` for ``iterations`` rounds -> ``(B, K, C)``.

    Per round (arXiv 2006.15055, Alg. 1): ``A = softmax over slots (k(x) q(s)^T / sqrt(D))``, per-slot weighted
    mean ``u = (A / sum_N A)^T v(x)``, ``s = GRU(u, s)``, ``s = s + MLP(LN(s))``. Slots start from learned
    means plus noise scaled by a learned sigma in training, the means alone in eval (deterministic); pass
    ``slots=`` to start elsewhere (Slot-MLLM's learned queries).

    Args:
        dim: ``C``. num_slots: ``K``. iterations: ``T`` (paper: 3). hidden: the MLP width (default ``2 C``).
        eps: the attention's additive epsilon.
    """

    def __init__(self, dim: int, num_slots: int = 8, iterations: int = 3, hidden: int | None = None,
                 eps: float = 1e-8):
        super().__init__()
        self.dim = int_option(self, "dim", dim, 1)
        self.num_slots = int_option(self, "num_slots", num_slots, 1)
        self.iterations = int_option(self, "iterations", iterations, 1)
        hidden = int_option(self, "hidden", 2 * dim if hidden is None else hidden, 1)
        self.eps = float_option(self, "eps", eps, minimum=0.0)
        self.slots_mu = nn.Parameter(torch.randn(1, 1, dim) * dim ** -0.5)
        self.slots_log_sigma = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm_input, self.norm_slots, self.norm_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.gru = nn.GRUCell(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def initial_slots(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        mu = self.slots_mu.to(like.dtype).expand(batch, self.num_slots, -1)
        if not self.training:
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
