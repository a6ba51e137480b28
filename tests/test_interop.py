"""Importers from sparsify, SAELens, dictionary_learning and research .pt checkpoints.

Each fixture is written in the source library's own layout (file names, tensor
names, shapes, dtypes, cfg fields), and the imported model is compared with the
source's forward written out by hand from that library's equations.
"""
from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors.torch import save_file

from dualenc_fast import interop
from dualenc_fast.train.checkpoint import load_model
from dualenc_fast.cli import main
from dualenc_fast.reference import modules as R

D, F, K = 12, 40, 5


def _x(n=64, seed=1):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed)) * 2.0


def _w(*shape, seed=0, scale=0.3):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _topk_dense(pre, k):
    """TopK of ReLU(pre) as a dense code (ReLU then top-k, as sparsify and dictionary_learning do)."""
    post = torch.relu(pre)
    v, i = post.topk(k, dim=-1)
    return torch.zeros_like(post).scatter_(-1, i, v)


def _recon(model, x):
    model.eval()
    with torch.no_grad():
        return model.forward_sparse(x).recon


# --------------------------------------------------------------------------- sparsify


def _write_sparsify(folder, *, dtype=torch.float32, **cfg_over):
    folder.mkdir(parents=True, exist_ok=True)
    t = {"encoder.weight": _w(F, D, seed=1), "encoder.bias": _w(F, seed=2, scale=0.1),
         "W_dec": _w(F, D, seed=3), "b_dec": _w(D, seed=4)}
    t["W_dec"] = t["W_dec"] / t["W_dec"].norm(dim=1, keepdim=True)
    t = {n: v.to(dtype) for n, v in t.items()}
    save_file(t, str(folder / "sae.safetensors"))
    # SparseCoder.save_to_disk: the SparseCoderConfig fields plus d_in
    cfg = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": F, "k": K,
           "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D, **cfg_over}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return {n: v.float() for n, v in t.items()}


