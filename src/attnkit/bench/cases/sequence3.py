"""``sequence`` suite cases for the third batch of sequence mechanisms (fwd, fp32, each vs a baseline).

* KArAt (arXiv 2503.10632): ``kat_attention`` basis backend, B=8, N=197, H=3, D=64, r=12, G=3 (ViT-Tiny G3B)
  vs softmax SDPA on the same q, k, v (group ``kat_r12_g3/N=197``).
* ST-LINK SE-attention (arXiv 2509.13753): ``se_attention`` (rotate + ak.attention), causal, B=4, N=192
  (12 steps x 16 nodes), H=4, D=64, spatial_dim 32 vs causal SDPA without rotations (group ``se_attention/N=192``).
* Pointer Networks (arXiv 1506.03134): ``pointer_attention`` chunked vs its naive twin, forward and forward +
  backward, at B=128, Nd=Ne=50, A=256 (group ``pointer/N=50``) and B=8, Nd=Ne=32, A=256 (group ``pointer/N=32``).
* Multi-layer trainable pooling (arXiv 2409.02727): ``latent_attention_pool`` through ak.attention vs its naive
  twin, B=32, L=25 layers, r=1, H=8, D=112 (group ``embedding_pool/L=25``).
* TCPA (arXiv 2505.02406): ``prompt_attention`` with 10 + 10 prompts and a top-5 token mask, B=8, N=197, H=12,
  D=64 vs SDPA over the tokens alone (group ``tcpa/N=197``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from attnkit.bench.case import Case, Runner, pass_fn, pass_with_random_grad

SUITE = frozenset({"sequence"})


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> Callable[[], torch.Tensor]:
    qh, kh, vh = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # (B, H, N, D)
    return lambda: F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal)


def _kat_setup(impl: str) -> Callable[[], Runner]:
    def setup() -> Runner:
        from attnkit.ops.sequence.kat import kat_attention

        g = torch.Generator().manual_seed(0)
        q, k, v = (_randn(g, 8, 197, 3, 64) for _ in range(3))
        if impl == "sdpa":
            return Runner(run=pass_fn(_sdpa(q, k, v), "fwd"))
        a, b = (_randn(g, 3, 12, 197, 3) * 0.05 for _ in range(2))
        w = _randn(g, 3, 197, 12) * 0.02
        return Runner(run=pass_fn(lambda: kat_attention(q, k, v, a, b, w), "fwd"))

    return setup


def _se_setup(impl: str) -> Callable[[], Runner]:
    def setup() -> Runner:
        from attnkit.ops.sequence.se_rope import grid_coords, se_attention

        g = torch.Generator().manual_seed(0)
        q, k, v = (_randn(g, 4, 192, 4, 64) for _ in range(3))
        if impl == "sdpa":
            return Runner(run=pass_fn(_sdpa(q, k, v, True), "fwd"))
        n = torch.arange(192)
        coords = grid_coords(16)[n % 16]
        return Runner(run=pass_fn(lambda: se_attention(q, k, v, n // 16, coords, spatial_dim=32, causal=True), "fwd"))

    return setup


def _pointer_setup(impl: str, B: int, N: int, A: int, pass_: str) -> Callable[[], Runner]:
    def setup() -> Runner:
        from attnkit.ops.sequence.pointer import pointer_attention

        g = torch.Generator().manual_seed(0)
        dec, enc, v = _randn(g, B, N, A), _randn(g, B, N, A), _randn(g, A)
        inputs = (dec, enc, v)
        if pass_ != "fwd":
            for t in inputs:
                t.requires_grad_()
        return Runner(run=pass_with_random_grad(lambda: pointer_attention(dec, enc, v, backend=impl), pass_, inputs))

    return setup


def _pool_setup(impl: str) -> Callable[[], Runner]:
    def setup() -> Runner:
        from attnkit.ops.sequence.embed_pool import latent_attention_pool

        g = torch.Generator().manual_seed(0)
        lat, k, v = _randn(g, 1, 8, 112), _randn(g, 32, 25, 8, 112), _randn(g, 32, 25, 8, 112)
        return Runner(run=pass_fn(lambda: latent_attention_pool(lat, k, v, backend=impl), "fwd"))

    return setup


def _tcpa_setup(impl: str) -> Callable[[], Runner]:
    def setup() -> Runner:
        from attnkit.ops.sequence.prompt import prompt_attention, tcpa_prompt_mask

        g = torch.Generator().manual_seed(0)
        q, k, v = (_randn(g, 8, 197, 12, 64) for _ in range(3))
        if impl == "sdpa":
            return Runner(run=pass_fn(_sdpa(q, k, v), "fwd"))
        pk, pv = _randn(g, 20, 12, 64), _randn(g, 20, 12, 64)
        mask = tcpa_prompt_mask(_randn(g, 8, 197, 768), _randn(g, 10, 768), num_cls_prompts=10, top_k=5)
        return Runner(run=pass_fn(lambda: prompt_attention(q, k, v, pk, pv, mask), "fwd"))

    return setup


def cases() -> list[Case]:
    out = []
    p = (("N", 197), ("B", 8), ("H", 3), ("D", 64), ("rank", 12), ("grid", 3), ("dtype", "float32"))
    for impl in ("basis", "sdpa"):
        extra = 8 * 3 * 197 * 197 * (4 * 3 * 12 + 2 * 12) if impl == "basis" else 0
        out.append(Case(op="kat_attention", impl=impl, group="kat_r12_g3/N=197", pass_="fwd", suites=SUITE, params=p,
                        flops=4.0 * 8 * 3 * 64 * 197 * 197 + extra, setup=_kat_setup(impl), baseline=impl == "sdpa"))
    p = (("N", 192), ("B", 4), ("H", 4), ("D", 64), ("nodes", 16), ("causal", True), ("dtype", "float32"))
    for impl in ("rotary", "sdpa"):
        out.append(Case(op="se_attention", impl=impl, group="se_attention/N=192", pass_="fwd", suites=SUITE, params=p,
                        flops=4.0 * 4 * 4 * 64 * 192 * 193 / 2, setup=_se_setup(impl), baseline=impl == "sdpa"))
    for B, N, A in ((128, 50, 256), (8, 32, 256)):
        p = (("Nd", N), ("Ne", N), ("B", B), ("A", A), ("dtype", "float32"))
        for impl in ("chunked", "reference"):
            for pass_ in ("fwd", "fwd+bwd"):
                out.append(Case(op="pointer_attention", impl=impl, group=f"pointer/N={N}", pass_=pass_, suites=SUITE,
                                params=p, flops=3.0 * B * N * N * A, setup=_pointer_setup(impl, B, N, A, pass_),
                                baseline=impl == "reference"))
    p = (("L", 25), ("r", 1), ("B", 32), ("H", 8), ("D", 112), ("dtype", "float32"))
    for impl in ("attention", "reference"):
        out.append(Case(op="latent_attention_pool", impl=impl, group="embedding_pool/L=25", pass_="fwd", suites=SUITE,
                        params=p, flops=4.0 * 32 * 8 * 112 * 25, setup=_pool_setup(impl),
                        baseline=impl == "reference"))
    p = (("N", 197), ("B", 8), ("H", 12), ("D", 64), ("prompts", 20), ("top_k", 5), ("dtype", "float32"))
    for impl in ("attention", "sdpa"):
        keys = 197 + 20 if impl == "attention" else 197
        out.append(Case(op="prompt_attention", impl=impl, group="tcpa/N=197", pass_="fwd", suites=SUITE, params=p,
                        flops=4.0 * 8 * 12 * 64 * 197 * keys, setup=_tcpa_setup(impl), baseline=impl == "sdpa"))
    return out
