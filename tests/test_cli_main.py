"""The collect / train / demo commands, through ``python -m dualenc_fast.cli`` in a subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dualenc_fast.cli import main

from tinylm import TEXT, build_tiny_lm

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, timeout=240):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "dualenc_fast.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=str(ROOT))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = build_tiny_lm(root / "tiny_lm")
    text = root / "text.txt"
    text.write_text("\n\n".join(TEXT * 3), encoding="utf-8")
    return root, model, text


@pytest.mark.parametrize("command", ["collect", "train", "demo"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--out" in out and "default" in out


def test_collect_then_train_then_errors(assets, capsys):
    root, model, text = assets
    acts = root / "acts"
    # collect in process (the subprocess path is covered by the demo test), train through a subprocess
    assert main(["collect", "--model", str(model), "--layer", "1", "--out", str(acts), "--text", str(text),
                 "--max-tokens", "600", "--window", "20", "--no-progress"]) == 0
    assert "wrote" in capsys.readouterr().out
    man = json.loads((acts / "manifest.json").read_text())
    assert man["layer"] == 1 and man["d"] == 32 and man["count"] >= 600 and man["skip_first"] == 1
    run = root / "run"
    r = cli("train", "--activations", acts, "--kind", "joint", "--out", run, "--features", 64, "--k", 4,
            "--embedding-dim", 8, "--steps", 6, "--batch-size", 32, "--backend", "reference", "--no-progress",
            "--threads", 1, "--checkpoint-every", 3, "--export-saelens", root / "saelens")
    assert r.returncode == 0, r.stderr
    line = json.loads(r.stdout.strip().splitlines()[0])
    assert line["kind"] == "joint" and line["steps"] == 6
    assert (run / "model" / "model.safetensors").exists() and (run / "metrics.jsonl").exists()
    assert (root / "saelens" / "sae_weights.safetensors").exists() and (root / "saelens" / "cfg.json").exists()
    assert (root / "saelens" / "sparsity.safetensors").exists()  # SAELens's log10 feature density
    # errors that say what to fix (in process: same code path as the console script)
    assert main(["train", "--activations", str(root / "missing"), "--out", str(root / "r2")]) == 2
    assert "dualenc collect" in capsys.readouterr().err
    assert main(["train", "--activations", str(acts), "--out", str(run), "--steps", "6", "--features", "64",
                 "--k", "4", "--embedding-dim", "8", "--batch-size", "32", "--backend", "reference",
                 "--no-progress"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["collect", "--model", str(model), "--layer", "9", "--out", str(root / "x"), "--text", str(text),
                 "--no-progress"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main(["collect", "--model", str(root / "no_model"), "--out", str(root / "x"), "--text", str(text)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_demo_quick(assets):
    root, model, text = assets
    out = root / "demo"
    r = cli("demo", "--quick", "--model", model, "--text", text, "--out", out, "--no-progress", "--threads", 1,
            "--backend", "reference")
    assert r.returncode == 0, r.stderr
    for kind in ("sae", "sae_bias", "sequential", "joint"):
        assert kind in r.stdout
        assert (out / kind / "model" / "model.safetensors").exists()
    assert "vs SAE+bias" in r.stdout
    res = json.loads((out / "results.json").read_text())
    assert [row["kind"] for row in res["rows"]] == ["sae", "sae_bias", "sequential", "joint"]
    assert res["rows"][0]["reduction_vs_sae"] == 0.0
    assert (out / "results.md").exists() and (out / "activations" / "manifest.json").exists()
