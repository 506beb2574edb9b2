"""Diagnostics of attention maps: sinks, head metrics, entropy, reasoning-rhythm metrics, pass bounds.

* See What You Are Told: Visual Attention Sink in Large Multimodal Models (arXiv 2503.03321): the
  massive-activation sink test and VAR (Visual Attention Redistribution).
* How Does Attention Work in Vision Transformers? A Visual Analytics Attempt (arXiv 2303.13731): head
  importance, attention-strength profile, mean attention distance.
* Attention Illuminates LLM Reasoning: The Preplan-and-Anchor Rhythm (arXiv 2510.13554): WAAD and FAI.
* FuseMax: Leveraging Extended Einsums to Optimize Attention Accelerator Design (arXiv 2406.10491 §3):
  the number of passes over the key rank a cascade of Einsums needs.

Probabilities are ``(B, H, Nq, Nk)``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import torch


def _probs(fn: str, a: torch.Tensor) -> torch.Tensor:
    if not isinstance(a, torch.Tensor) or a.dim() != 4:
        raise ValueError(f"{fn}: expected probabilities (B, H, Nq, Nk), got "
                         f"{tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__}")
    return a


# ---- sinks ---------------------------------------------------------------------------------------------

def sink_scores(a: torch.Tensor) -> torch.Tensor:
    """Attention each key receives, averaged over the query rows: ``(B, H, Nq, Nk) -> (B, H, Nk)``.

    A sink is a key whose score stays high whatever the query (uniform attention gives ``1 / Nk``).
    """
    return _probs("sink_scores", a).mean(2)


def sink_share(a: torch.Tensor, tokens: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Share of every head's attention that lands on ``tokens`` (mean over query rows): ``-> (B, H)``."""
    a = _probs("sink_share", a)
    idx = torch.as_tensor(tokens, dtype=torch.long)
    nk = a.shape[-1]
    if idx.numel() and (idx.min() < -nk or idx.max() >= nk):
        raise ValueError(f"sink_share: token index out of range for Nk = {nk}: {idx.tolist()}")
    return a[..., idx].sum(-1).mean(-1)


def massive_activation_sinks(hidden: torch.Tensor, dims: Sequence[int], tau: float = 20.0) -> torch.Tensor:
    """The visual-sink test of arXiv 2503.03321 §3: ``φ(x_j) = max_{d ∈ dims} |RMSnorm(x_j)[d]| > τ``.

    Args:
        hidden: ``(B, N, C)`` hidden states at a layer's input.
        dims: the base LLM's sink dimensions (found with :func:`find_sink_dims`).
        tau: threshold (20 in the paper).

    Returns:
        bool ``(B, N)``: True where the token is a sink.
    """
    if hidden.dim() != 3:
        raise ValueError(f"massive_activation_sinks: hidden must be (B, N, C), got {tuple(hidden.shape)}")
    c = hidden.shape[-1]
    dims = list(dims)
    if not dims or any(not -c <= d < c for d in dims):
        raise ValueError(f"massive_activation_sinks: dims must be non-empty indices into C = {c}, got {dims}")
    x = hidden.float()
    xn = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)                 # RMS norm, no affine weight
    return xn[..., dims].abs().amax(-1) > tau


def find_sink_dims(hidden: torch.Tensor, token: int = 0, top: int = 2) -> list[int]:
    """The ``top`` hidden dimensions with the largest RMS-normalized magnitude at ``token`` (the BOS sink),
    averaged over the batch: ``(B, N, C) -> list of dims``."""
    if hidden.dim() != 3:
        raise ValueError(f"find_sink_dims: hidden must be (B, N, C), got {tuple(hidden.shape)}")
    x = hidden[:, token].float()                                                  # (B, C)
    xn = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    return xn.abs().mean(0).topk(top).indices.tolist()


