"""Weight analysis: bimodality test, contributions, blocked Gram statistics, PCA."""
import math

import numpy as np
import pytest
import torch

from dualenc_fast.analysis import weights as A
from dualenc_fast.reference import JointSAENFM, TopKSparseAutoencoder

N_SIM = 200  # Monte-Carlo samples for the dip p-value in tests


pytestmark = pytest.mark.usefixtures("one_thread")


def _decoder_with_squared_norms(sq: np.ndarray, d: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, sq.size, generator=g, dtype=torch.float64)
    w = w / w.norm(dim=0, keepdim=True) * torch.from_numpy(np.sqrt(sq))
    return w


def _planted(n=800, seed=0):
    rng = np.random.default_rng(seed)
    n_low = int(0.55 * n)
    sq = np.concatenate([rng.normal(0.05, 0.015, n_low), rng.normal(0.37, 0.06, n - n_low)])
    return np.abs(sq), n_low / n


# ----------------------------------------------------------------------------- dip statistic

def test_dip_two_point_masses_is_quarter():
    x = np.array([0.0] * 40 + [1.0] * 40)
    assert A.dip_statistic(x) == pytest.approx(0.25, abs=1e-12)


def test_dip_invariances_and_range():
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal(0, 1, 150), rng.normal(4, 1, 100)])
    d = A.dip_statistic(x)
    assert 1 / (2 * x.size) <= d <= 0.25
    assert A.dip_statistic(rng.permutation(x)) == pytest.approx(d, abs=1e-15)
    assert A.dip_statistic(3.0 * x - 7.0) == pytest.approx(d, abs=1e-12)
    assert A.dip_statistic(-x) == pytest.approx(d, abs=1e-12)


def test_dip_of_uniform_grid_is_minimal():
    # an evenly spaced sample is its own (unimodal) linear CDF: dip = 1/(2n)
    x = np.linspace(0.0, 1.0, 101)
    assert A.dip_statistic(x) == pytest.approx(1 / (2 * 101), rel=1e-9)


def test_dip_test_pvalues():
    rng = np.random.default_rng(1)
    uni = A.dip_test(rng.normal(size=400), n_sim=N_SIM)
    bi = A.dip_test(np.concatenate([rng.normal(0, 1, 200), rng.normal(6, 1, 200)]), n_sim=N_SIM)
    assert uni.p_value > 0.2
    assert bi.p_value == pytest.approx(1 / (N_SIM + 1))


# ----------------------------------------------------------------------------- mixture

def test_gaussian_mixture_recovers_planted_components():
    sq, frac = _planted(2000)
    g = A.fit_gaussian_mixture(sq, 2)
    assert g.means[0] == pytest.approx(0.05, abs=0.01)
    assert g.means[1] == pytest.approx(0.37, abs=0.02)
    assert g.weights[0] == pytest.approx(frac, abs=0.03)
    assert g.means[0] < A.mixture_split(g) < g.means[1]
    g1 = A.fit_gaussian_mixture(sq, 1)
    assert g1.bic > g.bic


# ----------------------------------------------------------------------------- bimodality decision

def test_planted_bimodal_norms_are_found():
    sq, frac = _planted(800)
    w = _decoder_with_squared_norms(sq)
    res = A.norm_bimodality(w, n_sim=N_SIM)
    assert res.bimodal
    np.testing.assert_allclose(res.squared_norms, sq, rtol=1e-9)
    lo, hi = res.group_means
    assert lo == pytest.approx(0.05, abs=0.01) and hi == pytest.approx(0.37, abs=0.02)
    assert res.group_fractions[0] == pytest.approx(frac, abs=0.03)
    assert 0.1 < res.split < 0.3
    d = res.to_dict()
    assert d["bimodal"] is True and d["delta_bic"] > 10 and d["dip"]["p_value"] < 0.05
    assert "squared_norms" not in d and len(res.to_dict(include_norms=True)["squared_norms"]) == 800


def test_planted_bimodal_via_joint_model():
    sq, _ = _planted(600, seed=4)
    model = JointSAENFM(24, 600, 8, 8)
    with torch.no_grad():
        model.primary_sae.decoder.weight.copy_(_decoder_with_squared_norms(sq, seed=4).float())
    assert A.norm_bimodality(model, n_sim=N_SIM).bimodal


