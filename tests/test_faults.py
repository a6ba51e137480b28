"""Fault injection: corrupt checkpoint files, killed training processes, a full disk.

Each fault either resumes from the newest good checkpoint and reproduces the
uninterrupted run bit for bit (loss curve and final weights), or stops with
one line on stderr and a non-zero exit.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from dualenc_fast import storage as S
from dualenc_fast.cli import main
from dualenc_fast.train import checkpoint as C
from dualenc_fast.train.data import write_store
from dualenc_fast.errors import CheckpointError, CorruptFileError, DiskFullError
from dualenc_fast.train import TrainConfig, read_metrics, train

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]

STEPS, EVERY = 8, 2
TRAIN_ARGS = ["--kind", "joint", "--features", "48", "--k", "4", "--embedding-dim", "8", "--steps", str(STEPS),
              "--batch-size", "32", "--lr", "1e-3", "--backend", "reference", "--val-rows", "200",
              "--checkpoint-every", str(EVERY), "--keep-checkpoints", "3", "--no-progress", "--threads", "1"]
CKPT_FILES = list(C.CHECKPOINT_FILES) + [C.CHECKPOINT_MANIFEST]


def config() -> TrainConfig:
    """The TrainConfig TRAIN_ARGS gives (CLI defaults for the rest)."""
    return TrainConfig(kind="joint", features=48, k=4, embedding_dim=8, steps=STEPS, batch_size=32, lr=1e-3,
                       backend="reference", val_rows=200, checkpoint_every=EVERY, keep_checkpoints=3)


def train_cli(acts, out, *extra):
    return main(["train", "--activations", str(acts), "--out", str(out), *TRAIN_ARGS, *extra])


def curve(run):
    return [(r["step"], r.get("split"), r.get("loss"), r.get("mse")) for r in read_metrics(Path(run) / "metrics.jsonl")]


def weights(run):
    return C.load_model(run, backend="reference").state_dict()


def assert_same_run(run, ref):
    assert curve(run) == curve(ref)  # every logged loss, bit for bit
    a, b = weights(run), weights(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def stderr_lines(capsys):
    """stderr less blank lines and the status line naming the device."""
    return [line for line in capsys.readouterr().err.splitlines() if line.strip() and not line.startswith("device: ")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An activation store, the uninterrupted run and a run stopped after step 6
    (checkpoints at steps 2, 4 and 6)."""
    root = tmp_path_factory.mktemp("faults")
    torch.manual_seed(0)
    x = torch.randn(900, 12) @ torch.randn(12, 12)
    acts = root / "acts"
    write_store(x, acts, shard_rows=300)
    ref = root / "ref"
    assert train_cli(acts, ref) == 0
    cut = root / "cut6"
    train(config(), acts, cut, progress=False, stop_after=6)
    assert [p.name for p in C.list_checkpoints(cut)] == ["step_00000002", "step_00000004", "step_00000006"]
    return root, acts, ref, cut


