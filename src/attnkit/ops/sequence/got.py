"""Improving Routing in Sparse Mixture of Experts with Graph of Tokens (arXiv 2505.00792) — graph-smoothed routing.

A sparse MoE routes each token on its own: ``P = softmax_E(x W_r)``, top-``k`` experts of ``P``. The paper lets a
token borrow the expert distribution of related tokens (sections 2-3): with a row-stochastic token graph ``S``,
``P' = S P`` (rows still sum to 1) and the top-``k`` experts are taken from ``P'``, their probabilities renormalised
as the combine weights. ``S`` is a similarity graph ``softmax_j(z_i . z_j / tau)`` (Similarity-Aware MoE) or the
head-mean attention matrix of the attention block before the MoE (Attention-Aware MoE).

``S P`` is attention with the routing probabilities as values, so the ``attention`` backend computes it with
``ak.attention(q, k, P)`` (values of width ``E``) and never materialises ``S``; ``reference`` builds ``S``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from attnkit.masks import causal as causal_mask
from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.ops.dense.call import attention
from attnkit.reference.naive_sequence4 import naive_got_route, naive_token_graph


class GoTRoute(NamedTuple):
    """The routing of a graph-of-tokens MoE layer.

    Attributes:
        probs: ``P' = S softmax(logits)``, ``(B, N, E)``, rows sum to 1.
        weights: the renormalised ``P'`` of the chosen experts, ``(B, N, k)``, rows sum to 1.
        indices: the chosen experts, ``(B, N, k)`` int64, in decreasing ``P'``.
    """

    probs: torch.Tensor
    weights: torch.Tensor
    indices: torch.Tensor


@dataclass(frozen=True, eq=False)
class GoTCall:
    logits: torch.Tensor
    q: torch.Tensor | None
    k: torch.Tensor | None
    graph: torch.Tensor | None
    topk: int
    causal: bool
    scale: float | None

    def describe(self) -> str:
        src = "identity graph" if self.q is None and self.graph is None else (
            "explicit graph" if self.graph is not None else f"attention graph ({self.q.shape[2]} head(s))")
        return (f"logits {tuple(self.logits.shape)} {self.logits.dtype}, top-{self.topk}, {src}, "
                f"{'causal' if self.causal else 'non-causal'}")


def make_call(logits, q=None, k=None, *, graph=None, topk=2, causal=False, scale=None) -> GoTCall:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.numel() == 0:
        raise ValueError(f"got_route: logits must be a non-empty (B, N, E) tensor, got "
                         f"{tuple(getattr(logits, 'shape', ())) or type(logits).__name__}")
    B, N, E = logits.shape
    if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= E:
        raise ValueError(f"got_route: topk must be an int in [1, E={E}], got {topk!r}")
    if (q is None) != (k is None):
        raise ValueError("got_route: q and k must be given together (the attention graph) or both left None")
    if q is not None and graph is not None:
        raise ValueError("got_route: give either q and k or graph, not both")
    if q is not None:
        for name, t in (("q", q), ("k", k)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[:2] != (B, N):
                raise ValueError(f"got_route: {name} must be (B={B}, N={N}, H, D), got "
                                 f"{tuple(getattr(t, 'shape', ())) or type(t).__name__}")
        if q.shape[2:] != k.shape[2:]:
            raise ValueError(f"got_route: q and k must have the same heads and width, got {tuple(q.shape)} and "
                             f"{tuple(k.shape)}")
    if graph is not None and (not isinstance(graph, torch.Tensor) or tuple(graph.shape) != (B, N, N)):
        raise ValueError(f"got_route: graph must be (B={B}, N={N}, N={N}) (row-stochastic), got "
                         f"{tuple(getattr(graph, 'shape', ())) or type(graph).__name__}")
    return GoTCall(logits, q, k, graph, topk, bool(causal), scale)


def _select(p: torch.Tensor, topk: int) -> GoTRoute:
    w, idx = p.topk(topk, -1)  # (B, N, k)
    return GoTRoute(p, w / w.sum(-1, keepdim=True), idx)


def _attention(c: GoTCall) -> GoTRoute:
    p = torch.softmax(c.logits, -1)  # (B, N, E)
    if c.graph is not None:
        p = torch.bmm(c.graph, p)
    elif c.q is not None:
        H = c.q.shape[2]
        pv = p.unsqueeze(2).expand(-1, -1, H, -1)  # (B, N, H, E): every head mixes the same values
        p = attention(c.q, c.k, pv, causal_mask() if c.causal else None, scale=c.scale).mean(2)  # (B, N, E)
    return _select(p, c.topk)


def _reference(c: GoTCall) -> GoTRoute:
    graph = c.graph
    if c.q is not None:
        graph = naive_token_graph(c.q, c.k, causal=c.causal, scale=c.scale)
    return GoTRoute(*naive_got_route(c.logits, graph, topk=c.topk))


DISPATCHER = Dispatcher("got_route", [
    Backend("attention", _attention, note="S P as ak.attention(q, k, P): the graph is never materialised"),
    Backend("reference", _reference, auto=False, note="naive_got_route: explicit (B, N, N) graph"),
])
register_op("got_route", make_call, DISPATCHER)


def got_route(logits: torch.Tensor, q: torch.Tensor | None = None, k: torch.Tensor | None = None, *,
              graph: torch.Tensor | None = None, topk: int = 2, causal: bool = False, scale: float | None = None,
              backend: str | None = None) -> GoTRoute:
    """Graph-of-tokens routing: top-``k`` experts of ``S softmax(logits)``.

    Args:
        logits: router logits ``(B, N, E)``.
        q, k: ``(B, N, H, D)``: the graph is ``S = mean_h softmax_j(q_i . k_j * scale)`` (the attention
            matrix of an attention block, or a similarity graph with ``q = k``); causal: only ``j <= i``.
        graph: an explicit row-stochastic ``(B, N, N)`` graph instead of ``q, k``.
            Neither ``q, k`` nor ``graph``: the identity graph, i.e. plain softmax top-``k`` routing.
        topk: experts per token; scale: score scale (default ``D ** -0.5``).
        backend: None / ``"attention"`` or ``"reference"``.

    Returns:
        :class:`GoTRoute` ``(probs (B, N, E), weights (B, N, k), indices (B, N, k))``.

    Example:
        >>> r = got_route(torch.randn(2, 16, 8), torch.randn(2, 16, 4, 32), torch.randn(2, 16, 4, 32), topk=2)
    """
    return DISPATCHER.run(make_call(logits, q, k, graph=graph, topk=topk, causal=causal, scale=scale), backend)


def moe_experts(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, w1: torch.Tensor,
                w2: torch.Tensor) -> torch.Tensor:
    """Apply the routed GELU experts: ``y_i = sum_r weights_ir GELU(x_i W1[e_ir]) W2[e_ir]``.

    Each expert runs once on the tokens routed to it (gathered rows, results scattered back).

    Args:
        x: ``(B, N, C)``; weights, indices: ``(B, N, k)``; w1: ``(E, C, F)``; w2: ``(E, F, C)``.

    Returns:
        ``(B, N, C)``.
    """
    E, C = w1.shape[0], x.shape[-1]
    if w1.dim() != 3 or w1.shape[1] != C or w2.shape != (E, w1.shape[2], C):
        raise ValueError(f"moe_experts: w1 must be (E, C={C}, F) and w2 (E, F, C={C}), got {tuple(w1.shape)} and "
                         f"{tuple(w2.shape)}")
    xf = x.reshape(-1, C)  # (B N, C)
    flat_idx, flat_w = indices.reshape(xf.shape[0], -1), weights.reshape(xf.shape[0], -1)  # (B N, k)
    y = torch.zeros_like(xf)
    for e in range(E):
        tok, slot = torch.nonzero(flat_idx == e, as_tuple=True)  # the tokens routed to expert e
        if tok.numel():
            h = F.gelu(xf[tok] @ w1[e]) @ w2[e]  # (T_e, C)
            y = y.index_add(0, tok, h * flat_w[tok, slot].unsqueeze(-1))
    return y.view_as(x)