def var_redistribute(a: torch.Tensor, sink: torch.Tensor, image: torch.Tensor, p: float = 0.6, rho: float = 0.5,
                     min_image_share: float = 0.2) -> torch.Tensor:
    """VAR (arXiv 2503.03321 §4): in image-centric rows, move ``1 - p`` of the sink attention to image tokens.

    A (head, query row) is image-centric when its attention to ``image`` is at least ``min_image_share`` and
    at most ``rho`` of that lands on sink image tokens. Its sink columns keep ``p`` of their weight; the
    freed budget is spread over the non-sink image tokens in proportion to their weight. Row sums are kept.

    Args:
        a: ``(B, H, Nq, Nk)`` probabilities.
        sink: bool ``(Nk,)`` or ``(B, Nk)``: sink tokens (text sinks such as BOS included).
        image: bool ``(Nk,)`` or ``(B, Nk)``: image tokens.
        p: fraction KEPT on the sinks (0.6 in the paper; 1 leaves ``a`` unchanged).

    Returns:
        ``(B, H, Nq, Nk)`` edited probabilities.
    """
    a = _probs("var_redistribute", a)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"var_redistribute: p (fraction kept on sinks) must be in [0, 1], got {p}")
    nk = a.shape[-1]
    masks = []
    for name, m in (("sink", sink), ("image", image)):
        m = torch.as_tensor(m, dtype=torch.bool, device=a.device)
        if m.shape[-1] != nk or m.dim() > 2:
            raise ValueError(f"var_redistribute: {name} must be bool (Nk,) or (B, Nk) with Nk = {nk}, got "
                             f"{tuple(m.shape)}")
        masks.append((m if m.dim() == 2 else m[None])[:, None, None, :].to(a.dtype))  # (B|1, 1, 1, Nk)
    s, im = masks
    img_share = (a * im).sum(-1, keepdim=True)
    sink_img = (a * im * s).sum(-1, keepdim=True)
    rows = (img_share >= min_image_share) & (sink_img / (img_share + 1e-6) <= rho)
    budget = (1 - p) * (a * s).sum(-1, keepdim=True)
    target = im * (1 - s)
    tw = (a * target).sum(-1, keepdim=True)
    rows = rows & (tw > 0)                                                         # nowhere to move it: keep the row
    edited = a * (1 - s) + p * a * s + budget * a * target / tw.clamp_min(1e-30)
    return torch.where(rows, edited, a)


# ---- head metrics (arXiv 2303.13731) -------------------------------------------------------------------

def attention_entropy(a: torch.Tensor) -> torch.Tensor:
    """Entropy of every row, nats: ``(B, H, Nq, Nk) -> (B, H, Nq)`` (uniform over n keys gives ``log n``)."""
    a = _probs("attention_entropy", a)
    return -(a * torch.log(a.clamp_min(1e-30))).sum(-1)


def _grid_positions(grid: tuple[int, int], device=None) -> torch.Tensor:
    gh, gw = grid
    r, c = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    return torch.stack([r.flatten(), c.flatten()], -1).to(device, torch.float64)  # (G, 2)


def _patch_block(fn: str, a: torch.Tensor, grid: tuple[int, int], num_prefix: int) -> torch.Tensor:
    a = _probs(fn, a)
    if len(grid) != 2 or min(grid) < 1:
        raise ValueError(f"{fn}: grid must be (rows, cols) >= 1, got {grid}")
    g = grid[0] * grid[1]
    if a.shape[-1] != num_prefix + g or a.shape[-2] != num_prefix + g:
        raise ValueError(f"{fn}: maps of shape {tuple(a.shape)} do not hold num_prefix ({num_prefix}) + "
                         f"grid {grid[0]}x{grid[1]} tokens")
    return a[..., num_prefix:, num_prefix:].double()                              # (B, H, G, G)


def mean_attention_distance(a: torch.Tensor, grid: tuple[int, int], patch_size: float = 1.0,
                            num_prefix: int = 0) -> torch.Tensor:
    """``d_h = mean_i Σ_j a_ij ‖p_i − p_j‖ · patch_size`` over patch tokens: ``-> (B, H)`` (pixels).

    Prefix tokens ([CLS], registers) are left out of rows and columns (the rows are not renormalized, so a
    head that attends mostly to [CLS] has a short distance).
    """
    p = _patch_block("mean_attention_distance", a, grid, num_prefix)
    pos = _grid_positions(grid, a.device)
    dist = torch.cdist(pos, pos)                                                  # (G, G)
    return ((p * dist).sum(-1) * patch_size).mean(-1)


def attention_strength(a: torch.Tensor, grid: tuple[int, int], num_prefix: int = 0) -> tuple[torch.Tensor,
                                                                                            torch.Tensor]:
    """Spatial profile of attention strength per head.

    ``S[Δr, Δc]`` = mean over the patch queries ``i`` (and batch) whose neighbour ``p_i + Δ`` is in the grid of
    ``a[i, j(i, Δ)]``; ``s_k`` = mean of ``S`` over the ring ``max(|Δr|, |Δc|) = k``.

    Returns:
        ``profile (H, 2 Gh − 1, 2 Gw − 1)`` (offset ``(0, 0)`` at the centre) and ``rings (H, max(Gh, Gw))``.
    """
    p = _patch_block("attention_strength", a, grid, num_prefix)                   # (B, H, G, G)
    gh, gw = grid
    pos = _grid_positions(grid).long()
    dr = pos[None, :, 0] - pos[:, None, 0] + gh - 1                               # (G, G): key row - query row
    dc = pos[None, :, 1] - pos[:, None, 1] + gw - 1
    flat = (dr * (2 * gw - 1) + dc).flatten()                                     # offset bin of every (i, j)
    nb = (2 * gh - 1) * (2 * gw - 1)
    h = p.shape[1]
    sums = torch.zeros(h, nb, dtype=torch.float64).index_add_(1, flat, p.sum(0).reshape(h, -1))
    counts = torch.zeros(nb, dtype=torch.float64).index_add_(0, flat, torch.ones_like(flat, dtype=torch.float64))
    profile = (sums / (counts * p.shape[0])).reshape(h, 2 * gh - 1, 2 * gw - 1)
    ro = torch.arange(-(gh - 1), gh)[:, None].abs()
    co = torch.arange(-(gw - 1), gw)[None, :].abs()
    ring = torch.maximum(ro, co).flatten()                                        # (nb,)
    rings = torch.stack([profile.reshape(h, -1)[:, ring == k].mean(-1) for k in range(max(gh, gw))], -1)
    return profile, rings