def corrupt(path: Path, fault: str) -> None:
    data = bytearray(path.read_bytes())
    if fault == "truncate-half":
        data = data[: len(data) // 2]
    elif fault == "truncate-empty":
        data = bytearray()
    elif fault == "delete":
        path.unlink()
        return
    else:
        at = {"flip-first": 0, "flip-middle": len(data) // 2, "flip-last": len(data) - 1}[fault]
        data[at] ^= 0x04
    path.write_bytes(bytes(data))


FAULTS = ["truncate-half", "truncate-empty", "flip-first", "flip-middle", "flip-last", "delete"]


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("name", CKPT_FILES)
def test_corrupt_newest_checkpoint_file_resumes_from_previous(runs, tmp_path, capsys, name, fault):
    root, acts, ref, cut = runs
    run = tmp_path / "run"
    shutil.copytree(cut, run)
    newest = run / "checkpoints" / "step_00000006"
    corrupt(newest / name, fault)
    with pytest.raises(CheckpointError, match=name if name != C.CHECKPOINT_MANIFEST else "checkpoint"):
        C.verify_checkpoint(newest)
    capsys.readouterr()
    assert train_cli(acts, run, "--resume") == 0
    err = stderr_lines(capsys)
    assert len(err) == 1 and err[0].startswith("dualenc train: warning: skipping checkpoint step_00000006")
    assert "corrupt-step_00000006" in err[0]
    assert (run / "checkpoints" / "corrupt-step_00000006").is_dir()  # kept for inspection, out of the way
    assert_same_run(run, ref)


def test_every_checkpoint_corrupt_stops_with_one_line(runs, tmp_path, capsys):
    root, acts, ref, cut = runs
    run = tmp_path / "run"
    shutil.copytree(cut, run)
    for i, folder in enumerate(C.list_checkpoints(run)):
        corrupt(folder / CKPT_FILES[i], "flip-middle")
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    capsys.readouterr()
    assert train_cli(acts, run, "--resume") == 2
    err = stderr_lines(capsys)
    assert len(err) == 1 and err[0].startswith("dualenc train: error: cannot resume")
    assert "none of its 3 checkpoint(s) verifies" in err[0] and "--overwrite" in err[0]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # nothing moved or deleted
    assert not (run / "model").exists()
    # the library call says the same; loading the run as a model fails the same way
    with pytest.raises(FileNotFoundError, match="no usable checkpoint"), pytest.warns(C.CheckpointWarning):
        C.load_checkpoint(run)


def test_stale_or_corrupt_latest_pointer_is_harmless(runs, tmp_path, capsys):
    root, acts, ref, cut = runs
    run = tmp_path / "run"
    shutil.copytree(cut, run)
    corrupt(run / "checkpoints" / "latest.json", "truncate-half")
    capsys.readouterr()
    assert train_cli(acts, run, "--resume") == 0
    assert stderr_lines(capsys) == []
    assert_same_run(run, ref)


def test_damaged_metrics_file(runs, tmp_path, capsys):
    """A torn last line (a crash mid-write) is dropped quietly; a damaged line before it
    is dropped with a warning naming it; every other row survives the resume."""
    root, acts, ref, cut = runs
    run = tmp_path / "run"
    shutil.copytree(cut, run)
    metrics = run / "metrics.jsonl"
    with open(metrics, "a", encoding="utf-8") as fh:
        fh.write('{"step": 7, "loss": 0.')
    capsys.readouterr()
    assert train_cli(acts, run, "--resume") == 0
    assert stderr_lines(capsys) == []
    assert_same_run(run, ref)
    run2 = tmp_path / "run2"
    shutil.copytree(cut, run2)
    lines = (run2 / "metrics.jsonl").read_bytes().split(b"\n")
    lines[1] = b"\xff" + lines[1][1:]  # not JSON any more
    (run2 / "metrics.jsonl").write_bytes(b"\n".join(lines))
    assert train_cli(acts, run2, "--resume") == 0
    err = stderr_lines(capsys)
    assert len(err) == 1 and "metrics.jsonl line 2 is unreadable: dropped" in err[0]
    assert curve(run2) == curve(ref)[:1] + curve(ref)[2:]


def test_load_checkpoint_and_load_model_verify(runs, tmp_path):
    root, acts, ref, cut = runs
    run = tmp_path / "run"
    shutil.copytree(cut, run)
    newest = run / "checkpoints" / "step_00000006"
    corrupt(newest / "model.safetensors", "flip-middle")
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt: its sha256"):
        C.load_checkpoint(newest)
    with pytest.raises(CheckpointError, match="sha256"):
        C.load_model(newest)
    with pytest.warns(C.CheckpointWarning, match="step_00000006"):
        assert C.load_checkpoint(run)["step"] == 4  # a run folder: its newest good checkpoint
    # a saved model: the hash in config.json guards model.safetensors
    model = tmp_path / "model"
    shutil.copytree(ref / "model", model)
    cfg = json.loads((model / "config.json").read_text())
    assert len(cfg["files"]["model.safetensors"]["sha256"]) == 64
    corrupt(model / "model.safetensors", "flip-last")
    with pytest.raises(CorruptFileError, match="model.safetensors is corrupt"):
        C.load_model(model)
    corrupt(model / "model.safetensors", "truncate-half")
    with pytest.raises(CorruptFileError, match="truncated"):
        C.load_model(model)
    corrupt(model / "config.json", "truncate-half")
    with pytest.raises(CorruptFileError, match="not valid JSON"):
        C.load_model(model)


def test_resume_never_restarts_silently(runs, tmp_path, capsys):
    root, acts, ref, cut = runs
    # metrics but no checkpoint (killed before the first one): refused, with or without --resume
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    capsys.readouterr()
    assert train_cli(acts, run) == 2
    err = stderr_lines(capsys)
    assert len(err) == 1 and "already holds a run (metrics.jsonl)" in err[0]
    assert train_cli(acts, run, "--resume") == 2
    err = stderr_lines(capsys)
    assert len(err) == 1 and "holds metrics.jsonl but no checkpoint" in err[0]
    assert (run / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'  # untouched
    # --resume on an empty folder starts a new run, and says so
    fresh = tmp_path / "fresh"
    assert train_cli(acts, fresh, "--resume") == 0
    err = stderr_lines(capsys)
    assert len(err) == 1 and "warning: nothing to resume" in err[0]
    assert_same_run(fresh, ref)
    # a folder with only config.json (a run that failed before its first step) starts over
    again = tmp_path / "again"
    again.mkdir()
    shutil.copy(ref / "config.json", again / "config.json")
    assert train_cli(acts, again) == 0
    assert_same_run(again, ref)


# --------------------------------------------------------------------------- a full disk


def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["safetensors", "fsync"])
def test_disk_full_keeps_previous_checkpoint(runs, tmp_path, capsys, monkeypatch, where):
    root, acts, ref, cut = runs
    run = tmp_path / "run"
    shutil.copytree(cut, run)
    for late in ("step_00000004", "step_00000006"):
        shutil.rmtree(run / "checkpoints" / late)  # resume from step 2; the step-4 checkpoint hits a full disk
    real_save, real_fsync = S.save_file, os.fsync

    def save_file(tensors, path, metadata=None):
        if ".tmp-step_00000004" in str(path):
            Path(path).write_bytes(b"\0" * 100)  # part of it got out
            _enospc()
        return real_save(tensors, path, metadata=metadata)

    def fsync(fd):
        if ".tmp-step_00000004" in os.readlink(f"/proc/self/fd/{fd}"):
            _enospc()
        return real_fsync(fd)

    if where == "safetensors":
        monkeypatch.setattr(S, "save_file", save_file)
    else:
        monkeypatch.setattr(os, "fsync", fsync)
    capsys.readouterr()
    assert train_cli(acts, run, "--resume") == 2
    err = stderr_lines(capsys)
    assert len(err) == 1 and err[0].startswith("dualenc train: error: no space left on the device while writing")
    assert "step_00000004" in err[0] and "model.safetensors" in err[0]
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith((".tmp", "step_"))] == \
        ["step_00000002"]
    C.verify_checkpoint(run / "checkpoints" / "step_00000002")
    assert not (run / "model").exists()
    monkeypatch.undo()  # space freed: the same command finishes the run exactly
    assert train_cli(acts, run, "--resume") == 0
    assert_same_run(run, ref)


def test_disk_full_error_type(tmp_path, monkeypatch):
    S.atomic_write_json(tmp_path / "a.json", {"v": 1})
    real_open = open

    def full_open(path, mode="r", *a, **k):
        fh = real_open(path, mode, *a, **k)
        if "w" in mode and ".a.json." in str(path):
            fh.close()
            _enospc()
        return fh

    monkeypatch.setattr("builtins.open", full_open)
    with pytest.raises(DiskFullError) as exc:
        S.atomic_write_json(tmp_path / "a.json", {"v": 2})
    monkeypatch.undo()
    assert isinstance(exc.value, OSError) and exc.value.errno == errno.ENOSPC
    assert str(exc.value).startswith(f"no space left on the device while writing {tmp_path / 'a.json'}")
    assert json.loads((tmp_path / "a.json").read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    return r.returncode == 0


def test_really_full_tmpfs(runs, tmp_path, capsys):
    """The same on a small tmpfs filled to the brim (needs root and mount; skipped otherwise)."""
    root, acts, ref, cut = runs
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "2m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        run = disk / "run"
        shutil.copytree(cut, run)
        for late in ("step_00000004", "step_00000006"):
            shutil.rmtree(run / "checkpoints" / late)
        ckpt_bytes = sum(f.stat().st_size for f in (run / "checkpoints" / "step_00000002").iterdir())
        ballast = disk / "ballast"
        fd = os.open(ballast, os.O_WRONLY | os.O_CREAT)
        try:  # fill the disk ...
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        finally:
            os.close(fd)
        os.truncate(ballast, os.path.getsize(ballast) - max(ckpt_bytes // 2, 4 * 4096))  # ... all but a little
        capsys.readouterr()
        assert train_cli(acts, run, "--resume") == 2
        err = stderr_lines(capsys)
        assert len(err) == 1 and "dualenc train: error: no space left on the device while writing" in err[0], err
        C.verify_checkpoint(run / "checkpoints" / "step_00000002")
        assert not any(p.name.startswith(".tmp") for p in (run / "checkpoints").iterdir())
        ballast.unlink()
        assert train_cli(acts, run, "--resume") == 0
        assert_same_run(run, ref)
    finally:
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)


# --------------------------------------------------------------------------- killed processes

KILLER = textwrap.dedent("""
    import os, shutil, signal, sys, tempfile
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from dualenc_fast import storage as S
    from dualenc_fast.cli import main
    from dualenc_fast.train import checkpoint as C
    target = os.environ["DIE_WRITING"]  # die half-way through writing the file whose path ends so
    real_write, real_rmtree = S._atomic_write, C.shutil.rmtree

    def die(path, writer):  # target "A*B": the path holds A and ends with B
        *inside, end = target.split("*")
        if str(path).replace(os.sep, "/").endswith(end) and all(part in str(path) for part in inside):
            fd, tmp = tempfile.mkstemp(prefix=f".{Path(path).name}.", suffix=".tmp", dir=str(Path(path).parent))
            os.close(fd)
            writer(tmp)
            os.truncate(tmp, os.path.getsize(tmp) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        return real_write(path, writer)

    def die_pruning(path, *a, **k):
        if Path(path).name.startswith("step_"):
            os.unlink(Path(path) / "model.safetensors")
            os.kill(os.getpid(), signal.SIGKILL)
        return real_rmtree(path, *a, **k)

    S._atomic_write = die
    if target == "prune":
        shutil.rmtree = die_pruning
    sys.exit(main(sys.argv[1:]))
""")


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                OMP_NUM_THREADS="1")


# where the process dies: the start of a checkpoint, its last file, the pointer after it,
# the final model, the pruning of an old checkpoint
# (three run in CI; DUALENC_LONG=1 runs them all)
KILL_POINTS = [pytest.param(".tmp-step_00000006*model.safetensors", marks=pytest.mark.slow),
               pytest.param(".tmp-step_00000006*state.safetensors", marks=pytest.mark.long),
               pytest.param(".tmp-step_00000006*checkpoint.json", marks=pytest.mark.slow),
               pytest.param("checkpoints/latest.json", marks=pytest.mark.long),
               pytest.param("model/model.safetensors", marks=pytest.mark.slow),
               pytest.param("summary.json", marks=pytest.mark.long),
               pytest.param("prune", marks=pytest.mark.long)]


@pytest.mark.parametrize("point", KILL_POINTS)
def test_sigkill_while_writing_loses_nothing(runs, tmp_path, capsys, point):
    root, acts, ref, cut = runs
    run = tmp_path / "run"
    keep = ["--keep-checkpoints", "2"] if point == "prune" else []
    r = subprocess.run([sys.executable, "-c", KILLER, "train", "--activations", str(acts), "--out", str(run),
                        *TRAIN_ARGS, *keep], env=dict(_env(), DIE_WRITING=point), capture_output=True, text=True,
                       timeout=300, cwd=str(ROOT))
    assert r.returncode == -signal.SIGKILL, r.stderr
    capsys.readouterr()
    assert train_cli(acts, run, "--resume", *keep) == 0
    err = stderr_lines(capsys)
    assert err == [], err  # the newest complete checkpoint is intact: nothing to warn about
    assert_same_run(run, ref)
    assert not any(p.name.startswith(".tmp") for p in (run / "checkpoints").iterdir())


@pytest.mark.slow
def test_sigkill_from_outside_mid_run(runs, tmp_path, capsys):
    """SIGKILL sent by another process at whatever point training has reached."""
    root, acts, ref, cut = runs
    run = tmp_path / "run"
    every1 = TRAIN_ARGS + ["--checkpoint-every", "1"]  # a checkpoint every step: kills land anywhere
    proc = subprocess.Popen([sys.executable, "-m", "dualenc_fast.cli", "train", "--activations", str(acts),
                             "--out", str(run), *every1], env=_env(), cwd=str(ROOT),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (run / "checkpoints" / "step_00000003").exists():
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the run finished before it could be killed")
    assert train_cli(acts, run, "--resume", "--checkpoint-every", "1") == 0
    assert stderr_lines(capsys) == []
    full = tmp_path / "full"
    assert train_cli(acts, full, "--checkpoint-every", "1") == 0
    assert_same_run(run, full)