def _sparsify_forward(t, x):
    # SparseCoder.encode: relu(encoder(x - b_dec)) -> topk; decode: top_acts @ W_dec[top_indices] + b_dec
    pre = (x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"]
    return _topk_dense(pre, K) @ t["W_dec"] + t["b_dec"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparsify_reproduces_source(tmp_path, dtype):
    t = _write_sparsify(tmp_path / "layers.3", dtype=dtype)
    model = interop.import_sparsify(tmp_path / "layers.3", backend="reference")
    x = _x()
    assert model.k == K and model.hidden_dim == F and model.input_dim == D
    assert model.unit_norm_decoder == (dtype == torch.float32)  # bf16 rows are unit only to ~1e-2
    torch.testing.assert_close(_recon(model, x), _sparsify_forward(t, x), rtol=1e-5, atol=1e-5)


def test_sparsify_hookpoint_folders_and_refusals(tmp_path):
    _write_sparsify(tmp_path / "run" / "layers.3")
    interop.import_sparsify(tmp_path / "run", backend="reference")  # the only hookpoint
    _write_sparsify(tmp_path / "run" / "layers.5")
    with pytest.raises(ValueError, match="several hookpoints.*layers.3, layers.5"):
        interop.import_sparsify(tmp_path / "run")
    assert interop.import_sparsify(tmp_path / "run", hookpoint="layers.5", backend="reference").k == K
    _write_sparsify(tmp_path / "tc", transcode=True)
    with pytest.raises(ValueError, match="transcoder"):
        interop.import_sparsify(tmp_path / "tc")
    _write_sparsify(tmp_path / "gm", activation="groupmax")
    with pytest.raises(ValueError, match="groupmax"):
        interop.import_sparsify(tmp_path / "gm")
    _write_sparsify(tmp_path / "nl", num_latents=0, expansion_factor=2)  # 2 * 12 = 24 != 40
    with pytest.raises(ValueError, match="24 latents"):
        interop.import_sparsify(tmp_path / "nl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="sparsify"):
        interop.import_sparsify(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "cfg.json").write_text("{}")
    (tmp_path / "bad" / "sae.safetensors").write_bytes(b"\x00\x01 not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        interop.import_sparsify(tmp_path / "bad")


def test_sparsify_real_package(tmp_path, monkeypatch):
    sparsify = pytest.importorskip("sparsify")
    if not hasattr(sparsify, "SparseCoder"):
        pytest.skip("the installed 'sparsify' is not EleutherAI's (eai-sparsify)")
    import sparsify.sparse_coder as sc
    import sparsify.utils as su

    if not torch.cuda.is_available():  # its Triton decoder needs a GPU; use the library's eager one
        monkeypatch.setattr(sc, "decoder_impl", su.eager_decode)
    torch.manual_seed(0)
    sae = sparsify.SparseCoder(D, sparsify.SparseCoderConfig(num_latents=F, k=K))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.encoder.bias.normal_(std=0.1)
    sae.save_to_disk(tmp_path / "sae")
    model = interop.import_sparsify(tmp_path / "sae", backend="reference")
    x = _x()
    with torch.no_grad():
        acts, idx, _ = sae.encode(x)
        ref = sae.decode(acts, idx)
    torch.testing.assert_close(_recon(model, x), ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- SAELens


def _write_saelens(folder, *, apply_b_dec_to_input=True, rescale=False, **cfg_over):
    folder.mkdir(parents=True, exist_ok=True)
    t = {"W_enc": _w(D, F, seed=5), "b_enc": _w(F, seed=6, scale=0.1), "W_dec": _w(F, D, seed=7),
         "b_dec": _w(D, seed=8)}
    save_file(t, str(folder / "sae_weights.safetensors"))
    # TopKSAEConfig.to_dict() (sae_lens 6): dataclass fields + metadata + architecture
    cfg = {"d_in": D, "d_sae": F, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": apply_b_dec_to_input,
           "normalize_activations": "none", "reshape_activations": "none", "metadata": {"hook_name": "blocks.3.hook_resid_post"},
           "k": K, "rescale_acts_by_decoder_norm": rescale, "architecture": "topk", **cfg_over}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return t


def _saelens_forward(t, x, apply_b_dec_to_input, rescale):
    # TopKSAE.encode: hidden_pre = (x - b_dec * apply) @ W_enc + b_enc [* ||W_dec_i||]; TopK: topk then relu
    # decode: (acts [/ ||W_dec_i||]) @ W_dec + b_dec
    n = t["W_dec"].norm(dim=-1)
    pre = (x - t["b_dec"] * apply_b_dec_to_input) @ t["W_enc"] + t["b_enc"]
    if rescale:
        pre = pre * n
    v, i = pre.topk(K, dim=-1)
    acts = torch.zeros_like(pre).scatter_(-1, i, v.relu())
    if rescale:
        acts = acts / n
    return acts @ t["W_dec"] + t["b_dec"]


@pytest.mark.parametrize("apply_b_dec_to_input,rescale", [(True, False), (False, False), (True, True)])
def test_saelens_reproduces_source(tmp_path, apply_b_dec_to_input, rescale):
    t = _write_saelens(tmp_path / "sae", apply_b_dec_to_input=apply_b_dec_to_input, rescale=rescale)
    model = interop.import_saelens(tmp_path / "sae", backend="reference")
    x = _x()
    torch.testing.assert_close(_recon(model, x), _saelens_forward(t, x, apply_b_dec_to_input, rescale),
                               rtol=1e-5, atol=1e-5)
    # the older cfg form (k under activation_fn_kwargs) reads the same
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    cfg.pop("k")
    cfg["activation_fn_kwargs"] = {"k": K}
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(cfg))
    torch.testing.assert_close(_recon(interop.import_saelens(tmp_path / "sae", backend="reference"), x),
                               _saelens_forward(t, x, apply_b_dec_to_input, rescale), rtol=1e-5, atol=1e-5)


def test_saelens_refusals(tmp_path):
    _write_saelens(tmp_path / "j", architecture="jumprelu")
    with pytest.raises(ValueError, match="jumprelu"):
        interop.import_saelens(tmp_path / "j")
    _write_saelens(tmp_path / "n", normalize_activations="layer_norm")
    with pytest.raises(ValueError, match="layer_norm"):
        interop.import_saelens(tmp_path / "n")


@pytest.mark.parametrize("apply_b_dec_to_input,rescale", [(True, False), (False, True)])
def test_saelens_real_package(tmp_path, apply_b_dec_to_input, rescale):
    pytest.importorskip("sae_lens")
    from sae_lens import TopKSAE, TopKSAEConfig

    sae = TopKSAE(TopKSAEConfig(d_in=D, d_sae=F, k=K, apply_b_dec_to_input=apply_b_dec_to_input,
                                rescale_acts_by_decoder_norm=rescale))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(std=0.3)
    sae.save_model(str(tmp_path / "sae"))
    model = interop.import_saelens(tmp_path / "sae", backend="reference")
    x = _x()
    with torch.no_grad():
        ref = sae(x)
    torch.testing.assert_close(_recon(model, x), ref, rtol=1e-5, atol=1e-5)


def test_saelens_real_package_loads_our_export(tmp_path):
    pytest.importorskip("sae_lens")
    from sae_lens import TopKSAE

    from dualenc_fast.train.checkpoint import export_saelens
    from dualenc_fast.nn.modules import TopKSparseAutoencoder

    torch.manual_seed(5)
    ours = TopKSparseAutoencoder(D, F, K, backend="reference", pre_bias=True)
    with torch.no_grad():
        ours.b_dec.normal_()
    export_saelens(ours, tmp_path / "sl")
    sae = TopKSAE.load_from_disk(str(tmp_path / "sl"))
    x = _x()
    with torch.no_grad():
        ref = sae(x)
    torch.testing.assert_close(ref, _recon(ours, x), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- dictionary_learning


def _dl_state_dict():
    # AutoEncoderTopK.state_dict(): buffers k (int32) and threshold, decoder (nn.Linear(F, D, bias=False)),
    # encoder (nn.Linear(D, F)), b_dec
    return {"k": torch.tensor(K, dtype=torch.int32), "threshold": torch.tensor(0.25),
            "decoder.weight": _w(D, F, seed=9), "encoder.weight": _w(F, D, seed=10),
            "encoder.bias": _w(F, seed=11, scale=0.1), "b_dec": _w(D, seed=12)}


def _dl_forward(sd, x):
    # encode: relu(encoder(x - b_dec)) -> topk -> scatter; decode: decoder(f) + b_dec
    pre = (x - sd["b_dec"]) @ sd["encoder.weight"].T + sd["encoder.bias"]
    return _topk_dense(pre, K) @ sd["decoder.weight"].T + sd["b_dec"]


def test_dictionary_learning_reproduces_source(tmp_path):
    sd = _dl_state_dict()
    folder = tmp_path / "trainer_0"
    folder.mkdir()
    torch.save(sd, folder / "ae.pt")
    (folder / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoderTopK", "k": K,
                                                                "activation_dim": D, "dict_size": F}}))
    x = _x()
    for path in (folder, folder / "ae.pt"):
        model = interop.import_dictionary_learning(path, backend="reference")
        torch.testing.assert_close(_recon(model, x), _dl_forward(sd, x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="conflicting k"):
        interop.import_dictionary_learning(folder, k=K + 1)
    (folder / "config.json").write_text(json.dumps({"trainer": {"dict_class": "BatchTopKSAE", "k": K}}))
    with pytest.raises(ValueError, match="BatchTopKSAE"):
        interop.import_dictionary_learning(folder)


def test_dictionary_learning_backup_with_norm_factor(tmp_path):
    # the training backup: biases in normalised units; the final save multiplies them by norm_factor
    sd = _dl_state_dict()
    s = 3.5
    torch.save({"step": 10, "ae": sd, "optimizer": {"state": {}, "param_groups": []},
                "config": {"k": K}, "norm_factor": s}, tmp_path / "ae.pt")
    model = interop.import_dictionary_learning(tmp_path / "ae.pt", backend="reference")
    final = dict(sd, **{"encoder.bias": sd["encoder.bias"] * s, "b_dec": sd["b_dec"] * s})
    x = _x()
    torch.testing.assert_close(_recon(model, x), _dl_forward(final, x), rtol=1e-5, atol=1e-5)


def test_dictionary_learning_real_package(tmp_path):
    pytest.importorskip("dictionary_learning")
    from dictionary_learning.trainers.top_k import AutoEncoderTopK

    ae = AutoEncoderTopK(D, F, K)
    with torch.no_grad():
        ae.b_dec.normal_()
        ae.encoder.bias.normal_(std=0.1)
    torch.save(ae.state_dict(), tmp_path / "ae.pt")
    model = interop.import_dictionary_learning(tmp_path / "ae.pt", backend="reference")
    x = _x()
    with torch.no_grad():
        ref = ae(x)
    torch.testing.assert_close(_recon(model, x), ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- research .pt


def _ref_out(module, x):
    module.eval()
    with torch.no_grad():
        out = module(x)
    return out[0] if isinstance(module, R.JointSAENFM) else out[1]


def test_research_pt_sae_and_joint(tmp_path):
    torch.manual_seed(3)
    sae = R.TopKSparseAutoencoder(D, F, K)
    torch.save(sae.state_dict(), tmp_path / "best_model.pt")
    x = _x()
    model = interop.import_research_pt(tmp_path / "best_model.pt", k=K, backend="reference")
    torch.testing.assert_close(_recon(model, x), _ref_out(sae, x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="pass k"):
        interop.import_research_pt(tmp_path / "best_model.pt")

    joint = R.JointSAENFM(D, F, K, 6)
    with torch.no_grad():
        for p in joint.nfm.parameters():
            p.normal_(std=0.2)
    # a training checkpoint dict: state dict under model_state_dict, k recorded in its config
    torch.save({"epoch": 3, "model_state_dict": joint.state_dict(), "config": {"sae_k": K, "lr": 1e-4},
                "val_loss": 0.25}, tmp_path / "joint.pt")
    model = interop.import_research_pt(tmp_path / "joint.pt", backend="reference")
    assert type(model).__name__ == "JointSAENFM"
    torch.testing.assert_close(_recon(model, x), _ref_out(joint, x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="k=5 but k=6"):
        interop.import_research_pt(tmp_path / "joint.pt", k=6)


def test_research_pt_sequential_sae_plus_nfm(tmp_path):
    torch.manual_seed(4)
    joint = R.JointSAENFM(D, F, K, 6)
    with torch.no_grad():
        for p in joint.nfm.parameters():
            p.normal_(std=0.2)
    torch.save(joint.primary_sae.state_dict(), tmp_path / "sae.pt")
    torch.save({"model_state_dict": {f"module.{n}": t for n, t in joint.nfm.state_dict().items()}},
               tmp_path / "nfm.pt")  # DataParallel prefix
    model = interop.import_research_pt(tmp_path / "sae.pt", k=K, nfm=str(tmp_path / "nfm.pt"), backend="reference")
    torch.testing.assert_close(_recon(model, _x()), _ref_out(joint, _x()), rtol=1e-5, atol=1e-5)


def _side_effect(path):  # what a malicious pickle would run
    open(path, "w").write("ran")
    return {}


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (_side_effect, (self.path,))


def test_pickle_with_code_is_refused(tmp_path):
    marker = tmp_path / "ran.txt"
    sae = R.TopKSparseAutoencoder(D, F, K)
    torch.save({"model_state_dict": sae.state_dict(), "hook": _Evil(str(marker))}, tmp_path / "evil.pt")
    for fn in (lambda p: interop.import_research_pt(p, k=K), interop.import_dictionary_learning):
        with pytest.raises(ValueError, match="refusing to unpickle"):
            fn(tmp_path / "evil.pt")
    assert not marker.exists()
    # an argparse Namespace (research scripts save vars(args) or args) is refused the same way
    torch.save({"model_state_dict": sae.state_dict(), "args": argparse.Namespace(k=K)}, tmp_path / "ns.pt")
    with pytest.raises(ValueError, match="refusing to unpickle"):
        interop.import_research_pt(tmp_path / "ns.pt", k=K)
    (tmp_path / "trunc.pt").write_bytes((tmp_path / "ns.pt").read_bytes()[:100])
    with pytest.raises(ValueError, match="trunc.pt is not a readable torch file"):
        interop.import_research_pt(tmp_path / "trunc.pt", k=K)
    (tmp_path / "junk.pt").write_bytes(b"\x80\x04junkjunk")
    with pytest.raises(ValueError, match="junk.pt is not a readable torch file"):
        interop.import_dictionary_learning(tmp_path / "junk.pt", k=K)


# --------------------------------------------------------------------------- CLI


def test_cli_import_writes_a_loadable_model(tmp_path, capsys):
    t = _write_sparsify(tmp_path / "sp")
    out = tmp_path / "model"
    assert main(["import", "--from", "sparsify", str(tmp_path / "sp"), "--out", str(out)]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["features"] == F and line["k"] == K and line["pre_bias"]
    model = load_model(out, backend="reference")
    x = _x()
    torch.testing.assert_close(_recon(model, x), _sparsify_forward(t, x), rtol=1e-5, atol=1e-5)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["extra"]["imported_from"]["source"] == "sparsify"
    # an existing folder needs --overwrite; a wrong option for the source names itself
    assert main(["import", "--from", "sparsify", str(tmp_path / "sp"), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["import", "--from", "sparsify", str(tmp_path / "sp"), "--out", str(tmp_path / "m2"), "--k", "3"]) == 2
    err = capsys.readouterr().err
    assert "--k" in err and err.count("\n") == 1
    assert main(["import", "--from", "research-pt", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "m3")]) == 2
    assert "no file at" in capsys.readouterr().err


def test_import_sae_dispatch():
    with pytest.raises(ValueError, match="source must be one of"):
        interop.import_sae("torchlens", "x")