@pytest.mark.parametrize("kind", ["normal", "gamma", "lognormal", "sae_init"])
def test_unimodal_controls_are_not_bimodal(kind):
    rng = np.random.default_rng(7)
    if kind == "normal":
        sq = np.abs(rng.normal(0.4, 0.05, 800))
    elif kind == "gamma":  # skewed: BIC alone prefers 2 components here, the dip test must veto
        sq = rng.gamma(4.0, 0.1, 800)
    elif kind == "lognormal":
        sq = rng.lognormal(-1.0, 0.6, 800)
    else:
        torch.manual_seed(0)
        sq = A.squared_norms(TopKSparseAutoencoder(32, 800, 8))
    res = A.norm_bimodality(sq, n_sim=N_SIM)
    assert not res.bimodal, res.summary()


# ----------------------------------------------------------------------------- contributions

def _hand_built_joint():
    model = JointSAENFM(3, 4, 2, 2)
    with torch.no_grad():
        dec = torch.zeros(3, 4)
        dec[:, 0] = torch.tensor([3.0, 4.0, 0.0])   # ||.|| 5
        dec[:, 1] = torch.tensor([0.0, 0.0, 1.0])   # 1
        dec[:, 2] = torch.tensor([1.0, 2.0, 2.0])   # 3
        dec[:, 3] = torch.tensor([0.0, 0.0, 0.0])   # 0
        lin = torch.zeros(3, 4)
        lin[:, 0] = torch.tensor([0.0, 3.0, 4.0])   # 5
        lin[:, 1] = torch.tensor([2.0, 0.0, 0.0])   # 2
        lin[:, 2] = torch.tensor([0.0, 0.0, 0.0])   # 0
        lin[:, 3] = torch.tensor([0.0, 0.0, 0.0])   # 0
        V = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 1.0], [0.0, 0.0]])  # 0, 5, 1, 0
        model.primary_sae.decoder.weight.copy_(dec)
        model.nfm.linear.weight.copy_(lin)
        model.nfm.feature_embeddings.weight.copy_(V)
    return model


def test_contribution_norms_and_ratios_on_hand_built_weights():
    c = A.contribution_norms(_hand_built_joint())
    np.testing.assert_allclose(c.decoder, [5, 1, 3, 0])
    np.testing.assert_allclose(c.linear, [5, 2, 0, 0])
    np.testing.assert_allclose(c.embedding, [0, 5, 1, 0])
    np.testing.assert_allclose(c.total, [10, 8, 4, 0])
    r = c.ratios()
    np.testing.assert_allclose(r["decoder"], [0.5, 1 / 8, 0.75, 0])
    np.testing.assert_allclose(r["linear"], [0.5, 2 / 8, 0, 0])
    np.testing.assert_allclose(r["embedding"], [0, 5 / 8, 0.25, 0])
    d = c.as_dict()
    assert set(d) == {"decoder_norm", "linear_norm", "embedding_norm", "decoder_ratio", "linear_ratio",
                      "embedding_ratio"}


def test_contributions_of_sae_only_have_no_ratios():
    c = A.contribution_norms(TopKSparseAutoencoder(8, 16, 2))
    assert c.linear is None and c.embedding is None
    assert set(c.as_dict()) == {"decoder_norm"}


def test_fused_module_orientation_matches_reference():
    from dualenc_fast.nn.modules import JointSAENFM as FusedJoint

    torch.manual_seed(0)
    ref = JointSAENFM(6, 10, 2, 3)
    fused = FusedJoint(6, 10, 2, 3, backend="reference")
    fused.load_state_dict(ref.state_dict())
    torch.testing.assert_close(A.decoder_weight(fused), ref.primary_sae.decoder.weight)
    lin, emb = A.nfm_weights(fused)
    torch.testing.assert_close(lin, ref.nfm.linear.weight)
    np.testing.assert_allclose(A.contribution_norms(fused).linear, A.contribution_norms(ref).linear, rtol=1e-6)


