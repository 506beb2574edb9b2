"""ACMIL pooling, MEDUSA's multi-scale gate, RISurConv's surface attention and CSA's class-semantic gates:
ops against their naive twins (output and every gradient), the papers' identities, the modules' options."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnkit as ak
from attnkit.mechanisms.vision_acmil import ACMILPooling
from attnkit.mechanisms.vision_csa import ClassSemanticAttention
from attnkit.mechanisms.vision_medusa import MEDUSAAttention
from attnkit.mechanisms.vision_risur import RISurAttention
from attnkit.ops.vision.acmil import acmil_pool, stkim_mask
from attnkit.ops.vision.csa import class_semantic_attention
from attnkit.ops.vision.medusa import multiscale_gate
from attnkit.ops.vision.risur import risp_features, surface_attention
from attnkit.reference.naive_vision_c import (
    naive_acmil_pool,
    naive_class_semantic_attention,
    naive_medusa_module,
    naive_multiscale_gate,
    naive_risp_features,
    naive_risur_module,
    naive_surface_attention,
)
from tolerances import assert_close

F64 = torch.float64


def _grads(out, wrt, seed=7):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, wrt, g)


# ------------------------------------------------------------------------------------------- ACMIL


@pytest.mark.parametrize(("num_masked", "drop"), [(0, 0.6), (4, 0.5), (10, 0.6), (20, 1.0)])
def test_acmil_pool_matches_naive(num_masked, drop):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 12, generator=gen, dtype=F64, requires_grad=True)
    x = torch.randn(2, 12, 5, generator=gen, dtype=F64, requires_grad=True)
    out, w = acmil_pool(logits, x, num_masked, drop, generator=torch.Generator().manual_seed(3),
                        return_weights=True)
    ref, wr = naive_acmil_pool(logits, x, num_masked, drop, torch.Generator().manual_seed(3), True)
    assert_close(out, ref, F64, "out")
    assert_close(w, wr, F64, "weights")
    for name, a, b in zip(("dlogits", "dx"), _grads(out, (logits, x)), _grads(ref, (logits, x)), strict=True):
        assert_close(a, b, F64, name, grad=True)


def test_acmil_masked_topk_get_zero_weight_and_rows_sum_to_one():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 4, 30, generator=gen, dtype=F64)
    x = torch.randn(3, 30, 8, generator=gen, dtype=F64)
    K, p = 10, 0.6
    keep = stkim_mask(logits, K, p, torch.Generator().manual_seed(5))
    _, w = acmil_pool(logits, x, K, p, generator=torch.Generator().manual_seed(5), return_weights=True)
    top = torch.topk(logits, K, -1).indices
    masked = ~keep
    assert (masked.sum(-1) == int(K * p)).all()  # exactly floor(K p) per branch (the authors' code)
    assert masked.gather(-1, top).sum(-1).eq(int(K * p)).all()  # ... all among the branch's top K
    assert (w[masked] == 0).all()
    assert torch.allclose(w.sum(-1), torch.ones(3, 4, dtype=F64))
    # the kept entries are the softmax over the kept logits alone
    ref = torch.where(keep, logits, torch.tensor(-torch.inf, dtype=F64)).softmax(-1)
    assert torch.allclose(w, ref)


def test_acmil_one_branch_no_masking_is_abmil_gated_pooling():
    torch.manual_seed(0)
    m = ACMILPooling(8, att_dim=6, num_branches=1, num_masked=0).double()
    x = torch.randn(2, 11, 8, dtype=F64)
    # ABMIL (arXiv 1802.04712, Eq. 9): a_k = w^T (tanh(V h_k) * sigmoid(U h_k)), softmax over k, weighted sum
    a = m.attention_w(torch.tanh(m.attention_v(x)) * torch.sigmoid(m.attention_u(x))).squeeze(-1)  # (B, N)
    abmil = (a.softmax(-1)[..., None] * x).sum(1)  # (B, C)
    assert torch.allclose(m(x)[:, 0], abmil)
    m2 = ACMILPooling(8, att_dim=6, num_branches=1, num_masked=10, mask_drop=0.0).double()
    m2.load_state_dict(m.state_dict())
    assert torch.allclose(m2.train()(x), m(x))  # p = 0: multi-branch ABMIL even in training


def test_acmil_eval_is_deterministic_and_training_masks_change_output():
    torch.manual_seed(0)
    m = ACMILPooling(8, att_dim=6, num_branches=3, num_masked=5, mask_drop=0.6)
    x = torch.randn(2, 40, 8)
    torch.manual_seed(1)
    train_a = m.train()(x)
    torch.manual_seed(2)
    train_b = m(x)
    assert not torch.equal(train_a, train_b)  # different draws, different masks
    m.eval()
    torch.manual_seed(3)
    e1 = m(x)
    torch.manual_seed(4)
    assert torch.equal(e1, m(x))
    assert not torch.allclose(e1, train_a)


def test_acmil_seed_and_generator_make_training_reproducible():
    torch.manual_seed(0)
    m = ACMILPooling(8, att_dim=6, num_branches=3, num_masked=5, mask_drop=0.6, seed=11).train()
    x = torch.randn(2, 40, 8)
    assert torch.equal(m(x), m(x))
    free = ACMILPooling(8, att_dim=6, num_branches=3, num_masked=5, mask_drop=0.6).train()
    free.load_state_dict(m.state_dict())
    g = lambda: torch.Generator().manual_seed(11)  # noqa: E731
    assert torch.equal(free(x, generator=g()), free(x, generator=g()))
    assert torch.equal(free(x, generator=g()), m(x))


def test_acmil_bag_embedding_is_the_branch_mean():
    torch.manual_seed(0)
    m = ACMILPooling(8, att_dim=6, num_branches=4, num_masked=0).double().eval()
    x = torch.randn(1, 20, 8, dtype=F64)
    z, w = m(x, return_attention=True)
    assert torch.allclose(z.mean(1), w.mean(1) @ x[0])  # the authors' bag_A = mean of branch softmaxes


def test_acmil_options_and_inputs_are_checked():
    with pytest.raises(ValueError, match="ACMILPooling: mask_drop"):
        ACMILPooling(8, mask_drop=1.5)
    with pytest.raises(ValueError, match="ACMILPooling: num_branches"):
        ACMILPooling(8, num_branches=0)
    with pytest.raises(ValueError, match="acmil_pool: logits must be"):
        acmil_pool(torch.randn(1, 2, 5), torch.randn(1, 6, 3))
    with pytest.raises(ValueError, match="acmil_pool: mask_drop"):
        acmil_pool(torch.randn(1, 2, 5), torch.randn(1, 5, 3), 2, -0.1)
    assert "acmil_pool" in ak.explain("acmil_pool", torch.randn(1, 2, 5), torch.randn(1, 5, 3), 2)


# --------------------------------------------------------------------------------------------- CSA


@pytest.mark.parametrize("fuse", ["concat", "sum"])
def test_csa_matches_naive(fuse):
    gen = torch.Generator().manual_seed(0)
    B, T, C, Cr, h, k = 2, 9, 5, 7, 3, 5

    def t(*s):
        return torch.randn(*s, generator=gen, dtype=F64, requires_grad=True)

    args = [t(B, T, C), t(B, T, Cr), t(h, Cr), t(h), t(C, h), t(C), t(1, Cr, k), t(1),
            t(C, 2 * C) if fuse == "concat" else None, t(C) if fuse == "concat" else None]
    out = class_semantic_attention(*args, fuse=fuse)
    ref = naive_class_semantic_attention(*args, fuse=fuse)
    assert_close(out, ref, F64, "out")
    wrt = [a for a in args if a is not None]
    names = ["df", "dr", "dw1", "db1", "dw2", "db2", "dwt", "dbt", "dwf", "dbf"][:len(wrt)]
    for name, a, b in zip(names, _grads(out, wrt), _grads(ref, wrt), strict=True):
        assert_close(a, b, F64, name, grad=True)


def test_csa_zero_weights_give_half_gates():
    m = ClassSemanticAttention(6, semantic_dim=4, fuse="sum").double()
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
    f, r = torch.randn(2, 8, 6, dtype=F64), torch.randn(2, 8, 4, dtype=F64)
    assert torch.allclose(m(f, r), f)  # f * 0.5 + f * 0.5 in the sum form: both gates are exactly 1/2


def test_csa_gates_come_from_r_only():
    torch.manual_seed(0)
    m = ClassSemanticAttention(6, semantic_dim=4, fuse="sum").double()
    f1, f2, r = (torch.randn(2, 8, c, dtype=F64) for c in (6, 6, 4))
    g1, g2 = m(f1, r) / f1, m(f2, r) / f2  # a_c + a_t, the same for any f
    assert torch.allclose(g1, g2)
    # concat form: linear in f for a fixed r (no gradient from f into the gates)
    m2 = ClassSemanticAttention(6, semantic_dim=4).double()
    zero = m2(torch.zeros_like(f1), r)
    assert torch.allclose(m2(f1 + f2, r) - zero, (m2(f1, r) - zero) + (m2(f2, r) - zero))


def test_csa_temporal_gate_is_local():
    torch.manual_seed(0)
    m = ClassSemanticAttention(6, semantic_dim=4, kernel_size=3, fuse="sum").double()
    with torch.no_grad():
        m.channel_fc2.weight.zero_()  # the channel gate no longer depends on r
    f, r = torch.randn(1, 12, 6, dtype=F64), torch.randn(1, 12, 4, dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(m(f, r)[0, 5].sum(), r)
    assert g[0, 4:7].abs().sum() > 0 and g[0, :4].abs().max() == 0 and g[0, 7:].abs().max() == 0


def test_csa_options_and_inputs_are_checked():
    with pytest.raises(ValueError, match="ClassSemanticAttention: kernel_size"):
        ClassSemanticAttention(6, kernel_size=4)
    m = ClassSemanticAttention(6, semantic_dim=4)
    with pytest.raises(ValueError, match="ClassSemanticAttention: r "):
        m(torch.randn(1, 5, 6))
    with pytest.raises(ValueError, match="ClassSemanticAttention: r must share"):
        m(torch.randn(1, 5, 6), torch.randn(1, 6, 4))


# ------------------------------------------------------------------------------------------ MEDUSA


@pytest.mark.parametrize("mode", ["residual", "multiply"])
def test_multiscale_gate_matches_naive(mode):
    gen = torch.Generator().manual_seed(0)

    def t(*s):
        return torch.randn(*s, generator=gen, dtype=F64, requires_grad=True)

    body = t(2, 5, 12, 10)
    stages = [t(2, 3, 12, 10), t(2, 8, 6, 5), t(2, 4, 5, 3)]  # C_s < C_b (head first) and C_s > C_b (pool first)
    weights = [t(3, 5), t(8, 5), t(4, 5)]
    biases = [t(3), None, t(4)]
    out = multiscale_gate(body, stages, weights, biases, mode)
    ref = naive_multiscale_gate(body, stages, weights, biases, mode)
    wrt = [body, *stages, *weights, biases[0], biases[2]]
    for a, b in zip(out, ref, strict=True):
        assert_close(a, b, F64, "out")
    g = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i), dtype=F64) for i, o in enumerate(out)]
    ga = torch.autograd.grad(out, wrt, g)
    gb = torch.autograd.grad(ref, wrt, g)
    for i, (a, b) in enumerate(zip(ga, gb, strict=True)):
        assert_close(a, b, F64, f"grad{i}", grad=True)


def _medusa(mode="residual"):
    torch.manual_seed(0)
    return MEDUSAAttention(3, stage_channels=(6, 10, 12), body_dim=8, mode=mode).double()


def _pyramid(B=2):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(B, 3, 32, 32, generator=gen, dtype=F64)
    stages = [torch.randn(B, c, s, s, generator=gen, dtype=F64) for c, s in ((6, 16), (10, 8), (12, 4))]
    return x, stages


def test_medusa_multiscale_module_matches_its_twin():
    m = _medusa()
    x, stages = _pyramid()
    x.requires_grad_()
    out = m(x, stages)
    ref = naive_medusa_module(m, x, stages)
    assert [o.shape for o in out] == [s.shape for s in stages]
    for a, b in zip(out, ref, strict=True):
        assert_close(a, b, F64, "out")
    (ga,) = torch.autograd.grad(sum(o.sum() for o in out), x)
    (gb,) = torch.autograd.grad(sum(o.sum() for o in ref), x)
    assert_close(ga, gb, F64, "dx", grad=True)
    assert ga.abs().sum() > 0  # every stage's attention reads the body's input


def test_medusa_zero_attention_leaves_the_backbone_unchanged():
    m = _medusa()
    with torch.no_grad():
        for h in m.heads:
            h.weight.zero_()
            h.bias.fill_(-1e4)  # sigmoid = 0 exactly
    x, stages = _pyramid()
    for a, s in zip(m(x, stages), stages, strict=True):
        assert torch.equal(a, s)
    m.mode = "multiply"
    assert all((a == 0).all() for a in m(x, stages))


def test_medusa_one_body_evaluation_for_every_scale():
    m = _medusa()
    calls = []
    m.enc1.register_forward_hook(lambda *_: calls.append(1))
    x, stages = _pyramid()
    m(x, stages)
    assert len(calls) == 1
    # a stage's result does not depend on the other stages (each head reads only the shared body)
    alone = m(x, stages[:1])[0]
    assert torch.equal(alone, m(x, stages)[0])


def test_medusa_inputs_are_checked():
    m = _medusa()
    x, stages = _pyramid()
    with pytest.raises(ValueError, match="MEDUSAAttention: without stages"):
        m(x)
    with pytest.raises(ValueError, match=r"MEDUSAAttention: stages\[1\] must be"):
        m(x, [stages[0], stages[2]])
    with pytest.raises(ValueError, match=r"multiscale_gate: stages\[0\] extent"):
        m(x[:, :, :8, :8], stages)
    with pytest.raises(ValueError, match="MEDUSAAttention: mode"):
        MEDUSAAttention(3, mode="add")


# --------------------------------------------------------------------------------------- RISurConv


def _cloud(B=2, N=24, seed=0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    pts = torch.randn(B, N, 3, generator=gen, dtype=dtype)
    nrm = F.normalize(torch.randn(B, N, 3, generator=gen, dtype=dtype), dim=-1)
    return pts, nrm


def _rotation(seed=0):
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed), dtype=F64))
    q = q * torch.sign(torch.diagonal(r))
    return q if torch.det(q) > 0 else -q  # a proper rotation (det +1)


@pytest.mark.parametrize("normalize", ["neighbours", "points"])
def test_surface_attention_matches_naive(normalize):
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 3, 5, 4, generator=gen, dtype=F64, requires_grad=True) for _ in range(2))
    v = torch.randn(2, 3, 5, 6, generator=gen, dtype=F64, requires_grad=True)
    out = surface_attention(q, k, v, normalize)
    ref = naive_surface_attention(q, k, v, normalize)
    assert_close(out, ref, F64, "out")
    for name, a, b in zip("qkv", _grads(out, (q, k, v)), _grads(ref, (q, k, v)), strict=True):
        assert_close(a, b, F64, f"d{name}", grad=True)


def test_surface_attention_columns_are_renormalised():
    gen = torch.Generator().manual_seed(1)
    q, k = (torch.randn(1, 2, 6, 3, generator=gen, dtype=F64) for _ in range(2))
    eye = torch.eye(6, dtype=F64).expand(1, 2, 6, 6)
    a = surface_attention(q, k, eye)  # v = I reads the matrix: out[j, i] = A[i, j]
    # every key's column sums to 1 over the queries
    assert torch.allclose(a.sum(-1), torch.ones(1, 2, 6, dtype=F64), atol=1e-8)


@pytest.mark.parametrize("shift", [1, 2])
def test_risp_features_match_naive(shift):
    pts, nrm = _cloud(N=12)
    pts.requires_grad_()
    nrm.requires_grad_()
    (out, idx), (ref, idx_r) = risp_features(pts, nrm, 5, shift), naive_risp_features(pts, nrm, 5, shift)
    assert torch.equal(idx, idx_r)
    assert_close(out, ref, F64, "risp")
    for name, a, b in zip(("dpoints", "dnormals"), _grads(out, (pts, nrm)), _grads(ref, (pts, nrm)), strict=True):
        assert_close(a, b, F64, name, grad=True)


def test_risp_features_are_rotation_invariant():
    pts, nrm = _cloud(N=40)
    R = _rotation(3)
    f, idx = risp_features(pts, nrm, 8)
    g, idx_r = risp_features(pts @ R.T, nrm @ R.T, 8)
    assert torch.equal(idx, idx_r)
    assert (f - g).abs().max() < 1e-10


@pytest.mark.parametrize("train", [True, False])
def test_risur_module_is_rotation_invariant(train):
    torch.manual_seed(0)
    m = RISurAttention(out_dim=8, k=6, in_channels=3, embed_dim=8).double().train(train)
    pts, nrm = _cloud(N=30)
    feats = torch.randn(2, 30, 3, generator=torch.Generator().manual_seed(2), dtype=F64)  # invariant features
    R = _rotation(5)
    y = m(torch.cat([pts, nrm], -1), feats)
    y_rot = m(torch.cat([pts @ R.T, nrm @ R.T], -1), feats)
    assert (y - y_rot).abs().max() < 1e-10
    assert y.abs().max() > 1e-3  # not invariant by being zero


def test_risur_module_with_features_matches_twin_and_is_permutation_equivariant():
    torch.manual_seed(0)
    m = RISurAttention(out_dim=8, k=4, in_channels=3, embed_dim=8, shift=2).double()
    pts, nrm = _cloud(N=16)
    x = torch.cat([pts, nrm], -1).requires_grad_()
    feats = torch.randn(2, 16, 3, generator=torch.Generator().manual_seed(2), dtype=F64, requires_grad=True)
    out, ref = m(x, feats), naive_risur_module(m, x, feats)
    assert_close(out, ref, F64, "out")
    for name, a, b in zip(("dx", "dfeatures"), _grads(out, (x, feats)), _grads(ref, (x, feats)), strict=True):
        assert_close(a, b, F64, name, grad=True)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.allclose(m(x[:, perm], feats[:, perm]), m(x, feats)[:, perm])  # point order does not matter


def test_risur_inputs_are_checked():
    m = RISurAttention(out_dim=8, k=4, embed_dim=8)
    with pytest.raises(ValueError, match="RISurAttention: x has N=4 points"):
        m(torch.randn(1, 4, 6))
    with pytest.raises(ValueError, match="RISurAttention: features"):
        m(torch.randn(1, 9, 6), torch.randn(1, 9, 2))
    with pytest.raises(ValueError, match="RISurAttention: shift"):
        RISurAttention(k=3, shift=3)
    with pytest.raises(ValueError, match="risp_features: k must be"):
        risp_features(torch.randn(1, 5, 3), torch.randn(1, 5, 3), 5)
