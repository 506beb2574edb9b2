"""Pictures of masks: text for terminals, matplotlib for reports."""

from __future__ import annotations

from typing import Any

from attnkit.masks.base import EMPTY, FULL


def show(mask: Any, n: int = 32, nk: int | None = None, *, max_cells: int = 64) -> str:
    """A text picture of ``mask`` over ``n`` queries and ``nk`` keys (default ``n``).

    Up to ``max_cells`` per side each cell is one pair (``█`` attend, ``·`` not); larger sizes
    draw tiles: ``█`` full, ``▒`` partial, ``·`` empty. The first line names the mask and its density.
    """
    from attnkit.masks import as_mask

    mask = as_mask(mask)
    nk = n if nk is None else nk
    head = f"{mask.name}  Nq={n} Nk={nk}  density={mask.density(n, nk):.4f}"
    if n <= max_cells and nk <= max_cells:
        dense = mask.to_dense(n, nk)
        if dense.dim() > 2:
            dense = dense.flatten(0, -3).any(0)
        rows = ["".join("█" if x else "·" for x in row) for row in dense.tolist()]
        return "\n".join([head, *rows])
    bq, bk = -(-n // max_cells), -(-nk // max_cells)
    cls = mask.blocks(n, nk, bq, bk)
    chars = {EMPTY: "·", FULL: "█"}
    rows = ["".join(chars.get(c, "▒") for c in row) for row in cls.tolist()]
    return "\n".join([f"{head}  (tiles of {bq}x{bk}: █ full, ▒ partial, · empty)", *rows])


def plot(mask: Any, n: int = 256, nk: int | None = None, ax: Any = None) -> Any:
    """Draw ``mask`` with matplotlib (tile classes above 512 per side); returns the axes."""
    import matplotlib.pyplot as plt

    from attnkit.masks import as_mask

    mask = as_mask(mask)
    nk = n if nk is None else nk
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    if n <= 512 and nk <= 512:
        img = mask.to_dense(n, nk)
        img = img.flatten(0, -3).float().mean(0) if img.dim() > 2 else img.float()
    else:
        img = mask.blocks(n, nk, -(-n // 512), -(-nk // 512)).float() / FULL
    ax.imshow(img.numpy(), cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(f"{mask.name}\ndensity {mask.density(n, nk):.3f}", fontsize=8)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    return ax


