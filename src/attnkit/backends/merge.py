"""Exact log-sum-exp merge of two partial softmax attentions over disjoint key sets."""

from __future__ import annotations

import torch


def merge_partials(oa: torch.Tensor, la: torch.Tensor, ob: torch.Tensor, lb: torch.Tensor):
    """``(oa (..., Dv), la (...))`` and ``(ob, lb)`` -> ``(out (..., Dv), lse (...))``.

    ``la`` must be finite (a part every query has a key in); ``lb`` may be ``-inf`` (empty part).
    """
    top = torch.maximum(la, lb)
    wa, wb = torch.exp(la - top), torch.exp(lb - top)
    den = wa + wb
    return (oa * wa.unsqueeze(-1) + ob * wb.unsqueeze(-1)) / den.unsqueeze(-1), top + den.log()
