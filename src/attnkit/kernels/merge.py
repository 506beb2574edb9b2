"""Exact log-sum-exp merge of two partial softmax attentions over disjoint key sets."""

from __future__ import annotations

import torch


def merge_partials(oa: torch.Tensor, la: torch.Tensor, ob: torch.Tensor, lb: torch.Tensor):
    """``(oa (..., Dv), la (...))`` and ``(ob, lb)`` -> ``(out (..., Dv), lse (...))``.

    Either part may be empty (``lse = -inf``, ``o = 0``): merging with it is the identity, and two
    empty parts give ``(0, -inf)`` (the contract for a row with no allowed key).
    """
    top = torch.maximum(la, lb)
    top = top.masked_fill(torch.isneginf(top), 0.0)  # both empty: both weights 0, handled below
    wa, wb = torch.exp(la - top), torch.exp(lb - top)
    den = wa + wb  # >= 1 unless both parts are empty, so the clamp only turns 0/0 into 0
    out = (oa * wa.unsqueeze(-1) + ob * wb.unsqueeze(-1)) / den.clamp_min(torch.finfo(den.dtype).tiny).unsqueeze(-1)
    return out, top + den.log()
