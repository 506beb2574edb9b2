"""Third batch of sequence mechanisms: ops vs naive twins (output and every gradient) and each paper's identities.

Pointer Networks (arXiv 1506.03134), multi-layer trainable pooling (arXiv 2409.02727), TCPA (arXiv 2505.02406),
ST-LINK's spatially-enhanced attention (arXiv 2509.13753) and KArAt (arXiv 2503.10632).
"""

from __future__ import annotations

import pytest
import torch

from attnkit.mechanisms.seq_embed_pool import MultiLayerTrainablePooling
from attnkit.mechanisms.seq_kat import KArAtAttention
from attnkit.mechanisms.seq_pointer import PointerAttention
from attnkit.mechanisms.seq_prompt import TokenCoordinatedPromptAttention
from attnkit.mechanisms.seq_se import SEAttention
from attnkit.ops.sequence.embed_pool import latent_attention_pool, layer_states
from attnkit.ops.sequence.kat import kat_attention
from attnkit.ops.sequence.pointer import pointed_mask, pointer_attention
from attnkit.ops.sequence.prompt import prompt_attention, tcpa_prompt_mask
from attnkit.ops.sequence.se_rope import laplacian_coords, se_attention
from attnkit.reference.naive_dense import naive_masked_attention
from attnkit.reference.naive_sequence3 import (
    naive_kat_attention,
    naive_latent_pool,
    naive_pointer_attention,
    naive_prompt_attention,
    naive_prompt_mask,
    naive_se_attention,
)
from tolerances import assert_close, compare_fn

F64 = torch.float64


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------- Pointer Networks


def _pointer_inputs(Nd=4, Ne=6, A=5, seed=0):
    g = _gen(seed)
    return {"dec": torch.randn(2, Nd, A, generator=g, dtype=F64), "enc": torch.randn(2, Ne, A, generator=g, dtype=F64),
            "v": torch.randn(A, generator=g, dtype=F64)}


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pointer_op_matches_naive(log, masked, dtype):
    t = _pointer_inputs()
    mask = pointed_mask(torch.tensor([[0, 3, 5, 1], [2, 2, 4, 0]]), 6) if masked else None
    compare_fn(lambda **a: pointer_attention(**a, mask=mask, log=log),
               lambda **a: naive_pointer_attention(**a, mask=mask, log=log), t, dtype)


def test_pointer_rows_sum_to_one_and_masked_positions_are_zero(monkeypatch):
    import attnkit.ops.sequence.pointer as pointer_mod

    monkeypatch.setattr(pointer_mod, "CHUNK_ELEMENTS", 7)  # several decoder-row blocks
    t = _pointer_inputs(Nd=5, Ne=5)
    perm = torch.tensor([[4, 0, 3, 1, 2], [1, 2, 0, 4, 3]])
    mask = pointed_mask(perm, 5)
    # step i may not point at the i positions already output
    assert mask.sum(-1).tolist() == [[5, 4, 3, 2, 1]] * 2
    p = pointer_attention(**t, mask=mask)
    assert_close(p.sum(-1), torch.ones(2, 5, dtype=F64), F64, "row sums")
    assert torch.all(p[~mask] == 0)
    assert torch.all(p[mask] > 0)
    logp = pointer_attention(**t, mask=mask, log=True)
    assert torch.all(torch.isneginf(logp[~mask]))
    assert_close(logp[mask].exp(), p[mask], F64, "exp(log p)")
    # the last step has one choice left: the remaining index, with probability 1
    assert torch.equal(p[:, -1].argmax(-1), perm[:, -1]) and torch.all(p[:, -1].amax(-1) == 1)
    # a row with nothing allowed is all 0 and its gradient is finite
    none = torch.zeros(2, 5, 5, dtype=torch.bool)
    dec = t["dec"].clone().requires_grad_()
    out = pointer_attention(dec, t["enc"], t["v"], none)
    out.sum().backward()
    assert torch.all(out == 0) and torch.all(torch.isfinite(dec.grad))


