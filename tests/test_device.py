"""Device plumbing of the trainer: --device cpu explicitly, bf16 autocast on the CPU (ops and
whole runs), no host reads inside a training step (CPU: counted; CUDA: sync debug mode),
memory-mapped shards, the batch prefetcher."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

import dualenc_fast as df
from dualenc_fast.cli import main as cli_main
from dualenc_fast.train.distributed import autocast, resolve_device
from dualenc_fast.train import checkpoint as C
from dualenc_fast.train import trainer as T
from dualenc_fast.train.data import ActivationStore, BatchPrefetcher, write_store
from dualenc_fast.train.trainer import TrainConfig, TrainingDiverged, read_metrics, train
from synthetic import D_, F_, K_, synthetic_store

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return synthetic_store(tmp_path_factory.mktemp("acts"))


def cfg(**kw):
    base = dict(kind="joint", features=F_, k=4, embedding_dim=K_, steps=10, batch_size=32, lr=1e-3,
                val_rows=200, backend="auto")
    base.update(kw)
    return TrainConfig(**base)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cuda" if torch.cuda.is_available() else "cpu", 0) \
        or resolve_device(None) == torch.device("cpu")
    with pytest.raises(ValueError, match="--device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda:0")


def test_cli_device_cpu_bf16(store, tmp_path, capsys):
    args = ["train", "--activations", str(store.folder), "--kind", "joint", "--features", str(F_), "--k", "4",
            "--embedding-dim", str(K_), "--steps", "10", "--batch-size", "32", "--lr", "1e-3", "--val-rows", "200",
            "--no-progress", "--threads", "1", "--device", "cpu", "--log-every", "5"]
    assert cli_main(args + ["--out", str(tmp_path / "fp32")]) == 0
    assert cli_main(args + ["--out", str(tmp_path / "bf16"), "--precision", "bf16"]) == 0
    err = capsys.readouterr().err
    assert "device: cpu" in err
    s32 = json.loads((tmp_path / "fp32" / "summary.json").read_text())
    s16 = json.loads((tmp_path / "bf16" / "summary.json").read_text())
    assert s16["precision"] == "bf16" and s16["device"] == "cpu"
    # bf16 products, float32 master weights: the same run up to bf16 rounding
    assert s16["val"]["mse"] == pytest.approx(s32["val"]["mse"], rel=0.05)
    assert [r["step"] for r in read_metrics(tmp_path / "bf16" / "metrics.jsonl") if "split" not in r] == [5, 10]
    # checkpoints stay float32: weights and Adam state
    info = C.load_checkpoint(tmp_path / "bf16", restore_rng=False)
    assert all(v.dtype == torch.float32 for v in info["model_state"].values())
    for st in info["optimizer"]["state"].values():
        assert st["exp_avg"].dtype == torch.float32 and st["exp_avg_sq"].dtype == torch.float32
    model = C.load_model(tmp_path / "bf16", device="cpu")
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_ops_under_cpu_autocast_run_in_bf16_with_fp32_master_grads():
    """Inside autocast the compiled ops see their float32 inputs cast to bfloat16: the same
    numbers as a bfloat16 copy of the model, while the float32 weights get float32 gradients."""
    import copy

    torch.manual_seed(0)
    m = df.JointSAENFM(16, 64, 4, 8, dropout=0.0)
    m16 = copy.deepcopy(m).to(torch.bfloat16)
    x = torch.randn(64, 16)
    with autocast(torch.device("cpu"), "bf16"):
        out = m.forward_sparse(x)
        loss = (out.recon.float() - x).pow(2).mean()
    loss.backward()
    out16 = m16.forward_sparse(x.to(torch.bfloat16))
    (out16.recon.float() - x).pow(2).mean().backward()
    assert out.recon.dtype == torch.bfloat16
    assert torch.equal(out.recon, out16.recon) and torch.equal(out.code.indices, out16.code.indices)
    for (n, p), p16 in zip(m.named_parameters(), m16.parameters()):
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, n
        assert torch.equal(p.grad, p16.grad.float()), n
    # and close to float32 (bf16 rounding; a near-tie of the top-k may flip)
    m.zero_grad()
    ref = m.forward_sparse(x)
    assert float((ref.recon - out.recon.float()).detach().norm()) < 0.15 * float(ref.recon.detach().norm())


def test_fused_adam_is_used(store):
    model = T.build_model(cfg(), D_)
    opt, _ = T.make_optimizer(model.parameters(), cfg(), 10)
    assert opt.defaults["fused"] is True


class _Recorder:
    """Events of a training run in the main thread: batch fetched, optimizer step done, and
    every host read of a tensor (item/float/int/bool/tolist/numpy/cpu)."""

    READS = ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__", "__index__")

    def __init__(self, monkeypatch):
        self.events = []
        main = threading.main_thread()
        for name in self.READS:
            orig = getattr(torch.Tensor, name)

            def wrapped(t, *a, _orig=orig, _name=name, **k):
                if threading.current_thread() is main:
                    self.events.append(("read", _name))
                return _orig(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, wrapped)
        orig_next = BatchPrefetcher.__next__

        def next_(it):
            x = orig_next(it)
            self.events.append(("batch", None))
            return x

        monkeypatch.setattr(BatchPrefetcher, "__next__", next_)
        orig_step = torch.optim.Adam.step

        def step(opt, *a, **k):
            r = orig_step(opt, *a, **k)
            self.events.append(("step_done", None))
            return r

        monkeypatch.setattr(torch.optim.Adam, "step", step)

    def reads_by_phase(self):
        """[(step, phase, method)] where phase is 'in-step' (batch fetched .. optimizer done)
        or 'after' (optimizer done .. next batch)."""
        out, step, phase = [], 0, None
        for kind, name in self.events:
            if kind == "batch":
                step, phase = step + 1, "in-step"
            elif kind == "step_done":
                phase = "after"
            elif phase is not None:
                out.append((step, phase, name))
        return out


@pytest.mark.parametrize("kind", ["joint", "sae", "sequential"])
def test_no_host_read_inside_a_step(store, tmp_path, monkeypatch, kind):
    rec = _Recorder(monkeypatch)
    train(cfg(kind=kind, log_every=4, steps=10), store, tmp_path / "run", progress=False, device="cpu")
    reads = rec.reads_by_phase()
    inside = [r for r in reads if r[1] == "in-step"]
    assert inside == [], f"host reads inside training steps: {inside[:10]}"
    n_steps = 20 if kind == "sequential" else 10
    read_points = sorted({s for s, _, _ in reads})
    # reads happen only after the log points (every 4 steps, and each stage's last step)
    allowed = {s for s in range(1, n_steps + 1) if s % 4 == 0} | {10, n_steps}
    assert set(read_points) <= allowed, read_points


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_nan_found_at_the_read_names_the_step(tmp_path, backend):
    """The loss goes non-finite at step 1; the trainer finds it at the read after step 5."""
    x = torch.randn(400, D_)
    x[::7] *= 1e20  # some batches overflow float32 squares
    s = write_store(x, tmp_path / "huge")
    with pytest.raises(TrainingDiverged, match=r"at step 1 .*steps 1-5 .*every 5 steps"):
        train(cfg(log_every=5, backend=backend), s, tmp_path / "run", progress=False, device="cpu")
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing saved past the divergence


def test_a_step_error_after_an_unread_divergence_reports_the_divergence(tmp_path, monkeypatch):
    """An op that rejects the NaN weights of step 2 (a ValueError) is reported as the
    divergence of step 1, read back before the error propagates."""
    x = torch.randn(400, D_)
    x[::7] *= 1e20
    s = write_store(x, tmp_path / "huge")
    orig, calls = df.JointSAENFM.forward_sparse, []

    def forward_sparse(self, inp):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("an op found NaN input")
        return orig(self, inp)

    monkeypatch.setattr(df.JointSAENFM, "forward_sparse", forward_sparse)
    with pytest.raises(TrainingDiverged, match=r"at step 1 .*steps 1-1 ") as info:
        train(cfg(log_every=5), s, tmp_path / "run", progress=False, device="cpu")
    assert "an op found NaN input" in str(info.value.__context__)


@pytest.mark.cuda
def test_no_sync_inside_a_step_on_cuda(store, tmp_path, monkeypatch):
    """torch.cuda.set_sync_debug_mode("error") from each batch fetch until the optimizer step ends."""
    orig_next, orig_step = BatchPrefetcher.__next__, torch.optim.Adam.step

    def next_(it):
        x = orig_next(it)
        torch.cuda.set_sync_debug_mode("error")
        return x

    def step(opt, *a, **k):
        r = orig_step(opt, *a, **k)
        torch.cuda.set_sync_debug_mode("default")
        return r

    monkeypatch.setattr(BatchPrefetcher, "__next__", next_)
    monkeypatch.setattr(torch.optim.Adam, "step", step)
    try:
        for precision in ("fp32", "bf16"):
            res = train(cfg(log_every=5, precision=precision), store, tmp_path / precision, progress=False,
                        device="cuda")
            assert res.summary["device"].startswith("cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _mapped_file(t: torch.Tensor):
    p = t.data_ptr()
    with open("/proc/self/maps") as fh:
        for line in fh:
            parts = line.split()
            lo, hi = (int(v, 16) for v in parts[0].split("-"))
            if lo <= p < hi:
                return parts[-1] if len(parts) >= 6 else None
    return None


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_shards_are_memory_mapped(tmp_path, dtype):
    x = torch.randn(300, D_)
    write_store(x, tmp_path / "a", shard_rows=100, dtype=dtype)
    st = ActivationStore(tmp_path / "a", cache_shards=2)
    raw = st.stored_shard(1)
    assert raw.dtype == getattr(torch, dtype)
    assert _mapped_file(raw) == str((tmp_path / "a" / "shard_00001.safetensors").resolve())
    ids = torch.tensor([5, 150, 299, 0])
    assert torch.equal(st.rows(ids), x[ids].to(getattr(torch, dtype)).float())
    st.stored_shard(0), st.stored_shard(2)
    assert list(st._cache) == [0, 2]  # least recently used dropped


def test_prefetcher_same_batches_and_errors(store):
    plain = store.loader(32, seed=3, start_batch=2)
    pre = BatchPrefetcher(store.loader(32, seed=3, start_batch=2), "cpu")
    for _ in range(5):
        assert torch.equal(next(plain), next(pre))
    pre.close()

    def bad():
        yield torch.zeros(2)
        raise OSError("disk gone")

    pre = BatchPrefetcher(bad(), "cpu")
    with pytest.raises(OSError, match="disk gone"):
        next(pre)
        next(pre)
    pre.close()


def test_rank_slices_cover_the_global_batch(store):
    full = next(store.loader(32, seed=1, start_batch=3))
    parts = [next(store.loader(32, seed=1, start_batch=3, rank=r, world_size=4)) for r in range(4)]
    assert torch.equal(torch.cat(parts), full)
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        next(store.loader(30, rank=0, world_size=4))
