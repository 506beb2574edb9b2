"""Cases of the ``decode`` suite: split-KV decoding (Lean Attention, arXiv 2405.10480) and a KIVI cache
(arXiv 2402.02750) against their baselines, measured in the same run.

Groups and implementations (``Case.impl``):

* ``split_kv/N=...`` (N = 32K, 64K, 128K, 256K; 1 query, H=32, Hkv=8, D=128, fp32):
  ``split_kv`` = ``decode_attention(..., backend="split_kv")`` (the compiled decode kernel) over a cache
  stored as ``KVCache`` stores it (heads-first), ``sdpa`` = ``F.scaled_dot_product_attention(...,
  enable_gqa=True)`` on the same tensors (the baseline), and ``copy_`` = ``dst.copy_(src)`` of a buffer of
  the K/V's bytes. Each case records ``kv_bytes``; bandwidth fraction =
  ``(kv_bytes / t_split_kv) / (2 * kv_bytes / t_copy_)`` = ``t_copy_ / (2 t_split_kv)`` (a copy reads and
  writes every byte, STREAM's convention).
* ``kivi4/N=65536`` (1 query, H=32, Hkv=8, D=128): ``kivi4`` = a 4-bit ``KIVICache`` (group 128, residual
  128) attended block by block, ``fp32_cache`` = ``decode_attention`` over the fp32 cache (the baseline);
  ``kivi4`` records ``memory_ratio_vs_fp16`` (fp16 bytes of K/V / the 4-bit cache's bytes, with an fp16 input).
* ``offload/N=8192`` (Lamina, arXiv 2405.01814; B=1, H=32, Hkv=8, D=128, fp32): one decode step (append a
  token, attend) with the cache in a worker process over gloo (``offloaded``) vs in-process ``KVCache`` +
  ``decode_attention`` (``in_process``, the baseline); ``offloaded`` records ``bytes_per_token`` (bytes moved
  per token per layer, both directions).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from attnkit.bench.case import Case, Runner
from attnkit.bench.flops import attention_flops
from attnkit.bench.suites import Suite, register_suite

H, HKV, D = 32, 8, 128
SPLIT_NS = (32768, 65536, 131072, 262144)
KIVI_N = 65536

OFFLOAD_N = 8192

DECODE = register_suite(Suite(
    "decode", "decode-time attention: split-KV vs SDPA and a same-bytes copy_ at N=32K..256K (H=32, Hkv=8, "
              "D=128); 4-bit KIVI memory ratio vs fp16 and step time vs the fp32 cache at N=64K; offloaded "
              "attention (worker process, gloo) step time and bytes per token vs in-process at N=8K (~3 min)",
    repeat=5, min_repeat=3, warmup_s=0.0, unit_budget_s=20.0, case_timeout_s=120.0, memory=False))


def _cache(n: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, H, D, generator=g, dtype=dtype)
    # heads-first storage viewed heads-last, as KVCache holds it
    k = torch.randn(1, HKV, n, D, generator=g, dtype=dtype).transpose(1, 2)
    v = torch.randn(1, HKV, n, D, generator=g, dtype=dtype).transpose(1, 2)
    return q, k, v


def _check(out, q, k, v) -> tuple[float, float]:
    from attnkit.reference.naive_decode import naive_decode_attention

    n = min(k.shape[1], 4096)   # check against the oracle on the last 4096 keys (a window of the same call)
    ref = naive_decode_attention(q.double(), k[:, -n:].double(), v[:, -n:].double())
    from attnkit.ops.decode import decode_attention

    got = decode_attention(q, k[:, -n:], v[:, -n:]).double() if out is None else out.double()
    err = (got - ref).abs().max().item()
    return err, ((got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def _split_setup(impl: str, n: int) -> Callable[[], Runner]:
    def setup() -> Runner:
        from attnkit.ops.decode import decode_attention

        q, k, v = _cache(n)
        kv_bytes = 2 * k.numel() * k.element_size()
        if impl == "split_kv":
            def run():
                return decode_attention(q, k, v, backend="split_kv")
        elif impl == "sdpa":
            qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))                 # (B, H, N, D)

            def run():
                return F.scaled_dot_product_attention(qh, kh, vh, enable_gqa=True)
        else:
            src = torch.empty(kv_bytes // 4).normal_()
            dst = torch.empty_like(src)

            def run():
                return dst.copy_(src)

        def no_grad_run():
            with torch.no_grad():
                return run()

        check = (lambda: _check(None, q, k, v)) if impl == "split_kv" else None
        return Runner(run=no_grad_run, check=check, params={"kv_bytes": kv_bytes})

    return setup


def _kivi_setup(impl: str, n: int) -> Callable[[], Runner]:
    def setup() -> Runner:
        from attnkit.ops.decode import decode_attention
        from attnkit.ops.decode.quant import KIVICache

        q, k, v = _cache(n)
        params = {}
        if impl == "kivi4":
            cache = KIVICache(bits=4, group=128, residual=128)
            cache.append(k, v)
            half = KIVICache(bits=4, group=128, residual=128)
            half.append(k.half(), v.half())
            params["memory_ratio_vs_fp16"] = 2 * k.numel() * 2 / half.memory_bytes()
            params["cache_bytes_fp32_input"] = cache.memory_bytes()

            def run():
                return cache.attend(q)
        else:
            def run():
                return decode_attention(q, k, v, backend="split_kv")

        def no_grad_run():
            with torch.no_grad():
                return run()

        return Runner(run=no_grad_run, params=params)

    return setup


_SESSION: dict = {}


def _offload_worker(rdv: str) -> None:
    import datetime

    import torch.distributed as dist

    from attnkit.distributed.offload import serve

    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=1, world_size=2,
                            timeout=datetime.timedelta(seconds=600))
    serve(0)
    dist.destroy_process_group()


def _offload_session():
    """One worker process for the whole run (a re-timed case reuses it); closed at exit."""
    if "att" not in _SESSION:
        import atexit
        import datetime
        import os
        import tempfile

        import torch.distributed as dist
        import torch.multiprocessing as mp

        from attnkit.distributed.offload import OffloadedAttention

        rdv = os.path.join(tempfile.mkdtemp(prefix="attnkit_offload_"), "rendezvous")
        proc = mp.get_context("spawn").Process(target=_offload_worker, args=(rdv,), daemon=True)
        proc.start()
        dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=0, world_size=2,
                                timeout=datetime.timedelta(seconds=600))
        att = OffloadedAttention([1])

        def close():
            att.close()
            dist.destroy_process_group()
            proc.join(timeout=30)

        atexit.register(close)
        _SESSION.update(att=att, layer=0)
    _SESSION["layer"] += 1
    return _SESSION["att"], _SESSION["layer"]


def _offload_setup(impl: str, n: int) -> Callable[[], Runner]:
    def setup() -> Runner:
        from attnkit.ops.decode import KVCache, decode_attention

        q, k, v = _cache(n)
        g = torch.Generator().manual_seed(1)
        kn, vn = torch.randn(1, 1, HKV, D, generator=g), torch.randn(1, 1, HKV, D, generator=g)
        params = {}
        if impl == "offloaded":
            att, layer = _offload_session()
            att.fill(layer, k, v)
            sent, received = att.bytes_sent, att.bytes_received   # after the prefill: one step's bytes only

            def run():
                return att.step(layer, q, kn, vn)

            run()   # one step to count its bytes
            params["bytes_per_token"] = att.bytes_sent - sent + att.bytes_received - received
        else:
            cache = KVCache()
            cache.append(0, k, v)

            def run():
                keys, values = cache.append(0, kn, vn)
                return decode_attention(q, keys, values)

        def no_grad_run():
            with torch.no_grad():
                return run()

        return Runner(run=no_grad_run, params=params)

    return setup


def cases() -> list[Case]:
    out = []
    suites = frozenset({"decode"})
    for n in SPLIT_NS:
        for impl in ("split_kv", "sdpa", "copy_"):
            out.append(Case(op="decode_attention", impl=impl, group=f"split_kv/N={n}", pass_="fwd", suites=suites,
                            params=(("N", n), ("B", 1), ("H", H), ("Hkv", HKV), ("D", D), ("dtype", "float32")),
                            flops=0.0 if impl == "copy_" else attention_flops(n, H, D, batch=1),
                            setup=_split_setup(impl, n), baseline=impl == "sdpa"))
    for impl in ("kivi4", "fp32_cache"):
        out.append(Case(op="decode_attention", impl=impl, group=f"kivi4/N={KIVI_N}", pass_="fwd", suites=suites,
                        params=(("N", KIVI_N), ("B", 1), ("H", H), ("Hkv", HKV), ("D", D), ("dtype", "float32"),
                                ("bits", 4 if impl == "kivi4" else 32)),
                        flops=attention_flops(KIVI_N, H, D, batch=1), setup=_kivi_setup(impl, KIVI_N),
                        baseline=impl == "fp32_cache"))
    for impl in ("offloaded", "in_process"):
        out.append(Case(op="decode_attention", impl=impl, group=f"offload/N={OFFLOAD_N}", pass_="fwd", suites=suites,
                        params=(("N", OFFLOAD_N), ("B", 1), ("H", H), ("Hkv", HKV), ("D", D), ("dtype", "float32"),
                                ("workers", 1 if impl == "offloaded" else 0)),
                        flops=attention_flops(OFFLOAD_N, H, D, batch=1), setup=_offload_setup(impl, OFFLOAD_N),
                        baseline=impl == "in_process"))
    return out
