"""Improving Routing in Sparse Mixture of Experts with Graph of Tokens (arXiv 2505.00792).

A sparse-MoE layer whose router reads a graph of tokens (sections 2-3): ``mode="attention"`` is the paper's
Attention-Aware MoE block (an attention sublayer, then an MoE whose routing probabilities are mixed by that
attention's head-mean matrix); ``mode="similarity"`` is the Similarity-Aware MoE (the graph is a softmax similarity
of a learned projection of the tokens). The routing op is :func:`~attnkit.ops.sequence.got.got_route`.
"""

from __future__ import annotations

import torch
from torch import nn

from attnkit.masks import causal as causal_mask
from attnkit.ops.dense.call import attention
from attnkit.ops.sequence.got import got_route, moe_experts
from attnkit.reference.naive_sequence4 import naive_got_module
from attnkit.registry import Family, Paper, check_input, choice_option, divisible, float_option, int_option, register

MODES = ("attention", "similarity")


def _flops(cfg: dict) -> float:
    b, n, c, e, k = cfg["batch"], cfg["seq_len"], cfg["dim"], cfg["num_experts"], cfg["topk"]
    f = cfg["hidden"]
    experts = 4 * b * n * k * c * f + 2 * b * n * c * e
    if cfg["mode"] == "attention":
        return experts + 8 * b * n * c * c + 4 * b * n * n * c + 2 * b * n * n * cfg["num_heads"] * (c // cfg[
            "num_heads"] + e)
    ds = cfg["sim_dim"]
    return experts + 2 * b * n * c * ds + 2 * b * n * n * (ds + e)


_DEFAULT = {"dim": 64, "num_experts": 8, "topk": 2, "hidden": 128, "mode": "attention", "num_heads": 4,
            "sim_dim": 32, "tau": 1.0, "causal": False}


def _options(c: dict) -> dict:
    return {k: c[k] for k in _DEFAULT}


