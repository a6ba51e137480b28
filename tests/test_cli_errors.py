"""Every command ends a user error with one line on stderr and exit status 2, no
traceback unless --debug: missing folders, wrong formats, bad arguments, corrupt
files, NaN/Inf data, a full disk."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dualenc_fast import storage as S
from dualenc_fast.cli import COMMANDS, build_parser, main
from dualenc_fast.train.data import write_store

from tinylm import TEXT, build_tiny_lm

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--kind", "sae", "--features", "16", "--k", "2", "--steps", "2", "--batch-size", "32",
         "--backend", "reference", "--no-progress", "--val-rows", "50", "--threads", "1"]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("errs")
    torch.manual_seed(0)
    acts = root / "acts"
    write_store(torch.randn(600, 8), acts, shard_rows=300)
    p = {"root": root, "acts": acts, "missing": root / "no_such_folder"}
    # NaN and Inf in shard 1, rows 10..12 and 40
    p["nan"] = root / "nan"
    shutil.copytree(acts, p["nan"])
    t = load_file(str(p["nan"] / "shard_00001.safetensors"))
    t["activations"][10:13, 2] = float("nan")
    t["activations"][40, 0] = float("inf")
    save_file(t, str(p["nan"] / "shard_00001.safetensors"))
    # a truncated shard; a manifest that is not JSON; a manifest of another format
    p["torn_shard"] = root / "torn_shard"
    shutil.copytree(acts, p["torn_shard"])
    shard = p["torn_shard"] / "shard_00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    p["torn_manifest"] = root / "torn_manifest"
    shutil.copytree(acts, p["torn_manifest"])
    man = p["torn_manifest"] / "manifest.json"
    man.write_bytes(man.read_bytes()[:50])
    p["other_manifest"] = root / "other_manifest"
    shutil.copytree(acts, p["other_manifest"])
    (p["other_manifest"] / "manifest.json").write_text('{"format": "something.else"}')
    # a trained model, and a copy with one bit flipped in its weights
    p["run"] = root / "run"
    assert main(["train", "--activations", str(acts), "--out", str(p["run"]), *SMALL]) == 0
    p["model"] = p["run"] / "model"
    p["bad_model"] = root / "bad_model"
    shutil.copytree(p["model"], p["bad_model"])
    w = p["bad_model"] / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-3] ^= 0x10
    w.write_bytes(bytes(data))
    # a tiny LM, one whose embeddings are NaN, text
    p["lm"] = build_tiny_lm(root / "lm")
    p["nan_lm"] = root / "nan_lm"
    shutil.copytree(p["lm"], p["nan_lm"])
    weights = load_file(str(p["nan_lm"] / "model.safetensors"))
    for k in weights:
        if "embed_tokens" in k:
            weights[k].fill_(float("nan"))
    save_file(weights, str(p["nan_lm"] / "model.safetensors"), metadata={"format": "pt"})
    # a SAELens folder (exported from the model), and one with its weights cut short
    from dualenc_fast.train.checkpoint import export_saelens, load_model

    p["saelens"] = root / "saelens"
    export_saelens(load_model(p["model"], backend="reference"), p["saelens"])
    p["torn_saelens"] = root / "torn_saelens"
    shutil.copytree(p["saelens"], p["torn_saelens"])
    sw = p["torn_saelens"] / "sae_weights.safetensors"
    sw.write_bytes(sw.read_bytes()[:200])
    p["text"] = root / "text.txt"
    p["text"].write_text("\n\n".join(TEXT * 3), encoding="utf-8")
    p["a_file"] = p["text"]
    return p


def _train(p, acts, out="t"):
    return ["train", "--activations", str(acts), "--out", str(p["root"] / out), *SMALL]


def _collect(p, model="lm", *extra):
    return ["collect", "--model", str(p[model]), "--out", str(p["root"] / "c"), "--text", str(p["text"]),
            "--max-tokens", "200", "--window", "20", "--no-progress", *extra]


# (command, error class, argv(paths), words the one line must hold)
CASES = [
    ("train", "missing folder", lambda p: _train(p, p["missing"]), "no manifest.json"),
    ("train", "wrong format", lambda p: _train(p, p["model"]), "is not an activation folder"),
    ("train", "wrong format", lambda p: _train(p, p["other_manifest"]), "not a dualenc_fast activation manifest"),
    ("train", "bad argument", lambda p: _train(p, p["acts"]) + ["--k", "40"], "k (40) must not exceed features"),
    ("train", "bad argument", lambda p: _train(p, p["acts"]) + ["--steps", "ten"], "argument --steps: invalid int"),
    ("train", "corrupt file", lambda p: _train(p, p["torn_shard"]), "shard_00000.safetensors is not a readable"),
    ("train", "corrupt file", lambda p: _train(p, p["torn_manifest"]), "manifest.json is not valid JSON"),
    ("train", "corrupt file", lambda p: _train(p, p["acts"], "t_bad_init") + [
        "--kind", "sequential", "--init-sae", str(p["bad_model"])], "model.safetensors is corrupt"),
    ("train", "NaN data", lambda p: _train(p, p["nan"]),
     "shard_00001.safetensors (shard 1) holds NaN/Inf activations in 4 row(s) within rows 10..40"),
    ("eval", "missing folder", lambda p: ["eval", str(p["missing"]), "--data", str(p["acts"]), "--out",
                                         str(p["root"] / "e"), "--lm", "none"], "no model at"),
    ("eval", "wrong format", lambda p: ["eval", str(p["acts"]), "--data", str(p["acts"]), "--out",
                                       str(p["root"] / "e"), "--lm", "none"], "holds no config.json"),
    ("eval", "bad argument", lambda p: ["eval", str(p["model"]), "--names", "a", "b", "--data", str(p["acts"]),
                                       "--out", str(p["root"] / "e"), "--lm", "none"], "got 2 names for 1"),
    ("eval", "corrupt file", lambda p: ["eval", str(p["bad_model"]), "--data", str(p["acts"]), "--out",
                                       str(p["root"] / "e"), "--lm", "none"], "model.safetensors is corrupt"),
    ("eval", "NaN data", lambda p: ["eval", str(p["model"]), "--data", str(p["nan"]), "--out", str(p["root"] / "e"),
                                   "--lm", "none", "--no-analysis"], "holds NaN/Inf activations"),
    ("analyze", "missing folder", lambda p: ["analyze", str(p["missing"]), "--out", str(p["root"] / "a")],
     "no model at"),
    ("analyze", "wrong format", lambda p: ["analyze", str(p["acts"]), "--out", str(p["root"] / "a")],
     "holds no config.json"),
    ("analyze", "bad argument", lambda p: ["analyze", str(p["model"]), "--names", "a", "b", "--out",
                                          str(p["root"] / "a")], "got 2 names for 1"),
    ("analyze", "corrupt file", lambda p: ["analyze", str(p["bad_model"]), "--out", str(p["root"] / "a")],
     "model.safetensors is corrupt"),
    ("collect", "missing folder", lambda p: _collect(p, "missing"), "does not exist"),
    ("collect", "missing folder", lambda p: _collect(p) + ["--text", str(p["missing"] / "t.txt")],
     "t.txt does not exist"),
    ("collect", "wrong format", lambda p: _collect(p, "acts"), "is not a transformers model folder"),
    ("collect", "bad argument", lambda p: _collect(p, "lm", "--layer", "9"), "--layer 9 is out of range"),
    ("collect", "bad argument", lambda p: _collect(p, "lm", "--max-tokens", "0"), "--max-tokens must be positive"),
    ("collect", "NaN data", lambda p: _collect(p, "nan_lm"), "the model produced NaN/Inf activations"),
    ("demo", "missing folder", lambda p: ["demo", "--quick", "--model", str(p["missing"]), "--out",
                                         str(p["root"] / "d")], "does not exist"),
    ("demo", "wrong format", lambda p: ["demo", "--quick", "--model", str(p["acts"]), "--out",
                                       str(p["root"] / "d")], "is not a transformers model folder"),
    ("demo", "bad argument", lambda p: ["demo", "--quick", "--steps", "x"], "argument --steps: invalid int"),
    ("reproduce", "missing folder", lambda p: ["reproduce", "--model", str(p["missing"]), "--out",
                                              str(p["root"] / "r"), "--no-progress"], "does not exist"),
    ("reproduce", "bad argument", lambda p: ["reproduce", "--out", str(p["root"] / "r"), "--seeds", "0"],
     "--seeds must be positive"),
    ("import", "missing folder", lambda p: ["import", str(p["missing"]), "--from", "sparsify", "--out",
                                           str(p["root"] / "i")], "no sparsify SAE at"),
    ("import", "wrong format", lambda p: ["import", str(p["acts"]), "--from", "saelens", "--out",
                                         str(p["root"] / "i")], "needs cfg.json and sae_weights.safetensors"),
    ("import", "bad argument", lambda p: ["import", str(p["saelens"]), "--from", "saelens", "--k", "3", "--out",
                                         str(p["root"] / "i")], "--k applies to"),
    ("import", "bad argument", lambda p: ["import", str(p["saelens"]), "--from", "nowhere", "--out",
                                         str(p["root"] / "i")], "argument --from: invalid choice"),
    ("import", "corrupt file", lambda p: ["import", str(p["torn_saelens"]), "--from", "saelens", "--out",
                                         str(p["root"] / "i")], "sae_weights.safetensors is not a readable"),
    ("bench", "bad argument", lambda p: ["bench", "--config", "huge"], "unknown config 'huge'"),
    ("bench", "bad argument", lambda p: ["bench", "--paths", "fast"], "--paths: unknown path(s) ['fast']"),
    ("bench", "bad argument", lambda p: ["bench", "--repeats", "0"], "--repeats must be >= 1"),
    ("info", "bad argument", lambda p: ["info", "--verbose"], "unrecognized arguments: --verbose"),
]


def _run(argv):
    try:
        return main(argv)
    except SystemExit as exc:  # argparse
        return exc.code


def _error_line(capsys, command):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith((f"dualenc {command}: error: ", "dualenc: error: ")), line
    return line


@pytest.mark.parametrize("command,kind,argv,words", CASES, ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_user_error_is_one_line(paths, capsys, command, kind, argv, words):
    assert _run(argv(paths)) == 2
    line = _error_line(capsys, command)
    assert words in line, line


def test_nan_data_writes_no_model(paths, capsys):
    out = paths["root"] / "nan_run"
    assert main(_train(paths, paths["nan"], "nan_run")) == 2
    assert "rows 310..340 of the store" in _error_line(capsys, "train")
    assert not (out / "model").exists() and not (out / "checkpoints").exists()
    # once the data is fixed the same folder trains without --overwrite (no step was taken)
    assert main(_train(paths, paths["acts"], "nan_run")) == 0
    assert (out / "model" / "model.safetensors").exists()


@pytest.mark.parametrize("command", ["train", "collect"])
def test_disk_full_is_one_line(paths, capsys, monkeypatch, command):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(S, "save_file", full)
    argv = _train(paths, paths["acts"], "full_run") if command == "train" else _collect(paths)
    assert main(argv) == 2
    line = _error_line(capsys, command)
    assert "no space left on the device while writing" in line
    assert ("model.safetensors" if command == "train" else "shard_00000.safetensors") in line


def test_debug_shows_the_traceback(paths, capsys):
    argv = _train(paths, paths["torn_shard"])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        main(argv + ["--debug"])


def test_every_command_has_debug():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(COMMANDS) <= set(sub.choices)
    for name, parser in sub.choices.items():
        assert "--debug" in parser._option_string_actions, name


def test_subprocess_exit_status_and_stderr(paths):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    argv = [sys.executable, "-m", "dualenc_fast.cli", *_train(paths, paths["torn_shard"])]
    r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=240, cwd=str(ROOT))
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip() and not line.startswith("device: ")]
    assert len(lines) == 1 and "not a readable safetensors file" in lines[0]
    r = subprocess.run(argv + ["--debug"], capture_output=True, text=True, env=env, timeout=240, cwd=str(ROOT))
    assert r.returncode != 0 and "Traceback" in r.stderr and "CorruptFileError" in r.stderr
