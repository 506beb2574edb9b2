"""RISurConv's rotation-invariant surface properties and its neighbourhood self-attention.

"RISurConv: Rotation Invariant Surface Attention-Augmented Convolutions for 3D Point Cloud Classification and
Segmentation", arXiv 2408.06110 (ECCV 2024), Sec. 3: around each reference point ``p`` with normal ``n_p``,
its K nearest neighbours are ordered by angle in ``p``'s tangent plane; each neighbour ``x_i`` and its
ordered predecessor / successor span local triangles whose side lengths, angles and normal relations give
a 14-dim rotation-invariant surface property (RISP). The RISP is embedded and refined by self-attention
over the neighbourhood, combined with the neighbours' features, max-pooled, and refined again by
self-attention over the points. The attention is the offset-attention of Point Cloud Transformer (arXiv
2012.09688, Sec. 3.3): ``A = softmax_j(q_i . k_j)`` renormalised over the queries, ``out_j = sum_i A_ij v_i``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.reference.naive_vision_c import naive_risp_features, naive_surface_attention

NORMALIZE = ("neighbours", "points")
EPS = 1e-7  # added to lengths before dividing, as the authors' code does
ATTN_EPS = 1e-9  # added to the column sums of the renormalisation (Point Cloud Transformer's code)


# -------------------------------------------------------------------------------------- attention


@dataclass(frozen=True, eq=False)
class SurfaceAttnCall:
    """A validated ``surface_attention`` call."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    normalize: str

    def describe(self) -> str:
        return f"q {tuple(self.q.shape)}, v {tuple(self.v.shape)} {self.q.dtype}, renormalised over {self.normalize}"


def make_surface_attn_call(q, k, v, normalize="neighbours") -> SurfaceAttnCall:
    op = "surface_attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor (B, G, K, D), got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.dim() != 4 or t.numel() == 0:
            raise ValueError(f"{op}: {name} must be a non-empty (B, G, K, D), got shape {tuple(t.shape)}")
    if q.shape != k.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{op}: q and k must be (B, G, K, D) and v (B, G, K, Dv); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if normalize not in NORMALIZE:
        raise ValueError(f"{op}: normalize must be one of {NORMALIZE}, got {normalize!r}")
    return SurfaceAttnCall(q, k, v, normalize)


def _attn_matmul(c: SurfaceAttnCall) -> torch.Tensor:
    work = torch.float32 if c.q.dtype in (torch.float16, torch.bfloat16) else c.q.dtype
    a = torch.matmul(c.q.to(work), c.k.to(work).transpose(-1, -2)).softmax(-1)  # (B, G, K_i, K_j), no scale
    axis = 2 if c.normalize == "neighbours" else 1  # over the queries i, or (the code's 2-D layer) over groups
    a = a / (ATTN_EPS + a.sum(axis, keepdim=True))
    return torch.matmul(a.transpose(-1, -2), c.v.to(work)).to(c.v.dtype)  # (B, G, K_j, Dv)


SURFACE_ATTN_DISPATCHER = Dispatcher("surface_attention", [
    Backend("matmul", _attn_matmul, suits=lambda c: (True, "the fast path"),
            note="scores, softmax over keys, column renormalisation, transposed read; fp32 for half inputs"),
    Backend("reference", lambda c: naive_surface_attention(c.q, c.k, c.v, c.normalize), auto=False,
            note="naive_surface_attention: group by group"),
])
register_op("surface_attention", make_surface_attn_call, SURFACE_ATTN_DISPATCHER)


def surface_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, normalize: str = "neighbours", *,
                      backend: str | None = None) -> torch.Tensor:
    """Offset-attention's read over groups of tokens (RISurConv Sec. 3.3, from arXiv 2012.09688 Sec. 3.3).

    ``A = softmax_j(q_i . k_j)`` (no scale), ``A_ij /= 1e-9 + sum_i A_ij``, ``out_j = sum_i A_ij v_i``.

    Args:
        q, k: ``(B, G, K, D)`` (G groups, e.g. neighbourhoods, of K tokens); v: ``(B, G, K, Dv)``.
        normalize: ``"neighbours"`` (the column sum over the group's queries, Point Cloud Transformer) or
            ``"points"`` (over the G groups at the same positions, what the authors' 2-D layer computes).
        backend: None / ``"matmul"`` or ``"reference"``.

    Returns:
        ``(B, G, K, Dv)``; the offset-attention layer then adds ``relu(BN(W (x - out)))`` to ``x``.
    """
    return SURFACE_ATTN_DISPATCHER.run(make_surface_attn_call(q, k, v, normalize), backend)


