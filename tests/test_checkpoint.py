"""Atomic files, exact checkpoints (no pickle), SAELens export/import."""
from __future__ import annotations

import json
import os

import pytest
import torch

from dualenc_fast.nn import modules as M
from dualenc_fast.train import checkpoint as C

torch.set_num_threads(1)


@pytest.fixture
def no_pickle(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("torch.load (pickle) must never be used")

    monkeypatch.setattr(torch, "load", refuse)


def test_atomic_write_interrupted_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "x.safetensors"
    C.atomic_save_tensors(target, {"a": torch.ones(3)})

    def torn(tensors, path, metadata=None):
        with open(path, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(C, "save_file", torn)
    with pytest.raises(OSError):
        C.atomic_save_tensors(target, {"a": torch.zeros(3)})
    assert torch.equal(C.load_tensors(target)["a"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]  # no temp file left


def test_split_join_state_roundtrip():
    state = {"a": torch.arange(3), 1: (1.5, float("inf"), None, "s"), "n": [True, {"t": torch.ones(2, 2)}]}
    tensors = {}
    doc = C.split_state(state, tensors)
    json.dumps(doc)
    back = C.join_state(json.loads(json.dumps(doc)), tensors)
    assert torch.equal(back["a"], state["a"]) and back[1] == state[1]
    assert back["n"][0] is True and torch.equal(back["n"][1]["t"], torch.ones(2, 2))


def _trained(tmp_path):
    torch.manual_seed(0)
    model = M.JointSAENFM(8, 32, 4, 6, backend="reference")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - 0.01 * i)
    for _ in range(3):
        x = torch.randn(16, 8)
        loss = (model.forward_sparse(x).recon - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model, opt, sched


def _step(model, opt, sched):
    x = torch.randn(16, 8)  # global RNG: restored by the checkpoint
    loss = (model.forward_sparse(x).recon - x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    return float(loss.detach())


def test_checkpoint_resume_is_exact(tmp_path, no_pickle):
    model, opt, sched = _trained(tmp_path)
    C.save_checkpoint(tmp_path / "run", 3, model, opt, sched, extra={"stage": "joint", "counter": torch.arange(4)})
    want = [_step(model, opt, sched) for _ in range(3)]
    torch.manual_seed(123)  # scramble the RNG
    m2 = M.JointSAENFM(8, 32, 4, 6, backend="reference")
    o2 = torch.optim.Adam(m2.parameters(), lr=1e-3)
    s2 = torch.optim.lr_scheduler.LambdaLR(o2, lambda i: 1.0 - 0.01 * i)
    info = C.load_checkpoint(tmp_path / "run", m2, o2, s2)
    assert info["step"] == 3 and info["extra"]["stage"] == "joint"
    assert torch.equal(info["extra"]["counter"], torch.arange(4))
    got = [_step(m2, o2, s2) for _ in range(3)]
    assert got == want


def test_interrupted_checkpoint_leaves_previous_loadable(tmp_path, monkeypatch, no_pickle):
    model, opt, sched = _trained(tmp_path)
    run = tmp_path / "run"
    C.save_checkpoint(run, 1, model, opt, sched)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    _step(model, opt, sched)
    real = C.save_file
    calls = {"n": 0}

    def dies_midway(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:  # model file written, state file torn
            with open(path, "wb") as fh:
                fh.write(b"\x00" * 10)
            raise KeyboardInterrupt
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(C, "save_file", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        C.save_checkpoint(run, 2, model, opt, sched)
    monkeypatch.setattr(C, "save_file", real)
    assert C.latest_checkpoint(run).name == "step_00000001"
    assert not any(p.name.startswith(".tmp") for p in (run / "checkpoints").iterdir())
    m2 = M.JointSAENFM(8, 32, 4, 6, backend="reference")
    info = C.load_checkpoint(run, m2)
    assert info["step"] == 1
    for k, v in snapshot.items():
        assert torch.equal(m2.state_dict()[k], v)
    # a stale pointer to a half-written folder falls back to the newest complete one
    (run / "checkpoints" / "step_00000005").mkdir()
    C.atomic_write_json(run / "checkpoints" / "latest.json", {"name": "step_00000005", "step": 5})
    assert C.latest_checkpoint(run).name == "step_00000001"
    with pytest.warns(C.CheckpointWarning, match="step_00000005"):  # the torn folder is named, then skipped
        assert isinstance(C.load_model(run), M.JointSAENFM)


def test_checkpoint_pruning(tmp_path):
    model, opt, sched = _trained(tmp_path)
    for s in range(1, 5):
        C.save_checkpoint(tmp_path, s, model, opt, sched, keep=2)
    assert [p.name for p in C.list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]


@pytest.mark.parametrize("opts", [{}, {"pre_bias": True}, {"decoder_bias": True},
                                  {"pre_bias": True, "decoder_bias": True}, {"normalize_input": True}])
def test_saelens_roundtrip(tmp_path, opts, no_pickle):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    sae = M.TopKSparseAutoencoder(8, 32, 4, backend="reference", **opts).eval()
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
        if opts.get("normalize_input"):
            sae.input_scale.fill_(0.25)
    x = torch.randn(10, 8)
    want = sae.forward_sparse(x)
    C.export_saelens(sae, tmp_path / "sl", model_name="m", hook_layer=3)
    w = load_file(str(tmp_path / "sl" / "sae_weights.safetensors"))
    assert w["W_enc"].shape == (8, 32) and w["W_dec"].shape == (32, 8)
    assert w["b_enc"].shape == (32,) and w["b_dec"].shape == (8,)
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    assert cfg["d_in"] == 8 and cfg["d_sae"] == 32 and cfg["k"] == 4
    # SAELens semantics, written out by hand
    xin = x - w["b_dec"] if cfg["apply_b_dec_to_input"] else x
    pre = torch.relu(xin @ w["W_enc"] + w["b_enc"])
    top = torch.topk(pre, 4, dim=-1)
    acts = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    torch.testing.assert_close(acts @ w["W_dec"] + w["b_dec"], want.recon, rtol=1e-4, atol=1e-4)
    back = C.import_saelens(tmp_path / "sl", backend="reference")
    torch.testing.assert_close(back.forward_sparse(x).recon, want.recon, rtol=1e-4, atol=1e-4)
    assert isinstance(C.load_model(tmp_path / "sl", backend="reference"), M.TopKSparseAutoencoder)


def test_saelens_joint_keeps_nfm_sidecar(tmp_path):
    torch.manual_seed(0)
    j = M.JointSAENFM(8, 32, 4, 6, backend="reference").eval()
    x = torch.randn(5, 8)
    C.export_saelens(j, tmp_path / "sl")
    back = C.import_saelens(tmp_path / "sl", backend="reference").eval()
    assert isinstance(back, M.JointSAENFM)
    torch.testing.assert_close(back(x)[0], j(x)[0])
    sae_only = C.import_saelens(tmp_path / "sl", backend="reference", with_nfm=False)
    assert isinstance(sae_only, M.TopKSparseAutoencoder)


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        C.load_model(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError):
        C.load_model(tmp_path / "empty")
    os.makedirs(tmp_path / "bad")
    C.atomic_write_json(tmp_path / "bad" / "config.json", {"format": "other"})
    with pytest.raises(ValueError):
        C.load_model(tmp_path / "bad")
