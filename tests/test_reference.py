"""The pure-PyTorch reference checked against independent computations: explicit
sums over feature pairs, a NumPy sort, and the research modules' exact
parameter names, shapes, initialisation and outputs."""
import itertools
import math

import numpy as np
import pytest
import torch

from dualenc_fast import reference as ref
from dualenc_fast.reference import functional as RF


def test_fm_pooling_equals_sum_over_pairs():
    g = torch.Generator().manual_seed(0)
    B, k, F, K = 4, 5, 12, 3
    values = torch.randn(B, k, generator=g, dtype=torch.float64)
    indices = torch.stack([torch.randperm(F, generator=g)[:k] for _ in range(B)])
    emb = torch.randn(F, K, generator=g, dtype=torch.float64)
    out = RF.fm_interaction(values, indices, emb)
    for b in range(B):
        expect = torch.zeros(K, dtype=torch.float64)
        for a, c in itertools.combinations(range(k), 2):
            expect += values[b, a] * emb[indices[b, a]] * values[b, c] * emb[indices[b, c]]
        torch.testing.assert_close(out[b], expect)


def test_fm_pooling_gradient_formulas():
    # dp/dv_i = V_i * (s - v_i V_i), dp/dV_i = v_i * (s - v_i V_i) (SPEC.md)
    g = torch.Generator().manual_seed(1)
    values = torch.randn(1, 4, generator=g, dtype=torch.float64, requires_grad=True)
    indices = torch.tensor([[0, 2, 3, 5]])
    emb = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    up = torch.randn(1, 3, generator=g, dtype=torch.float64)
    gv, ge = torch.autograd.grad(RF.fm_interaction(values, indices, emb), (values, emb), up)
    with torch.no_grad():
        V = emb[indices[0]]
        v = values[0]
        s = (v[:, None] * V).sum(0)
        for j in range(4):
            term = s - v[j] * V[j]
            torch.testing.assert_close(gv[0, j], (up[0] * V[j] * term).sum())
            torch.testing.assert_close(ge[indices[0, j]], up[0] * v[j] * term)


def test_topk_code_against_numpy_sort():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 5, generator=g)
    w = torch.randn(20, 5, generator=g)
    w[7] = w[3]  # an exact tie between features 3 and 7
    b = torch.zeros(20)
    values, indices = RF.topk_encode(x, w, b, 6)
    z = np.maximum((x @ w.T + b).numpy(), 0)
    for r in range(6):
        order = np.lexsort((np.arange(20), -z[r]))[:6]  # value desc, index asc
        assert indices[r].tolist() == order.tolist()
        np.testing.assert_allclose(values[r].numpy(), z[r, order])


def test_sparse_decode_and_dense_code_agree():
    g = torch.Generator().manual_seed(3)
    values = torch.randn(3, 4, generator=g)
    indices = torch.tensor([[0, 1, 1, 5], [2, 3, 4, 0], [5, 5, 5, 5]])  # repeats add up
    w = torch.randn(6, 7, generator=g)
    dense = RF.dense_code(values, indices, 6)
    torch.testing.assert_close(RF.sparse_decode(values, indices, w), dense @ w)
    assert dense[2, 5] == pytest.approx(values[2].sum().item(), rel=1e-6)


def test_topk_sae_names_shapes_init_and_forward():
    torch.manual_seed(0)
    d, F, k = 16, 400, 5
    sae = ref.TopKSparseAutoencoder(d, F, k)
    shapes = {n: tuple(p.shape) for n, p in sae.named_parameters()}
    assert shapes == {"encoder.0.weight": (F, d), "encoder.0.bias": (F,), "decoder.weight": (d, F)}
    assert sae.k == k
    assert torch.equal(sae.encoder[0].weight, sae.decoder.weight.T)
    assert torch.count_nonzero(sae.encoder[0].bias) == 0
    std = sae.decoder.weight.std().item()
    assert std == pytest.approx(math.sqrt(2.0 / F), rel=0.05)  # Kaiming normal, fan_in = F
    x = torch.randn(9, d)
    sparse, recon = sae(x)
    assert sparse.shape == (9, F)
    assert ((sparse != 0).sum(1) <= k).all()
    z = torch.relu(x @ sae.encoder[0].weight.T + sae.encoder[0].bias)
    kth = torch.sort(z, 1, descending=True).values[:, k - 1 : k]
    torch.testing.assert_close(sparse, torch.where(z >= kth, z, torch.zeros_like(z)))
    torch.testing.assert_close(recon, sparse @ sae.decoder.weight.T)


