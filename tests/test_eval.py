"""Evaluation: reconstruction metrics, ablations, the KL/CE splice test, integration
features and the report. LM tests use a tiny randomly initialised Llama (offline)."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from dualenc_fast.analysis import integration as I
from dualenc_fast.eval import metrics as E
from dualenc_fast.reference import JointSAENFM, TopKSparseAutoencoder

D = 32
VOCAB = 64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_lm():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
    return transformers.LlamaForCausalLM(cfg).eval()


class CharTokenizer:
    """A stand-in tokenizer: one token per character."""

    bos_token_id = 1

    def encode(self, text, add_special_tokens=False):
        return [2 + ord(c) % (VOCAB - 2) for c in text][:32]

    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)


def _joint(seed=0, F=96, k=6, K=8):
    torch.manual_seed(seed)
    m = JointSAENFM(D, F, k, K)
    with torch.no_grad():  # make the NFM parts non-trivial
        m.nfm.linear.weight.normal_(0, 0.05)
        m.nfm.interaction_mlp[1].weight.normal_(0, 0.5)
        m.nfm.interaction_mlp[3].weight.normal_(0, 0.5)
    return m


class Zero(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


# ----------------------------------------------------------------------------- reconstruction

def test_reconstruction_metrics_identity_and_zero():
    torch.manual_seed(0)
    x = torch.randn(300, D) + 2.0
    ident = E.reconstruction_metrics(nn.Identity(), x, batch_size=64)
    assert ident["mse"] == 0 and ident["fvu"] == 0 and ident["n_rows"] == 300
    zero = E.reconstruction_metrics(Zero(), x, batch_size=64, baseline_mse=2 * float((x ** 2).mean()))
    x64 = x.double()
    assert zero["mse"] == pytest.approx(float((x64 ** 2).mean()), rel=1e-9)
    assert zero["fvu"] == pytest.approx(float((x64 ** 2).sum() / ((x64 - x64.mean(0)) ** 2).sum()), rel=1e-9)
    assert zero["error_reduction"] == pytest.approx(0.5)
    # a loader of batches gives the same numbers as a tensor
    loader = E.reconstruction_metrics(Zero(), list(x.split(50)))
    assert loader["mse"] == pytest.approx(zero["mse"], rel=1e-12)


def test_component_ablation_matches_model_outputs():
    model = _joint()
    x = torch.randn(200, D)
    abl = E.component_ablation(model, x, batch_size=64)
    assert list(abl) == list(E.ABLATIONS)
    model.eval()
    with torch.no_grad():
        recon, _, sae, lin, inter = model(x)
    for key, r in (("sae", sae), ("sae+linear", sae + lin), ("sae+interaction", sae + inter), ("all", recon)):
        assert abl[key]["mse"] == pytest.approx(float(((x - r).double() ** 2).mean()), rel=1e-6)
    assert abl["sae"]["reduction_vs_sae"] == 0
    metrics = E.reconstruction_metrics(model, x)
    assert metrics["mse"] == pytest.approx(abl["all"]["mse"], rel=1e-9)
    assert metrics["mse_sae_only"] == pytest.approx(abl["sae"]["mse"], rel=1e-9)
    assert metrics["mean_abs"]["interaction"] > 0
    assert sum(metrics["nfm_shares"].values()) == pytest.approx(1.0)
    assert model.training is False or True  # eval_mode restores the flag


def test_fused_modules_give_the_reference_components():
    from dualenc_fast.nn.modules import JointSAENFM as FusedJoint

    ref = _joint()
    fused = FusedJoint(D, 96, 6, 8, backend="reference")
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(50, D)
    with E.eval_mode(ref), E.eval_mode(fused):
        a, b = E.components(ref, x), E.components(fused, x)
        torch.testing.assert_close(E.reconstruct(fused, x), a["recon"], rtol=1e-4, atol=1e-5)
    for key in ("recon", "sae", "linear", "interaction"):
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(I.interaction_hidden(fused, x), I.interaction_hidden(ref, x), rtol=1e-4, atol=1e-5)


def test_evaluate_models_uses_sae_as_baseline():
    torch.manual_seed(1)
    models = {"sae": TopKSparseAutoencoder(D, 96, 6), "joint": _joint()}
    ev = E.evaluate_models(models, torch.randn(100, D))
    assert ev["baseline"] == "sae"
    assert ev["reconstruction"]["sae"]["error_reduction"] == 0
    assert set(ev["ablation"]) == {"joint"}


def test_eval_mode_restores_training_flag():
    model = _joint()
    model.train()
    E.reconstruction_metrics(model, torch.randn(10, D))
    assert model.training


# ----------------------------------------------------------------------------- splice test

def test_eps_baseline_has_the_reconstruction_error_norm():
    torch.manual_seed(0)
    x = torch.randn(3, 7, D)
    recon = x + 0.3 * torch.randn(3, 7, D)
    g = torch.Generator().manual_seed(0)
    pert = E.eps_baseline(x, recon, generator=g)
    torch.testing.assert_close((pert - x).norm(dim=-1), (x - recon).norm(dim=-1), rtol=1e-5, atol=1e-6)
    # a different draw, the same norms, a different direction
    pert2 = E.eps_baseline(x, recon, generator=g)
    torch.testing.assert_close((pert2 - x).norm(dim=-1), (x - recon).norm(dim=-1), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(pert, pert2)


def test_splice_identity_gives_zero_kl(tiny_lm):
    ids = torch.randint(0, VOCAB, (4, 10), generator=torch.Generator().manual_seed(0))
    res = E.splice_test(tiny_lm, 1, ids, {"identity": nn.Identity()}, n_eps=1, n_boot=50)
    r = res["models"]["identity"]
    assert r["kl_recon"] == 0.0
    assert r["ce_recon"] == pytest.approx(res["ce_clean"], abs=0)
    assert r["ce_increase"] == 0.0 and r["mse_splice"] == 0.0
    assert r["kl_eps"] == 0.0  # zero error -> eps of norm 0
    assert res["n_kl_tokens"] == 40 and res["n_ce_tokens"] == 36


def test_splice_test_sae_joint_and_skip_first(tiny_lm):
    ids = torch.randint(0, VOCAB, (6, 12), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    models = {"sae": TopKSparseAutoencoder(D, 96, 4), "joint": _joint()}
    res = E.splice_test(tiny_lm, 0, ids, models, n_eps=2, batch_size=4, n_boot=200, skip_first=1)
    assert res["n_kl_tokens"] == 6 * 11 and res["skip_first"] == 1
    for name, r in res["models"].items():
        assert r["kl_recon"] > 0 and r["kl_eps"] > 0
        assert r["kl_ratio"] == pytest.approx(r["kl_recon"] / r["kl_eps"])
        lo, hi = r["kl_ratio_ci"]
        assert lo <= r["kl_ratio"] <= hi
        lo, hi = r["ce_increase_ci"]
        assert lo <= r["ce_increase"] <= hi
        assert r["mse_splice"] > 0
    # only the last two positions are spliced and scored
    res0 = E.splice_test(tiny_lm, 0, ids, {"zero": Zero()}, n_eps=0, skip_first=10)
    assert res0["n_kl_tokens"] == 6 * 2 and res0["n_ce_tokens"] == 6
    assert res0["models"]["zero"]["kl_recon"] > 0
    with pytest.raises(ValueError):
        E.splice_test(tiny_lm, 0, ids, {"zero": Zero()}, n_eps=0, skip_first=11)


def test_token_windows_from_text():
    w = E.token_windows_from_text(CharTokenizer(), "abcdefghij" * 2, 5, bos=True)
    assert w.shape == (5, 5) and (w[:, 0] == 1).all()  # 20 text tokens, 4 per window


# ----------------------------------------------------------------------------- integration

def test_two_way_anova_matches_balanced_formulas():
    rng = np.random.default_rng(0)
    a = np.repeat(["f", "c"], 20)
    b = np.tile(np.repeat(["e", "n"], 10), 2)
    y = rng.normal(size=40) + (a == "f") * 1.0 + (a == "f") * (b == "e") * 2.0
    res = I.two_way_anova(y, a, b)
    grand = y.mean()
    ss_a = sum(((y[a == l].mean() - grand) ** 2) * (a == l).sum() for l in ("f", "c"))
    ss_b = sum(((y[b == l].mean() - grand) ** 2) * (b == l).sum() for l in ("e", "n"))
    cells = [(la, lb) for la in ("f", "c") for lb in ("e", "n")]
    ss_cells = sum(((y[(a == la) & (b == lb)].mean() - grand) ** 2) * 10 for la, lb in cells)
    ss_e = sum(((y[(a == la) & (b == lb)] - y[(a == la) & (b == lb)].mean()) ** 2).sum() for la, lb in cells)
    assert res["A"]["ss"] == pytest.approx(ss_a)
    assert res["B"]["ss"] == pytest.approx(ss_b)
    assert res["A:B"]["ss"] == pytest.approx(ss_cells - ss_a - ss_b)
    assert res["residual"]["ss"] == pytest.approx(ss_e) and res["residual"]["df"] == 36
    assert res["A:B"]["F"] == pytest.approx((ss_cells - ss_a - ss_b) / (ss_e / 36))
    assert res["A:B"]["p"] < 0.01


def test_interaction_hidden_is_w1_p_plus_b1():
    model = _joint()
    x = torch.randn(20, D)
    model.eval()
    captured = {}
    h = model.nfm.interaction_mlp[1].register_forward_hook(lambda m, i, o: captured.setdefault("pre", o))
    with torch.no_grad():
        model(x)
    h.remove()
    torch.testing.assert_close(I.interaction_hidden(model, x), captured["pre"], rtol=1e-5, atol=1e-6)


def test_clamp_intervention_and_logit_effects(tiny_lm):
    model = _joint()
    hidden = I.collect_interaction_hidden(model, torch.randn(500, D))
    sae2 = I.train_secondary_sae(hidden, n_features=32, k=4, steps=30, batch_size=128)
    assert sae2.a_ref.shape == (32,) and 0 <= sae2.train_fvu
    feat = int(torch.argmax(sae2.a_ref))
    ids = torch.randint(2, VOCAB, (1, 9), generator=torch.Generator().manual_seed(0))
    clean = tiny_lm(input_ids=ids).logits
    clamp = I.ClampIntervention(tiny_lm, 1, model, sae2, feat, value=None)
    with clamp, torch.no_grad():
        torch.testing.assert_close(tiny_lm(input_ids=ids).logits, clean)  # disabled: no change
        clamp.value = 40.0 * float(sae2.a_ref[feat])
        clamped = tiny_lm(input_ids=ids).logits
        assert not torch.allclose(clamped, clean)
        clamp.skip_first = 4  # the first positions are left alone: their logits do not change
        part = tiny_lm(input_ids=ids).logits
        torch.testing.assert_close(part[:, :4], clean[:, :4])
        assert not torch.allclose(part[:, 4:], clean[:, 4:])
        clamp.skip_first = 0
    # the hook is gone afterwards
    torch.testing.assert_close(tiny_lm(input_ids=ids).logits, clean)

    stim = {(fa, fb): [f"{fa} {fb} {i}" for i in range(2)] for fa in ("formal", "casual")
            for fb in ("emotional", "neutral")}
    eff = I.clamp_logit_effects(tiny_lm, CharTokenizer(), 1, model, sae2, feat, stimuli=stim,
                                word_sets={"w1": [5, 6], "w2": [7]}, max_new_tokens=2)
    assert len(eff["rows"]) == 8 * 4 * 2
    assert len(eff["generations"]) == 4 * 4  # first prompt of each cell, every multiplier
    zero_rows = [r for r in eff["rows"] if r["multiplier"] == 0.0]
    assert all(np.isfinite(r["delta"]) for r in zero_rows)
    an = I.factorial_anova(eff)
    assert set(an) == {f"x{m:g}/{w}" for m in (-4, 0, 1, 4) for w in ("w1", "w2")}
    ps = [v["A:B"]["p"] for v in an.values()]  # nan where a clamp changes nothing at all
    assert all(np.isnan(p) or 0 <= p <= 1 for p in ps) and any(np.isfinite(ps))


def test_clamp_effects_with_kv_cache_equal_full_recompute(tiny_lm, monkeypatch):
    model = _joint(seed=3)
    sae2 = I.train_secondary_sae(I.collect_interaction_hidden(model, torch.randn(200, D)), n_features=16, k=2,
                                 steps=10)
    stim = {(fa, fb): [f"{fa}{fb} ab"] for fa in ("x", "y") for fb in ("u", "v")}
    kw = dict(stimuli=stim, word_sets={"w": [5, 6, 7]}, max_new_tokens=3, a_ref=5.0)
    cached = I.clamp_logit_effects(tiny_lm, CharTokenizer(), 1, model, sae2, 0, **kw)
    full = I._last_logits
    monkeypatch.setattr(I, "_last_logits", lambda lm, ids, past=None: (full(lm, ids, None)[0], None))
    recomputed = I.clamp_logit_effects(tiny_lm, CharTokenizer(), 1, model, sae2, 0, **kw)
    a = np.array([r["delta"] for r in cached["rows"]])
    b = np.array([r["delta"] for r in recomputed["rows"]])
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert np.abs(a).max() > 0
    assert [g["continuation"] for g in cached["generations"]] == [g["continuation"] for g in recomputed["generations"]]


def test_clamp_with_zero_output_weights_changes_nothing(tiny_lm):
    model = _joint()
    with torch.no_grad():
        model.nfm.interaction_mlp[3].weight.zero_()
    sae2 = I.train_secondary_sae(I.collect_interaction_hidden(model, torch.randn(200, D)), n_features=16, k=2,
                                 steps=5)
    stim = {(fa, fb): ["ab", "cd"] for fa in ("x", "y") for fb in ("u", "v")}
    eff = I.clamp_logit_effects(tiny_lm, CharTokenizer(), 0, model, sae2, 0, stimuli=stim,
                                word_sets={"w": [3, 4]}, multipliers=(4.0,), max_new_tokens=1)
    assert all(r["delta"] == 0.0 for r in eff["rows"])


def test_default_stimuli_are_a_2x2_design():
    cells = set(I.DEFAULT_STIMULI)
    assert cells == {(a, b) for a in ("formal", "casual") for b in ("emotional", "neutral")}
    assert len({len(v) for v in I.DEFAULT_STIMULI.values()}) == 1
    assert set(I.DEFAULT_WORD_SETS) == {"formal", "casual", "emotional", "neutral"}


# ----------------------------------------------------------------------------- report and CLI

def test_write_report_with_lm(tiny_lm, tmp_path):
    from dualenc_fast.eval.report import write_report

    torch.manual_seed(0)
    models = {"sae": TopKSparseAutoencoder(D, 96, 6), "joint": _joint()}
    ids = torch.randint(0, VOCAB, (4, 10), generator=torch.Generator().manual_seed(2))
    path = write_report(tmp_path / "rep", models, torch.randn(300, D), lm=tiny_lm, tokenizer=CharTokenizer(),
                        layer=1, token_windows=ids, n_eps=1, n_sim=50, integration=True,
                        integration_kwargs={"n_features": 1, "max_new_tokens": 1,
                                            "sae2_kwargs": {"n_features": 16, "k": 2, "steps": 5}})
    text = path.read_text()
    for png in ("norm_histogram.png", "norm_vs_ratio.png", "group_violins.png", "ablation.png", "kl_ratio.png"):
        assert (tmp_path / "rep" / png).stat().st_size > 1000
        assert f"({png})" in text
    for section in ("Decoder norm bimodality", "Component ablation", "KL / CE splice test", "Integration features"):
        assert section in text
    results = json.loads((tmp_path / "rep" / "results.json").read_text())
    assert set(results["splice"]["models"]) == {"sae", "joint"}
    assert results["analysis"]["joint"]["bimodality"]["bimodal"] in (True, False)


def test_cli_analyze_and_eval(tmp_path, capsys):
    from dualenc_fast.cli import main
    from dualenc_fast.nn.modules import JointSAENFM as FusedJoint
    from dualenc_fast.nn.modules import TopKSparseAutoencoder as FusedSAE
    from dualenc_fast.train.data import write_store

    torch.manual_seed(0)
    write_store(torch.randn(1000, 16), tmp_path / "store")
    FusedSAE(16, 48, 4, backend="reference").save(tmp_path / "sae")
    FusedJoint(16, 48, 4, 8, backend="reference").save(tmp_path / "joint")
    assert main(["analyze", str(tmp_path / "sae"), str(tmp_path / "joint"), "--out", str(tmp_path / "an"),
                 "--n-sim", "50", "--backend", "reference"]) == 0
    assert (tmp_path / "an" / "report.md").exists() and (tmp_path / "an" / "norm_histogram.png").exists()
    assert main(["eval", str(tmp_path / "sae"), str(tmp_path / "joint"), "--data", str(tmp_path / "store"),
                 "--out", str(tmp_path / "ev"), "--lm", "none", "--no-analysis", "--backend", "reference"]) == 0
    out = capsys.readouterr().out
    assert "error reduction" in out and "report:" in out
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert res["evaluation"]["baseline"] == "sae"
    assert "ablation.png" in (tmp_path / "ev" / "report.md").read_text()