@pytest.mark.parametrize("block", [7, 40, 90, 400, 1 << 16])
def test_pointer_blocks_match_naive_output_and_gradients(monkeypatch, block):
    import attnkit.ops.sequence.pointer as pointer_mod

    # 7: one decoder row per block; 40, 90: several rows of one batch element, a ragged last block;
    # 400: several whole batch elements per block; 1 << 16: everything in one block
    monkeypatch.setattr(pointer_mod, "CHUNK_ELEMENTS", block)
    g = _gen(3)
    t = {"dec": torch.randn(3, 7, 5, generator=g, dtype=F64), "enc": torch.randn(3, 4, 5, generator=g, dtype=F64),
         "v": torch.randn(5, generator=g, dtype=F64)}
    mask = torch.rand(3, 7, 4, generator=g) > 0.3
    for log in (False, True):
        compare_fn(lambda log=log, **a: pointer_attention(**a, mask=mask, log=log, backend="chunked"),
                   lambda log=log, **a: naive_pointer_attention(**a, mask=mask, log=log), t, F64)
    compare_fn(lambda **a: pointer_attention(**a, backend="chunked"), naive_pointer_attention, t, torch.float32)


def test_pointer_backward_saves_no_pair_tensor_and_double_backward_works():
    t = _pointer_inputs(Nd=6, Ne=7, A=5)
    leaves = [t[n].clone().requires_grad_() for n in ("dec", "enc", "v")]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x, lambda x: x):
        pointer_attention(*leaves, backend="chunked")
    # the (B, Nd, Ne, A) tanh tensor (420 elements here) is recomputed in backward, never kept for it
    assert max(saved) < 2 * 6 * 7 * 5
    small = [x[:1, :3, :3].detach().requires_grad_() for x in leaves[:2]] + [leaves[2][:3].detach().requires_grad_()]
    assert torch.autograd.gradcheck(lambda d, e, v: pointer_attention(d, e, v, backend="chunked"), small)
    assert torch.autograd.gradgradcheck(lambda d, e, v: pointer_attention(d, e, v, log=True, backend="chunked"),
                                        small)
    # mixed dtypes promote like the naive twin
    mixed = pointer_attention(t["dec"].float(), t["enc"], t["v"])
    assert mixed.dtype == F64
    assert_close(mixed, naive_pointer_attention(t["dec"].float(), t["enc"], t["v"]), F64, "promoted")


def test_pointer_auto_dispatch_picks_chunked_and_explains_why():
    from attnkit.ops.base import explain

    t = _pointer_inputs()
    text = explain("pointer_attention", t["dec"], t["enc"], t["v"])
    assert "-> chunked" in text and "L2-sized blocks" in text and "inference path" in text
    assert "reference" in text and "slower" in text
    text = explain("pointer_attention", t["dec"].requires_grad_(), t["enc"], t["v"])
    assert "recomputes tanh per block" in text


def test_pointer_output_size_follows_the_input_length():
    m = PointerAttention(6, 5).double()
    x = torch.randn(2, 3, 6, dtype=F64)
    for ne in (4, 9):
        p = m(x, torch.randn(2, ne, 6, dtype=F64))
        assert p.shape == (2, 3, ne)
        assert_close(p.sum(-1), torch.ones(2, 3, dtype=F64), F64, "row sums")
    # permuting the inputs permutes the pointer distribution the same way
    e = torch.randn(2, 7, 6, dtype=F64)
    perm = torch.randperm(7, generator=_gen())
    assert_close(m(x, e[:, perm]), m(x, e)[..., perm], F64, "permuted inputs")