# -------------------------------------------------------------------------------------------- RISP


@dataclass(frozen=True, eq=False)
class RispCall:
    """A validated ``risp_features`` call."""

    points: torch.Tensor
    normals: torch.Tensor
    k: int
    shift: int

    def describe(self) -> str:
        return f"points {tuple(self.points.shape)} {self.points.dtype}, k={self.k}, shift={self.shift}"


def make_risp_call(points, normals, k=16, shift=1) -> RispCall:
    op = "risp_features"
    for name, t in (("points", points), ("normals", normals)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor (B, N, 3), got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.dim() != 3 or t.shape[-1] != 3 or t.numel() == 0:
            raise ValueError(f"{op}: {name} must be a non-empty (B, N, 3), got shape {tuple(t.shape)}")
    if points.shape != normals.shape:
        raise ValueError(f"{op}: normals must match points {tuple(points.shape)}, got {tuple(normals.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or not 3 <= k <= points.shape[1] - 1:
        raise ValueError(f"{op}: k must be an int in [3, N - 1] (the neighbours exclude the point itself; the "
                         f"triangles need 3), got k={k!r} for N={points.shape[1]}")
    if isinstance(shift, bool) or not isinstance(shift, int) or not 1 <= shift < k:
        raise ValueError(f"{op}: shift must be an int in [1, k), got {shift!r}")
    return RispCall(points, normals, k, shift)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / (torch.linalg.vector_norm(v, dim=-1, keepdim=True) + EPS)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1)


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    B, N, K = idx.shape
    return torch.gather(t, 1, idx.reshape(B, N * K, 1).expand(-1, -1, t.shape[-1])).view(B, N, K, -1)  # (B,N,K,C)


def ordered_neighbours(points: torch.Tensor, normals: torch.Tensor, k: int) -> torch.Tensor:
    """The K nearest other points of every point, ordered by angle in its tangent plane: ``(B, N, K)`` indices.

    From the longest tangent projection, first the neighbours on the positive side of ``n_p`` (by decreasing
    cosine), then the others; discrete, rotation invariant, no gradient."""
    with torch.no_grad():
        N = points.shape[1]
        d = torch.cdist(points, points)  # (B, N, N)
        d = d + torch.diag(torch.full((N,), torch.inf, dtype=d.dtype, device=d.device))  # not the point itself
        idx = d.topk(k, -1, largest=False).indices  # (B, N, K)
        local = _gather(points, idx) - points[:, :, None]  # (B, N, K, 3)
        n = normals[:, :, None]
        proj = local - _dot(local, n)[..., None] * n  # onto the tangent plane
        length = torch.linalg.vector_norm(proj, dim=-1)  # (B, N, K)
        u = proj / (length[..., None] + EPS)
        longest = length.argmax(-1, keepdim=True)  # (B, N, 1)
        ref = torch.gather(u, 2, longest[..., None].expand(-1, -1, 1, 3))  # (B, N, 1, 3)
        cos = _dot(u, ref)
        sign = torch.sign(_dot(torch.cross(u, ref.expand_as(u), dim=-1), n))
        # the reference itself counts as the positive side (its cross product is rounding noise of either sign)
        sign = sign.scatter(2, longest, 1.0)
        key = torch.where(sign > 0, cos, -cos - 2)  # (B, N, K): one half-plane in [-1, 1], the other in [-3, -1]
        return torch.gather(idx, 2, key.argsort(-1, descending=True))


def _risp(c: RispCall) -> tuple[torch.Tensor, torch.Tensor]:
    work = torch.float32 if c.points.dtype in (torch.float16, torch.bfloat16) else c.points.dtype
    pts, nrm = c.points.to(work), _unit_normals(c.normals.to(work))
    idx = ordered_neighbours(pts, nrm, c.k)
    xi = _gather(pts, idx) - pts[:, :, None]  # (B, N, K, 3): p at the origin
    ni = _gather(nrm, idx)
    x3, n3 = xi.roll(c.shift, 2), ni.roll(c.shift, 2)  # the ordered predecessor
    x4, n4 = xi.roll(-c.shift, 2), ni.roll(-c.shift, 2)  # the ordered successor
    n_p = nrm[:, :, None].expand_as(xi)
    u_pi, u_p3, u_p4 = _unit(xi), _unit(x3), _unit(x4)  # p -> x_i, p -> x_{i-1}, p -> x_{i+1}
    u_3i, u_i4 = _unit(xi - x3), _unit(x4 - xi)
    feats = [
        torch.linalg.vector_norm(xi, dim=-1),  # |p x_i|
        _dot(u_pi, n_p), -_dot(u_pi, ni),  # angles of p x_i with both normals
        _dot(u_pi, u_p3),  # angle at p of the triangle (p, x_i, x_{i-1})
        _dot(u_p3, n_p), -_dot(u_p3, n3),  # angles of p x_{i-1} with both normals
        _dot(u_p3, -u_3i),  # angle at x_{i-1}
        -_dot(u_3i, ni), _dot(u_3i, n3),  # angles of x_{i-1} x_i with both normals
        _dot(u_p4, u_pi),  # angle at p of the triangle (p, x_i, x_{i+1})
        _dot(u_p4, u_i4),  # angle between p x_{i+1} and x_i x_{i+1}
        _dot(u_i4, n4), _dot(u_pi, n4),  # x_{i+1}'s normal against x_i x_{i+1} and p x_i
        _dot(torch.cross(u_p4, u_pi, dim=-1), torch.cross(u_p3, u_pi, dim=-1)),  # the two triangles' normals
    ]
    return torch.stack(feats, -1).to(c.points.dtype), idx  # (B, N, K, 14)


def _unit_normals(n: torch.Tensor) -> torch.Tensor:
    return n / torch.linalg.vector_norm(n, dim=-1, keepdim=True).clamp_min(1e-12)


RISP_DISPATCHER = Dispatcher("risp_features", [
    Backend("torch", _risp, suits=lambda c: (True, "the fast path"),
            note="cdist + top-k neighbours, tangent-plane ordering, 14 dot products per neighbour (fp32 for half)"),
    Backend("reference", lambda c: naive_risp_features(c.points, c.normals, c.k, c.shift), auto=False,
            note="naive_risp_features: point by point"),
])
register_op("risp_features", lambda points, normals, k=16, shift=1, *_: make_risp_call(points, normals, k, shift),
            RISP_DISPATCHER)


def risp_features(points: torch.Tensor, normals: torch.Tensor, k: int = 16, shift: int = 1, *,
                  backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RISurConv's 14 rotation-invariant surface properties of every point's neighbourhood (arXiv 2408.06110).

    Every point is a reference point ``p``; its ``k`` nearest other points, ordered by angle around ``n_p``,
    with ordered predecessor ``x_{i-shift}`` and successor ``x_{i+shift}``, give per neighbour: the length
    ``|p x_i|`` and cosines of the triangles ``(p, x_i, x_{i-1})`` and ``(p, x_i, x_{i+1})`` among their
    sides and the normals (the list in the source), all invariant to rotations of points and normals together.

    Args:
        points: ``(B, N, 3)``. normals: ``(B, N, 3)`` (normalised here). k: neighbours (3 <= k < N).
        shift: the ordered offset of the adjacent neighbour (the authors use 2 from N >= 1024 on).
        backend: None / ``"torch"`` or ``"reference"``.

    Returns:
        ``(features (B, N, K, 14), idx (B, N, K))``: the ordered neighbour indices (no gradient).
    """
    return RISP_DISPATCHER.run(make_risp_call(points, normals, k, shift), backend)