@register(
    name="got_routing", family=Family.HEAD,
    paper=Paper("Improving Routing in Sparse Mixture of Experts with Graph of Tokens", "2505.00792", 2025),
    patterns=("noncausal-self", "causal-self"), complexity="O(N^2 (d + E) + N k C F)", flops=_flops,
    options=_options, reference=naive_got_module, functional=(got_route, moe_experts), default_config=_DEFAULT,
    tiny_config={"dim": 8, "num_experts": 4, "topk": 2, "hidden": 8, "num_heads": 2, "sim_dim": 4},
    default_input={"batch": 2, "seq_len": 64}, tiny_input={"batch": 1, "seq_len": 6},
    notes="Routing P' = S softmax(x W_r) (router probabilities mixed by the graph, so rows sum to 1), top-k of P' "
          "renormalised as combine weights (the notes' [paper*] form; the paper's exact body was not readable in "
          "this session). Attention mode: S = head-mean softmax of the block's own attention, computed as "
          "ak.attention(q, k, P) (values of width E) without a (N, N) matrix. Similarity mode: one head, "
          "q = k = x W_s, scale 1/(tau sqrt(d_s)). Both use residuals and no normalisation layers: "
          "attention mode u = x + Attn(x), y = u + MoE(u); similarity mode y = x + MoE(x). Experts are "
          "bias-free GELU MLPs. aux_loss = E sum_e f_e mean(P'_e) (Switch balance on the smoothed "
          "probabilities, f_e = share of routing slots on expert e). Causal: the graph is lower-triangular, so "
          "routing never reads later tokens.",
)
class GoTMoE(nn.Module):
    """Similarity- / attention-aware sparse-MoE layer.

    Args:
        dim: ``C``; num_experts: ``E``; topk: experts per token ``k``; hidden: expert width ``F``;
        mode: ``"attention"`` (attention block + attention-aware MoE) or ``"similarity"`` (similarity-aware MoE);
        num_heads: attention heads (attention mode); sim_dim, tau: similarity projection width and temperature
        (similarity mode); causal: causal graph (and attention) (default False).

    Shapes:
        ``x (B, N, C)`` -> ``(B, N, C)``; after a forward ``self.aux_loss`` holds the balance loss and
        ``self.last_route`` the :class:`~attnkit.ops.sequence.got.GoTRoute` (detached).

    Example:
        >>> m = GoTMoE(64, 8, topk=2, mode="attention", num_heads=4)
        >>> y = m(torch.randn(2, 64, 64)); loss = y.pow(2).mean() + 0.01 * m.aux_loss
    """

    def __init__(self, dim: int, num_experts: int = 8, *, topk: int = 2, hidden: int | None = None,
                 mode: str = "attention", num_heads: int = 4, sim_dim: int = 32, tau: float = 1.0,
                 causal: bool = False):
        super().__init__()
        self.dim = int_option(self, "dim", dim, 1)
        self.num_experts = int_option(self, "num_experts", num_experts, 1)
        self.topk = int_option(self, "topk", topk, 1)
        if self.topk > num_experts:
            raise ValueError(f"{type(self).__name__}: topk must be in [1, num_experts={num_experts}], got {topk}")
        self.hidden = int_option(self, "hidden", 2 * dim if hidden is None else hidden, 1)
        self.mode = choice_option(self, "mode", mode, MODES)
        self.num_heads = int_option(self, "num_heads", num_heads, 1)
        self.sim_dim = int_option(self, "sim_dim", sim_dim, 1)
        self.tau = float_option(self, "tau", tau, minimum=0.0, exclusive=True)
        self.causal = bool(causal)
        self.router_weight = nn.Parameter(torch.randn(dim, num_experts) * dim ** -0.5)
        self.w1 = nn.Parameter(torch.randn(num_experts, dim, self.hidden) * dim ** -0.5)
        self.w2 = nn.Parameter(torch.randn(num_experts, self.hidden, dim) * self.hidden ** -0.5)
        if mode == "attention":
            divisible(self, dim, num_heads)
            self.qkv = nn.Linear(dim, 3 * dim, bias=False)
            self.proj = nn.Linear(dim, dim, bias=False)
            self.sim_weight = None
        else:
            self.qkv = self.proj = None
            self.sim_weight = nn.Parameter(torch.randn(dim, sim_dim) * dim ** -0.5)
        self.aux_loss = torch.zeros(())
        self.last_route = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, "(B, N, C)", channels=self.dim, meta="each expert runs on the tokens routed to it, "
                    "a value-dependent set")
        B, N, C = x.shape
        if self.mode == "attention":
            q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).unbind(2)  # (B, N, H, D)
            u = x + self.proj(attention(q, k, v, causal_mask() if self.causal else None).reshape(B, N, C))
            route = got_route(u @ self.router_weight, q, k, topk=self.topk, causal=self.causal)
        else:
            u = x
            z = (x @ self.sim_weight).unsqueeze(2)  # (B, N, 1, Ds): one similarity head with q = k
            route = got_route(x @ self.router_weight, z, z, topk=self.topk, causal=self.causal,
                              scale=self.sim_dim ** -0.5 / self.tau)
        share = torch.zeros(B, N, self.num_experts, dtype=x.dtype, device=x.device).scatter_(
            -1, route.indices, 1.0 / self.topk)  # (B, N, E): each routing slot counts 1/k
        self.aux_loss = self.num_experts * (share.mean((0, 1)) * route.probs.mean((0, 1))).sum()
        self.last_route = type(route)(*(t.detach() for t in route))  # for inspection, no graph kept
        return u + moe_experts(u, route.weights, route.indices, self.w1, self.w2)

    def __getstate__(self) -> dict:
        # aux_loss holds the last forward's graph, which deepcopy and pickle cannot copy: keep its value only
        state = dict(super().__getstate__())
        state["aux_loss"] = state["aux_loss"].detach()
        return state

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, experts={self.num_experts}, topk={self.topk}, hidden={self.hidden}, "
                f"mode={self.mode}, causal={self.causal}")