def test_pointer_errors():
    t = _pointer_inputs()
    with pytest.raises(ValueError, match="pointer_attention: mask"):
        pointer_attention(**t, mask=torch.ones(2, 4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="pointer_attention: dec"):
        pointer_attention(t["dec"][0], t["enc"], t["v"])
    with pytest.raises(ValueError, match="PointerAttention: output"):
        PointerAttention(6, output="logits")


# --------------------------------------------------------------------- multi-layer trainable pooling


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_latent_pool_matches_naive(dtype):
    g = _gen()
    t = {"latents": torch.randn(3, 2, 4, generator=g, dtype=F64), "k": torch.randn(2, 5, 2, 4, generator=g, dtype=F64),
         "v": torch.randn(2, 5, 2, 3, generator=g, dtype=F64)}
    compare_fn(latent_attention_pool, naive_latent_pool, t, dtype)


def _neutral_pool(C=8, H=2, L=5, r=3):
    """A pool whose K/V projections and output projection are identities (its MLP stays: tests apply it)."""
    m = MultiLayerTrainablePooling(C, num_layers=L, num_latents=r, num_heads=H, normalize=False).double()
    with torch.no_grad():
        m.to_kv.weight.copy_(torch.cat([torch.eye(C), torch.eye(C)]).double())
        m.to_kv.bias.zero_()
        m.proj.weight.copy_(torch.eye(C))
        m.proj.bias.zero_()
    return m


def test_uniform_layer_weights_reduce_to_mean_pooling():
    m = _neutral_pool()
    x = torch.randn(2, 5, 8, dtype=F64)
    with torch.no_grad():
        m.latents.zero_()  # every score 0: uniform weights over the layers
        m.layer_embed.zero_()
    assert_close(m(x), m.mlp(x.mean(1)), F64, "mean over layers")
    # the op alone: zero latents give the plain mean of the values
    k, v = torch.randn(2, 5, 2, 4, dtype=F64), torch.randn(2, 5, 2, 4, dtype=F64)
    z = latent_attention_pool(torch.zeros(1, 2, 4, dtype=F64), k, v)
    assert_close(z[:, 0], v.mean(1), F64, "op mean")


def test_one_layer_passes_its_state_through_and_layer_permutation_with_embedding_is_invariant():
    m = _neutral_pool()
    x = torch.randn(2, 5, 8, dtype=F64)
    # one layer: the softmax has one entry, so the latents do not matter
    assert_close(m(x[:, :1]), m.mlp(x[:, 0] + m.layer_embed[0]), F64, "one layer")
    with torch.no_grad():
        m.layer_embed.normal_()
    y = m(x)
    perm = torch.tensor([3, 0, 4, 1, 2])
    with torch.no_grad():
        m.layer_embed.copy_(m.layer_embed[perm])
    assert_close(m(x[:, perm]), y, F64, "layers and embedding permuted together")
    assert (m(x) - y).abs().max() > 1e-6  # the embedding is what tells the layers apart


def test_layer_states_last_and_mean():
    hs = [torch.randn(2, 4, 3, dtype=F64) for _ in range(3)]
    am = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    last = layer_states(hs, am)
    assert last.shape == (2, 3, 3)
    assert torch.equal(last[0, 1], hs[1][0, 2]) and torch.equal(last[1, 2], hs[2][1, 3])
    mean = layer_states(hs, am, mode="mean")
    assert_close(mean[0, 0], hs[0][0, :3].mean(0), F64, "mean")
    with pytest.raises(ValueError, match="layer_states: mode"):
        layer_states(hs, mode="max")
    with pytest.raises(ValueError, match="MultiLayerTrainablePooling: x stacks 6"):
        MultiLayerTrainablePooling(8, num_layers=5, num_heads=2)(torch.randn(1, 6, 8))


# --------------------------------------------------------------------------------------------- TCPA


def _prompt_inputs(N=6, P=5, seed=0):
    g = _gen(seed)
    t = {n: torch.randn(2, N, 2, 4, generator=g, dtype=F64) for n in "qkv"}
    t.update(pk=torch.randn(P, 2, 4, generator=g, dtype=F64), pv=torch.randn(P, 2, 4, generator=g, dtype=F64))
    return t


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_prompt_op_matches_naive(masked, dtype):
    mask = torch.rand(2, 6, 5, generator=_gen(3)) > 0.5 if masked else None
    compare_fn(lambda **a: prompt_attention(**a, prompt_mask=mask),
               lambda **a: naive_prompt_attention(**a, prompt_mask=mask), _prompt_inputs(), dtype)


@pytest.mark.parametrize("coordination", ["token", "role", "none"])
def test_prompt_mask_matches_naive(coordination):
    x, prompts = torch.randn(3, 7, 8, dtype=F64), torch.randn(5, 8, dtype=F64)
    kw = {"num_cls_prompts": 2, "top_k": 2, "num_cls_tokens": 1, "coordination": coordination}
    got = tcpa_prompt_mask(x, prompts, **kw)
    assert torch.equal(got, naive_prompt_mask(x, prompts, **kw))
    if coordination != "none":
        assert torch.equal(got[:, 0], torch.tensor([True, True] + [False] * 5).expand(3, 7))  # [CLS]: CLS prompts
        assert not got[:, 1:, :2].any()  # image tokens never see CLS prompts
    if coordination == "token":
        assert torch.all(got[:, 1:, 2:].sum(-1) == 2)


def _tcpa(coordination="token", nc=2, npr=4, top_k=2):
    torch.manual_seed(0)
    return TokenCoordinatedPromptAttention(8, 2, num_cls_prompts=nc, num_image_prompts=npr, top_k=top_k,
                                           coordination=coordination).double()


def test_tcpa_without_prompts_is_plain_attention():
    m = _tcpa(nc=0, npr=0)
    x = torch.randn(2, 6, 8, dtype=F64)
    q, k, v = m.qkv(x).view(2, 6, 3, 2, 4).unbind(2)
    want = m.proj(naive_masked_attention(q, k, v)[0].reshape(2, 6, 8))
    assert_close(m(x), want, F64, "no prompts")


def test_tcpa_all_visible_is_vpt_deep():
    m = _tcpa("none")
    x = torch.randn(2, 6, 8, dtype=F64)
    P = torch.cat([m.cls_prompts, m.image_prompts])
    q, _, _ = m.qkv(x).view(2, 6, 3, 2, 4).unbind(2)
    _, k, v = m.qkv(torch.cat([x, P.expand(2, -1, -1)], 1)).view(2, 12, 3, 2, 4).unbind(2)  # prompts as tokens
    want = m.proj(naive_masked_attention(q, k, v)[0].reshape(2, 6, 8))
    assert_close(m(x), want, F64, "VPT-deep")


def test_tcpa_cls_ignores_image_prompts_and_unselected_prompts_get_no_gradient():
    m = _tcpa(npr=6, top_k=1)
    x = torch.randn(1, 3, 8, dtype=F64)  # 2 image tokens pick at most 2 of the 6 image prompts
    y = m(x)
    with torch.no_grad():
        m.image_prompts.add_(torch.randn_like(m.image_prompts))
    y2 = m(x)
    assert_close(y2[:, 0], y[:, 0], F64, "[CLS] output")
    assert (y2[:, 1:] - y[:, 1:]).abs().max() > 1e-6
    m.zero_grad()
    m(x).sum().backward()
    picked = tcpa_prompt_mask(x, m.image_prompts, num_cls_prompts=2, top_k=1)[0, 1:, 2:].any(0)  # (Np,)
    assert picked.sum() <= 2
    g = m.image_prompts.grad.abs().sum(-1)
    assert torch.all(g[~picked] == 0) and torch.all(g[picked] > 0)


def test_tcpa_errors():
    with pytest.raises(ValueError, match="TokenCoordinatedPromptAttention: coordination"):
        TokenCoordinatedPromptAttention(8, 2, coordination="all")
    t = _prompt_inputs()
    with pytest.raises(ValueError, match="prompt_attention: prompt_mask"):
        prompt_attention(**t, prompt_mask=torch.ones(2, 6, 4, dtype=torch.bool))


# ----------------------------------------------------------------------------- ST-LINK SE-attention


def _se_inputs(N=7, S=2, seed=0, batched=False):
    g = _gen(seed)
    t = {n: torch.randn(2, N, 2, 8, generator=g, dtype=F64) for n in "qkv"}
    shape = (2, N, S) if batched else (N, S)
    return t, torch.randint(0, 5, shape[:-1], generator=g), torch.randn(shape, generator=g, dtype=F64)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_se_op_matches_naive(causal, batched, dtype):
    t, tp, c = _se_inputs(batched=batched)
    kw = {"spatial_dim": 4, "causal": causal}
    compare_fn(lambda **a: se_attention(**a, time_pos=tp, coords=c, **kw),
               lambda **a: naive_se_attention(**a, time_pos=tp, coords=c, **kw), t, dtype)


def test_se_scores_depend_on_differences_only():
    t, tp, c = _se_inputs()
    y = se_attention(**t, time_pos=tp, coords=c, spatial_dim=4)
    shifted = se_attention(**t, time_pos=tp + 11, coords=c + torch.tensor([3.7, -1.25], dtype=F64), spatial_dim=4)
    assert_close(shifted, y, F64, "shifted time and coordinates")
    moved = se_attention(**t, time_pos=tp, coords=c * 1.5, spatial_dim=4)
    assert (moved - y).abs().max() > 1e-6  # not a constant: the differences matter


def test_se_zero_positions_are_plain_attention_and_zero_coords_are_time_rope():
    t, tp, c = _se_inputs()
    zero_t, zero_c = torch.zeros_like(tp), torch.zeros_like(c)
    plain = naive_masked_attention(t["q"], t["k"], t["v"])[0]
    assert_close(se_attention(**t, time_pos=zero_t, coords=zero_c, spatial_dim=4), plain, F64, "zero positions")
    # coordinates 0: the spatial channels stay unrotated, so the output is that of all-time RoPE with zero angles
    # on those channels, and it no longer depends on the spatial split's frequencies
    a = se_attention(**t, time_pos=tp, coords=zero_c, spatial_dim=4, spatial_base=7.0)
    b = se_attention(**t, time_pos=tp, coords=zero_c, spatial_dim=4, spatial_base=1000.0)
    assert_close(a, b, F64, "spatial base irrelevant at zero coordinates")


def test_se_node_permutation_equivariance():
    torch.manual_seed(0)
    V, T = 4, 3
    coords = torch.randn(V, 2)
    m = SEAttention(16, 2, num_nodes=V, node_coords=coords).double()
    x = torch.randn(2, V * T, 16, dtype=F64)
    perm = torch.tensor([2, 0, 3, 1])
    m2 = SEAttention(16, 2, num_nodes=V, node_coords=coords[perm]).double()
    m2.load_state_dict({k: v for k, v in m.state_dict().items() if k != "node_coords"}, strict=False)
    tok = (torch.arange(T).unsqueeze(1) * V + perm).reshape(-1)  # token of node perm[j] at each time
    assert_close(m2(x[:, tok]), m(x)[:, tok], F64, "nodes permuted with their coordinates")


def test_se_laplacian_coords_and_errors():
    adj = torch.zeros(6, 6)
    for i in range(5):  # a path graph
        adj[i, i + 1] = adj[i + 1, i] = 1
    u = laplacian_coords(adj, 2)
    assert u.shape == (6, 2)
    # the Fiedler vector of a path (random-walk form: the normalised one over sqrt(degree)) is monotone along it
    f = u[:, 0] / adj.sum(1).sqrt()
    d = f[1:] - f[:-1]
    assert torch.all(d > 0) or torch.all(d < 0)
    t, tp, c = _se_inputs()
    with pytest.raises(ValueError, match="se_attention: spatial_dim"):
        se_attention(**t, time_pos=tp, coords=c, spatial_dim=3)
    with pytest.raises(ValueError, match="se_attention: coords"):
        se_attention(**t, time_pos=tp, coords=c[:3], spatial_dim=4)
    with pytest.raises(ValueError, match="SEAttention: node_coords"):
        SEAttention(16, 2, num_nodes=3, node_coords=torch.zeros(4, 2))


# ------------------------------------------------------------------------------------------ KArAt


def _kat_inputs(N=6, nmax=8, r=3, G=2, seed=0):
    g = _gen(seed)
    t = {n: torch.randn(2, N, 2, 4, generator=g, dtype=F64) for n in "qkv"}
    t.update(alpha=torch.randn(2, r, nmax, G, generator=g, dtype=F64) * 0.3,
             beta=torch.randn(2, r, nmax, G, generator=g, dtype=F64) * 0.3,
             w=torch.randn(2, nmax, r, generator=g, dtype=F64) * 0.3)
    return t


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kat_op_matches_naive(causal, dtype, monkeypatch):
    import attnkit.ops.sequence.kat as kat_mod

    monkeypatch.setattr(kat_mod, "CHUNK_ELEMENTS", 100)  # several row blocks
    compare_fn(lambda **a: kat_attention(**a, causal=causal), lambda **a: naive_kat_attention(**a, causal=causal),
               _kat_inputs(), dtype)


def test_kat_zero_coefficients_give_zero_output():
    t = _kat_inputs()
    t["alpha"], t["beta"] = torch.zeros_like(t["alpha"]), torch.zeros_like(t["beta"])
    for causal in (False, True):
        out = kat_attention(**t, causal=causal)
        assert torch.all(out == 0) and torch.all(torch.isfinite(out))


def _diagonal(t, c, d):
    """Unit p reads key p only with harmonics c (cos) / d (sin); W = I: sigma_ij = f(a_ij), f elementwise."""
    N, G = t["q"].shape[1], len(c)
    eye = torch.eye(N, dtype=F64)
    t["alpha"] = (eye.view(1, N, N, 1) * torch.tensor(c, dtype=F64)).expand(2, N, N, G).clone()
    t["beta"] = (eye.view(1, N, N, 1) * torch.tensor(d, dtype=F64)).expand(2, N, N, G).clone()
    t["w"] = eye.expand(2, N, N).clone()
    return t


def test_kat_diagonal_coefficients_are_an_elementwise_fourier_kernel():
    t = _diagonal(_kat_inputs(N=5, nmax=5, r=5), [0.5, -0.2], [1.0, 0.3])
    a = torch.einsum("bihd,bjhd->bhij", t["q"], t["k"]) * 0.5  # D = 4
    f = 0.5 * a.cos() - 0.2 * (2 * a).cos() + a.sin() + 0.3 * (2 * a).sin()
    for causal in (False, True):
        s = f.tril() if causal else f
        assert_close(kat_attention(**t, causal=causal), torch.einsum("bhij,bjhd->bihd", s, t["v"]), F64, "f(A) V")


def test_kat_single_sine_term_is_linear_attention_in_the_small_angle_limit():
    eps = 1e-4
    t = _diagonal(_kat_inputs(N=5, nmax=5, r=5), [0.0], [1.0 / eps])  # sigma = sin(eps a) / eps -> a
    out = kat_attention(**t, scale=eps * 0.5)
    a = torch.einsum("bihd,bjhd->bhij", t["q"], t["k"]) * 0.5
    linear = torch.einsum("bhij,bjhd->bihd", a, t["v"])  # unnormalised linear attention (q k^T / sqrt(D)) V
    assert (out - linear).abs().max() < 1e-6 * linear.abs().max()


def test_kat_rows_are_independent_and_causal_prefixes_agree():
    t = _kat_inputs()
    y = kat_attention(**t)
    perm = torch.randperm(6, generator=_gen(1))
    permuted = dict(t, q=t["q"][:, perm])
    assert_close(kat_attention(**permuted), y[:, perm], F64, "query rows permuted")
    yc = kat_attention(**t, causal=True)
    short = {n: (x[:, :4] if n in "qkv" else x) for n, x in t.items()}
    assert_close(kat_attention(**short, causal=True), yc[:, :4], F64, "causal prefix")


def test_kat_length_is_bounded_by_the_parameters():
    t = _kat_inputs(N=9, nmax=8)
    with pytest.raises(ValueError, match="kat_attention: 9 tokens"):
        kat_attention(**t)
    with pytest.raises(ValueError, match="KArAtAttention: x has 17 tokens"):
        KArAtAttention(8, 2, max_len=16)(torch.randn(1, 17, 8))
