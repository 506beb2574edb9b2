"""Naive twins for the fifth batch of sequence mechanisms: obvious loops, torch only.

* GAAM (arXiv 2401.11143) with the released code's head split over the statistics axis, and the module twin
  of ``gaussian_adaptive`` with every option;
* Spatial-Mamba's structure-aware state fusion (arXiv 2410.15091): a token-by-token selective scan and
  explicit neighbour sums;
* the layer-spec hybrids (Hydra, arXiv 2508.15099; MiniCPM-SALA, arXiv 2602.11761): each layer's own
  registered reference, applied in order.
"""

from __future__ import annotations

import torch

from attnkit.reference.naive_dense import naive_gaam

# ----------------------------------------------------------------------------------------------- GAAM


def naive_gaam_axis_split(x, offsets, widths, mix_logits=None, axis=1, normalize=False, eps=1e-8, unbiased=False,
                          combine="mixture"):
    """GAAM with heads = consecutive chunks of the statistics axis of ``x (B, N, C)`` (the released code's split).

    Chunk ``i`` holds positions ``[i * (n // h), (i + 1) * (n // h))`` of the axis, the last chunk also the
    remainder; each chunk takes its own mean and variance along the axis and its own ``offsets[i]``,
    ``widths[i]``.
    """
    h, g = offsets.shape
    dim = 1 if axis == 1 else 2
    n = x.shape[dim]
    size = n // h
    outs = []
    for i in range(h):
        start = i * size
        stop = start + size if i < h - 1 else n
        xi = x.narrow(dim, start, stop - start)
        m = stop - start
        mu = xi.mean(dim, keepdim=True)
        var = ((xi - mu) ** 2).sum(dim, keepdim=True) / (max(m - 1, 1) if unbiased else m)
        gate = 1 if combine == "product" else 0
        for j in range(g):
            z = (xi - (mu + offsets[i, j])) / torch.sqrt(var + eps)
            dens = torch.exp(-z ** 2 / (2 * widths[i, j] ** 2))
            if combine == "product":
                gate = gate * dens
            else:
                w = torch.softmax(mix_logits[i], -1)[j] if mix_logits is not None else 1.0 / g
                gate = gate + w * dens
        if normalize:
            gate = gate / gate.sum(dim, keepdim=True)
        outs.append(xi * gate)
    return torch.cat(outs, dim=dim)


def naive_gaussian_adaptive_options(m, x: torch.Tensor) -> torch.Tensor:
    """:class:`~attnkit.mechanisms.gaussian_adaptive.GaussianAdaptiveAttention` with all its options."""
    fn = naive_gaam_axis_split if m.head_split == "axis" else naive_gaam
    return fn(x, m.offsets, m.widths, m.mix_logits if m.combine == "mixture" else None, axis=m.axis,
              normalize=m.normalize, eps=m.eps, unbiased=m.unbiased, combine=m.combine)


# -------------------------------------------------------------------------------------- hybrid stacks


def naive_hybrid_stack(m, x: torch.Tensor) -> torch.Tensor:
    """:class:`~attnkit.mechanisms.seq_hybrid_spec.SalaHybrid` / ``HydraHybrid``: every layer's paths through
    their own registered naive twins (``m.block_references``) on the layer's RMS-normed input (when
    ``m.norms``), summed, plus the residual."""
    for i, (paths, refs) in enumerate(zip(m.layers, m.block_references, strict=True)):
        h = x
        if m.norms is not None:  # RMSNorm
            n = m.norms[i]
            h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + n.eps) * n.weight
        out = sum(ref(block, h) for block, ref in zip(paths, refs, strict=True))
        x = x + out if m.residual else out
    return x


# ---------------------------------------------------------------------------------- Spatial-Mamba SASF


def naive_selective_scan_states(x, dt, A, Bm):
    """States ``h (B, L, C, n)`` of ``h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t``, one token at a time;
    ``x, dt (B, L, C)``, ``A (C, n)``, ``Bm (B, L, n)``."""
    B, L, C = x.shape
    h = x.new_zeros(B, C, A.shape[1])
    out = []
    for t in range(L):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * x[:, t])[:, :, None] * Bm[:, t, None, :]
        out.append(h)
    return torch.stack(out, 1)


def naive_spatial_mamba_fusion(x, dt, A, Bm, Cm, D, weights, dilations):
    """Spatial-Mamba's SASF on ``x (B, Y, X, C)``: the 1-D scan over the raster order, then for every pixel the
    sum over dilations r and the 3x3 offsets (i, j) of ``weights[r, c, i, j] * h[clamped neighbour]``
    (replicate padding = the neighbour's coordinates clamped into the image), then ``y = C . hf + D x``."""
    B, Y, X, C = x.shape
    L = Y * X
    h = naive_selective_scan_states(x.reshape(B, L, C), dt.reshape(B, L, C), A, Bm.reshape(B, L, -1))
    h = h.reshape(B, Y, X, C, -1)
    fused = torch.zeros_like(h)
    for yy in range(Y):
        for xx in range(X):
            for r, d in enumerate(dilations):
                for i in range(3):
                    for j in range(3):
                        ny = min(max(yy + (i - 1) * d, 0), Y - 1)
                        nx = min(max(xx + (j - 1) * d, 0), X - 1)
                        fused[:, yy, xx] = fused[:, yy, xx] + weights[r, :, i, j, None] * h[:, ny, nx]
    y = (fused * Cm[:, :, :, None, :]).sum(-1)  # (B, Y, X, C)
    return y + D * x if D is not None else y


def naive_spatial_mamba_module(m, x: torch.Tensor) -> torch.Tensor:
    """:class:`~attnkit.mechanisms.vision_spatial_mamba.SpatialMambaMixer` on ``x (B, Y, X, C)``."""
    C, n = m.dim, m.state
    z = x @ m.in_proj.weight.T + m.in_proj.bias
    xs, dt, Bm, Cm = z.split([C, C, n, n], dim=-1)
    dt = torch.nn.functional.softplus(dt)
    y = naive_spatial_mamba_fusion(xs, dt, -torch.exp(m.a_log), Bm, Cm, m.D, m.fusion, m.dilations)
    return y @ m.out_proj.weight.T + m.out_proj.bias
