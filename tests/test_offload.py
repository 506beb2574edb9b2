"""Offloaded decode attention (Lamina, arXiv 2405.01814): the cache and attention in worker processes, over
torch.distributed (gloo), against in-process decode attention over the same cache."""

from __future__ import annotations

import pytest
import torch

from attnkit.distributed.launch import run_local

# (new tokens per step): a prefill, single-token decode steps, and a 3-token step (speculative decoding's shape)
STEPS = [40, 1, 1, 3, 1, 1, 2, 1]
B, HQ, HKV, D, DV, LAYERS = 2, 8, 2, 16, 12, 2


def _run(rank: int, world: int):
    from attnkit.distributed.offload import OffloadedAttention, serve
    from attnkit.ops.decode import KVCache, decode_attention

    if rank > 0:
        return serve(0)
    att = OffloadedAttention(list(range(1, world)))
    local = KVCache()
    g = torch.Generator().manual_seed(0)
    got, want = [], []
    for n in STEPS:
        for layer in range(LAYERS):
            q = torch.randn(B, n, HQ, D, generator=g)
            k = torch.randn(B, n, HKV, D, generator=g)
            v = torch.randn(B, n, HKV, DV, generator=g)
            got.append(att.step(layer, q, k, v))
            keys, values = local.append(layer, k, v)
            # decode steps: the call a model makes; the prefill (> 16 queries): the LSE-returning backend the
            # worker must use (SDPA returns no LSE), so both sides run the same arithmetic
            want.append(decode_attention(q, keys, values) if n <= 16 else
                        decode_attention(q, keys, values, return_lse=True)[0])
    att.close()
    return {"got": got, "want": want, "sent": att.bytes_sent, "received": att.bytes_received}


def _wire_bytes(workers: int) -> tuple[int, int]:
    sent, received = workers * 9 * 8, 0          # the closing header
    for n in STEPS:
        per_layer = workers * (9 * 8 + B * n * HQ * D * 4) + B * n * HKV * (D + DV) * 4
        sent += LAYERS * per_layer
        received += LAYERS * workers * (B * n * HQ * DV * 4 + B * n * HQ * 4)
    return sent, received


@pytest.mark.slow
def test_one_worker_equals_in_process_exactly():
    model, worker = run_local(_run, 2, timeout_s=240)
    for got, want in zip(model["got"], model["want"]):
        assert torch.equal(got, want)
    assert (model["sent"], model["received"]) == _wire_bytes(1)
    assert worker["steps"] == len(STEPS) * LAYERS and worker["tokens"] == [sum(STEPS)] * LAYERS


@pytest.mark.slow
def test_two_workers_shard_the_cache_and_merge_exactly():
    from tolerances import assert_close

    model, w1, w2 = run_local(_run, 3, timeout_s=240)
    for got, want in zip(model["got"], model["want"]):
        assert_close(got, want.double(), torch.float32, "offloaded")
    assert (model["sent"], model["received"]) == _wire_bytes(2)
    # steps go to the workers in turn: the cache is spread over both, nothing lost
    assert [a + b for a, b in zip(w1["tokens"], w2["tokens"])] == [sum(STEPS)] * LAYERS
    assert w1["tokens"][0] == sum(STEPS[0::2]) and w2["tokens"][0] == sum(STEPS[1::2])
