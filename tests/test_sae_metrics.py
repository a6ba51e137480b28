"""Standard SAE metrics (SAELens definitions) against hand computations on tiny cases."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from dualenc_fast.eval import sae_metrics as S
from dualenc_fast.nn.modules import SparseCode

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.tensor([[3.0, 0.0], [0.0, 4.0], [0.0, 0.0]])
XHAT = torch.tensor([[3.0, 0.0], [0.0, 2.0], [1.0, 0.0]])
# four latents; a zero value is not an activation
VALUES = torch.tensor([[2.0, 0.0], [1.0, 0.5], [1.0, 0.0]])
INDICES = torch.tensor([[0, 3], [0, 1], [2, 3]])


def test_metrics_match_hand_computation():
    m = S.SAEMetrics().update(X, XHAT, SparseCode(VALUES, INDICES, 4)).result()
    # residual sq 0, 4, 1 -> E = 5/3; E||x||^2 = 25/3, E x = (1, 4/3), ||E x||^2 = 25/9; var = 50/9
    assert m["explained_variance"] == pytest.approx(1 - (5 / 3) / (50 / 9))  # 0.7
    assert m["cossim"] == pytest.approx((1 + 1 + 0) / 3)  # zero x counts as cosine 0
    assert m["l2_ratio"] == pytest.approx((1 + 0.5 + 1) / 3)  # ||x|| < 1e-4 -> divided by 1
    assert m["relative_reconstruction_bias"] == pytest.approx((14 / 3) / (17 / 3))
    assert m["l0"] == pytest.approx(4 / 3)
    assert m["dead_latents"] == 1 and m["dense_latents"] == 3 and m["latents"] == 4
    assert m["density_tokens"] == 3


def test_density_batches_and_code_forms_agree():
    a = S.SAEMetrics().update(X, XHAT, SparseCode(VALUES, INDICES, 4))
    torch.testing.assert_close(a.feature_density, torch.tensor([2 / 3, 1 / 3, 1 / 3, 0.0], dtype=torch.float64))
    dense = torch.zeros(3, 4).scatter_(1, INDICES, VALUES)
    b = S.SAEMetrics().update(X[:2], XHAT[:2], dense[:2]).update(X[2:], XHAT[2:], dense[2:])
    c = S.SAEMetrics(num_features=4).update(X[:1], XHAT[:1], (VALUES[:1], INDICES[:1])) \
        .update(X[1:], XHAT[1:], (VALUES[1:], INDICES[1:]))
    for other in (b, c):
        assert other.result() == pytest.approx(a.result())
        torch.testing.assert_close(other.feature_density, a.feature_density)


def test_dense_threshold_is_strictly_above_ten_percent():
    # latent 0 fires on 1 of 10 tokens (exactly 10%: not dense), latent 1 on 2 of 10 (dense)
    x = torch.ones(10, 2)
    vals = torch.zeros(10, 2)
    vals[0, 0] = 1.0
    vals[:2, 1] = 1.0
    m = S.SAEMetrics().update(x, x, vals).result()
    assert m["dense_latents"] == 1 and m["dead_latents"] == 0
    assert m["explained_variance"] == 1.0  # no variance and no error


def test_metrics_bad_input():
    with pytest.raises(ValueError, match="recon"):
        S.SAEMetrics().update(X, XHAT[:2])
    with pytest.raises(IndexError, match=r"\[0, 4\)"):
        S.SAEMetrics().update(X, XHAT, SparseCode(VALUES, INDICES + 2, 4))
    with pytest.raises(ValueError, match="no tokens"):
        S.SAEMetrics().result()


def test_recovered_scores_and_log_density():
    r = S.recovered_scores(ce_clean=2.0, ce_sae=2.5, ce_zero=7.0, kl_sae=0.5, kl_zero=5.0)
    assert r["ce_loss_score"] == pytest.approx(0.9) and r["kl_div_score"] == pytest.approx(0.9)
    assert math.isnan(S.recovered_scores(ce_clean=1, ce_sae=1, ce_zero=1, kl_sae=0, kl_zero=0)["kl_div_score"])
    logd = S.log_feature_density(torch.tensor([0.0, 1.0, 0.01]))
    assert logd.dtype == torch.float32
    torch.testing.assert_close(logd, torch.tensor([-10.0, 0.0, -2.0]))


def test_standard_metrics_of_a_module_and_histogram(tmp_path):
    from dualenc_fast.nn.modules import TopKSparseAutoencoder

    torch.manual_seed(0)
    sae = TopKSparseAutoencoder(8, 24, 3, backend="reference")
    x = torch.randn(50, 8)
    m, dens = S.standard_metrics(sae, x, batch_size=16)
    with torch.no_grad():
        out = sae.forward_sparse(x)
    ref = S.SAEMetrics().update(x, out.recon, out.code)
    assert m == pytest.approx(ref.result())
    assert m["explained_variance"] == pytest.approx(1 - float((out.recon - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()))
    torch.testing.assert_close(dens, ref.feature_density)
    png = S.density_histogram({"sae": dens}, tmp_path / "d.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_saelens_export_writes_sparsity(tmp_path):
    from safetensors.torch import load_file

    from dualenc_fast.train.checkpoint import export_saelens
    from dualenc_fast.nn.modules import TopKSparseAutoencoder

    sae = TopKSparseAutoencoder(8, 24, 3, backend="reference")
    dens = torch.linspace(0, 0.5, 24)
    export_saelens(sae, tmp_path / "sl", feature_density=dens)
    sp = load_file(str(tmp_path / "sl" / "sparsity.safetensors"))
    assert list(sp) == ["sparsity"] and sp["sparsity"].shape == (24,)
    torch.testing.assert_close(sp["sparsity"], torch.log10(dens.double() + 1e-10).float())
    with pytest.raises(ValueError, match="feature_density"):
        export_saelens(sae, tmp_path / "sl2", feature_density=torch.zeros(5))


def test_train_evaluate_reports_standard_metrics():
    from dualenc_fast.nn.modules import JointSAENFM
    from dualenc_fast.train import evaluate

    torch.manual_seed(1)
    model = JointSAENFM(8, 24, 3, 4, backend="reference")
    x = torch.randn(40, 8)
    m = evaluate(model, x, batch_size=16)
    assert m["explained_variance"] == pytest.approx(1 - m["fvu"], abs=1e-6)
    assert m["dead_latents"] == 24 - m["features_fired"]
    for key in ("cossim", "l2_ratio", "relative_reconstruction_bias", "dense_latents"):
        assert key in m


# --------------------------------------------------------------------------- CE / KL recovered


@pytest.fixture(scope="module")
def tiny_lm():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
    return transformers.LlamaForCausalLM(cfg).eval()


class _Zero(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


class _Half(nn.Module):
    def forward(self, x):
        return 0.5 * x


def test_splice_scores_against_zero_ablation(tiny_lm):
    from dualenc_fast.eval import splice_test

    ids = torch.randint(0, 64, (4, 10), generator=torch.Generator().manual_seed(0))
    res = splice_test(tiny_lm, 0, ids, {"identity": nn.Identity(), "zero": _Zero(), "half": _Half()},
                      n_eps=0, n_boot=10, skip_first=1)
    assert res["kl_zero"] > 0 and res["ce_zero"] != res["ce_clean"]
    ident, zero, half = (res["models"][n] for n in ("identity", "zero", "half"))
    # a perfect reconstruction recovers everything, the zero ablation nothing
    assert ident["ce_loss_score"] == pytest.approx(1.0) and ident["kl_div_score"] == pytest.approx(1.0)
    assert zero["ce_loss_score"] == pytest.approx(0.0, abs=1e-6) and zero["kl_div_score"] == pytest.approx(0.0, abs=1e-6)
    assert zero["kl_recon"] == pytest.approx(res["kl_zero"])
    assert half["ce_loss_score"] == pytest.approx((res["ce_zero"] - half["ce_recon"]) / (res["ce_zero"] - res["ce_clean"]))
    assert half["kl_div_score"] == pytest.approx((res["kl_zero"] - half["kl_recon"]) / res["kl_zero"])


def test_cli_eval_prints_and_stores_standard_metrics(tmp_path, capsys):
    from dualenc_fast.cli import main
    from dualenc_fast.train.data import write_store
    from dualenc_fast.nn.modules import TopKSparseAutoencoder

    torch.manual_seed(0)
    write_store(torch.randn(600, 16), tmp_path / "store")
    TopKSparseAutoencoder(16, 48, 4, backend="reference").save(tmp_path / "sae")
    assert main(["eval", str(tmp_path / "sae"), "--data", str(tmp_path / "store"), "--out", str(tmp_path / "ev"),
                 "--lm", "none", "--no-analysis", "--backend", "reference"]) == 0
    out = capsys.readouterr().out
    assert "explained variance" in out and "dead" in out
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    m = res["standard_metrics"]["models"]["sae"]
    assert m["explained_variance"] == pytest.approx(1 - res["evaluation"]["reconstruction"]["sae"]["fvu"], abs=1e-5)
    assert (tmp_path / "ev" / "feature_density.png").exists()
    assert "## Standard SAE metrics" in (tmp_path / "ev" / "report.md").read_text()
