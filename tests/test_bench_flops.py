"""FLOP accounting (LongCA-bench: 4 * area * H * D forward, 3.5x for fwd+bwd) against hand counts."""

from __future__ import annotations

import pytest
import torch

import attnkit as ak
from attnkit.bench.flops import (
    attention_flops,
    causal_area,
    document_area,
    mask_area,
    pass_flops,
    sliding_window_area,
)


def brute(mask, n):
    return int(mask.to_dense(n, n).sum()) if mask is not None else n * n


@pytest.mark.parametrize(("mask", "n", "hand"), [
    (None, 8, 64),                                                  # dense: N^2
    (ak.masks.causal(), 8, 36),                                     # 8 * 9 / 2
    (ak.masks.sliding_window(2), 8, 3 + 4 + 5 * 4 + 4 + 3),         # |i - j| <= 2
    (ak.masks.causal() & ak.masks.sliding_window(2), 8, 1 + 2 + 3 * 6),  # 0 <= i - j <= 2
    (ak.masks.document([3, 5]), 8, 9 + 25),                         # block diagonal
    (ak.masks.causal() & ak.masks.document([3, 5]), 8, 6 + 15),     # causal inside each document
])
def test_mask_area_matches_hand_count(mask, n, hand):
    assert mask_area(mask, n, n) == hand == brute(mask, n)


def test_closed_forms_agree_with_the_masks_at_scale():
    n = 16384
    assert mask_area(ak.masks.causal(), n, n) == causal_area(n) == n * (n + 1) // 2
    assert mask_area(ak.masks.sliding_window(512), n, n) == sliding_window_area(n, 512)
    assert mask_area(ak.masks.sliding_window(512, 0), n, n) == sliding_window_area(n, 512, 0)
    lengths = [4000, 100, 8000, 284, 4000]
    assert mask_area(ak.masks.document(lengths), n, n) == document_area(lengths)
    assert mask_area(ak.masks.causal() & ak.masks.document(lengths), n, n) == document_area(lengths, causal=True)
    for w, nn in ((0, 7), (3, 7), (6, 7), (100, 7), (5, 300)):
        assert sliding_window_area(nn, w) == brute(ak.masks.sliding_window(w), nn)


def test_flops_formula():
    # dense N=1024, H=8, D=64: 4 * N^2 * H * D
    assert attention_flops(1024 * 1024, 8, 64) == 4 * 1024**2 * 8 * 64
    assert attention_flops(36, 2, 16, head_dim_v=32, batch=3) == 2 * 3 * 2 * 36 * (16 + 32)
    assert pass_flops(100.0, "fwd") == 100.0
    assert pass_flops(100.0, "fwd+bwd") == 350.0  # backward counts 2.5x the forward
    with pytest.raises(ValueError, match="pass_"):
        pass_flops(1.0, "bwd")


def test_bool_tensor_mask_area():
    t = torch.tril(torch.ones(8, 8, dtype=torch.bool))
    assert mask_area(t, 8, 8) == 36
    assert mask_area(t[None, None], 8, 8) == 36


def test_attention_cases_carry_exact_flops():
    from attnkit.bench.cases.attention import cases

    by = {c.id: c for c in cases()}
    sw = by["attention/sliding_window_512/N=16384/blocked/fwd"]
    assert sw.flops == 4 * sliding_window_area(16384, 512) * 8 * 64
    cz = by["attention/causal/N=8192/sdpa_causal/fwd+bwd"]
    assert cz.flops == 4 * causal_area(8192) * 8 * 64  # Case.flops is the forward; the harness applies 3.5x
    full = by["attention/full/N=8192/sdpa/fwd"]
    assert full.baseline and full.flops == 4 * 8192**2 * 8 * 64
    assert "flex" not in {c.impl for c in by.values() if c.pass_ == "fwd+bwd"}  # no CPU backward
