"""Interventions driven by attention maps: token pruning, selection and merging, and attention edits.

* [CLS] Attention is All You Need for Training-Free Visual Token Pruning, FasterVLM (arXiv 2412.01818 v1).
* An Image is Worth 1/2 Tokens After Layer 2, FastV (arXiv 2403.06764): prune after layer K.
* LSceneLLM (arXiv 2412.01292) and AdaToken-3D (arXiv 2505.12782): attention-based token selection.
* FastVGGT: Training-Free Acceleration of Visual Geometry Transformer (arXiv 2509.02560): token merging.
* ZeroTuning (arXiv 2505.11739): scaling the initial token's attention.
* Fixing Imbalanced Attention to Mitigate In-Context Hallucination, PAINT (arXiv 2501.12206).
* Visual Dependency Transformers (arXiv 2304.03282): reversed attention and dependency trees.

:func:`edit_attention` applies any probability edit ``fn(layer, probs) -> probs`` inside a model (attnkit
modules or transformers models); the edits here (ZeroTuning, re-balancing, VAR, head gates) plug into it.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from attnkit.analysis.capture import _find_layers, _select, _track_layers


def _keep_count(fn: str, n: int, keep_ratio: float) -> int:
    if not 0.0 <= keep_ratio <= 1.0:
        raise ValueError(f"{fn}: keep_ratio must be in [0, 1], got {keep_ratio}")
    return int(n * keep_ratio)


def _topk_sorted(score: torch.Tensor, k: int) -> torch.Tensor:
    return score.topk(k, dim=-1).indices.sort(-1).values                          # keep the original order


# ---- pruning and selection ----------------------------------------------------------------------------

def cls_prune(x: torch.Tensor, cls_attention: torch.Tensor, keep_ratio: float,
              num_prefix: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """FasterVLM: keep the patch tokens the [CLS] row attends to most (per sample, raster order kept).

    Args:
        x: ``(B, N, C)`` the patch features (prefix tokens excluded) of the layer that feeds the next stage.
        cls_attention: ``(B, H, N_prefix + N)`` the [CLS] row of that layer (``capture(keep="cls_row")``) or
            the full ``(B, H, N_prefix + N, N_prefix + N)`` map.
        keep_ratio: ``r = 1 −`` reduction; keeps ``int(N r)`` tokens.
        num_prefix: tokens before the patches ([CLS], registers): excluded from the score.

    Returns:
        ``(x_kept (B, k, C), idx (B, k))`` with ``idx`` strictly increasing patch indices.
    """
    if cls_attention.dim() == 4:
        cls_attention = cls_attention[:, :, 0]                                     # (B, H, Nk)
    if cls_attention.dim() != 3 or x.dim() != 3:
        raise ValueError(f"cls_prune: x must be (B, N, C) and cls_attention (B, H, Nk), got {tuple(x.shape)} and "
                         f"{tuple(cls_attention.shape)}")
    n = x.shape[1]
    if cls_attention.shape[-1] != num_prefix + n:
        raise ValueError(f"cls_prune: cls_attention covers {cls_attention.shape[-1]} keys, expected num_prefix "
                         f"({num_prefix}) + N ({n})")
    score = cls_attention[:, :, num_prefix:].mean(1)                              # (B, N)
    idx = _topk_sorted(score, _keep_count("cls_prune", n, keep_ratio))
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1])), idx


def fastv_prune(a: torch.Tensor, candidates: torch.Tensor | Sequence[int], keep_ratio: float = 0.5) -> torch.Tensor:
    """FastV: after layer K, rank the ``candidates`` (image tokens) by the attention they receive (mean over
    heads and query rows of layer K's map ``a (B, H, N, N)``) and drop the lowest ``1 − keep_ratio``.

    Returns:
        ``(B, N')`` sorted indices of the tokens to keep (every non-candidate token is kept).
    """
    a = _cap_probs("fastv_prune", a)
    n = a.shape[-1]
    cand = torch.as_tensor(candidates, dtype=torch.long).reshape(-1)
    score = a.mean((1, 2))[:, cand]                                                # (B, n_cand)
    keep = cand[score.topk(_keep_count("fastv_prune", cand.numel(), keep_ratio), -1).indices]  # (B, k)
    others = torch.ones(n, dtype=torch.bool)
    others[cand] = False
    rest = torch.arange(n)[others].expand(a.shape[0], -1)
    return torch.cat([rest, keep], -1).sort(-1).values


def lscene_select(a: torch.Tensor, query_rows: Sequence[int] | torch.Tensor, candidates: Sequence[int] | torch.Tensor,
                  k: int = 8) -> torch.Tensor:
    """LSceneLLM: top-``k`` candidate (coarse visual) tokens by ``mean_{h, i ∈ query_rows} a[h, i, j]``: ``(B, k)``."""
    a = _cap_probs("lscene_select", a)
    rows = torch.as_tensor(query_rows, dtype=torch.long)
    cand = torch.as_tensor(candidates, dtype=torch.long)
    if not 1 <= k <= cand.numel():
        raise ValueError(f"lscene_select: k must be in 1..{cand.numel()} (the candidates), got {k}")
    score = a[:, :, rows][..., cand].mean((1, 2))                                 # (B, n_cand)
    return cand[_topk_sorted(score, k)]


def adatoken_contribution(a: torch.Tensor, query_rows, candidates) -> torch.Tensor:
    """AdaToken-3D's contribution of each spatial token: text-row attention it receives, normalized over the
    candidates: ``(B, n_cand)`` summing to 1."""
    a = _cap_probs("adatoken_contribution", a)
    rows = torch.as_tensor(query_rows, dtype=torch.long)
    cand = torch.as_tensor(candidates, dtype=torch.long)
    c = a.mean(1)[:, rows][..., cand].sum(1)                                      # (B, n_cand)
    return c / c.sum(-1, keepdim=True).clamp_min(1e-30)


def adatoken_prune(a: torch.Tensor, query_rows, candidates, tau: float = 0.05) -> list[torch.Tensor]:
    """AdaToken-3D: drop candidates whose contribution is below ``tau``; returns, per sample, the sorted indices
    of all tokens kept (non-candidates always kept). ``tau = 0`` keeps everything."""
    c = adatoken_contribution(a, query_rows, candidates)
    cand = torch.as_tensor(candidates, dtype=torch.long)
    n = a.shape[-1]
    out = []
    for b in range(c.shape[0]):
        keep = torch.ones(n, dtype=torch.bool)
        keep[cand[c[b] < tau]] = False
        out.append(torch.arange(n)[keep])
    return out


def _cap_probs(fn: str, a: torch.Tensor) -> torch.Tensor:
    if not isinstance(a, torch.Tensor) or a.dim() != 4:
        raise ValueError(f"{fn}: expected probabilities (B, H, Nq, Nk), got "
                         f"{tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__}")
    return a


# ---- FastVGGT token merging ---------------------------------------------------------------------------

def fastvggt_destinations(x: torch.Tensor, num_frames: int, num_special: int = 5, merge_ratio: float = 0.9,
                          salient_ratio: float = 0.1) -> torch.Tensor:
    """Which tokens stay (destinations): all of frame 0, the ``num_special`` camera/register tokens of every
    frame, the ``salient_ratio`` highest-norm patch tokens, and of the rest every ``⌈1 / (1 − merge_ratio)⌉``-th
    token (regular sampling in each frame). ``x (B, F·T, C)``; returns bool ``(B, F·T)``."""
    b, n, _ = x.shape
    if num_frames < 1 or n % num_frames:
        raise ValueError(f"fastvggt_destinations: N = {n} is not num_frames ({num_frames}) frames of equal size")
    if not 0.0 <= merge_ratio < 1.0:
        raise ValueError(f"fastvggt_destinations: merge_ratio must be in [0, 1), got {merge_ratio}")
    t = n // num_frames
    pos = torch.arange(n) % t
    dst = ((torch.arange(n) < t) | (pos < num_special)).expand(b, n).clone()     # (B, N)
    patches = ~dst
    norms = x.norm(dim=-1).masked_fill(~patches, float("-inf"))
    n_sal = int(patches[0].sum().item() * salient_ratio)
    if n_sal:
        dst.scatter_(1, norms.topk(n_sal, -1).indices, True)
    stride = math.ceil(1.0 / (1.0 - merge_ratio))
    dst |= patches & ((pos - num_special) % stride == 0)
    return dst


def merge_tokens(x: torch.Tensor, dst: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge every source token into its most cosine-similar destination (the average of all merged).

    Args:
        x: ``(B, N, C)``; dst: bool ``(B, N)`` with the same count of destinations in every sample.

    Returns:
        ``(merged (B, Nd, C), assign (B, N))``: ``assign[b, i]`` is token ``i``'s destination slot.
    """
    counts = dst.sum(-1)
    if (counts != counts[0]).any() or counts[0] == 0:
        raise ValueError("merge_tokens: every sample needs the same, non-zero number of destinations")
    b, n, c = x.shape
    nd = int(counts[0])
    didx = torch.nonzero(dst)[:, 1].reshape(b, nd)                                # (B, Nd)
    xd = x.gather(1, didx[..., None].expand(-1, -1, c))                           # (B, Nd, C)
    sim = torch.nn.functional.normalize(x, dim=-1) @ torch.nn.functional.normalize(xd, dim=-1).transpose(1, 2)
    assign = sim.argmax(-1)                                                        # (B, N)
    slot = torch.full((b, n), -1, dtype=torch.long)
    slot.scatter_(1, didx, torch.arange(nd).expand(b, nd))
    assign = torch.where(dst, slot, assign)                                       # destinations map to themselves
    total = torch.zeros(b, nd, c, dtype=x.dtype).index_put_(
        (torch.arange(b)[:, None].expand(b, n), assign), x, accumulate=True)
    cnt = torch.zeros(b, nd, dtype=x.dtype).index_put_(
        (torch.arange(b)[:, None].expand(b, n), assign), torch.ones(b, n, dtype=x.dtype), accumulate=True)
    return total / cnt[..., None], assign


def unmerge_tokens(y: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
    """Copy each destination's output back to every token merged into it: ``(B, Nd, C) -> (B, N, C)``."""
    return y.gather(1, assign[..., None].expand(-1, -1, y.shape[-1]))


def merged_attention(x: torch.Tensor, attn: Callable[[torch.Tensor], torch.Tensor], dst: torch.Tensor) -> torch.Tensor:
    """FastVGGT global attention: merge, run ``attn`` on the destinations only, unmerge: ``(B, N, C) -> (B, N, C)``."""
    merged, assign = merge_tokens(x, dst)
    return unmerge_tokens(attn(merged), assign)


# ---- attention edits ----------------------------------------------------------------------------------

def zerotuning_scale(a: torch.Tensor, gamma: float | torch.Tensor, initial: int = 0) -> torch.Tensor:
    """ZeroTuning: ``a'_0 = γ a_0 / D``, ``a'_i = a_i / D``, ``D = (γ − 1) a_0 + 1`` on key ``initial``.

    ``gamma`` is a float or a per-head ``(H,)`` tensor; equal to adding ``log γ`` to that key's logit.
    """
    a = _cap_probs("zerotuning_scale", a)
    g = torch.as_tensor(gamma, dtype=a.dtype, device=a.device)
    if (g <= 0).any():
        raise ValueError(f"zerotuning_scale: gamma must be > 0, got {gamma}")
    g = g.reshape(1, -1, 1, 1) if g.dim() == 1 else g
    a0 = a[..., initial:initial + 1]
    scaled = a.clone()
    scaled[..., initial:initial + 1] = a0 * g
    return scaled / ((g - 1) * a0 + 1)


def zerotuning_bias(nk: int, gamma: float, initial: int = 0) -> torch.Tensor:
    """The additive-logit form of ZeroTuning: ``(Nk,)`` with ``log γ`` at key ``initial``, 0 elsewhere."""
    if gamma <= 0:
        raise ValueError(f"zerotuning_bias: gamma must be > 0, got {gamma}")
    b = torch.zeros(nk)
    b[initial] = math.log(gamma)
    return b


def rebalance_attention(a: torch.Tensor, local: Sequence[int] | torch.Tensor, summary: Sequence[int] | torch.Tensor,
                        alpha_local: float, alpha_summary: float, heads: Sequence[int] | None = None) -> torch.Tensor:
    """PAINT's re-balancing: add margins ``α`` to the logits of the selected visual tokens in the chosen heads,
    then renormalize (``a_j e^{α_j} / Σ a e^{α}``). ``α = 0`` leaves ``a`` unchanged."""
    a = _cap_probs("rebalance_attention", a)
    bias = torch.zeros(a.shape[-1], dtype=a.dtype, device=a.device)
    bias[torch.as_tensor(local, dtype=torch.long)] += alpha_local
    bias[torch.as_tensor(summary, dtype=torch.long)] += alpha_summary
    edited = a * bias.exp()
    edited = edited / edited.sum(-1, keepdim=True).clamp_min(1e-30)
    if heads is None:
        return edited
    sel = torch.zeros(a.shape[1], dtype=torch.bool, device=a.device)
    sel[list(heads)] = True
    return torch.where(sel[None, :, None, None], edited, a)


def reversed_attention(a: torch.Tensor, v: torch.Tensor, message: torch.Tensor | None = None,
                       head_select: torch.Tensor | None = None) -> torch.Tensor:
    """DependencyViT: each child ``i`` sends ``m_i v_i`` to its parents along ``A[i, :]``.

    Args:
        a: ``(B, H, N, N)`` forward probabilities (row = child over parents).
        v: ``(B, N, H, D)``; message: ``(B, N)`` gate ``m`` (None = 1); head_select: ``(H,)`` weights ``P``.

    Returns:
        ``(B, N, H, D)``: parent ``j`` gathers ``Σ_i A[i, j] m_i v_i``.
    """
    a = _cap_probs("reversed_attention", a)
    ar = a.transpose(-1, -2)                                                      # (B, H, N, N): [j, i] = A[i, j]
    if head_select is not None:
        ar = ar * head_select.reshape(1, -1, 1, 1)
    mv = v if message is None else v * message[:, :, None, None]
    return torch.einsum("bhji,bihd->bjhd", ar, mv)


def dependency_tree(a: torch.Tensor) -> torch.Tensor:
    """Parent of every token in the head-summed reversed attention: ``(B, H, N, N) -> (B, N)`` long.

    The parent of ``i`` is the other token ``i`` sends most to (``argmax_{j ≠ i} Σ_h A[i, j]``); the root, the
    token receiving the most in total, has parent ``-1``.
    """
    a = _cap_probs("dependency_tree", a)
    m = a.sum(1).clone()                                                          # (B, N, N)
    n = m.shape[-1]
    recv = m.sum(1)                                                               # (B, N)
    m[:, torch.arange(n), torch.arange(n)] = float("-inf")
    parent = m.argmax(-1)
    root = recv.argmax(-1)
    parent[torch.arange(m.shape[0]), root] = -1
    return parent


def gate_heads_fn(gates: torch.Tensor) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """An :func:`edit_attention` function scaling head ``h`` of layer ``l`` by ``gates[l, h]``: the same as gating
    that head's output before the output projection (``out_h = P_h V_h``)."""
    def fn(layer: int, p: torch.Tensor) -> torch.Tensor:
        return p * gates[layer].to(p.dtype)[None, :, None, None]
    return fn


_EDIT_IMPL = "attnkit_edit"
_EDITS: list[tuple[Callable, dict[str, int], dict[int, str]]] = []


def _edited_output(fn, index, q, k, v, scale, mask_rows):
    """``edit(softmax(q k^T s + mask)) v`` for heads-first ``q (B, H, Nq, D)``, ``k, v (B, Hkv, Nk, D)``."""
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale                             # (B, H, Nq, Nk)
    m = mask_rows(0, q.shape[2])
    if m is not None:
        s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.to(s.dtype)
    p = torch.nan_to_num(torch.softmax(s, -1), nan=0.0)
    p = fn(index, p)
    return torch.matmul(p.to(v.dtype), v)                                         # (B, H, Nq, Dv)


def _hf_edit_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    fn, index, names = _EDITS[-1]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    name = names.get(id(module))
    if name not in index:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, scaling=scaling,
                                               dropout=dropout, **kwargs)
    out = _edited_output(fn, index[name], query, key, value, scale,
                         lambda q0, q1: None if attention_mask is None else attention_mask[..., q0:q1, :key.shape[2]])
    return out.transpose(1, 2).contiguous(), None                                 # (B, Nq, H, Dv)


@contextlib.contextmanager
def edit_attention(model: nn.Module, fn: Callable[[int, torch.Tensor], torch.Tensor],
                   layers: int | str | Sequence[int | str] | None = None) -> Iterator[None]:
    """Run ``model`` with its attention probabilities replaced by ``fn(layer_index, probs)`` in the chosen layers.

    ``probs`` is ``(B, H, Nq, Nk)`` (the layer's mask applied); ``layer_index`` indexes
    :func:`attnkit.analysis.attention_layers`. Edited layers run the materialized path; the others are
    untouched. Supports attnkit modules calling ``ak.attention`` and transformers models.

    Example:
        >>> with edit_attention(model, lambda l, p: zerotuning_scale(p, 1.5), layers=[0, 1]):
        ...     out = model(**batch)
    """
    kind, found = _find_layers(model)
    names = [n for n, _ in found]
    index = {n: names.index(n) for n in _select(names, layers)}
    undo: list = []
    _EDITS.append((fn, index, {id(m): n for n, m in found}))
    try:
        if kind == "transformers":
            from transformers import AttentionInterface
            from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

            AttentionInterface.register(_EDIT_IMPL, _hf_edit_attention)
            ALL_MASK_ATTENTION_FUNCTIONS.register(_EDIT_IMPL, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
            previous = model.config._attn_implementation or "eager"
            model.set_attn_implementation(_EDIT_IMPL)
            undo.append(lambda: model.set_attn_implementation(previous))
        elif kind == "attnkit":
            from attnkit.ops.dense.call import make_call

            stack: list[nn.Module] = []
            ids = {id(m): n for n, m in found}
            for mod_name in {type(m).__module__ for _, m in found}:
                mod = sys.modules[mod_name]
                original = mod.attention

                def edited(q, k, v, mask=None, *, scale=None, backend=None, return_lse=False, original=original):
                    name = ids.get(id(stack[-1])) if stack else None
                    if name not in index or return_lse:
                        return original(q, k, v, mask, scale=scale, backend=backend, return_lse=return_lse)
                    call = make_call(q, k, v, mask, scale=scale)

                    def mask_rows(q0, q1):
                        if call.mask is None:
                            return None
                        return call.mask.tile(q0, q1, torch.arange(call.nk), call.nq, call.nk).to(q.device)
                    out = _edited_output(fn, index[name], q.transpose(1, 2), k.transpose(1, 2),
                                         v.transpose(1, 2), call.scale, mask_rows)
                    return out.transpose(1, 2).to(q.dtype)                      # (B, Nq, H, Dv)
                edited._attnkit_wrapped = original
                mod.attention = edited
                undo.append(lambda mod=mod, o=original: setattr(mod, "attention", o))
            undo += _track_layers(found, stack)
        else:
            raise ValueError(f"edit_attention: {type(model).__name__} is a {kind} model; edits support attnkit "
                             "modules and transformers models")
        yield
    finally:
        _EDITS.pop()
        for u in reversed(undo):
            u()