def head_importance(evaluate: Callable[[torch.Tensor], torch.Tensor], num_layers: int, num_heads: int,
                    method: str = "ablation") -> torch.Tensor:
    """Importance of every head (arXiv 2303.13731 §4), from a metric evaluated under head gates.

    Args:
        evaluate: ``evaluate(gates) -> scalar tensor``, the metric (accuracy, true-class confidence or
            loss) of the model whose head ``(l, h)`` output is multiplied by ``gates[l, h]`` before the
            output projection (:func:`attnkit.analysis.interventions.gate_heads` does this for attnkit modules).
        method: ``"ablation"``: ``metric(all ones) − metric(gate (l, h) = 0)``; ``"gradient"``: the Taylor
            score ``|∂ metric / ∂ gates[l, h]|`` at all ones.

    Returns:
        ``(num_layers, num_heads)`` float64.
    """
    if method not in ("ablation", "gradient"):
        raise ValueError(f"head_importance: method must be 'ablation' or 'gradient', got {method!r}")
    ones = torch.ones(num_layers, num_heads, dtype=torch.float64)
    if method == "gradient":
        g = ones.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(evaluate(g), g)
        return grad.abs()
    with torch.no_grad():
        base = float(evaluate(ones))
        out = torch.empty(num_layers, num_heads, dtype=torch.float64)
        for ly in range(num_layers):
            for hd in range(num_heads):
                g = ones.clone()
                g[ly, hd] = 0
                out[ly, hd] = base - float(evaluate(g))
    return out


# ---- Preplan-and-anchor (arXiv 2510.13554) -------------------------------------------------------------

def waad(a: torch.Tensor, window: int = 10) -> torch.Tensor:
    """Windowed average attention distance ``WAAD_t = Σ_{s ≤ t} A[t, s] · min(t − s, W)``: ``-> (B, H, N)``."""
    a = _probs("waad", a)
    n = a.shape[-1]
    t = torch.arange(n, device=a.device)
    d = (t[:, None] - t[None, :]).clamp(0, window).to(a.dtype)                    # future keys count 0
    return (a * d).sum(-1)


def fai(a: torch.Tensor) -> torch.Tensor:
    """Future attention influence ``FAI_s = mean_{t > s} A[t, s]``: ``-> (B, H, N)``; the last token is NaN."""
    a = _probs("fai", a)
    n = a.shape[-1]
    strict_lower = torch.ones(n, n, dtype=torch.bool, device=a.device).tril(-1)   # rows t > column s
    total = (a * strict_lower).sum(-2)                                            # (B, H, N)
    count = torch.arange(n - 1, -1, -1, device=a.device, dtype=a.dtype)           # N − s − 1 later rows
    return total / count                                                          # 0 / 0 = NaN for the last


def preplan_anchor_tokens(a: torch.Tensor, window: int = 10, top_anchors: int = 5) -> dict[str, torch.Tensor]:
    """Preplan tokens (local maxima of WAAD, from the heads below the median mean distance) and anchors (top
    FAI, from the heads above it), on one sequence ``(1, H, N, N)``. Returns index tensors."""
    a = _probs("preplan_anchor_tokens", a)
    if a.shape[0] != 1:
        raise ValueError(f"preplan_anchor_tokens: one sequence at a time (B = 1), got B = {a.shape[0]}")
    n = a.shape[-1]
    t = torch.arange(n, dtype=a.dtype)
    dist = (a[0] * (t[:, None] - t[None, :]).abs()).sum(-1).mean(-1)              # (H,) mean distance
    med = dist.median()
    local, glob = dist <= med, dist > med
    if not glob.any():
        glob = local
    w = waad(a[:, local]).mean((0, 1))                                             # (N,)
    peaks = [i for i in range(1, n - 1) if w[i] > w[i - 1] and w[i] >= w[i + 1]]
    f = fai(a[:, glob]).mean((0, 1))
    anchors = torch.nan_to_num(f, nan=-1.0).topk(min(top_anchors, n)).indices.sort().values
    return {"preplan": torch.tensor(peaks, dtype=torch.long), "anchors": anchors, "waad": w, "fai": f}


