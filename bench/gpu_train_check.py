"""GPU training check, for a machine with a CUDA GPU and the package built with its CUDA kernels.

    python bench/gpu_train_check.py                 # on the GPU machine, from the repository root
    python bench/gpu_train_check.py --device cpu --small   # a seconds-long smoke run of the script itself

1. the CUDA test of tests/test_device.py (no sync inside a training step, fp32 and bf16);
2. ``train`` of a joint model at the paper-shaped size (d=3200, F=50000, k=1024, K=300,
   N=512, B=4096) on synthetic activations, backends fused and reference, precisions fp32
   and bf16: tokens/s (rows per second of training, timed around ``train`` in this process,
   including its final validation of 4096 rows);
3. with 2 or more GPUs: ``torchrun`` NCCL training on every GPU vs one process (``--dropout 0``),
   max weight difference and validation MSE difference.

Writes ``bench/results/gpu-train-<device>-<date>.json`` and ``.txt``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dualenc_fast.bench import machine_description  # noqa: E402
from dualenc_fast.train import checkpoint as C  # noqa: E402
from dualenc_fast.train.data import write_store  # noqa: E402
from dualenc_fast.train.trainer import TrainConfig, train  # noqa: E402

PAPER = dict(d=3200, features=50000, k=1024, embedding_dim=300, top_n=512, batch_size=4096)
SMALL = dict(d=64, features=1024, k=16, embedding_dim=32, top_n=8, batch_size=128)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny shapes (smoke run)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--work", default="/tmp/dualenc_gpu_train_check")
    args = ap.parse_args()
    shape = SMALL if args.small else PAPER
    work = Path(args.work)
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    result = {"machine": machine_description(args.device), "shape": shape, "steps": args.steps,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    if args.device.startswith("cuda"):
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_device.py", "-k", "cuda", "-rs"],
                           cwd=ROOT, env=env, capture_output=True, text=True)
        result["cuda_sync_test"] = {"rc": r.returncode, "tail": r.stdout[-2000:]}
        log(f"CUDA no-sync test: rc {r.returncode}\n{r.stdout[-600:]}")

    rows = max(shape["batch_size"] * 8, 20000 if not args.small else 4000)
    torch.manual_seed(0)
    store = write_store(torch.randn(rows, shape["d"]), work / "acts", shard_rows=rows // 4,
                        dtype="float16" if not args.small else "float32")
    result["train"] = {}
    # warm-up (CUDA context, kernels, allocator), untimed
    train(TrainConfig(kind="joint", features=shape["features"], k=shape["k"], embedding_dim=shape["embedding_dim"],
                      top_n=shape["top_n"], batch_size=shape["batch_size"], steps=2, val_rows=256),
          store, work / "warmup", overwrite=True, progress=False, device=args.device)
    for backend in ("fused", "reference"):
        for precision in ("fp32", "bf16"):
            cfg = TrainConfig(kind="joint", features=shape["features"], k=shape["k"],
                              embedding_dim=shape["embedding_dim"], top_n=shape["top_n"],
                              batch_size=shape["batch_size"], steps=args.steps, backend=backend,
                              precision=precision, log_every=max(1, args.steps // 2), val_rows=4096)
            name = f"{backend}-{precision}"
            try:
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                res = train(cfg, store, work / name, overwrite=True, progress=False, device=args.device)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                sec = time.perf_counter() - t0
                tps = args.steps * shape["batch_size"] / sec
                result["train"][name] = {"seconds": sec, "tokens_per_second": tps, "val_mse": res.summary["val"]["mse"]}
                log(f"train joint {name}: {tps:12.1f} tokens/s ({sec:.2f} s for {args.steps} steps), "
                    f"val MSE {res.summary['val']['mse']:.5g}")
            except Exception as exc:  # keep going: report what failed
                result["train"][name] = {"error": f"{type(exc).__name__}: {exc}"}
                log(f"train joint {name}: FAILED {type(exc).__name__}: {exc}")
    t = result["train"]
    for precision in ("fp32", "bf16"):
        f, r = t.get(f"fused-{precision}", {}), t.get(f"reference-{precision}", {})
        if "tokens_per_second" in f and "tokens_per_second" in r:
            log(f"{precision}: fused / reference = {f['tokens_per_second'] / r['tokens_per_second']:.2f}x")

    n_gpu = torch.cuda.device_count() if args.device.startswith("cuda") else 0
    if n_gpu >= 2:
        tiny = ["--kind", "joint", "--features", "1024", "--k", "16", "--embedding-dim", "32", "--batch-size",
                str(128 * n_gpu), "--steps", "20", "--dropout", "0", "--no-progress", "--val-rows", "1000",
                "--activations", str(work / "acts_small"), "--log-every", "10", "--overwrite"]
        torch.manual_seed(0)
        write_store(torch.randn(8000, 64), work / "acts_small", shard_rows=2000)
        one = subprocess.run([sys.executable, "-m", "dualenc_fast", "train", *tiny, "--out", str(work / "nccl1"),
                              "--device", "cuda:0"], env=env, capture_output=True, text=True)
        many = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               f"--nproc-per-node={n_gpu}", "-m", "dualenc_fast", "train", *tiny,
                               "--out", str(work / "nccln"), "--device", "cuda"], env=env, capture_output=True,
                              text=True)
        if one.returncode == 0 and many.returncode == 0:
            a = C.load_tensors(work / "nccl1" / "model" / "model.safetensors")
            b = C.load_tensors(work / "nccln" / "model" / "model.safetensors")
            diff = max(float((a[k] - b[k]).abs().max()) for k in a)
            m1 = C.read_json(work / "nccl1" / "summary.json")["val"]["mse"]
            m2 = C.read_json(work / "nccln" / "summary.json")["val"]["mse"]
            result["nccl_parity"] = {"gpus": n_gpu, "max_weight_diff": diff, "val_mse": [m1, m2]}
            log(f"NCCL {n_gpu} GPUs vs 1: max |weight diff| {diff:.3g}, val MSE {m2:.6g} vs {m1:.6g}")
        else:
            result["nccl_parity"] = {"error": (one.stderr + many.stdout + many.stderr)[-3000:]}
            log("NCCL parity run FAILED:\n" + result["nccl_parity"]["error"])

    dev = result["machine"].get("gpu", "cpu").replace(" ", "_")
    stem = ROOT / "bench" / "results" / f"gpu-train-{dev}-{datetime.date.today():%Y%m%d}{'-small' if args.small else ''}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.json/.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
