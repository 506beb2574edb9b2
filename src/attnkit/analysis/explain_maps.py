"""Explanations built from attention maps.

* Quantifying Attention Flow in Transformers (arXiv 2005.00928): attention rollout and attention flow.
* Training-Free Open-Ended Object Detection and Segmentation via Attention as Prompts, VL-SAM
  (arXiv 2410.05963): mean-max head weights and the regularized flow.
* Cross-Attention is Half Explanation in Speech-to-Text Models (arXiv 2509.18010): aggregated
  cross-attention and its row-wise correlation with a saliency map.
* Focusing by Contrastive Attention, CARVE (arXiv 2509.06461): task attention over general attention.

``maps`` is a list, one entry per layer (first layer first), of ``(B, H, N, N)`` probabilities.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import torch

_FUSIONS = ("mean", "max", "min")


def _check_maps(fn: str, maps: Sequence[torch.Tensor], square: bool = True) -> list[torch.Tensor]:
    if isinstance(maps, torch.Tensor):
        maps = list(maps.unbind(0)) if maps.dim() == 5 else [maps]
    maps = list(maps)
    if not maps:
        raise ValueError(f"{fn}: maps is empty (expected one (B, H, N, N) map per layer)")
    for i, a in enumerate(maps):
        if not isinstance(a, torch.Tensor) or a.dim() != 4:
            raise ValueError(f"{fn}: maps[{i}] must be a (B, H, N, N) tensor, got "
                             f"{tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__}")
        if square and (a.shape[-1] != a.shape[-2] or a.shape != maps[0].shape):
            raise ValueError(f"{fn}: maps[{i}] has shape {tuple(a.shape)}; every layer must be (B, H, N, N) with "
                             f"the shape of maps[0] {tuple(maps[0].shape)}")
    return maps


def fuse_heads(a: torch.Tensor, head_fusion: str = "mean") -> torch.Tensor:
    """``(B, H, Nq, Nk) -> (B, Nq, Nk)`` by mean, max or min over heads."""
    if head_fusion not in _FUSIONS:
        raise ValueError(f"fuse_heads: head_fusion must be one of {_FUSIONS}, got {head_fusion!r}")
    return a.mean(1) if head_fusion == "mean" else a.amax(1) if head_fusion == "max" else a.amin(1)


def _layer_matrices(fn, maps, head_fusion, add_residual) -> list[torch.Tensor]:
    out = []
    for a in _check_maps(fn, maps):
        m = fuse_heads(a.double(), head_fusion)                                     # (B, N, N)
        if add_residual:
            m = m + torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
            m = m / m.sum(-1, keepdim=True)   # 0.5 A + 0.5 I when rows of A sum to 1
        out.append(m)
    return out


def rollout(maps: Sequence[torch.Tensor], head_fusion: str = "mean", add_residual: bool = True) -> torch.Tensor:
    """Attention rollout (arXiv 2005.00928 §3): ``R_1 = Ã_1``, ``R_l = Ã_l R_{l-1}``.

    Args:
        maps: per layer ``(B, H, N, N)`` probabilities, first layer first.
        head_fusion: ``"mean"``, ``"max"`` or ``"min"`` over heads.
        add_residual: ``Ã = rownorm(Ā + I)`` (the residual path); False uses ``Ā``.

    Returns:
        ``(B, N, N)`` in the dtype of ``maps[0]``: row ``i`` is output token ``i``'s share of each input token.
    """
    mats = _layer_matrices("rollout", maps, head_fusion, add_residual)
    r = mats[0]
    for m in mats[1:]:
        r = m @ r                                                                 # the new layer on the left
    return r.to(maps[0].dtype if isinstance(maps, (list, tuple)) else torch.float32)


def _max_flow(cap: list[dict[int, float]], s: int, t: int, eps: float = 1e-12) -> float:
    """Edmonds-Karp on a residual graph given as adjacency dicts ``cap[u][v]`` (modified in place)."""
    total = 0.0
    n = len(cap)
    while True:
        parent = [-1] * n
        parent[s] = s
        dq = deque([s])
        while dq and parent[t] < 0:
            u = dq.popleft()
            for v, c in cap[u].items():
                if c > eps and parent[v] < 0:
                    parent[v] = u
                    dq.append(v)
        if parent[t] < 0:
            return total
        f, v = float("inf"), t
        while v != s:
            f = min(f, cap[parent[v]][v])
            v = parent[v]
        v = t
        while v != s:
            u = parent[v]
            cap[u][v] -= f
            cap[v][u] = cap[v].get(u, 0.0) + f
            v = u
        total += f


def _flow_graph(mats: list[torch.Tensor], b: int) -> list[dict[int, float]]:
    # node (l, j) is l * N + j; an edge from token j of layer l - 1 to token i of layer l carries Ã_l[i, j]
    n = mats[0].shape[-1]
    cap: list[dict[int, float]] = [dict() for _ in range((len(mats) + 1) * n)]
    for layer, m in enumerate(mats, start=1):
        w = m[b].tolist()
        for i in range(n):
            for j in range(n):
                if w[i][j] > 0:
                    cap[(layer - 1) * n + j][layer * n + i] = w[i][j]
    return cap


def flow(maps: Sequence[torch.Tensor], head_fusion: str = "mean", add_residual: bool = True, *,
         solver: str = "exact", max_tokens: int = 64) -> torch.Tensor:
    """Attention flow (arXiv 2005.00928 §3): max-flow from input token ``j`` to output token ``i``.

    The layered graph has ``L + 1`` columns of ``N`` nodes; token ``j`` of column ``l - 1`` feeds token ``i``
    of column ``l`` with capacity ``Ã_l[i, j]`` (as in :func:`rollout`). One max-flow per pair: only for
    small ``N`` (``max_tokens``).

    Args:
        maps: per layer ``(B, H, N, N)`` probabilities.
        head_fusion, add_residual: as in :func:`rollout`.
        solver: ``"exact"`` (this module's Edmonds-Karp) or ``"networkx"`` (``networkx.maximum_flow_value``).
        max_tokens: refuse larger ``N`` (the cost is ``N^2`` max-flows on ``L N^2`` edges).

    Returns:
        ``(B, N, N)`` float64: ``[b, i, j]`` = flow value from input ``j`` to output ``i``.
    """
    if solver not in ("exact", "networkx"):
        raise ValueError(f"flow: solver must be 'exact' or 'networkx', got {solver!r}")
    mats = _layer_matrices("flow", maps, head_fusion, add_residual)
    bsz, n, _ = mats[0].shape
    if n > max_tokens:
        raise ValueError(f"flow: N = {n} tokens exceeds max_tokens = {max_tokens} (N^2 max-flows; use rollout)")
    big_l = len(mats)
    out = torch.zeros(bsz, n, n, dtype=torch.float64)
    for b in range(bsz):
        if solver == "networkx":
            try:
                import networkx as nx
            except ImportError as e:
                raise ImportError("flow: solver='networkx' needs networkx (pip install networkx)") from e
            g = nx.DiGraph()
            for u, nbrs in enumerate(_flow_graph(mats, b)):
                for v, c in nbrs.items():
                    g.add_edge(u, v, capacity=c)
            for i in range(n):
                for j in range(n):
                    src, dst = j, big_l * n + i
                    out[b, i, j] = nx.maximum_flow_value(g, src, dst) if src in g and dst in g else 0.0
        else:
            base = _flow_graph(mats, b)
            for i in range(n):
                for j in range(n):
                    out[b, i, j] = _max_flow([dict(d) for d in base], j, big_l * n + i)
    return out


# ---- VL-SAM (arXiv 2410.05963 §3) ------------------------------------------------------------------------

def vlsam_head_weights(a: torch.Tensor, rows: torch.Tensor | slice | None = None) -> torch.Tensor:
    """Mean-max head weights ``w_h = mean_i max_j A[h, i, j]`` over the query ``rows``: ``(B, H, Nq, Nk) -> (B, H)``.

    Peaky heads weigh more. ``rows`` (indices or a slice) restricts the mean, e.g. to the text rows of a
    causal model, whose first rows have max 1 trivially.
    """
    if a.dim() != 4:
        raise ValueError(f"vlsam_head_weights: a must be (B, H, Nq, Nk), got {tuple(a.shape)}")
    sel = a if rows is None else a[:, :, rows]
    return sel.amax(-1).mean(-1)


def vlsam_flow(maps: Sequence[torch.Tensor], rows: torch.Tensor | slice | None = None,
               regularize: bool = True) -> torch.Tensor:
    """VL-SAM's regularized attention flow: head-weighted maps, column factor ``(j + 1) / N``, chained product.

    ``S'_l = mean_h(w_{l,h} A_{l,h})``; ``S''_l[:, j] = ρ_j S'_l[:, j]`` with ``ρ_j = (j + 1) / N`` when
    ``regularize`` (undoes the causal mask's pull toward early tokens; the exact factor is not stated in the
    paper — this choice is ours); ``F_1 = S''_1``, ``F_l = S''_l F_{l-1}``. No identity term is added.

    Returns:
        ``(B, N, N)`` float64 (not row-stochastic: normalize a row before thresholding it).
    """
    maps = _check_maps("vlsam_flow", maps)
    f = None
    for a in maps:
        a = a.double()
        w = vlsam_head_weights(a, rows)                                           # (B, H)
        s = (w[:, :, None, None] * a).mean(1)                                     # (B, N, N)
        if regularize:
            n = s.shape[-1]
            s = s * (torch.arange(1, n + 1, dtype=s.dtype, device=s.device) / n)  # column j scaled by (j+1)/N
        f = s if f is None else s @ f
    return f


# ---- Cross-attention as explanation (arXiv 2509.18010) ---------------------------------------------------

def cross_attention_saliency(maps: Sequence[torch.Tensor], layers: Sequence[int] | None = None,
                             heads: Sequence[int] | None = None) -> torch.Tensor:
    """Mean cross-attention over the chosen ``(layer, head)`` set: ``maps[l] (B, H, I, T) -> (B, I, T)``."""
    maps = _check_maps("cross_attention_saliency", maps, square=False)
    nl = len(maps)
    layers = list(range(nl)) if layers is None else list(layers)
    for ly in layers:
        if not -nl <= ly < nl:
            raise ValueError(f"cross_attention_saliency: layer {ly} does not exist ({nl} layers: 0..{nl - 1})")
    acc = []
    for ly in layers:
        a = maps[ly]
        h = a.shape[1]
        hs = list(range(h)) if heads is None else list(heads)
        for hd in hs:
            if not -h <= hd < h:
                raise ValueError(f"cross_attention_saliency: head {hd} does not exist in layer {ly} ({h} heads)")
        acc.append(a[:, hs].double().mean(1))
    return torch.stack(acc).mean(0)


def rowwise_pearson(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Pearson correlation of every row: ``(..., I, T), (..., I, T) -> (..., I)``."""
    if a.shape != b.shape:
        raise ValueError(f"rowwise_pearson: a {tuple(a.shape)} and b {tuple(b.shape)} must have one shape")
    a, b = a.double(), b.double()
    a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(eps)


# ---- CARVE (arXiv 2509.06461) ----------------------------------------------------------------------------

def carve_contrast(a_task: torch.Tensor, a_general: torch.Tensor, eps: float | None = None,
                   normalize: bool = True) -> torch.Tensor:
    """CARVE's contrast ``C = A_q / (A_g + ε)`` over the image tokens, min-max normalized to ``[0, 1]``.

    Args:
        a_task: ``(..., n)`` attention to the ``n`` image tokens under the task question (already aggregated
            over the chosen layers/heads, or ``(..., L, n)`` to average the contrast over a leading axis).
        a_general: same shape, under a general instruction ("Describe this image").
        eps: default ``0.1 / n`` (relative to uniform attention so ε does not dominate).

    Returns:
        ``(..., n)`` float64; a constant map gives zeros.
    """
    if a_task.shape != a_general.shape:
        raise ValueError(f"carve_contrast: a_task {tuple(a_task.shape)} and a_general {tuple(a_general.shape)} "
                         "must have one shape")
    n = a_task.shape[-1]
    eps = 0.1 / n if eps is None else eps
    qn = a_task.double() / a_task.double().sum(-1, keepdim=True).clamp_min(1e-30)    # share over the image
    gn = a_general.double() / a_general.double().sum(-1, keepdim=True).clamp_min(1e-30)
    c = qn / (gn + eps)
    if not normalize:
        return c
    lo, hi = c.amin(-1, keepdim=True), c.amax(-1, keepdim=True)
    return (c - lo) / (hi - lo).clamp_min(1e-30)
