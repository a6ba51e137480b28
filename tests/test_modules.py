"""dualenc_fast.nn.modules against the reference modules: init, state_dict, outputs, gradients, options."""
from __future__ import annotations

import importlib.util

import pytest
import torch

import dualenc_fast
from dualenc_fast.nn import modules as M
from dualenc_fast.reference import functional as RF
from dualenc_fast.reference import modules as R

torch.set_num_threads(1)

FUSED_OK = dualenc_fast.extension_available() and importlib.util.find_spec("dualenc_fast.ops") is not None
BACKENDS = ["reference", pytest.param("fused", marks=pytest.mark.skipif(not FUSED_OK, reason="compiled ops unavailable"))]

d, F, k, K = 12, 48, 6, 10


def pairs(backend, top_n=None):
    torch.manual_seed(0)
    r = R.JointSAENFM(d, F, k, K, top_n=top_n)
    torch.manual_seed(0)
    m = M.JointSAENFM(d, F, k, K, top_n=top_n, backend=backend)
    return r, m


def grads(module):
    return {n: p.grad for n, p in module.named_parameters()}


def ref_oriented(module, grads_by_name):
    """Gradients of our module in the reference orientation ([d, F] for the row-major weights)."""
    out = {}
    for n, g in grads_by_name.items():
        if n.endswith("decoder.weight") or n.endswith("linear.weight"):
            g = g.T
        out[n] = g
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_init_and_state_dict_identical(backend):
    r, m = pairs(backend)
    sr, sm = r.state_dict(), m.state_dict()
    assert list(sr) == list(sm)
    for key in sr:
        assert sr[key].shape == sm[key].shape, key
        assert torch.equal(sr[key], sm[key]), key
    assert sm["primary_sae.decoder.weight"].shape == (d, F)
    assert sm["nfm.linear.weight"].shape == (d, F)
    assert m.primary_sae.decoder.weight.shape == (F, d)  # stored row-major
    assert m.nfm.linear.weight.shape == (F, d)
    assert m.primary_sae.k == k
    torch.manual_seed(1)
    a = R.TopKSparseAutoencoder(d, F, k)
    torch.manual_seed(1)
    b = M.TopKSparseAutoencoder(d, F, k, backend=backend)
    assert all(torch.equal(a.state_dict()[n], b.state_dict()[n]) for n in a.state_dict())
    torch.manual_seed(2)
    a = R.NeuralFactorizationMachine(F, K, d, top_n=3)
    torch.manual_seed(2)
    b = M.NeuralFactorizationMachine(F, K, d, top_n=3, backend=backend)
    assert list(a.state_dict()) == list(b.state_dict())
    assert all(torch.equal(a.state_dict()[n], b.state_dict()[n]) for n in a.state_dict())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("top_n", [None, 3])
