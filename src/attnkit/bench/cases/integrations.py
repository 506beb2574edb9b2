"""Cases for ``attnkit.integrations``: a whole transformers model, attn_implementation "attnkit" vs "sdpa".

A random-weight Mistral-architecture model (4 layers, hidden 256, 8 query / 4 KV heads of 32,
MLP 512, vocabulary 1000, sliding window 512) runs forward+backward on one sequence of N = 8192
tokens. With ``"sdpa"`` transformers builds a dense ``N x N`` boolean window mask and SDPA computes
every pair; with ``"attnkit"`` the window is ``ak.masks.sliding_window(511, 0)`` and the blocked
backend visits only the tiles it touches. Same weights, same tokens; the check compares the
attnkit model's logits with the sdpa model's (fp32). ``flops`` counts the model's useful forward
FLOPs (projections, MLP, LM head, and attention over the window's allowed pairs only).

``attnkit bench --suite integrations`` runs them (transformers required).
"""

from __future__ import annotations

import os

import torch

from attnkit.bench.case import Case, Runner
from attnkit.bench.suites import Suite, register_suite

INTEGRATIONS = register_suite(Suite(
    "integrations", "transformers integration: Mistral-architecture model (4 layers, hidden 256, sliding window "
                    "512) at N=8192, fwd+bwd, attn_implementation 'attnkit' vs 'sdpa': time and peak memory "
                    "(~3 min on 2 cores)",
    repeat=3, min_repeat=2, warmup_s=0.0, unit_budget_s=60.0, case_timeout_s=600.0, memory=True))

MODEL = dict(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, sliding_window=512, max_position_embeddings=16384)


def _allowed_pairs(n: int, window: int) -> int:
    """Pairs (q, kv) with ``0 <= q - kv < window`` (transformers' sliding window)."""
    return sum(min(i + 1, window) for i in range(n))


def model_flops(n: int, cfg: dict = MODEL) -> float:
    """Useful forward FLOPs of the model on one sequence of ``n`` tokens."""
    c, h, hkv, layers = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], \
        cfg["num_hidden_layers"]
    d = c // h
    proj = 2 * n * c * (h * d + 2 * hkv * d + h * d)                     # q, k, v, o
    mlp = 2 * n * 3 * c * cfg["intermediate_size"]                      # gate, up, down
    attn = 4 * h * d * _allowed_pairs(n, cfg["sliding_window"])         # QK^T and PV over the window
    return layers * (proj + mlp + attn) + 2 * n * c * cfg["vocab_size"]


def _model(impl: str):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import MistralConfig, MistralForCausalLM

    from attnkit.integrations import transformers as akt

    akt.register()
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(**MODEL))   # training mode; attention dropout is 0
    model.set_attn_implementation(impl)
    return model


def _setup(impl: str, n: int):
    def setup() -> Runner:
        model = _model(impl)
        ids = torch.randint(0, MODEL["vocab_size"], (1, n), generator=torch.Generator().manual_seed(1))

        def run():
            model.zero_grad(set_to_none=True)
            logits = model(ids, use_cache=False).logits                   # (1, N, V)
            logits.float().square().mean().backward()
            return logits

        check = None
        if impl == "attnkit":
            def check() -> tuple[float, float]:
                ref = _model("sdpa")
                with torch.no_grad():
                    got, want = model(ids, use_cache=False).logits.double(), ref(ids, use_cache=False).logits.double()
                diff = got - want
                return diff.abs().max().item(), (diff.pow(2).mean().sqrt() / want.pow(2).mean().sqrt()).item()
        return Runner(run=run, check=check, check_vs="attn_implementation='sdpa', fp32" if check else None)
    return setup


def cases() -> list[Case]:
    n = 8192
    group = f"mistral_L4_d256_sw512/N={n}"
    params = (("N", n), ("B", 1), ("layers", 4), ("hidden", 256), ("H", 8), ("Hkv", 4), ("D", 32),
              ("window", 512), ("dtype", "float32"), ("mask", "causal & sliding_window(512)"))
    return [
        Case(op="hf_mistral", impl=impl, group=group, pass_="fwd+bwd", suites=frozenset({"integrations"}),
             params=params, flops=model_flops(n), setup=_setup(impl, n), baseline=impl == "sdpa",
             requires="transformers")
        for impl in ("sdpa", "attnkit")
    ]
