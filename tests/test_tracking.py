"""Optional Weights & Biases logging: off by default, rank 0 only, one W&B run across --resume.

A stand-in for the ``wandb`` module records the calls (always runs); the real
package is exercised in offline mode when it is installed (no network)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from dualenc_fast.train import tracking
from dualenc_fast.cli import main
from dualenc_fast.train.data import write_store
from dualenc_fast.train import TrainConfig, read_metrics, train

torch.set_num_threads(1)
ARGS = ["--kind", "sae", "--features", "16", "--k", "2", "--steps", "6", "--batch-size", "32", "--lr", "1e-3",
        "--backend", "reference", "--no-progress", "--val-rows", "50", "--checkpoint-every", "2", "--threads", "1"]


def cfg():
    return TrainConfig(kind="sae", features=16, k=2, steps=6, batch_size=32, lr=1e-3, backend="reference",
                       val_rows=50, checkpoint_every=2)


@pytest.fixture(scope="module")
def acts(tmp_path_factory):
    torch.manual_seed(0)
    return write_store(torch.randn(500, 8), tmp_path_factory.mktemp("wb") / "acts").folder


class FakeRun:
    def __init__(self, calls, kwargs):
        self.calls, self.kwargs = calls, kwargs

    def log(self, data, step=None):
        self.calls.append(("log", step, dict(data)))

    def finish(self, exit_code=None):
        self.calls.append(("finish", exit_code))


class FakeWandb:
    """Records init/log/finish the way the wandb module is called."""

    def __init__(self):
        self.calls = []

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        return FakeRun(self.calls, kwargs)


@pytest.fixture
def fake(monkeypatch):
    fw = FakeWandb()
    monkeypatch.setattr(tracking, "_import_wandb", lambda: fw)
    return fw


def test_off_by_default(acts, tmp_path, fake):
    assert main(["train", "--activations", str(acts), "--out", str(tmp_path / "run"), *ARGS]) == 0
    assert fake.calls == [] and not (tmp_path / "run" / "wandb.json").exists()


def test_logs_every_row_and_keeps_the_run_id_across_resume(acts, tmp_path, fake):
    run = tmp_path / "run"
    train(cfg(), acts, run, progress=False, stop_after=5, wandb_project="proj")
    saved = json.loads((run / "wandb.json").read_text())
    init = fake.calls[0]
    assert init[0] == "init" and init[1]["project"] == "proj" and init[1]["id"] == saved["id"]
    assert init[1]["resume"] is None and init[1]["dir"] == str(run) and init[1]["config"]["steps"] == 6
    logged = [c for c in fake.calls if c[0] == "log"]
    assert [c[1] for c in logged] == [1, 2, 3, 4, 5]
    rows = read_metrics(run / "metrics.jsonl")
    assert logged[0][2]["train/loss"] == rows[0]["loss"] and logged[0][2]["train/lr"] == rows[0]["lr"]
    assert fake.calls[-1] == ("finish", 1)  # stopped early
    fake.calls.clear()
    assert main(["train", "--activations", str(acts), "--out", str(run), *ARGS, "--resume", "--wandb", "proj"]) == 0
    init = fake.calls[0]
    assert init[1]["id"] == saved["id"] and init[1]["resume"] == "allow"
    steps = [c[1] for c in fake.calls if c[0] == "log"]
    assert steps == [5, 6, 6]  # from the step-4 checkpoint on (step 5 again, same values), then the final val
    final = fake.calls[-2][2]
    assert final["val/mse"] == read_metrics(run / "metrics.jsonl")[-1]["mse"]
    assert fake.calls[-1] == ("finish", 0)


def test_rank0_only(acts, tmp_path, fake, monkeypatch):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    assert tracking.start_wandb("proj", tmp_path, config={}, resume=False) is None
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    assert tracking.start_wandb("proj", tmp_path, config={}, resume=False) is not None
    assert [c[0] for c in fake.calls] == ["init"]


def test_missing_package_is_one_line(acts, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    assert main(["train", "--activations", str(acts), "--out", str(tmp_path / "run"), *ARGS, "--wandb", "p"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not line.startswith("device: ")]
    assert len(err) == 1 and "--wandb needs the wandb package" in err[0]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (optional)")
def test_real_wandb_offline(acts, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    run = tmp_path / "run"
    train(cfg(), acts, run, progress=False, stop_after=3, wandb_project="dualenc-test")
    run_id = json.loads((run / "wandb.json").read_text())["id"]
    train(cfg(), acts, run, progress=False, resume=True, wandb_project="dualenc-test")
    offline = sorted(p.name for p in (run / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(name.endswith(run_id) for name in offline)