# ---- FuseMax pass bounds (arXiv 2406.10491 §3) -----------------------------------------------------------

_ACCESS = re.compile(r"([A-Za-z_]\w*)\s*\[([^\]]*)\]")

CASCADE_3PASS = (
    "QK[m,p] = Q[e,p] * K[e,m]",
    "GM[p] = max QK[m,p]",
    "SN[m,p] = exp(QK[m,p] - GM[p])",
    "SD[p] = sum SN[m,p]",
    "A[m,p] = SN[m,p] / SD[p]",
    "AV[f,p] = A[m,p] * V[f,m]",
)
CASCADE_2PASS = (
    "QK[m,p] = Q[e,p] * K[e,m]",
    "GM[p] = max QK[m,p]",
    "SN[m,p] = exp(QK[m,p] - GM[p])",
    "SD[p] = sum SN[m,p]",
    "SNV[f,p] = SN[m,p] * V[f,m]",
    "AV[f,p] = SNV[f,p] / SD[p]",
)
CASCADE_1PASS = (
    "BQK[m1,m0,p] = Q[e,p] * K[e,m1,m0]",
    "LM[m1,p] = max BQK[m1,m0,p]",
    "RM[m1+1,p] = max(RM[m1,p], LM[m1,p])",
    "SLN[m1,m0,p] = exp(BQK[m1,m0,p] - RM[m1+1,p])",
    "SLD[m1,p] = sum SLN[m1,m0,p]",
    "SLNV[f,m1,p] = SLN[m1,m0,p] * V[f,m1,m0]",
    "PRM[m1,p] = exp(RM[m1,p] - RM[m1+1,p])",
    "RD[m1+1,p] = SLD[m1,p] + RD[m1,p] * PRM[m1,p]",
    "RNV[f,m1+1,p] = SLNV[f,m1,p] + RNV[f,m1,p] * PRM[m1,p]",
    "AV[f,p] = RNV[f,M1,p] / RD[M1,p]",
)


def fusemax_passes(cascade: Sequence[str], rank: Sequence[str] = ("m",)) -> int:
    """Lower bound on the passes over the key rank that a cascade of extended Einsums needs.

    Each line is ``"OUT[ranks] = expression over IN[ranks] ..."``; lower-case identifiers inside brackets
    are ranks (``m1+1`` counts as ``m1``), upper-case ones constants (``M1`` = the last tile). ``rank`` names
    the key rank (``("m1", "m0")`` for a tiled cascade). An Einsum that iterates the key rank runs in pass
    ``p``; it needs pass ``p + 1`` when it reads, without the key rank, a tensor whose producer iterated the
    key rank (a complete reduction, available only after that pass). Tensors never written (``Q``, ``K``,
    ``V``) are available from pass 1.

    Returns:
        the number of passes (3 for textbook softmax, 2 with a deferred division, 1 for the tiled running
        max form; 0 if no Einsum touches the key rank).
    """
    rank = set(rank)
    produced: dict[str, int] = {}        # tensor -> pass of the Einsum that wrote it (0 if it did not stream)
    streamed: dict[str, bool] = {}
    total = 0
    for line in cascade:
        if "=" not in line:
            raise ValueError(f"fusemax_passes: {line!r} is not 'OUT[ranks] = ...'")
        lhs, rhs = line.split("=", 1)
        out = _ACCESS.search(lhs)
        if out is None:
            raise ValueError(f"fusemax_passes: no output access in {line!r}")
        accesses = [(n, {r for r in re.findall(r"[A-Za-z_]\w*", idx) if r[0].islower()})
                    for n, idx in _ACCESS.findall(rhs)]
        out_name, out_ranks = out.group(1), {r for r in re.findall(r"[A-Za-z_]\w*", out.group(2)) if r[0].islower()}
        iterates = bool(out_ranks & rank) or any(r & rank for _, r in accesses)
        need = 1 if iterates else 0
        done = 0
        for name, ranks in accesses:
            if name == out_name:             # a recurrence on itself (running state) does not add a barrier
                continue
            p = produced.get(name, 0)
            if ranks & rank:
                need = max(need, p)
            elif streamed.get(name, False):
                need = max(need, p + 1) if iterates else need
                done = max(done, p)
            else:
                done = max(done, p)
        produced[out_name] = need if iterates else done
        streamed[out_name] = iterates
        total = max(total, need)
    return total


def uniform_closed_forms(n: int) -> dict[str, float]:
    """Closed forms for uniform attention over ``n`` keys: entropy ``log n``, sink score ``1 / n``."""
    return {"entropy": math.log(n), "sink_score": 1.0 / n}
