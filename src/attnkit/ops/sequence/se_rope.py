"""ST-LINK: Spatially-Aware Large Language Models for Spatio-Temporal Forecasting (arXiv 2509.13753) — SE-attention.

Spatially-enhanced attention keeps the LLM's rotary embedding over time and adds a rotation by each token's
spatial coordinates (graph-node coordinates, e.g. Laplacian eigenvectors of the road graph, or grid positions),
so that the score of two tokens depends on their time offset and their coordinate difference only. The head
dimension is split: the first ``D - spatial_dim`` channels turn with the time position (RoPE), the last
``spatial_dim`` channels turn with the coordinates (pair ``f`` on axis ``f % S``, frequency
``spatial_base^(-(f // S) / ceil(Ps / S))``). Angles are linear in the positions, so shifting every time position
or every coordinate by the same amount leaves the scores unchanged.

Backends of ``se_attention``: ``rotary`` (rotate q and k, then ``ak.attention``) and ``reference``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from attnkit._validate import check_qkv, resolve_scale
from attnkit.masks import causal as causal_mask
from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.ops.dense.call import attention
from attnkit.reference.naive_sequence3 import naive_se_attention


def se_angles(time_pos: torch.Tensor, coords: torch.Tensor, head_dim: int, spatial_dim: int, *,
              time_base: float = 10000.0, spatial_base: float = 100.0, dtype: torch.dtype = torch.float32
              ) -> torch.Tensor:
    """The rotation angle of every (token, channel pair): ``(B or 1, N, head_dim // 2)``.

    ``time_pos (N,)`` or ``(B, N)``; ``coords (N, S)`` or ``(B, N, S)``.
    """
    pt, ps = (head_dim - spatial_dim) // 2, spatial_dim // 2
    t = time_pos.to(dtype)
    t = t.unsqueeze(0) if t.dim() == 1 else t  # (B, N)
    c = coords.to(dtype)
    c = c.unsqueeze(0) if c.dim() == 2 else c  # (B, N, S)
    S = c.shape[-1]
    parts = []
    if pt:
        f = torch.arange(pt, dtype=dtype, device=t.device)
        parts.append(t.unsqueeze(-1) * time_base ** (-f / pt))  # (B, N, Pt)
    if ps:
        g = torch.arange(ps, device=c.device)
        freq = spatial_base ** (-(g // S).to(dtype) / math.ceil(ps / S))  # (Ps,)
        parts.append(c[..., g % S] * freq)  # (B, N, Ps): pair g reads axis g % S
    if len(parts) == 2 and parts[0].shape[0] != parts[1].shape[0]:
        b = max(parts[0].shape[0], parts[1].shape[0])
        parts = [p.expand(b, *p.shape[1:]) for p in parts]
    return torch.cat(parts, -1)


def se_rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Turn the channel pairs ``(x[2f], x[2f+1])`` of ``x (B, N, H, D)`` by ``angles (B or 1, N, D // 2)``."""
    B, N, H, D = x.shape
    cos, sin = angles.cos().unsqueeze(2).to(x.dtype), angles.sin().unsqueeze(2).to(x.dtype)  # (B, N, 1, D/2)
    x0, x1 = x.view(B, N, H, D // 2, 2).unbind(-1)  # (B, N, H, D/2) each
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1).view(B, N, H, D)


@dataclass(frozen=True, eq=False)
class SECall:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    time_pos: torch.Tensor
    coords: torch.Tensor
    spatial_dim: int
    causal: bool
    time_base: float
    spatial_base: float
    scale: float

    def describe(self) -> str:
        return (f"q {tuple(self.q.shape)} {self.q.dtype}, spatial_dim {self.spatial_dim}, "
                f"{self.coords.shape[-1]}-d coords, causal {self.causal}")


def make_call(q, k, v, time_pos, coords, *, spatial_dim, causal=False, time_base=10000.0, spatial_base=100.0,
              scale=None) -> SECall:
    fn = "se_attention"
    try:
        check_qkv(q, k, v, same_extent=True)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{fn}: {e}") from None
    B, N, _, D = q.shape
    if isinstance(spatial_dim, bool) or not isinstance(spatial_dim, int) or spatial_dim < 0 or spatial_dim % 2 \
            or spatial_dim > D or D % 2:
        raise ValueError(f"{fn}: spatial_dim must be an even int in [0, D={D}] (D even), got {spatial_dim!r}")
    if not isinstance(time_pos, torch.Tensor) or time_pos.shape not in ((N,), (B, N)) or time_pos.dtype == torch.bool:
        raise ValueError(f"{fn}: time_pos must be a numeric (N,) or (B, N) tensor with N={N}, "
                         f"got {getattr(time_pos, 'shape', type(time_pos).__name__)}")
    if not isinstance(coords, torch.Tensor) or coords.dim() not in (2, 3) or coords.shape[-2] != N \
            or (coords.dim() == 3 and coords.shape[0] != B) or coords.shape[-1] < 1 or coords.dtype == torch.bool:
        raise ValueError(f"{fn}: coords must be a numeric (N, S) or (B, N, S) tensor with N={N}, "
                         f"got {getattr(coords, 'shape', type(coords).__name__)}")
    if not isinstance(causal, bool):
        raise TypeError(f"{fn}: causal must be a bool, got {type(causal).__name__}")
    for name, b in (("time_base", time_base), ("spatial_base", spatial_base)):
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not b > 0:
            raise ValueError(f"{fn}: {name} must be a positive number, got {b!r}")
    return SECall(q, k, v, time_pos, coords, spatial_dim, causal, float(time_base), float(spatial_base),
                  resolve_scale(scale, D))


def _rotary(c: SECall) -> torch.Tensor:
    # angles in float32 at least: positions of a few thousand steps lose their phase in half precision
    work = torch.promote_types(c.q.dtype, torch.float32)
    ang = se_angles(c.time_pos.to(c.q.device), c.coords.to(c.q.device), c.q.shape[-1], c.spatial_dim,
                    time_base=c.time_base, spatial_base=c.spatial_base, dtype=work)
    q, k = se_rotate(c.q, ang), se_rotate(c.k, ang)
    return attention(q, k, c.v, causal_mask() if c.causal else None, scale=c.scale)


def _reference(c: SECall) -> torch.Tensor:
    return naive_se_attention(c.q, c.k, c.v, c.time_pos, c.coords, spatial_dim=c.spatial_dim, causal=c.causal,
                              time_base=c.time_base, spatial_base=c.spatial_base, scale=c.scale)


DISPATCHER = Dispatcher("se_attention", [
    Backend("rotary", _rotary, note="rotate q and k by time and coordinate angles, then ak.attention"),
    Backend("reference", _reference, auto=False, note="naive_se_attention (explicit 2x2 rotations)"),
])
register_op("se_attention", make_call, DISPATCHER)


def se_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, time_pos: torch.Tensor, coords: torch.Tensor,
                 *, spatial_dim: int, causal: bool = False, time_base: float = 10000.0, spatial_base: float = 100.0,
                 scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """Softmax attention with rotary embeddings over time and over spatial coordinates.

    Args:
        q, k: ``(B, N, H, D)``; v: ``(B, N, H, Dv)``.
        time_pos: ``(N,)`` or ``(B, N)`` time step of each token.
        coords: ``(N, S)`` or ``(B, N, S)`` spatial coordinates of each token's node.
        spatial_dim: channels (even, ``<= D``) turned by the coordinates; the other ``D - spatial_dim`` by time.
        causal: token order causal mask. time_base / spatial_base: the RoPE bases.
        scale: default ``D ** -0.5``. backend: None, ``"rotary"`` or ``"reference"``.

    Returns:
        ``(B, N, H, Dv)``.

    Example:
        >>> n = torch.arange(N)
        >>> o = se_attention(q, k, v, n // V, laplacian_coords(adj, 2)[n % V], spatial_dim=32, causal=True)
    """
    return DISPATCHER.run(make_call(q, k, v, time_pos, coords, spatial_dim=spatial_dim, causal=causal,
                                    time_base=time_base, spatial_base=spatial_base, scale=scale), backend)


def laplacian_coords(adjacency: torch.Tensor, dims: int) -> torch.Tensor:
    """Spectral node coordinates of a graph: the ``dims`` eigenvectors of the symmetric normalised Laplacian after
    the first (smallest eigenvalues), ``(V, dims)``. Eigenvector signs are arbitrary: compute a graph's
    coordinates once and keep them (a sign flip mirrors that axis)."""
    if not isinstance(adjacency, torch.Tensor) or adjacency.dim() != 2 or adjacency.shape[0] != adjacency.shape[1]:
        raise ValueError(f"laplacian_coords: adjacency must be a square (V, V) tensor, "
                         f"got {getattr(adjacency, 'shape', type(adjacency).__name__)}")
    V = adjacency.shape[0]
    if isinstance(dims, bool) or not isinstance(dims, int) or not 1 <= dims < V:
        raise ValueError(f"laplacian_coords: dims must be an int in [1, V-1] = [1, {V - 1}], got {dims!r}")
    a = adjacency.to(torch.float64)
    a = (a + a.T) / 2
    deg = a.sum(1).clamp_min(1e-12)
    d = deg.rsqrt()
    lap = torch.eye(V, dtype=a.dtype) - d[:, None] * a * d[None, :]
    _, vecs = torch.linalg.eigh(lap)  # ascending eigenvalues
    return vecs[:, 1:dims + 1].to(adjacency.dtype if adjacency.is_floating_point() else torch.float32)


def grid_coords(num_nodes: int, dims: int = 2) -> torch.Tensor:
    """Nodes laid out row-major on a near-square grid (``dims`` 1 or 2): ``(num_nodes, dims)`` float32."""
    n = torch.arange(num_nodes)
    if dims == 1:
        return n.float().unsqueeze(-1)
    w = math.ceil(math.sqrt(num_nodes))
    base = torch.stack([n // w, n % w], -1).float()  # (V, 2)
    return torch.cat([base, torch.zeros(num_nodes, dims - 2)], -1) if dims > 2 else base


__all__ = ["grid_coords", "laplacian_coords", "se_angles", "se_attention", "se_rotate"]
