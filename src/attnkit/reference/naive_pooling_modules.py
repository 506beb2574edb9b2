"""Naive twins of the registered pooling modules: ``reference(module, *inputs)`` for the registry.

Pooling modules map their input to an output without a position per input token (a fixed-length
vector, K slots, a few pooled tokens, a similarity matrix). Each twin recomputes the module's forward
from its own parameters with plain tensor code and the naive op twins; none calls an ``attnkit.ops``
function. Imports only torch and ``attnkit.reference``.
"""

from __future__ import annotations

import torch

from attnkit.reference.naive_cross import naive_filip_similarity, naive_zero_param_pool
from attnkit.reference.naive_sampling import naive_slot_module, naive_spatial_pyramid_pool


def naive_spp_module(module, x):
    """``SpatialPyramidPooling``: ``x (B, C, H, W)`` -> ``(B, C * sum(n^2))`` (no parameters)."""
    return naive_spatial_pyramid_pool(x, module.levels, module.mode)


def naive_slot_attention_module(module, x):
    """``SlotAttention`` from its own initial slots: ``x (B, N, C)`` -> ``(B, K, C)``.

    The initial slots are the learned ones (``init="learned"``) or the shared mean (``init="gaussian"`` in
    eval); the gaussian draw of training is random, so it has no twin and is refused."""
    if module.init == "gaussian" and module.training:
        raise ValueError("naive_slot_attention_module: init='gaussian' draws random slots in training; "
                         "call module.eval() or use init='learned'")
    slots = module.slots_mu.to(x.dtype).expand(x.shape[0], module.num_slots, module.dim)  # (B, K, C)
    return naive_slot_module(module, x, slots)


def _proj(layer, x):
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.to(work) @ layer.weight.to(work).t()  # FILIP's projections have no bias


def naive_filip_module(module, x, context=None, context_mask=None):
    """``FILIPLateInteraction``: image tokens ``x (BI, n1, Ci)``, text tokens ``context (BT, n2, Ct)`` (None: ``x``
    itself) -> ``(2, BI, BT)``: ``s_i2t`` then ``s_t2i`` (arXiv 2111.07783, Eq. 4-5), in ``x``'s dtype."""
    ctx = x if context is None else context
    s_i2t, s_t2i = naive_filip_similarity(_proj(module.image_proj, x), _proj(module.text_proj, ctx), None,
                                          context_mask)
    return torch.stack([s_i2t, s_t2i]).to(x.dtype)


def naive_greenplm_module(module, x):
    """``ZeroParamPooling``: ``x (B, N, C)`` -> ``(B, cls + len(queries), C)`` (no parameters)."""
    return naive_zero_param_pool(x, module.queries, None, module.cls)
