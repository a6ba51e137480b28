"""Trainers on synthetic activations: every kind, exact resume, NaN stop, options, schedule."""
from __future__ import annotations

import json

import pytest
import torch

from dualenc_fast.nn import modules as M
from dualenc_fast.train import checkpoint as C
from dualenc_fast.train.data import write_store
from dualenc_fast.train.trainer import (KINDS, TrainConfig, TrainingDiverged, build_model, evaluate, lr_factor,
                                        read_metrics, train)
from synthetic import D_, F_, K_, synthetic_store

torch.set_num_threads(1)



@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return synthetic_store(tmp_path_factory.mktemp("acts"))


def cfg(**kw):
    base = dict(features=F_, k=4, embedding_dim=K_, steps=12, batch_size=32, backend="reference", lr=1e-3,
                val_rows=200)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_trains(store, tmp_path, kind):
    res = train(cfg(kind=kind), store, tmp_path / kind, progress=False)
    rows = read_metrics(tmp_path / kind / "metrics.jsonl")
    steps = [r for r in rows if "split" not in r]
    n_expected = 24 if kind == "sequential" else 12
    assert [r["step"] for r in steps] == list(range(1, n_expected + 1))
    for key in ("loss", "mse", "fvu", "l0", "dead", "lr", "mean_abs_linear", "mean_abs_interaction",
                "share_linear", "share_interaction"):
        assert key in steps[0]
    assert steps[0]["lr"] == pytest.approx(1e-3)
    summary = json.loads((tmp_path / kind / "summary.json").read_text())
    untrained = evaluate(build_model(cfg(kind=kind), D_), store.tensor("val", max_rows=200))
    assert summary["val"]["mse"] < untrained["mse"]
    assert summary["steps"] == n_expected and summary["val"]["l0"] <= 4
    model = C.load_model(tmp_path / kind, backend="reference")
    expect = M.TopKSparseAutoencoder if kind in ("sae", "sae_bias") else M.JointSAENFM
    assert isinstance(model, expect)
    if kind == "sae_bias":
        assert model.decoder.bias is not None and model.decoder.bias.abs().sum() > 0
    if kind == "sequential":
        stages = [r["stage"] for r in steps]
        assert stages == ["sae"] * 12 + ["nfm"] * 12
        assert steps[12]["mean_abs_linear"] > 0


def test_sequential_freezes_sae_and_matches_sae_run(store, tmp_path):
    train(cfg(kind="sae"), store, tmp_path / "sae", progress=False)
    train(cfg(kind="sequential"), store, tmp_path / "seq", progress=False)
    train(cfg(kind="sequential", init_sae=str(tmp_path / "sae" / "model")), store, tmp_path / "seq2",
          progress=False)
    sae = C.load_model(tmp_path / "sae", backend="reference")
    seq = C.load_model(tmp_path / "seq", backend="reference").primary_sae
    seq2 = C.load_model(tmp_path / "seq2", backend="reference").primary_sae
    for k, v in sae.state_dict().items():
        assert torch.equal(v, seq.state_dict()[k]), k  # stage 1 == the sae run, and stage 2 left it alone
        assert torch.equal(v, seq2.state_dict()[k]), k


@pytest.mark.parametrize("kind", ["joint", "sequential"])
def test_resume_reproduces_uninterrupted_run(store, tmp_path, kind):
    c = cfg(kind=kind, checkpoint_every=4, steps=10, val_every=5, dropout=0.3)
    train(c, store, tmp_path / "full", progress=False)
    stop = 7 if kind == "joint" else 13  # sequential: interrupted in stage 2
    partial = train(c, store, tmp_path / "cut", progress=False, stop_after=stop)
    assert partial.summary == {"stopped_at": stop}
    with pytest.raises(ValueError, match="resume"):
        train(c, store, tmp_path / "cut", progress=False)
    train(c, store, tmp_path / "cut", progress=False, resume=True)
    full = read_metrics(tmp_path / "full" / "metrics.jsonl")
    cut = read_metrics(tmp_path / "cut" / "metrics.jsonl")
    assert [r["step"] for r in cut] == [r["step"] for r in full]
    assert [r.get("loss") for r in cut] == [r.get("loss") for r in full]  # bit-exact
    assert [r.get("mse") for r in cut] == [r.get("mse") for r in full]
    a = C.load_model(tmp_path / "full", backend="reference").state_dict()
    b = C.load_model(tmp_path / "cut", backend="reference").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="differs"):
        train(cfg(kind=kind, checkpoint_every=4, steps=10, val_every=5, dropout=0.3, lr=5e-4), store,
              tmp_path / "cut", progress=False, resume=True)


def test_nan_loss_stops_naming_the_step(tmp_path):
    x = 1e20 * torch.randn(400, D_)  # squares overflow float32
    s = write_store(x, tmp_path / "huge")
    with pytest.raises(TrainingDiverged, match="at step 1"):
        train(cfg(kind="joint"), s, tmp_path / "run", progress=False)


def test_peer_options_train_and_save(store, tmp_path):
    c = cfg(kind="joint", pre_bias="geometric_median", unit_norm_decoder=True, aux_k=8, dead_after_tokens=64,
            normalize_input=True, top_n=3, steps=15)
    res = train(c, store, tmp_path / "run", progress=False)
    sae = res.model.primary_sae
    torch.testing.assert_close(sae.decoder.weight.norm(dim=1), torch.ones(F_))
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "split" not in r]
    assert any(r["dead"] > 0 for r in rows) and any(r.get("aux_loss", 0) > 0 for r in rows)
    x = store.tensor("val", max_rows=50)
    res.model.eval()
    loaded = C.load_model(tmp_path / "run", backend="reference").eval()
    assert not loaded.normalizes_input
    torch.testing.assert_close(loaded(x)[0], res.model(x)[0], rtol=1e-4, atol=1e-4)


def test_lr_schedule_and_config_errors():
    assert lr_factor(0, 100, 1e-4, 1e-5) == 1.0
    assert lr_factor(40, 100, 1e-4, 1e-5) == pytest.approx(1 - 0.9 * 0.5)
    assert lr_factor(80, 100, 1e-4, 1e-5) == pytest.approx(0.1)
    assert lr_factor(99, 100, 1e-4, 1e-5) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="kind"):
        TrainConfig(kind="nope").validate()
    with pytest.raises(ValueError, match="k"):
        TrainConfig(k=10, features=5).validate()