def test_group_comparison_and_correlations():
    sq = np.array([0.05, 0.1, 0.15, 0.3, 0.4, 0.5])
    vals = {"v": np.array([1.0, 2.0, 3.0, 10.0, 11.0, 12.0])}
    g = A.group_comparison(vals, sq, 0.2)["v"]
    assert (g["n_low"], g["n_high"]) == (3, 3)
    assert g["mean_low"] == pytest.approx(2.0) and g["mean_high"] == pytest.approx(11.0)
    assert g["cohens_d"] > 0 and 0 < g["mannwhitney_p"] <= 0.1
    c = A.correlations(sq, vals["v"])
    assert c["spearman_rho"] == pytest.approx(1.0)
    assert 0 < c["pearson_r"] < 1 and c["pearson_p"] < 0.05


# ----------------------------------------------------------------------------- Gram (blocked)

def _dense_offdiag(w):
    G = (w.T @ w).double()
    iu = torch.triu_indices(G.shape[0], G.shape[0], offset=1)
    return G[iu[0], iu[1]]


@pytest.mark.parametrize("block", [1, 8, 64])
def test_blocked_gram_stats_equal_dense(block):
    torch.manual_seed(0)
    F = 37
    w = torch.randn(5, F, dtype=torch.float64)
    groups = np.arange(F) % 3 == 0
    st = A.gram_offdiagonal_stats(w, block=block, groups=groups)
    off = _dense_offdiag(w)
    assert st["gram"]["n_pairs"] == F * (F - 1) // 2
    assert st["gram"]["mean"] == pytest.approx(float(off.mean()), rel=1e-10)
    assert st["gram"]["std"] == pytest.approx(float(off.std(unbiased=False)), rel=1e-10)
    assert st["gram"]["mean_abs"] == pytest.approx(float(off.abs().mean()), rel=1e-10)
    assert st["gram"]["max_abs"] == pytest.approx(float(off.abs().max()), rel=1e-12)
    wn = w / w.norm(dim=0, keepdim=True)
    cos = _dense_offdiag(wn)
    assert st["cosine"]["mean"] == pytest.approx(float(cos.mean()), rel=1e-10)
    assert st["cosine"]["max_abs"] == pytest.approx(float(cos.abs().max()), rel=1e-12)
    assert st["cosine"]["frac_abs_gt_0.5"] == pytest.approx(float((cos.abs() > 0.5).double().mean()))
    # by group
    C = (wn.T @ wn)
    gi = torch.from_numpy(groups)
    iu = torch.triu_indices(F, F, offset=1)
    a, b = gi[iu[0]], gi[iu[1]]
    vals = C[iu[0], iu[1]]
    by = st["cosine_by_group"]
    assert by["low_low"]["mean"] == pytest.approx(float(vals[a & b].mean()), rel=1e-10)
    assert by["high_high"]["mean"] == pytest.approx(float(vals[~a & ~b].mean()), rel=1e-10)
    assert by["low_high"]["n_pairs"] == int((a ^ b).sum())


def test_gram_sampling_bounds_memory_and_reports():
    w = torch.randn(4, 500)
    st = A.gram_offdiagonal_stats(w, block=64, max_features=100)
    assert st["sampled_features"] == 100 and st["gram"]["n_pairs"] == 100 * 99 // 2


# ----------------------------------------------------------------------------- PCA and full analysis

def test_pca_matches_svd_and_counts_components():
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(2, 10))
    x = rng.normal(size=(300, 2)) * [3.0, 1.0] @ basis + 1e-3 * rng.normal(size=(300, 10))
    res = A.pca_summary(torch.from_numpy(x), block=64)
    s = np.linalg.svd(x - x.mean(0), compute_uv=False) ** 2
    ratio = s / s.sum()
    np.testing.assert_allclose(res["explained_variance_ratio_top"][:3], ratio[:3], rtol=1e-6, atol=1e-9)
    assert res["n_components_90"] == int(np.searchsorted(np.cumsum(ratio), 0.9) + 1)
    assert res["n_components_99"] <= 2


def test_feature_analysis_runs_end_to_end():
    torch.manual_seed(0)
    model = JointSAENFM(16, 120, 4, 6)
    out = A.feature_analysis(model, n_sim=50, gram_block=32)
    assert {"bimodality", "contributions", "groups_at_threshold", "groups_at_split", "correlations", "gram",
            "pca", "_arrays"} <= set(out)
    assert out["pca"]["embedding"]["dim"] == 6
    assert out["_arrays"]["squared_norm"].shape == (120,)
    assert math.isfinite(out["correlations"]["linear_ratio"]["spearman_rho"])
