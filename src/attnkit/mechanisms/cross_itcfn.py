"""ITCFN: Incomplete Triple-Modal Co-Attention Fusion Network for Mild Cognitive Impairment Conversion
Prediction (arXiv 2501.11276).

Triple-modal co-attention (§3): the tokens of each modality (MRI, PET, clinical data) query the tokens of
the two other modalities. On the packed sequence ``[M_a; M_b; M_c]`` that is one attention under the
complement of the block-diagonal ``document`` mask (``~ak.masks.document(lengths)``); a missing modality
has its keys masked out. No new op: ``ak.attention`` with that mask.
"""

from __future__ import annotations

import torch
from torch import nn

from attnkit.masks.document import document
from attnkit.ops.dense.call import attention
from attnkit.reference.naive_cross import naive_itcfn_module
from attnkit.registry import Family, Paper, check_input, divisible, int_option, register


def _flops(cfg: dict) -> float:
    b, n, c = cfg["batch"], cfg["seq_len"], cfg["dim"]
    a, bb = cfg["modality_lengths"]
    lengths = (a, bb, n - a - bb)
    return 2 * b * n * 4 * c * c + 4 * b * sum(m * (n - m) for m in lengths) * c


@register(
    name="itcfn_coattention", family=Family.CROSS,
    paper=Paper("ITCFN: Incomplete Triple-Modal Co-Attention Fusion Network for Mild Cognitive Impairment "
                "Conversion Prediction", "2501.11276", 2025),
    patterns=("noncausal-self",), complexity="O(sum_m N_m (N - N_m) d)", flops=_flops,
    options=lambda c: {"dim": c["dim"], "num_heads": c["num_heads"], "modality_lengths": c["modality_lengths"]},
    reference=naive_itcfn_module, functional=attention,
    default_config={"dim": 64, "num_heads": 4, "modality_lengths": (32, 16)},
    tiny_config={"dim": 8, "num_heads": 2, "modality_lengths": (2, 2)},
    default_input={"batch": 2, "seq_len": 64}, tiny_input={"batch": 1, "seq_len": 6},
    notes="Inferred wiring: every modality queries the concatenation of the other two, one shared set of q/k/v "
          "projections, outputs per token (the per-modality mean and the concatenation feeding the classifier "
          "follow the layer). modality_lengths gives the first two modalities' token counts, the third takes the "
          "rest. present=(B, 3) bool masks an absent modality's keys (the paper fills a missing PET with a "
          "generated one upstream).",
)
class TriModalCoAttention(nn.Module):
    """ITCFN's triple-modal co-attention on ``[M_a; M_b; M_c]``.

    Args:
        dim: ``C``; num_heads: ``H``; modality_lengths: ``(N_a, N_b)``; ``N_c = N - N_a - N_b >= 1``.

    Shapes:
        ``x (B, N, C)``, optional ``present (B, 3)`` bool -> ``(B, N, C)``.

    Example:
        >>> y = TriModalCoAttention(256, 8, modality_lengths=(64, 64))(torch.cat([mri, pet, clin], 1))
    """

    def __init__(self, dim: int, num_heads: int, *, modality_lengths: tuple[int, int] = (1, 1), qkv_bias: bool = True):
        super().__init__()
        divisible(self, dim, num_heads)
        self.dim, self.num_heads = dim, num_heads
        if not isinstance(modality_lengths, (tuple, list)) or len(modality_lengths) != 2:
            raise TypeError(f"{type(self).__name__}: modality_lengths must be (N_a, N_b), got {modality_lengths!r}")
        self.modality_lengths = tuple(int_option(self, f"modality_lengths[{i}]", v, 1)
                                      for i, v in enumerate(modality_lengths))
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        check_input(self, x, "(B, N, C)", channels=self.dim, meta="its masked tile walk reads tensor values")
        b, n, c = x.shape
        na, nb = self.modality_lengths
        if n - na - nb < 1:
            raise ValueError(f"{type(self).__name__}: N = {n} leaves no token for the third modality "
                             f"(modality_lengths = {self.modality_lengths})")
        mask = ~document([na, nb, n - na - nb])
        if present is not None:
            if present.dtype != torch.bool or tuple(present.shape) != (b, 3):
                raise ValueError(f"{type(self).__name__}: present must be a bool (B, 3) = ({b}, 3) tensor, got "
                                 f"{present.dtype} {tuple(present.shape)}")
            mod = torch.repeat_interleave(torch.arange(3, device=x.device),
                                          torch.tensor([na, nb, n - na - nb], device=x.device))
            mask = mask & present[:, mod][:, None, None, :]                      # (B, 1, 1, N) key mask
        q, k, v = (t.reshape(b, n, self.num_heads, -1) for t in self.qkv(x).chunk(3, -1))   # (B, N, H, D)
        return self.proj(attention(q, k, v, mask=mask).reshape(b, n, c))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, modality_lengths={self.modality_lengths}"
