"""Understanding the differences in Foundation Models: Attention, State Space Models, and Recurrent Neural
Networks (arXiv 2405.15731) — one causal mixer layer run through the Dynamical Systems Framework.

``form`` picks the family: ``linear_attention`` (elu+1 features, normalised, heads of ``C / H``), ``s6`` (a
selective SSM with input-dependent ``delta``, ``B``, ``C`` and a learned negative ``A``, one DSF head per
channel) or ``rnn`` (a diagonal sigmoid-gated linear RNN). Each is converted to the common DSF and run by
:func:`~attnkit.ops.sequence.dsf.dsf_scan`; the module's reference runs each family in its own native loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attnkit.ops.sequence.dsf import dsf_from_gated_rnn, dsf_from_linear_attention, dsf_from_s6, dsf_scan, run_dsf
from attnkit.reference.naive_sequence2 import naive_dsf_module
from attnkit.registry import Family, Paper, check_input, choice_option, divisible, int_option, register

FORMS = ("linear_attention", "s6", "rnn")


def _flops(cfg: dict) -> float:
    b, n, c, s = cfg["batch"], cfg["seq_len"], cfg["dim"], cfg["state"]
    proj = {"linear_attention": 3 * c, "s6": 2 * c + 2 * s, "rnn": 2 * c}[cfg["form"]] * 2 * n * c + 2 * n * c * c
    d = c // cfg["num_heads"]
    scan = {"linear_attention": 4 * n * c * d, "s6": 6 * n * c * s, "rnn": 4 * n * c}[cfg["form"]]
    return b * (proj + scan)


_DEFAULT = {"dim": 128, "num_heads": 4, "form": "linear_attention", "state": 16}


def _options(c: dict) -> dict:
    return {k: c[k] for k in _DEFAULT}


@register(
    name="dsf_equivalence", family=Family.LINEAR,
    paper=Paper("Understanding the differences in Foundation Models: Attention, State Space Models, and Recurrent "
                "Neural Networks", "2405.15731", 2024),
    patterns=("causal-self",), complexity="O(N n d) per head (state n x d)", flops=_flops, options=_options,
    reference=naive_dsf_module, functional=dsf_scan, default_config=_DEFAULT,
    tiny_config={"dim": 8, "num_heads": 2, "state": 3}, default_input={"batch": 2, "seq_len": 1024},
    tiny_input={"batch": 1, "seq_len": 7},
    notes="One DSF h_i = diag(lambda_i) h_{i-1} + b_i u_i^T, y_i = h_i^T c_i / eta_i with the state's n rows "
          "sharing one transition across the d value channels; S6 and the RNN are one head per channel (d = 1). "
          "S6 uses Mamba's Euler input B_bar = delta B (not the full zero-order hold) and no D skip or gate; the "
          "linear-attention form uses elu+1 features, scale 1 and eps 1e-6. Softmax attention has no finite DSF "
          "and is not a form here. The layer choice (form) is an option; converters and the unrolled Phi matrix "
          "are in attnkit.ops.sequence.dsf.",
)
class DSFLayer(nn.Module):
    """A causal mixer in one of the DSF's families.

    Args:
        dim: ``C``; num_heads: ``H`` (linear attention); form: ``"linear_attention"``, ``"s6"`` or ``"rnn"``;
        state: ``n``, the S6 state size per channel.

    Shapes:
        ``x (B, N, C)`` -> ``(B, N, C)`` (causal).

    Example:
        >>> y = DSFLayer(128, 4, form="s6", state=16)(torch.randn(2, 256, 128))
    """

    def __init__(self, dim: int, num_heads: int = 4, *, form: str = "linear_attention", state: int = 16):
        super().__init__()
        self.dim = int_option(self, "dim", dim, 1)
        self.num_heads = int_option(self, "num_heads", num_heads, 1)
        divisible(self, dim, num_heads)
        self.form = choice_option(self, "form", form, FORMS)
        self.state = int_option(self, "state", state, 1)
        width = {"linear_attention": 3 * dim, "s6": 2 * dim + 2 * state, "rnn": 2 * dim}[form]
        self.inp = nn.Linear(dim, width)
        self.proj = nn.Linear(dim, dim)
        # S4D-real style init of A = -exp(a_log): rates 1..n per channel
        self.a_log = nn.Parameter(torch.log(torch.arange(1, state + 1, dtype=torch.float32)).repeat(dim, 1)) \
            if form == "s6" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, "(B, N, C)", channels=self.dim)
        B, N, C = x.shape
        z = self.inp(x)
        if self.form == "linear_attention":
            q, k, v = z.view(B, N, 3, self.num_heads, C // self.num_heads).unbind(2)  # (B, N, H, D)
            sys = dsf_from_linear_attention(q, k, v, feature_map=lambda t: F.elu(t) + 1, normalize=True)
            o = run_dsf(sys).reshape(B, N, C)  # (B, N, C)
        elif self.form == "s6":
            Bm, Cm = z[..., 2 * C:].chunk(2, -1)  # (B, N, n) each
            sys = dsf_from_s6(z[..., :C], F.softplus(z[..., C:2 * C]), -torch.exp(self.a_log.to(x.dtype)), Bm, Cm)
            o = run_dsf(sys).squeeze(-1)  # (B, N, C)
        else:
            xs, g = z.chunk(2, -1)
            o = run_dsf(dsf_from_gated_rnn(xs, torch.sigmoid(g))).squeeze(-1)  # (B, N, C)
        return self.proj(o)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.num_heads}, form={self.form}, state={self.state}"
