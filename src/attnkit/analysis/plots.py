"""Pictures of attention maps (matplotlib, Agg backend, PNG files).

* :func:`plot_heads`: one heatmap per head of one layer's ``(H, Nq, Nk)`` map, token labels on the axes;
* :func:`plot_layers`: the head-mean map of every layer side by side;
* :func:`plot_rollout`: a rollout row over an image's patch grid (or over the tokens of a sentence);
* :func:`plot_sinks`: bar charts of the attention each token receives, per layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _labels(ax, tokens: Sequence[str] | None, n_rows: int, n_cols: int, small: int = 40) -> None:
    if tokens is None:
        return
    if n_cols == len(tokens) and n_cols <= small:
        ax.set_xticks(range(n_cols), tokens, rotation=90, fontsize=6)
    if n_rows == len(tokens) and n_rows <= small:
        ax.set_yticks(range(n_rows), tokens, fontsize=6)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return path


def plot_heads(a: torch.Tensor, path: str | Path, tokens: Sequence[str] | None = None, title: str = "",
               heads: Sequence[int] | None = None) -> Path:
    """One heatmap per head: ``a (H, Nq, Nk)`` (or ``(1, H, Nq, Nk)``) -> PNG at ``path``."""
    if a.dim() == 4:
        a = a[0]
    if a.dim() != 3:
        raise ValueError(f"plot_heads: a must be (H, Nq, Nk) or (1, H, Nq, Nk), got {tuple(a.shape)}")
    heads = list(range(a.shape[0])) if heads is None else list(heads)
    cols = min(4, len(heads))
    rows = math.ceil(len(heads) / cols)
    plt = _plt()
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(heads):]:
        ax.axis("off")
    vmax = float(a[heads].max())                                                 # one colour scale for all heads
    im = None
    for i, (ax, h) in enumerate(zip(axes.flat, heads, strict=False)):
        im = ax.imshow(a[h].detach().float().cpu().numpy(), cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto")
        ax.set_title(f"head {h}", fontsize=8)
        _labels(ax, tokens, a.shape[1] if i % cols == 0 else -1, a.shape[2])
        if i % cols:
            ax.set_yticks([])
    fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.02, pad=0.02)
    fig.suptitle(title or "attention probabilities per head (row = query, column = key)", fontsize=9)
    return _save(fig, path)


def plot_layers(maps: Sequence[torch.Tensor], path: str | Path, tokens: Sequence[str] | None = None,
                title: str = "") -> Path:
    """The head-mean map of every layer: ``maps[l] (1, H, N, N)`` -> one PNG."""
    n = len(maps)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    plt = _plt()
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for i, (ax, a) in enumerate(zip(axes.flat, maps, strict=False)):
        m = a[0].mean(0).detach().float().cpu().numpy()
        im = ax.imshow(m, cmap="viridis", vmin=0.0, aspect="auto")
        ax.set_title(f"layer {i} (mean over heads)", fontsize=8)
        _labels(ax, tokens, m.shape[0], m.shape[1])
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title or "attention per layer", fontsize=9)
    return _save(fig, path)


def plot_rollout(r: torch.Tensor, path: str | Path, grid: tuple[int, int] | None = None,
                 tokens: Sequence[str] | None = None, image: torch.Tensor | None = None, title: str = "") -> Path:
    """A rollout row (e.g. ``rollout(maps)[0, 0, 1:]``, the [CLS] row over the patches).

    ``grid=(rows, cols)`` draws it over the patch grid (on top of ``image (3, H, W)`` in ``[0, 1]`` when given);
    without a grid it is drawn as bars over ``tokens``.
    """
    r = r.detach().double().cpu().reshape(-1)
    plt = _plt()
    if grid is not None:
        if grid[0] * grid[1] != r.numel():
            raise ValueError(f"plot_rollout: grid {grid} does not hold {r.numel()} values")
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        heat = r.reshape(grid).numpy()
        if image is not None:
            img = image.detach().float().cpu().permute(1, 2, 0).clamp(0, 1).numpy()
            ax.imshow(img)
            ax.imshow(heat, cmap="jet", alpha=0.5, extent=(0, img.shape[1], img.shape[0], 0),
                      interpolation="bilinear")
        else:
            im = ax.imshow(heat, cmap="viridis")
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        ax.set_title(title or "attention rollout over the patch grid", fontsize=9)
        ax.axis("off")
    else:
        fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * r.numel()), 3.2))
        ax.bar(range(r.numel()), r.numpy(), color="tab:blue")
        if tokens is not None and len(tokens) == r.numel():
            ax.set_xticks(range(r.numel()), tokens, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("share")
        ax.set_title(title or "attention rollout", fontsize=9)
    return _save(fig, path)


def plot_sinks(scores: torch.Tensor, path: str | Path, tokens: Sequence[str] | None = None, title: str = "") -> Path:
    """Bar charts of the attention each key receives: ``scores (L, Nk)`` (e.g. ``sink_scores`` averaged over
    heads per layer), one panel per layer, uniform ``1 / Nk`` as a dashed line."""
    if scores.dim() == 1:
        scores = scores[None]
    if scores.dim() != 2:
        raise ValueError(f"plot_sinks: scores must be (L, Nk) or (Nk,), got {tuple(scores.shape)}")
    s = scores.detach().double().cpu()
    nl, nk = s.shape
    plt = _plt()
    fig, axes = plt.subplots(nl, 1, figsize=(max(4.0, 0.35 * nk), 1.6 * nl + 0.6), sharex=True, squeeze=False)
    for i, ax in enumerate(axes[:, 0]):
        ax.bar(range(nk), s[i].numpy(), color="tab:red")
        ax.axhline(1.0 / nk, color="k", ls="--", lw=0.8)
        ax.set_ylabel(f"layer {i}", fontsize=7)
        ax.tick_params(labelsize=6)
    if tokens is not None and len(tokens) == nk:
        axes[-1, 0].set_xticks(range(nk), tokens, rotation=60, ha="right", fontsize=7)
    fig.suptitle(title or "attention received per token (mean over heads and queries); dashed: uniform", fontsize=9)
    return _save(fig, path)
