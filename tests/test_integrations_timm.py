"""``swap_attention`` on timm's ViT: an ``mha`` swap is the original model; variants keep every timm weight."""

from __future__ import annotations

import copy

import pytest
import torch

from attnkit.integrations.timm import AttnkitModuleAttention, AttnkitOpAttention, swap_attention
from peers import import_timm
from tolerances import assert_close

timm = import_timm()


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
    return model, x, ref


def test_mha_swap_is_the_original_model(vit):
    model, x, ref = vit
    swapped = swap_attention(copy.deepcopy(model), "mha")
    blocks = [m for m in swapped.modules() if isinstance(m, AttnkitOpAttention)]
    assert len(blocks) == len(model.blocks) == 12
    assert not any(type(m).__name__ == "Attention" for m in swapped.modules())
    with torch.no_grad():
        out = swapped(x)
    assert torch.equal(out, ref)      # the same SDPA call on the same strided q, k, v: bit for bit
    assert list(swapped.state_dict()) == list(model.state_dict())           # checkpoints still load
    swapped.load_state_dict(model.state_dict())


def test_mha_swap_gradients_match(vit):
    model, x, _ = vit
    swapped = swap_attention(copy.deepcopy(model), "mha")
    for m in (model, swapped):
        m.zero_grad()
        m(x[:1]).square().mean().backward()
    for (name, p), (_, q) in zip(model.named_parameters(), swapped.named_parameters(), strict=True):
        assert_close(q.grad, p.grad, torch.float32, f"d{name}", grad=True)
    model.zero_grad()


@pytest.mark.parametrize("name, options", [
    ("moba", dict(block_size=16, topk=13)),              # 197 tokens = 13 blocks, all selected
    ("neighborhood_1d", dict(kernel_size=197)),         # a window over every token
])
def test_variants_reduce_to_the_original(vit, name, options):
    model, x, ref = vit
    with torch.no_grad():
        out = swap_attention(copy.deepcopy(model), name, **options)(x)
    assert_close(out, ref, torch.float32, name)


def test_sparse_variant_keeps_weights_and_changes_output(vit):
    model, x, ref = vit
    swapped = swap_attention(copy.deepcopy(model), "moba", block_size=16, topk=2)
    assert torch.equal(swapped.blocks[3].attn.qkv.weight, model.blocks[3].attn.qkv.weight)
    with torch.no_grad():
        out = swapped(x)
    assert (out - ref).abs().max() > 1e-3                                    # MoBA really ran


def test_module_swap_copies_qkv_and_proj(vit):
    model, x, _ = vit
    swapped = swap_attention(copy.deepcopy(model), "agent_attention_1d", num_agents=16, grid=(197,))
    attn = swapped.blocks[0].attn
    assert isinstance(attn, AttnkitModuleAttention)
    assert {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"} <= set(attn.kept)
    assert torch.equal(attn.inner.qkv.weight, model.blocks[0].attn.qkv.weight)
    with torch.no_grad():
        assert swapped(x[:1]).shape == (1, 1000)


def test_refusals_are_clear(vit):
    model, _, _ = vit
    with pytest.raises(ValueError, match="takes image inputs"):
        swap_attention(copy.deepcopy(model), "neighborhood_2d")
    with pytest.raises(KeyError, match="registered: "):
        swap_attention(copy.deepcopy(model), "no_such_mechanism")
    with pytest.raises(ValueError, match="unknown option"):
        swap_attention(copy.deepcopy(model), "moba", block=16)
    with pytest.raises(ValueError, match=r"no timm\.layers\.attention\.Attention"):
        swap_attention(torch.nn.Linear(2, 2), "mha")