@pytest.mark.parametrize("top_n", [None, 3])
def test_nfm_names_shapes_init_and_forward(top_n):
    torch.manual_seed(1)
    F, K, d = 300, 30, 12
    nfm = ref.NeuralFactorizationMachine(F, K, d, top_n=top_n, dropout=0.15)
    shapes = {n: tuple(p.shape) for n, p in nfm.named_parameters()}
    assert shapes == {
        "feature_embeddings.weight": (F, K),
        "linear.weight": (d, F),
        "linear.bias": (d,),
        "interaction_mlp.1.weight": (K, K),
        "interaction_mlp.1.bias": (K,),
        "interaction_mlp.3.weight": (d, K),
        "interaction_mlp.3.bias": (d,),
    }
    assert isinstance(nfm.interaction_mlp[0], torch.nn.Dropout) and nfm.interaction_mlp[0].p == 0.15
    assert nfm.feature_embeddings.weight.std().item() == pytest.approx(0.05, rel=0.05)
    assert nfm.linear.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert nfm.interaction_mlp[1].weight.std().item() == pytest.approx(0.01, rel=0.15)
    nfm.eval()
    f = torch.zeros(2, F)
    f[0, [3, 10, 50, 299]] = torch.tensor([1.0, 2.0, 0.5, 3.0])
    f[1, [0, 1]] = torch.tensor([0.25, 4.0])
    total, lin, inter = nfm(f)
    fk = f.clone()
    if top_n is not None:
        fk[0, 50] = 0.0  # the smallest of the four goes
    V = nfm.feature_embeddings.weight
    s = fk @ V
    p = 0.5 * (s**2 - (fk**2) @ (V**2))
    h = torch.relu(p @ nfm.interaction_mlp[1].weight.T + nfm.interaction_mlp[1].bias)
    torch.testing.assert_close(inter, h @ nfm.interaction_mlp[3].weight.T + nfm.interaction_mlp[3].bias)
    torch.testing.assert_close(lin, fk @ nfm.linear.weight.T + nfm.linear.bias)
    torch.testing.assert_close(total, lin + inter)


def test_joint_outputs_compose():
    torch.manual_seed(2)
    model = ref.JointSAENFM(10, 64, 4, 8, top_n=2, dropout=0.0)
    assert set(dict(model.named_children())) == {"primary_sae", "nfm"}
    x = torch.randn(5, 10)
    recon, sparse, sae_recon, lin, inter = model(x)
    s2, r2 = model.primary_sae(x)
    torch.testing.assert_close(sparse, s2)
    torch.testing.assert_close(sae_recon, r2)
    torch.testing.assert_close(recon, sae_recon + lin + inter)
    assert model.nfm.top_n == 2


def test_integration_mlp_dropout_scaling():
    p = torch.ones(2, 4)
    w1 = torch.eye(4)
    mask = torch.tensor([[True, False, True, True], [False, False, False, True]])
    out = RF.integration_mlp(p, w1, torch.zeros(4), torch.eye(4), torch.zeros(4), 0.5, True, mask=mask)
    torch.testing.assert_close(out, mask.float() * 2.0)
    # eval mode ignores dropout entirely
    out = RF.integration_mlp(p, w1, torch.zeros(4), torch.eye(4), torch.zeros(4), 0.5, False, mask=mask)
    torch.testing.assert_close(out, p)


def test_topn_reselect_tie_rule():
    values = torch.tensor([[1.0, 3.0, 3.0, 2.0]])
    indices = torch.tensor([[9, 7, 4, 1]])
    v, i = RF.topn_reselect(values, indices, 3)
    assert v.tolist() == [[3.0, 3.0, 2.0]] and i.tolist() == [[4, 7, 1]]
