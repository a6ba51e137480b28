"""``dualenc bench --ddp N``: data-parallel scaling of one joint training step on the CPU.

Times the step the trainer runs (``forward_sparse`` of a fused
:class:`~dualenc_fast.JointSAENFM`, MSE, backward, the dead-feature and gradient
all-reduces of :mod:`dualenc_fast.train.distributed`, fused Adam) at a config's
global batch ``B``, in 1 process and in N processes of ``B / N`` rows each
(torch.distributed, gloo, ``threads`` intra-op threads per process). Rounds
alternate 1 and N processes so a noisy machine slows both alike; each figure
is the median step time of its rounds, reported as rows per second and as the
ratio N-process / 1-process throughput (ideal: N).
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, shape: dict, repeats: int, warmup: int, threads: int,
            result_dir: str) -> None:
    torch.set_num_threads(threads)
    import torch.distributed as dist

    from .train import distributed as dist_
    from .nn.modules import JointSAENFM

    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=300))
    try:
        torch.manual_seed(0)
        model = JointSAENFM(shape["d"], shape["F"], shape["k"], shape["K"], top_n=shape["N"], dropout=0.15,
                            backend="fused")
        params = list(model.parameters())
        opt = torch.optim.Adam(params, lr=1e-4, fused=True)
        rows = shape["B"] // world
        torch.manual_seed(1 + rank)
        x = torch.randn(rows, shape["d"])
        dead = torch.zeros(shape["F"], dtype=torch.long)
        times = []
        for i in range(warmup + repeats):
            if world > 1:
                dist.barrier()
            t0 = time.perf_counter()
            out = model.forward_sparse(x)
            loss = (out.recon - x).pow(2).mean()
            fired = torch.zeros(shape["F"], dtype=torch.int32)
            fired.scatter_add_(0, out.code.indices.reshape(-1), (out.code.values > 0).to(torch.int32).reshape(-1))
            dist_.all_reduce_sum_(fired)
            dead += shape["B"]
            dead.masked_fill_(fired > 0, 0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            dist_.average_gradients(params)
            opt.step()
            if world > 1:
                dist.barrier()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        if rank == 0:
            Path(result_dir, "times.json").write_text(json.dumps(times))
    finally:
        if world > 1:
            dist.destroy_process_group()


def _measure(world: int, shape: dict, repeats: int, warmup: int, threads: int) -> list:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, _free_port(), shape, repeats, warmup, threads, tmp), nprocs=world,
                 join=True)
        return json.loads(Path(tmp, "times.json").read_text())


def run(config: str = "C1", nproc: int = 2, repeats: int = 5, warmup: int = 1, rounds: int = 2,
        threads: int = 1, out: Optional[str] = None, log=print) -> dict:
    from .bench import CONFIGS, machine_description

    if config not in CONFIGS:
        raise ValueError(f"unknown config {config!r}; choose one of {sorted(CONFIGS)}")
    if nproc < 2:
        raise ValueError(f"--ddp must be at least 2 (processes to compare with one), got {nproc}")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        raise RuntimeError("--ddp needs torch.distributed with the gloo backend")
    shape = dict(CONFIGS[config])
    if shape["B"] % nproc:
        raise ValueError(f"config {config}'s batch {shape['B']} is not a multiple of --ddp {nproc}")
    machine = machine_description("cpu")
    machine["torch_threads"] = threads
    log(f"dualenc bench --ddp {nproc}: one joint training step (fused module, forward + backward + "
        f"all-reduces + fused Adam), config {config} {shape}, global batch {shape['B']}")
    log(f"machine: {machine.get('cpu_model', machine['processor'])}, {machine['cpu_count']} CPUs, "
        f"torch {machine['torch']}; each process {threads} thread(s), gloo backend")
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    if load_before:
        log(f"load average before: {load_before[0]:.2f} (other processes share these CPUs)")
    times = {1: [], nproc: []}
    for r in range(rounds):
        for world in (1, nproc):
            t = _measure(world, shape, repeats, warmup, threads)
            times[world].extend(t)
            log(f"  round {r + 1}: {world} process(es): median step {statistics.median(t):.4f} s")
    med = {w: statistics.median(v) for w, v in times.items()}
    rps = {w: shape["B"] / m for w, m in med.items()}
    ratio = rps[nproc] / rps[1]
    log(f"1 process  x {threads} thread(s): {rps[1]:10.1f} rows/s (median step {med[1]:.4f} s)")
    log(f"{nproc} processes x {threads} thread(s): {rps[nproc]:10.1f} rows/s (median step {med[nproc]:.4f} s)")
    log(f"scaling ratio ({nproc} processes / 1): {ratio:.2f}x (ideal {nproc}x)")
    result = {
        "what": f"dualenc bench --ddp {nproc} --config {config}",
        "config": config, "shape": shape, "nproc": nproc, "threads_per_process": threads,
        "repeats": repeats, "warmup": warmup, "rounds": rounds, "backend": "gloo", "device": "cpu",
        "step_seconds": {str(w): v for w, v in times.items()},
        "median_step_seconds": {str(w): v for w, v in med.items()},
        "rows_per_second": {str(w): v for w, v in rps.items()},
        "scaling_ratio": ratio,
        "machine": machine,
        "load_average_before_after": [load_before, os.getloadavg() if load_before else None],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return result
