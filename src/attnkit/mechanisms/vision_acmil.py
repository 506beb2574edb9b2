"""ACMIL: multi-branch gated attention pooling with stochastic top-K instance masking.

"Attention-Challenging Multiple Instance Learning for Whole Slide Image Classification", arXiv 2311.07125
(ECCV 2024). The op is ``attnkit.ops.vision.acmil.acmil_pool``.
"""

from __future__ import annotations

import torch
from torch import nn

from attnkit.ops.vision.acmil import acmil_pool
from attnkit.reference.naive_vision_c import naive_acmil_module
from attnkit.registry import Family, InputKind, Paper, check_input, float_option, int_option, register


def _flops(c: dict) -> float:
    b, n, d, a, m = c["batch"], c["seq_len"], c["dim"], c["att_dim"], c["num_branches"]
    return float(b * n * (4 * d * a + 2 * a * m) + 2 * b * m * n * d)  # V and U, w, then the weighted sums


@register(
    name="acmil_pool", family=Family.VISION,
    paper=Paper("Attention-Challenging Multiple Instance Learning for Whole Slide Image Classification",
                "2311.07125", 2024),
    patterns=("noncausal-self",), complexity="O(B N C (D + M))", flops=_flops,
    options=lambda c: {"dim": c["dim"], "att_dim": c["att_dim"], "num_branches": c["num_branches"],
                       "num_masked": c["num_masked"], "mask_drop": c["mask_drop"], "seed": c.get("seed")},
    reference=naive_acmil_module, functional=acmil_pool, input_kind=InputKind.SEQUENCE,
    default_config={"dim": 512, "att_dim": 128, "num_branches": 5, "num_masked": 10, "mask_drop": 0.6,
                    "seed": None},
    default_input={"batch": 1, "seq_len": 4096},
    tiny_config={"dim": 6, "att_dim": 4, "num_branches": 3, "num_masked": 4, "mask_drop": 0.5, "seed": 0},
    tiny_input={"batch": 2, "seq_len": 9},
    output_shape=lambda c: (c.get("batch", 1), c["num_branches"], c["dim"]),
    notes="A pooling spec: a bag (B, N, C) -> branch embeddings (B, M, C); the slide embedding of the paper's "
          "bag classifier is their mean (the mean of the branch softmaxes times the bag, which is linear). "
          "Scores: ABMIL's gated attention (arXiv 1802.04712) with V, U shared by the branches and one w_m per "
          "branch (M = 5). STKIM follows the authors' released code: in training, of each branch's top K = 10 "
          "instances, floor(K p) with p = 0.6 chosen uniformly at random are masked (exactly that many, not each "
          "with probability p), logits set to the most negative finite value so they get exactly zero weight; "
          "nothing is masked in eval. Randomness: forward(generator=) or the seed option (a fresh generator "
          "seeded per forward, so training masks are reproducible; the registered tiny module uses seed=0). "
          "The dimension reduction (Linear + ReLU before the attention), the classifiers and the diversity loss "
          "are training code, not part of the op. One branch and no masking is ABMIL's gated attention pooling.",
)
class ACMILPooling(nn.Module):
    """ACMIL's attention pooling of a bag ``(B, N, C)`` into ``M`` branch embeddings ``(B, M, C)``.

    Args:
        dim: ``C``. att_dim: the gated attention's hidden width ``D`` (paper: 128).
        num_branches: ``M`` (paper: 5). num_masked: ``K``, top instances per branch that STKIM may mask (10).
        mask_drop: ``p``, the fraction of those masked in training (0.6). seed: None (global RNG) or an int:
            every training forward draws its mask from a generator seeded with it (reproducible).
    """

    def __init__(self, dim: int, att_dim: int = 128, num_branches: int = 5, num_masked: int = 10,
                 mask_drop: float = 0.6, seed: int | None = None):
        super().__init__()
        self.dim = int_option(self, "dim", dim, 1)
        self.att_dim = int_option(self, "att_dim", att_dim, 1)
        self.num_branches = int_option(self, "num_branches", num_branches, 1)
        self.num_masked = int_option(self, "num_masked", num_masked, 0)
        self.mask_drop = float_option(self, "mask_drop", mask_drop, minimum=0.0)
        if self.mask_drop > 1.0:
            raise ValueError(f"{type(self).__name__}: mask_drop must be in [0, 1], got {mask_drop}")
        self.seed = None if seed is None else int_option(self, "seed", seed, 0)
        self.attention_v = nn.Linear(dim, att_dim)
        self.attention_u = nn.Linear(dim, att_dim)
        self.attention_w = nn.Linear(att_dim, num_branches)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Branch scores ``(B, M, N)`` of a bag ``(B, N, C)``."""
        gated = torch.tanh(self.attention_v(x)) * torch.sigmoid(self.attention_u(x))  # (B, N, D)
        return self.attention_w(gated).transpose(1, 2)  # (B, M, N)

    def forward(self, x: torch.Tensor, *, generator: torch.Generator | None = None,
                return_attention: bool = False):
        """``x (B, N, C)`` -> ``(B, M, C)`` (with ``return_attention``: and the weights ``(B, M, N)``)."""
        check_input(self, x, "(B, N, C)", channels=self.dim)
        if self.training and generator is None and self.seed is not None and not x.is_meta:
            generator = torch.Generator(device=x.device).manual_seed(self.seed)
        num_masked = self.num_masked if self.training else 0  # STKIM masks in training only
        return acmil_pool(self.logits(x), x, num_masked, self.mask_drop, generator=generator,
                          return_weights=return_attention)