@pytest.mark.parametrize("direction", ["ref_to_ours", "ours_to_ref"])
def test_outputs_and_gradients_match_reference(backend, top_n, direction):
    r, m = pairs(backend, top_n)
    torch.manual_seed(5)
    if direction == "ref_to_ours":
        r2 = R.JointSAENFM(d, F, k, K, top_n=top_n)
        m.load_state_dict(r2.state_dict())
        r = r2
    else:
        # perturb ours, then move ours -> reference
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.01 * torch.randn_like(p))
        r.load_state_dict(m.state_dict())
    r.eval()
    m.eval()
    x = torch.randn(9, d)
    out_r, out_m = r(x), m(x)
    for a, b in zip(out_r, out_m):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    (out_r[0].pow(2).sum() + out_r[4].sum()).backward()
    (out_m[0].pow(2).sum() + out_m[4].sum()).backward()
    gr, gm = grads(r), ref_oriented(m, grads(m))
    for n in gr:
        torch.testing.assert_close(gr[n], gm[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("top_n", [None, 3])
def test_dense_code_output_carries_gradient(backend, top_n):
    # model(x) returns the dense code as the reference does; a loss on it trains the encoder
    r, m = pairs(backend, top_n)
    r.eval()
    m.eval()
    x = torch.randn(9, d)
    out_r, out_m = r(x), m(x)
    torch.testing.assert_close(out_m[1], out_r[1], rtol=1e-5, atol=1e-6)
    w = torch.randn(out_r[1].shape)
    ((out_r[1] * w).sum() + out_r[0].square().sum()).backward()
    ((out_m[1] * w).sum() + out_m[0].square().sum()).backward()
    gr, gm = grads(r), ref_oriented(m, grads(m))
    for n in gr:
        torch.testing.assert_close(gr[n], gm[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sae_and_nfm_alone_match_reference(backend):
    torch.manual_seed(3)
    r = R.TopKSparseAutoencoder(d, F, k)
    m = M.TopKSparseAutoencoder(d, F, k, backend=backend)
    m.load_state_dict(r.state_dict())
    x = torch.randn(7, d)
    fr, yr = r(x)
    fm, ym = m(x)
    torch.testing.assert_close(fr, fm)
    torch.testing.assert_close(yr, ym)
    torch.manual_seed(4)
    rn = R.NeuralFactorizationMachine(F, K, d, top_n=4).eval()
    mn = M.NeuralFactorizationMachine(F, K, d, top_n=4, backend=backend).eval()
    mn.load_state_dict(rn.state_dict())
    f1 = fr.detach().clone().requires_grad_(True)
    f2 = fr.detach().clone().requires_grad_(True)
    o1, o2 = rn(f1), mn(f2)
    for a, b in zip(o1, o2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    o1[0].sum().backward()
    o2[0].sum().backward()
    torch.testing.assert_close(f1.grad, f2.grad, rtol=1e-4, atol=1e-6)  # dense input grad, zeros included
    with torch.no_grad():  # sparse path for a plain dense input
        for a, b in zip(rn(fr), mn(fr)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_api_builds_no_dense_code(backend, monkeypatch):
    _, m = pairs(backend, top_n=4)
    m.eval()
    x = torch.randn(5, d)
    dense_ref = m(x)

    def boom(*a, **kw):
        raise AssertionError("dense [B, F] code built in the sparse path")

    monkeypatch.setattr(RF, "dense_code", boom)
    if FUSED_OK:
        monkeypatch.setattr(importlib.import_module("dualenc_fast.ops"), "dense_code", boom)
    out = m.forward_sparse(x)
    assert isinstance(out, M.SparseOutput)
    assert isinstance(out.code, M.SparseCode)
    assert out.code.values.shape == (5, k) and out.code.indices.dtype == torch.int64
    torch.testing.assert_close(out.recon, dense_ref[0])
    torch.testing.assert_close(out.sae_recon, dense_ref[2])
    torch.testing.assert_close(out.linear_out, dense_ref[3])
    torch.testing.assert_close(out.interaction_out, dense_ref[4])
    torch.testing.assert_close(m.decode(out.code), out.recon)
    sae_out = m.primary_sae.forward_sparse(x)
    torch.testing.assert_close(sae_out.recon, dense_ref[2])
    assert sae_out.linear_out is None
    monkeypatch.undo()
    torch.testing.assert_close(out.code.dense(), dense_ref[1])


def test_own_codes_skip_index_checks_and_foreign_codes_keep_them(monkeypatch):
    """Indices from encode() are in range by construction, so the sparse ops are
    told not to re-check them (a device sync each on CUDA); a code built by hand
    is checked."""
    pytest.importorskip("dualenc_fast.ops")
    torch.manual_seed(0)
    m = M.JointSAENFM(d, F, k, K, top_n=4, backend="fused").eval()
    seen = []
    fn = m.primary_sae._fn

    class Spy:  # the ops namespace, recording the check_indices of the sparse ops
        def __getattr__(self, name):
            attr = getattr(fn, name)
            if name not in ("sparse_decode", "fm_interaction"):
                return attr

            def spy(*a, **kw):
                seen.append((name, kw.get("check_indices", True)))
                return attr(*a, **kw)

            return spy

    monkeypatch.setattr(M._Common, "_fn", property(lambda self: Spy()))
    out = m.forward_sparse(torch.randn(3, d))
    assert seen and all(check is False for _, check in seen), seen
    assert {n for n, _ in seen} == {"sparse_decode", "fm_interaction"}
    seen.clear()
    foreign = M.SparseCode(out.code.values, out.code.indices.clone(), F)
    torch.testing.assert_close(m.decode(foreign), out.recon)
    assert seen and all(check is True for _, check in seen), seen
    bad = M.SparseCode(out.code.values, out.code.indices + F, F)
    with pytest.raises(IndexError, match="must hold feature indices"):
        m.decode(bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_n_of_a_sorted_code_is_a_narrow(backend, monkeypatch):
    """Codes from encode() come sorted (value descending, index ascending), so
    the NFM's top-N re-selection is their first N columns: topn_reselect is not
    called, and outputs and gradients equal the re-selecting path's. A code not
    known sorted still goes through topn_reselect."""
    torch.manual_seed(0)
    m = M.JointSAENFM(d, F, k, K, top_n=4, backend=backend).eval()
    x = torch.randn(7, d)
    code = m.encode(x)
    assert code.sorted and code.trusted
    fn = m.nfm._fn
    calls = []

    class Spy:  # the ops namespace, counting topn_reselect calls
        def __getattr__(self, name):
            attr = getattr(fn, name)
            if name != "topn_reselect":
                return attr

            def spy(*a, **kw):
                calls.append(name)
                return attr(*a, **kw)

            return spy

    monkeypatch.setattr(M._Common, "_fn", property(lambda self: Spy()))
    params = list(m.nfm.parameters())
    v = code.values.detach().requires_grad_(True)
    fast = m.nfm.forward_sparse(M.SparseCode(v, code.indices, F, trusted=True, sorted=True))
    g_fast = torch.autograd.grad(fast.out.sum(), [v] + params, allow_unused=True)
    assert calls == []
    v2 = code.values.detach().requires_grad_(True)
    slow = m.nfm.forward_sparse(M.SparseCode(v2, code.indices, F, trusted=True))
    g_slow = torch.autograd.grad(slow.out.sum(), [v2] + params, allow_unused=True)
    assert calls == ["topn_reselect"]
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b)
    # the op itself on a sorted code is the narrow
    nv, ni = fn.topn_reselect(code.values, code.indices, 4)
    assert torch.equal(nv, code.values[:, :4]) and torch.equal(ni, code.indices[:, :4])
    assert not M.SparseCode(code.values, code.indices, F).sorted  # a hand-built code is not assumed sorted


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["gather", "dense"])
def test_fused_training_step_never_waits_for_the_device(mode):
    """A fused forward + backward on CUDA queues work without a host sync (no
    index-check round trip, no bincount), in both forms of the sparse products,
    so steps pipeline and can be captured in a CUDA graph."""
    from dualenc_fast import ops

    torch.manual_seed(0)
    m = M.JointSAENFM(d, F, k, K, top_n=4, backend="fused", dropout=0.1).cuda().train()
    x = torch.randn(16, d, device="cuda")
    with ops.sparse_strategy_scope(mode):
        m.forward_sparse(x).recon.pow(2).mean().backward()  # warm-up (allocator, cuBLAS handles)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            m.forward_sparse(x).recon.pow(2).mean().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_backend_resolution():
    with pytest.raises(ValueError, match="backend must be one of"):
        M.TopKSparseAutoencoder(d, F, k, backend="cuda")
    m = M.TopKSparseAutoencoder(d, F, k, backend="reference")
    assert m.backend_name == "reference"
    if not FUSED_OK:
        with pytest.raises(RuntimeError):
            M.TopKSparseAutoencoder(d, F, k, backend="fused")
        with pytest.warns(RuntimeWarning) if not M._AUTO_WARNED else _null():
            a = M.JointSAENFM(d, F, k, K, backend="auto")
        assert a.backend_name == "reference" and a.nfm.backend_name == "reference"
    j = M.JointSAENFM(d, F, k, K, backend="reference").set_backend("reference")
    assert j.primary_sae.backend == "reference"


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_bias_options_and_pre_bias_init():
    torch.manual_seed(0)
    m = M.TopKSparseAutoencoder(d, F, k, backend="reference", pre_bias=True, decoder_bias=True)
    sd = m.state_dict()
    assert sd["b_dec"].shape == (d,) and sd["decoder.bias"].shape == (d,)
    x = torch.randn(200, d) + 3.0
    m.init_pre_bias(x, "mean")
    torch.testing.assert_close(m.b_dec.detach(), x.mean(0))
    m.init_pre_bias(x, "geometric_median")
    gm = m.b_dec.detach().clone()
    # the geometric median is a (near-)minimiser of the summed distances
    cost = lambda c: (x - c).norm(dim=1).sum()
    assert cost(gm) <= cost(x.mean(0)) + 1e-4
    with torch.no_grad():
        m.decoder.bias.normal_()
    code = m.encode(x)
    expect = RF.sparse_decode(code.values, code.indices, m.decoder.weight) + m.b_dec + m.decoder.bias
    torch.testing.assert_close(m.decode(code), expect)
    v, i = RF.topk_encode(x - m.b_dec, m.W_enc, m.b_enc, k)
    torch.testing.assert_close(code.values, v)


def test_unit_norm_decoder_and_parallel_grad():
    torch.manual_seed(0)
    m = M.TopKSparseAutoencoder(d, F, k, backend="reference", unit_norm_decoder=True)
    torch.testing.assert_close(m.decoder.weight.norm(dim=1), torch.ones(F))
    torch.testing.assert_close(m.W_enc, m.decoder.weight)
    x = torch.randn(32, d)
    m.forward_sparse(x).recon.pow(2).sum().backward()
    m.remove_parallel_decoder_grad()
    w, g = m.decoder.weight, m.decoder.weight.grad
    assert g.abs().sum() > 0
    assert (g * w).sum(1).abs().max() <= 1e-5 * g.norm(dim=1).max()
    with torch.no_grad():
        w.mul_(3.0)
    m.normalize_decoder()
    torch.testing.assert_close(m.decoder.weight.norm(dim=1), torch.ones(F))


@pytest.mark.parametrize("backend", BACKENDS)
def test_auxk_gradient_reaches_dead_encoder_rows(backend):
    torch.manual_seed(0)
    m = M.JointSAENFM(d, F, k, K, backend=backend, aux_k=4, pre_bias=True)
    x = torch.randn(16, d)
    out = m.forward_sparse(x)
    dead = torch.zeros(F, dtype=torch.bool)
    dead[:20] = True
    dead[out.code.indices.flatten()] = False  # a dead feature is one that did not fire
    loss = m.auxk_loss(x, x - out.recon, dead)
    assert loss.ndim == 0 and loss > 0
    loss.backward()
    g_enc = m.primary_sae.W_enc.grad
    assert g_enc[dead].abs().sum() > 0, "AuxK gradient must reach the encoder rows of dead features"
    assert g_enc[~dead].abs().sum() == 0
    assert m.primary_sae.decoder.weight.grad[dead].abs().sum() > 0
    assert m.primary_sae.b_enc.grad[dead].abs().sum() > 0
    none_dead = m.auxk_loss(x, x - out.recon, torch.zeros(F, dtype=torch.bool))
    assert float(none_dead) == 0.0


def test_input_normalization_folds_on_save(tmp_path, monkeypatch):
    torch.manual_seed(0)
    m = M.JointSAENFM(d, F, k, K, backend="reference", normalize_input=True, pre_bias=True, decoder_bias=True).eval()
    x = 50.0 * torch.randn(64, d)
    s = m.primary_sae.fit_input_normalization(x)
    assert abs((x * s).pow(2).sum(-1).mean() - 1.0) < 1e-4
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    want = m.forward_sparse(x)
    assert "primary_sae.input_scale" in m.state_dict()
    folded = m.folded()
    assert not folded.normalizes_input and "primary_sae.input_scale" not in folded.state_dict()
    got = folded.forward_sparse(x)
    torch.testing.assert_close(got.recon, want.recon, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(got.code.values, want.code.values, rtol=1e-4, atol=1e-5)
    monkeypatch.setattr(torch, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("torch.load used")))
    m.save(tmp_path / "joint")
    loaded = M.JointSAENFM.load(tmp_path / "joint", backend="reference").eval()
    torch.testing.assert_close(loaded.forward_sparse(x).recon, want.recon, rtol=1e-4, atol=1e-3)
    # the saved weights are plain reference weights (pre/decoder biases aside)
    plain = {k_: v for k_, v in loaded.state_dict().items() if not k_.endswith(("b_dec", "decoder.bias"))}
    r = R.JointSAENFM(d, F, k, K)
    r.load_state_dict(plain)


@pytest.mark.parametrize("cls_name", ["TopKSparseAutoencoder", "NeuralFactorizationMachine", "JointSAENFM"])
def test_save_load_every_module(tmp_path, cls_name):
    torch.manual_seed(0)
    args = {"TopKSparseAutoencoder": (d, F, k), "NeuralFactorizationMachine": (F, K, d),
            "JointSAENFM": (d, F, k, K)}[cls_name]
    cls = getattr(M, cls_name)
    m = cls(*args, backend="reference").eval()
    m.save(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").exists() and (tmp_path / "m" / "config.json").exists()
    n = cls.load(tmp_path / "m", backend="reference").eval()
    for key, v in m.state_dict().items():
        assert torch.equal(v, n.state_dict()[key])
    with pytest.raises(ValueError):
        (M.NeuralFactorizationMachine if cls is not M.NeuralFactorizationMachine else M.JointSAENFM).load(tmp_path / "m")
