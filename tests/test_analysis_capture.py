"""attnkit.analysis.capture: recorded probabilities equal the reference attention of the same layer
(attnkit modules, timm ViTs, transformers), the row reductions equal reductions of the full maps, clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attnkit.analysis import attention_layers, capture
from attnkit.masks import causal
from attnkit.mechanisms.mha import MultiHeadAttention
from attnkit.reference.naive_analysis import naive_attention_probs
from peers import import_timm, skip_if_no_transformers


class Stack(nn.Module):
    def __init__(self, layers=2, dim=16, heads=4, kv_heads=2, causal=False):
        super().__init__()
        self.blocks = nn.ModuleList(MultiHeadAttention(dim, heads, num_kv_heads=kv_heads, causal=causal)
                                    for _ in range(layers))

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return x


def _reference_maps(model, x):
    """Recompute each layer's probabilities from its inputs with the naive twin (hooks on the modules)."""
    out = []

    def hook(m, args):
        h = args[0]
        b, n, _ = h.shape
        q = m.q_proj(h).view(b, n, m.num_heads, m.head_dim)                     # (B, N, Hq, D)
        k = m.kv_proj(h).view(b, n, 2, m.num_kv_heads, m.head_dim)[:, :, 0]       # (B, N, Hkv, D)
        allowed = causal().to_dense(n, n) if m.causal else None
        out.append(naive_attention_probs(q, k, allowed))
    handles = [blk.register_forward_pre_hook(hook) for blk in model.blocks]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return out


@pytest.mark.parametrize("is_causal", [False, True])
def test_attnkit_capture_equals_reference(is_causal):
    torch.manual_seed(0)
    model = Stack(causal=is_causal)
    x = torch.randn(2, 7, 16)
    ref = _reference_maps(model, x)
    with torch.no_grad():
        want = model(x)
        with capture(model) as maps:
            got = model(x)
    torch.testing.assert_close(got, want)                                        # capture does not change outputs
    assert maps.layers == ["blocks.0", "blocks.1"] == attention_layers(model)
    for a, r in zip(maps.probs(), ref, strict=True):
        torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=1e-6)
    # the module globals are restored
    from attnkit.mechanisms import mha
    from attnkit.ops.dense.call import attention
    assert mha.attention is attention


def test_reductions_equal_reductions_of_full_maps_in_chunks():
    torch.manual_seed(1)
    model = Stack(layers=3, causal=True)
    x = torch.randn(2, 11, 16)
    keep = ("probs", "head_mean", "cls_row", "col_sum", "entropy")
    with torch.no_grad(), capture(model, layers=[0, -1], heads=[1, 3], keep=keep, query_index=2, chunk=3) as maps:
        model(x)
    assert maps.layers == ["blocks.0", "blocks.2"]
    for layer in (0, -1):
        p = maps.get(layer, "probs")
        assert p.shape == (2, 2, 11, 11)
        torch.testing.assert_close(maps.get(layer, "head_mean"), p.mean(1))
        torch.testing.assert_close(maps.get(layer, "cls_row"), p[:, :, 2])
        torch.testing.assert_close(maps.get(layer, "col_sum"), p.sum(2))
        ent = -(p * p.clamp_min(1e-30).log()).sum(-1)
        torch.testing.assert_close(maps.get(layer, "entropy"), ent)
    with torch.no_grad(), capture(model, keep=("probs",)) as full, \
            capture(model, keep=("cls_row", "col_sum", "entropy"), chunk=4) as small:   # the chunked path alone
        model(x)
    for layer in range(3):
        p = full.get(layer, "probs")
        torch.testing.assert_close(small.get(layer, "col_sum"), p.sum(2))
        torch.testing.assert_close(small.get(layer, "cls_row"), p[:, :, 0])
    assert "probs" not in small.data["blocks.1"]


