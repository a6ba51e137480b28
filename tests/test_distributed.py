"""Data-parallel training through torchrun + torch.distributed (gloo on CPU): parity with one
process, exact resume, a dead or hung worker stops the run, collection in several processes.

Each test launches ``python -m torch.distributed.run --standalone --nproc-per-node 2 -m
dualenc_fast ...`` in a subprocess with one thread per worker and tiny shapes."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dualenc_fast
from dualenc_fast.train import checkpoint as C
from dualenc_fast.train import TrainConfig, read_metrics, train
from synthetic import F_, K_, synthetic_store

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                 reason="torch.distributed with gloo is not available")]

torch.set_num_threads(1)
TRAIN = ["--kind", "joint", "--features", str(F_), "--k", "4", "--embedding-dim", str(K_), "--batch-size", "32",
         "--backend", "auto", "--lr", "1e-3", "--threads", "1", "--no-progress", "--val-rows", "200",
         "--device", "cpu"]


def _env() -> dict:
    env = dict(os.environ)
    root = str(Path(dualenc_fast.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def torchrun(args, *, nproc: int = 2, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "dualenc_fast"] + [str(a) for a in args]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def run_ok(args, timeout=240, **kw) -> str:
    p = torchrun(args, **kw)
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return synthetic_store(tmp_path_factory.mktemp("acts"))


def _weights(run: Path) -> dict:
    return C.load_tensors(run / "model" / "model.safetensors")


def test_two_processes_match_one(store, tmp_path):
    """--dropout 0: 2 gloo processes (16 rows each) == 1 process (32 rows) up to summation order."""
    run_ok(["train", "--activations", store.folder, "--out", tmp_path / "two", "--steps", "12", "--dropout", "0",
            "--checkpoint-every", "6"] + TRAIN)
    cfg = TrainConfig(kind="joint", features=F_, k=4, embedding_dim=K_, steps=12, batch_size=32, lr=1e-3,
                      dropout=0.0, val_rows=200, checkpoint_every=6)
    train(cfg, store, tmp_path / "one", progress=False, device="cpu")
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    diff = max(float((one[k] - two[k]).abs().max()) for k in one)
    mse1 = read_metrics(tmp_path / "one" / "metrics.jsonl")[-1]["mse"]
    mse2 = read_metrics(tmp_path / "two" / "metrics.jsonl")[-1]["mse"]
    print(f"\n2 gloo processes vs 1: max |weight diff| {diff:.3g}, validation MSE {mse2:.8g} vs {mse1:.8g} "
          f"(diff {abs(mse2 - mse1):.3g})")
    assert diff < 1e-5
    assert abs(mse1 - mse2) <= 1e-5 * mse1
    # rank 0 alone wrote: one row per step, no duplicates
    rows = [r for r in read_metrics(tmp_path / "two" / "metrics.jsonl") if "split" not in r]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert [r["loss"] for r in rows] == pytest.approx(
        [r["loss"] for r in read_metrics(tmp_path / "one" / "metrics.jsonl") if "split" not in r], rel=1e-5)
    summary = C.read_json(tmp_path / "two" / "summary.json")
    assert summary["processes"] == 2 and summary["device"] == "cpu"


def test_resume_under_torchrun_is_exact(store, tmp_path):
    """A 2-process run (dropout on: per-rank streams) cut after its step-8 checkpoint and resumed
    with --resume ends bit for bit where the uninterrupted 2-process run does."""
    args = ["train", "--activations", store.folder, "--steps", "10", "--dropout", "0.3",
            "--checkpoint-every", "4", "--keep-checkpoints", "3"] + TRAIN
    run_ok(args + ["--out", tmp_path / "full"])
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "full", cut)
    # the state of a run killed between its step-8 checkpoint and the end
    shutil.rmtree(cut / "checkpoints" / "step_00000010", ignore_errors=True)
    for name in ("model", "summary.json"):
        p = cut / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    C.atomic_write_json(cut / "checkpoints" / "latest.json", {"name": "step_00000008", "step": 8})
    assert [p.name for p in C.list_checkpoints(cut)] == ["step_00000004", "step_00000008"]
    run_ok(args + ["--out", cut, "--resume"])
    full, resumed = _weights(tmp_path / "full"), _weights(cut)
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    assert read_metrics(tmp_path / "full" / "metrics.jsonl") == read_metrics(cut / "metrics.jsonl")
    # the per-rank dropout streams differ (rank 1 is not a copy of rank 0)
    state = C.load_checkpoint(tmp_path / "full", restore_rng=False)
    r0, r1 = state["extra"]["rank_rng"]
    assert not torch.equal(r0, r1)


def _worker_pids(launcher_pid: int) -> dict:
    """rank -> pid of the workers torchrun started (children of its agent process)."""
    out = {}
    for pid in Path("/proc").iterdir():
        if not pid.name.isdigit():
            continue
        try:
            stat = (pid / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid != launcher_pid:
                continue
            env = (pid / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in env:
            if item.startswith(b"RANK="):
                out[int(item[5:])] = int(pid.name)
    return out


def _start_and_wait_for_steps(store, out: Path, extra=()):
    p = torchrun(["train", "--activations", store.folder, "--out", out, "--steps", "1000000",
                  "--dist-timeout", "10"] + TRAIN + list(extra))
    deadline = time.time() + 180
    metrics = out / "metrics.jsonl"
    while time.time() < deadline:
        if p.poll() is not None:
            pytest.fail(f"the run ended early:\n{p.stdout.read()}")
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
            workers = _worker_pids(p.pid)
            if len(workers) == 2:
                return p, workers
        time.sleep(0.2)
    p.kill()
    pytest.fail("the 2-process run did not start within 180 s")


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the workers through /proc")
def test_a_dead_worker_stops_the_others(store, tmp_path):
    p, workers = _start_and_wait_for_steps(store, tmp_path / "run")
    os.kill(workers[1], signal.SIGKILL)
    t0 = time.time()
    out, _ = p.communicate(timeout=120)
    waited = time.time() - t0
    print(f"\nrun stopped {waited:.1f} s after rank 1 was killed")
    assert p.returncode != 0
    assert "rank 0 of 2" in out or "rank 0: stopped by the launcher" in out, out
    assert "rank      : 1" in out and "SIGKILL" in out, out  # torchrun names the dead rank


@pytest.mark.long  # ~45 s: 10 s timeout, then torchrun's 30 s grace before it kills the stopped worker
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the workers through /proc")
def test_a_hung_worker_times_out(store, tmp_path):
    """A worker that stops responding (SIGSTOP: alive, silent) makes rank 0 fail after --dist-timeout."""
    p, workers = _start_and_wait_for_steps(store, tmp_path / "run")
    os.kill(workers[1], signal.SIGSTOP)
    t0 = time.time()
    try:
        out, _ = p.communicate(timeout=150)
    finally:
        try:
            os.kill(workers[1], signal.SIGKILL)
        except ProcessLookupError:
            pass
    waited = time.time() - t0
    print(f"\nrun stopped {waited:.1f} s after rank 1 hung (timeout 10 s)")
    assert p.returncode != 0
    assert "rank 0 of 2" in out and "--dist-timeout" in out, out


def test_collect_in_two_processes_matches_one(tmp_path):
    """torchrun collect: each rank writes its share of the shards, rank 0 one manifest; the folder
    holds the same shards (names, rows, tokens, positions) as a one-process collection."""
    from tinylm import TEXT, build_tiny_lm

    from dualenc_fast.cli import main as cli_main

    lm = build_tiny_lm(tmp_path / "lm")
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(TEXT))
    args = ["collect", "--model", lm, "--layer", "0", "--text", text, "--window", "12", "--skip-first", "1",
            "--max-tokens", "300", "--batch-size", "4", "--shard-rows", "37", "--dtype", "float32",
            "--device", "cpu", "--threads", "1", "--no-progress"]
    assert cli_main([str(a) for a in args + ["--out", tmp_path / "one"]]) == 0
    run_ok(args + ["--out", tmp_path / "two"])
    m1 = C.read_json(tmp_path / "one" / "manifest.json")
    m2 = C.read_json(tmp_path / "two" / "manifest.json")
    assert m1["shards"] == m2["shards"] and len(m1["shards"]) > 2
    n1, n2 = m1.pop("normalization"), m2.pop("normalization")
    assert m1 == m2
    for k, v in n1.items():
        assert n2[k] == (pytest.approx(v, rel=1e-9) if isinstance(v, float) else v), k
    diff = 0.0
    for s in m1["shards"]:
        a, b = C.load_tensors(tmp_path / "one" / s["file"]), C.load_tensors(tmp_path / "two" / s["file"])
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["positions"], b["positions"])
        diff = max(diff, float((a["activations"] - b["activations"]).abs().max()))
    print(f"\ncollect, 2 processes vs 1: max |activation diff| {diff:.3g}")
    assert diff <= 1e-5
    assert sorted(p.name for p in (tmp_path / "two").glob("shard_*")) == [s["file"] for s in m1["shards"]]


@pytest.mark.long  # spawns 3 sets of processes: about a minute on a busy 2-core machine
def test_bench_ddp_tiny(tmp_path):
    from dualenc_fast import bench_ddp

    lines = []
    r = bench_ddp.run("tiny", 2, repeats=2, warmup=1, rounds=1, out=str(tmp_path / "r.json"), log=lines.append)
    assert r["nproc"] == 2 and r["scaling_ratio"] > 0
    assert set(r["rows_per_second"]) == {"1", "2"} and any("scaling ratio" in line for line in lines)
    assert (tmp_path / "r.json").exists()
    with pytest.raises(ValueError, match="--ddp"):
        bench_ddp.run("tiny", 1)
