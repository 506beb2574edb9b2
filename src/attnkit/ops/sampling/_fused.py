"""Deformable attention on ``F.grid_sample`` without the formulation's extra copies.

The Deformable DETR PyTorch form samples every level with ``grid_sample``, stacks the levels, multiplies by the
attention weights and sums; autograd then keeps the stacked samples and the product. This Function keeps one
``(B H, D, Nq, P)`` sample per level (what ``grid_sample`` itself returns, needed for the weights' gradient),
never stacks them, and calls ``grid_sample``'s own backward with ``grad (x) weights`` per level.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _levels(value: torch.Tensor, shapes) -> list[torch.Tensor]:
    B, S, H, D = value.shape
    maps = value.permute(0, 2, 3, 1).reshape(B * H, D, S)  # (B H, D, S): channels-first per head
    out, start = [], 0
    for Hl, Wl in shapes:
        out.append(maps[:, :, start:start + Hl * Wl].view(B * H, D, Hl, Wl))  # (B H, D, H_l, W_l)
        start += Hl * Wl
    return out


class _FusedDeformable(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, locations, weights, shapes):
        B, _, H, D = value.shape
        _, Nq, _, L, P, _ = locations.shape
        grids = (2 * locations - 1).transpose(1, 2).reshape(B * H, Nq, L, P, 2)  # (B H, Nq, L, P, 2)
        a = weights.transpose(1, 2).reshape(B * H, Nq, L, P)  # (B H, Nq, L, P)
        maps = _levels(value, shapes)
        out, samples = None, []
        for lvl, v in enumerate(maps):
            s = F.grid_sample(v, grids[:, :, lvl], mode="bilinear", padding_mode="zeros",
                              align_corners=False)  # (B H, D, Nq, P)
            o = (s * a[:, None, :, lvl]).sum(-1)  # (B H, D, Nq)
            out = o if out is None else out.add_(o)
            samples.append(s)
        ctx.shapes = shapes
        ctx.save_for_backward(value, grids, a, *samples)
        return out.view(B, H, D, Nq).permute(0, 3, 1, 2)  # (B, Nq, H, D)

    @staticmethod
    def backward(ctx, grad):
        value, grids, a, *samples = ctx.saved_tensors
        B, S, H, D = value.shape
        Nq, L, P = a.shape[1:]
        g = grad.permute(0, 2, 3, 1).reshape(B * H, D, Nq)  # (B H, D, Nq)
        need_v, need_loc, need_a = ctx.needs_input_grad[:3]
        maps = _levels(value, ctx.shapes)
        d_maps, d_grid, d_a = [], [], []
        for lvl, (v, s) in enumerate(zip(maps, samples)):
            if need_a:
                d_a.append(torch.einsum("bdqp,bdq->bqp", s, g))  # (B H, Nq, P)
            if need_v or need_loc:
                gs = g[..., None] * a[:, None, :, lvl]  # (B H, D, Nq, P): grid_sample's own grad input
                dv, dg = torch.ops.aten.grid_sampler_2d_backward(gs, v, grids[:, :, lvl], 0, 0, False,
                                                                 [need_v, need_loc])
                d_maps.append(dv)
                d_grid.append(dg)
        d_value = d_loc = d_weights = None
        if need_v:
            dm = torch.cat([d.flatten(2) for d in d_maps], 2)  # (B H, D, S)
            d_value = dm.view(B, H, D, S).permute(0, 3, 1, 2)  # (B, S, H, D)
        if need_loc:
            dgr = torch.stack(d_grid, 2)  # (B H, Nq, L, P, 2)
            d_loc = 2 * dgr.view(B, H, Nq, L, P, 2).transpose(1, 2)  # d(2 loc - 1) / d loc = 2
        if need_a:
            d_weights = torch.stack(d_a, 2).view(B, H, Nq, L, P).transpose(1, 2)
        return d_value, d_loc, d_weights, None


def fused_deformable(value: torch.Tensor, locations: torch.Tensor, weights: torch.Tensor, shapes) -> torch.Tensor:
    """``value (B, S, H, D)``, ``locations (B, Nq, H, L, P, 2)``, ``weights (B, Nq, H, L, P)`` (one dtype) ->
    ``(B, Nq, H, D)``."""
    return _FusedDeformable.apply(value, locations, weights, tuple(shapes))