def test_capture_errors_name_the_layer_head_or_map():
    model = Stack(layers=2)
    x = torch.randn(1, 5, 16)
    with pytest.raises(ValueError, match="layer 5 does not exist"):
        with capture(model, layers=[5]):
            pass
    with pytest.raises(ValueError, match="layer 'nope' does not exist"):
        with capture(model, layers="nope"):
            pass
    with pytest.raises(ValueError, match=r"head 7 does not exist in layer 'blocks\.0'"):
        with torch.no_grad(), capture(model, heads=[7]):
            model(x)
    with pytest.raises(ValueError, match="keep"):
        with capture(model, keep="everything"):
            pass
    with torch.no_grad(), capture(model, layers=[1], keep="cls_row") as maps:
        model(x)
    with pytest.raises(KeyError, match=r"map 'probs' of layer 'blocks.1' was never produced"):
        maps.get(1, "probs")
    with pytest.raises(KeyError, match=r"layer 0 \('blocks.0'\) produced no map"):
        maps.get(0, "cls_row")
    with pytest.raises(KeyError, match="layer 9 does not exist"):
        maps.get(9, "cls_row")
    with pytest.raises(ValueError, match="found no attention layer"):
        with capture(nn.Linear(3, 3)):
            pass


def test_timm_vit_capture_equals_reference():
    timm = import_timm()
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=0, depth=2).eval()
    x = torch.randn(1, 3, 32, 32)
    names = attention_layers(model)
    assert names == ["blocks.0.attn", "blocks.1.attn"]
    ref = []

    def hook(m, args):
        h = args[0]
        b, n, _ = h.shape
        qkv = m.qkv(h).reshape(b, n, 3, m.num_heads, m.head_dim).permute(2, 0, 1, 3, 4)  # (3, B, N, H, D)
        ref.append(naive_attention_probs(m.q_norm(qkv[0].transpose(1, 2)).transpose(1, 2),
                                         m.k_norm(qkv[1].transpose(1, 2)).transpose(1, 2)))
    handles = [model.get_submodule(n).register_forward_pre_hook(hook) for n in names]
    fused = [model.get_submodule(n).fused_attn for n in names]
    with torch.no_grad():
        want = model(x)
        with capture(model, keep=("probs", "cls_row")) as maps:
            got = model(x)
    for h in handles:
        h.remove()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert [model.get_submodule(n).fused_attn for n in names] == fused          # switched back
    for i, r in enumerate(ref[:2]):
        torch.testing.assert_close(maps.get(i, "probs").double(), r, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(maps.get(i, "cls_row"), maps.get(i, "probs")[:, :, 0])


def test_transformers_capture_equals_eager_attentions_with_padding():
    skip_if_no_transformers()
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    model = BertModel(cfg).eval()
    ids = torch.randint(0, 50, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0                                                                # padding in the second sample
    model.set_attn_implementation("eager")
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    model.set_attn_implementation("sdpa")
    with torch.no_grad(), capture(model, keep=("probs", "col_sum")) as maps:
        out = model(input_ids=ids, attention_mask=mask)
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, rtol=1e-4, atol=1e-5)
    for a, r in zip(maps.probs(), ref.attentions, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)
    assert maps.get(1, "probs")[1, :, :, 6:].abs().max() == 0                     # padded keys get nothing


def test_nested_captures_both_record_and_unwind():
    torch.manual_seed(2)
    model = Stack(layers=2)
    x = torch.randn(1, 6, 16)
    with torch.no_grad(), capture(model, layers=[0]) as outer:
        with capture(model, layers=[1], keep="col_sum") as inner:
            model(x)
        model(x)
    assert outer.layers == ["blocks.0"] and inner.layers == ["blocks.1"]
    from attnkit.mechanisms import mha
    from attnkit.ops.dense.call import attention
    assert mha.attention is attention


def test_row_reductions_store_and_form_only_o_n_h(monkeypatch):
    """[CLS] row + column sums: stored bytes are exactly L·2·B·H·N floats, and no softmax sees more than
    ``chunk`` query rows at once (the full (B, H, N, N) map is never formed)."""
    torch.manual_seed(0)
    n, chunk = 600, 64
    model = Stack(layers=3, dim=16, heads=4, kv_heads=4)
    x = torch.randn(1, n, 16)
    seen = []
    softmax = torch.softmax

    def spy(t, dim, *a, **k):
        seen.append(t.shape)
        return softmax(t, dim, *a, **k)
    monkeypatch.setattr(torch, "softmax", spy)
    with torch.no_grad(), capture(model, keep=("cls_row", "col_sum"), chunk=chunk) as maps:
        model(x)
    assert maps.nbytes() == 3 * 2 * 1 * 4 * n * 4
    assert seen and max(s[-2] for s in seen) == chunk and all(s[-1] == n for s in seen)
