"""Benchmarks: one whole joint training step (forward, backward, Adam) on three
paths measured side by side in one run, plus op-level figures against the
limits they are judged by.

Paths
- ``reference``: the research modules (:mod:`dualenc_fast.reference`), dense
  [B, F] code and dense GEMMs.
- ``peer``: the best plain-PyTorch path we know: torch.topk, then
  ``F.embedding_bag`` (per-sample weights) for the decoder, the NFM linear
  part and both FM pooling sums.
- ``fused``: :mod:`dualenc_fast.ops` called directly.
- ``module``: the drop-in :class:`dualenc_fast.JointSAENFM` (``backend="fused"``)
  through ``forward_sparse``, i.e. what the trainers run.
- ``dropin``: the same module called as ``model(x)``, which also returns the
  dense ``[B, F]`` code as the reference module does (the loss uses only the
  reconstruction).
- ``floor``: what no kernel design can avoid: the encoder GEMM ``x @ W_enc^T``
  alone plus one step of the same Adam over the same parameters (gradients
  kept between steps). Every other path is also reported as a ratio to it.

Every path uses the same shapes, dropout 0.15, MSE loss and the same fused
Adam (``torch.optim.Adam(fused=True)`` where the device has it). Steps are
interleaved round-robin so that a noisy machine slows all paths alike; each
figure is a median.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict

import torch
import torch.nn.functional as F_

CONFIGS = {
    # CPU config (KERNELS.md "C1")
    "C1": dict(d=512, F=16384, k=64, K=128, N=64, B=1024),
    # paper scale (KERNELS.md "P"), 2% density
    "P": dict(d=3200, F=50000, k=1024, K=300, N=512, B=4096),
    # a typical modern SAE, 0.1% density
    "S": dict(d=2304, F=65536, k=64, K=128, N=32, B=8192),
    # S scaled to a CPU: the same F, density 0.05%
    "CPU-S": dict(d=512, F=65536, k=32, K=64, N=16, B=1024),
    # a seconds-long smoke configuration
    "tiny": dict(d=64, F=1024, k=16, K=32, N=8, B=128),
}


@dataclass
class Shape:
    d: int
    F: int
    k: int
    K: int
    N: int
    B: int


def machine_description(device: str) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


# --------------------------------------------------------------------------- parameters
def make_params(s: Shape, device, dtype, seed=0) -> Dict[str, torch.Tensor]:
    """Row-major [F, d] weights (the layout the fused kernels gather from)."""
    g = torch.Generator().manual_seed(seed)
    rn = lambda *shape, std: (std * torch.randn(*shape, generator=g)).to(device, dtype)  # noqa: E731
    w_dec = rn(s.F, s.d, std=(2.0 / s.F) ** 0.5)
    p = {
        "w_enc": w_dec.clone(),
        "b_enc": torch.zeros(s.F, device=device, dtype=dtype),
        "w_dec": w_dec,
        "emb": rn(s.F, s.K, std=0.05),
        "w_lin": rn(s.F, s.d, std=0.01),
        "b_lin": torch.zeros(s.d, device=device, dtype=dtype),
        "w1": rn(s.K, s.K, std=0.01),
        "b1": torch.zeros(s.K, device=device, dtype=dtype),
        "w2": rn(s.d, s.K, std=0.01),
        "b2": torch.zeros(s.d, device=device, dtype=dtype),
    }
    return {n: t.requires_grad_(True) for n, t in p.items()}


def forward_fused(p, x, s: Shape, training=True):
    from . import ops

    v, i = ops.topk_encode(x, p["w_enc"], p["b_enc"], s.k)
    # the indices come from topk_encode: no range check (a device sync on CUDA)
    sae = ops.sparse_decode(v, i, p["w_dec"], check_indices=False)
    vn, i_n = ops.topn_reselect(v, i, s.N) if s.N < s.k else (v, i)
    lin = ops.sparse_decode(vn, i_n, p["w_lin"], p["b_lin"], check_indices=False)
    pooled = ops.fm_interaction(vn, i_n, p["emb"], check_indices=False)
    inter = ops.integration_mlp(pooled, p["w1"], p["b1"], p["w2"], p["b2"], 0.15, training)
    return sae + lin + inter


def forward_peer(p, x, s: Shape, training=True):
    z = F_.relu(torch.addmm(p["b_enc"], x, p["w_enc"].T))
    v, i = torch.topk(z, s.k, dim=1)
    sae = F_.embedding_bag(i, p["w_dec"], per_sample_weights=v, mode="sum")
    if s.N < s.k:
        vn, pos = torch.topk(v, s.N, dim=1)
        i_n = torch.gather(i, 1, pos)
    else:
        vn, i_n = v, i
    lin = F_.embedding_bag(i_n, p["w_lin"], per_sample_weights=vn, mode="sum") + p["b_lin"]
    emb = p["emb"]
    sv = F_.embedding_bag(i_n, emb, per_sample_weights=vn, mode="sum")
    q = F_.embedding_bag(i_n, emb * emb, per_sample_weights=vn * vn, mode="sum")
    pooled = F_.dropout(0.5 * (sv * sv - q), 0.15, training)
    inter = F_.linear(F_.relu(F_.linear(pooled, p["w1"], p["b1"])), p["w2"], p["b2"])
    return sae + lin + inter


def reference_model(s: Shape, device, dtype):
    from .reference import JointSAENFM

    torch.manual_seed(0)
    model = JointSAENFM(s.d, s.F, s.k, s.K, top_n=s.N if s.N < s.k else None, dropout=0.15)
    return model.to(device, dtype).train()


def make_adam(params):
    kwargs = dict(lr=1e-4, betas=(0.9, 0.999))
    try:
        return torch.optim.Adam(params, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, foreach=True, **kwargs)


PATHS = ("reference", "peer", "fused", "module", "dropin", "floor")


def build_floor_step(s: Shape, device, dtype) -> Callable[[torch.Tensor], float]:
    """The floor: the encoder GEMM alone plus one Adam step over the fused
    path's parameters, whose gradients stay allocated between steps."""
    pd = make_params(s, device, dtype)
    params = list(pd.values())
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = make_adam(params)
    w_t = pd["w_enc"].detach().T

    def step(x):
        with torch.no_grad():
            torch.mm(x, w_t)
        opt.step()
        return 0.0

    step.params = params  # type: ignore[attr-defined]
    step.forward = lambda x: torch.mm(x, pd["w_enc"].T)  # type: ignore[attr-defined]
    return step


def build_step(path: str, s: Shape, device, dtype) -> Callable[[torch.Tensor], float]:
    """A closure running one whole training step on a batch; returns the loss."""
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; choose from {PATHS}")
    if path == "floor":
        return build_floor_step(s, device, dtype)
    if path == "reference":
        model = reference_model(s, device, dtype)
        params = list(model.parameters())
        fwd = lambda x: model(x)[0]  # noqa: E731
    elif path in ("module", "dropin"):
        from .nn.modules import JointSAENFM

        torch.manual_seed(0)
        model = JointSAENFM(s.d, s.F, s.k, s.K, top_n=s.N if s.N < s.k else None, dropout=0.15, backend="fused")
        model = model.to(device, dtype).train()
        params = list(model.parameters())
        if path == "module":
            fwd = lambda x: model.forward_sparse(x).recon  # noqa: E731
        else:
            fwd = lambda x: model(x)[0]  # noqa: E731
    else:
        pd = make_params(s, device, dtype)
        params = list(pd.values())
        f = forward_fused if path == "fused" else forward_peer
        fwd = lambda x: f(pd, x, s)  # noqa: E731
    opt = make_adam(params)

    def step(x):
        opt.zero_grad(set_to_none=True)
        loss = F_.mse_loss(fwd(x), x)
        loss.backward()
        opt.step()
        return float(loss.detach())

    step.params = params  # type: ignore[attr-defined]
    step.forward = fwd  # type: ignore[attr-defined]
    return step


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_paths(steps: Dict[str, Callable], x, device, repeats: int, warmup: int) -> Dict[str, list]:
    for _ in range(warmup):
        for fn in steps.values():
            fn(x)
    _sync(device)
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            _sync(device)
            t0 = time.perf_counter()
            fn(x)
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


# --------------------------------------------------------------------------- memory
def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def transient_memory_worker(path: str, shape: dict, dtype: str) -> dict:
    """Run in a fresh process: peak RSS of one forward+backward minus the RSS
    with parameters, their gradients and the batch already allocated."""
    s = Shape(**shape)
    dt = getattr(torch, dtype)
    torch.manual_seed(0)
    step = build_step(path, s, "cpu", dt)
    x = torch.randn(s.B, s.d, dtype=dt)
    for p in step.params:
        p.grad = torch.zeros_like(p)
    # one warm-up pass so one-time allocations (thread pools, caches) are counted out
    step.forward(x).pow(2).mean().backward()
    for p in step.params:
        p.grad.zero_()
    from ._ext import extension_available

    if extension_available():
        from . import ops

        ops.clear_buffer_cache()  # blocks the cache holds idle would hide what the step allocates
    base = _rss_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset the peak (VmHWM) to the current RSS
    loss = F_.mse_loss(step.forward(x), x)
    loss.backward()
    peak = _rss_bytes("VmHWM")
    param_bytes = sum(p.numel() * p.element_size() for p in step.params)
    return {"transient_bytes": max(0, peak - base), "param_bytes": param_bytes}


def transient_memory(path: str, s: Shape, dtype: str = "float32") -> dict:
    env = dict(os.environ)
    # large blocks from mmap and straight back on free, so RSS follows live memory
    env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    code = (
        "import json,sys; from dualenc_fast.bench import transient_memory_worker as w; "
        f"print(json.dumps(w({path!r}, {asdict(s)!r}, {dtype!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- op-level
def _in_form(mode: str, fn: Callable, tiled: str = "off") -> Callable:
    """A case for :func:`time_paths` running ``fn()`` with the sparse products
    in one form ("gather" or "dense"; sparse_decode's tiled CUDA forward off,
    or "on" to time it); the strategy in force comes back after."""
    from . import ops

    def case(_):
        with ops.sparse_strategy_scope(mode, tiled=tiled):
            return fn()

    return case


def op_figures(s: Shape, device, dtype, repeats: int) -> dict:
    """sparse_decode (gather form) against the device-copy bandwidth, and its
    dense form beside it; topk_encode against a bare GEMM of the same shape;
    all measured here, in this run."""
    from . import ops

    p = make_params(s, device, dtype)
    x = torch.randn(s.B, s.d, device=device, dtype=dtype)
    with torch.no_grad():
        v, i = ops.topk_encode(x, p["w_enc"], p["b_enc"], s.k)
        w = p["w_dec"].detach()
        wt = p["w_enc"].detach().T
        big = torch.empty(256 * 2**20 // 4 if device != "cpu" else 64 * 2**20 // 4, device=device)
        big2 = torch.empty_like(big)
        cases = {
            "sparse_decode": _in_form("gather", lambda: ops.sparse_decode(v, i, w)),
            "sparse_decode_dense": _in_form("dense", lambda: ops.sparse_decode(v, i, w)),
            "topk_encode": lambda _: ops.topk_encode(x, p["w_enc"].detach(), p["b_enc"].detach(), s.k),
            "bare_gemm": lambda _: torch.mm(x, wt),
            "device_copy": lambda _: big2.copy_(big),
        }
        times = time_paths(cases, None, device, repeats, warmup=1)
    med = {n: statistics.median(t) for n, t in times.items()}
    elt = torch.empty(0, dtype=dtype).element_size()
    # bytes a gather must move at least: the selected rows, codes and the output
    gather_bytes = s.B * s.k * s.d * elt + s.B * s.k * (elt + 8) + s.B * s.d * elt
    copy_bw = 2 * big.numel() * 4 / med["device_copy"]
    decode_bw = gather_bytes / med["sparse_decode"]
    return {
        "sparse_decode_s": med["sparse_decode"],
        "sparse_decode_bytes_per_s": decode_bw,
        "device_copy_bytes_per_s": copy_bw,
        "sparse_decode_fraction_of_copy_bandwidth": decode_bw / copy_bw,
        "sparse_decode_dense_s": med["sparse_decode_dense"],
        "sparse_decode_picks": "dense" if ops.uses_dense_path(v, s.F) else "gather",
        "topk_encode_s": med["topk_encode"],
        "bare_gemm_s": med["bare_gemm"],
        "topk_encode_over_bare_gemm": med["topk_encode"] / med["bare_gemm"],
    }


# --------------------------------------------------------------------------- design A/B
@contextlib.contextmanager
def _setting(get: Callable, set_: Callable, value):
    """A process-wide setting of :mod:`dualenc_fast.ops` at ``value`` for the
    length of a ``with`` block, put back after."""
    was = get()
    set_(value)
    try:
        yield
    finally:
        set_(was)


def _ops():
    from . import ops

    return ops


# name -> (what the design is, a context manager factory, [which way it switches]).
# Two fields: a shipped design and a factory switching it OFF. A third field
# "on": a non-default alternative and a factory switching it ON (the step as
# shipped is then its "off" side), so for every entry "on" means the design in
# use and off / on > 1 that it helps.
DESIGNS: Dict[str, tuple] = {
    "shared_transposes": ("one transpose per code shared by its backward products "
                          "(ops.set_share_transposes)",
                          lambda: _setting(_ops().share_transposes, _ops().set_share_transposes, False)),
    "dense_dv_chunks": ("the dense form's dvalues in cache-sized feature chunks read back through the "
                        "transpose, no [rows, F] product in memory (ops.set_dense_dv_block_bytes)",
                        lambda: _setting(_ops().dense_dv_block_bytes, _ops().set_dense_dv_block_bytes, 0)),
    "tiled_forward": ("the batch-tiled CUDA forward where 'auto' takes it (float32 at P), against the "
                      "gather or dense form it replaces (ops.set_sparse_strategy(tiled=...))",
                      lambda: _ops().sparse_strategy_scope(tiled="off")),
    "tiled_forward_on": ("the batch-tiled CUDA forward forced on, e.g. bfloat16 at P where 'auto' keeps the "
                         "dense GEMM (a toss-up by arithmetic; CUDA only, not the default there)",
                         lambda: _ops().sparse_strategy_scope(tiled="on"), "on"),
    "staged_weight_grads": ("the dense form's weight gradients by a feature-major kernel over column slices "
                            "of y staged in shared memory instead of the GEMMs (ops.set_dense_weight_grads; "
                            "CUDA only, not the default)",
                            lambda: _setting(_ops().dense_weight_grads, _ops().set_dense_weight_grads, "staged"),
                            "on"),
}


def design_switch(name: str) -> str:
    """"off" when DESIGNS[name]'s factory switches a shipped design off,
    "on" when it switches a non-default alternative on."""
    entry = DESIGNS[name]
    switch = entry[2] if len(entry) > 2 else "off"
    if switch not in ("off", "on"):
        raise ValueError(f"DESIGNS[{name!r}]: the third field must be 'off' or 'on', got {switch!r}")
    return switch


def design_ab(step: Callable, x, device, names, repeats: int, warmup: int = 1, log=print) -> dict:
    """The fused step with each named design switched off, interleaved round by
    round with the same step as shipped (one set of parameters and one Adam for
    both, so memory and data are the same): the before/after of each design in
    one run. Reports the paired median of off / on (> 1: the design helps).
    A non-default alternative (DESIGNS entry with "on") is measured the other
    way round: switched on against the step as shipped; "switch" says which."""
    out = {}
    log("design A/B: the fused step with the design off / on (paired median; > 1 means the design helps):")
    for name in names:
        if name not in DESIGNS:
            raise ValueError(f"unknown design {name!r}; choose from {sorted(DESIGNS)}")
        what, factory = DESIGNS[name][:2]
        switch = design_switch(name)

        def switched(x_, _factory=factory):
            with _factory():
                return step(x_)

        paths = {"on": step, "off": switched} if switch == "off" else {"on": switched, "off": step}
        # one round at a time, the order alternating (no side always runs first)
        times = {"on": [], "off": []}
        time_paths(paths, x, device, 0, warmup)
        for r in range(repeats):
            order = ("on", "off") if r % 2 == 0 else ("off", "on")
            got = time_paths({n: paths[n] for n in order}, x, device, 1, 0)
            for n in order:
                times[n] += got[n]
        ratio = statistics.median(a / b for a, b in zip(times["off"], times["on"]))
        out[name] = {"what": what, "switch": switch, "on_s": statistics.median(times["on"]),
                     "off_s": statistics.median(times["off"]), "off_over_on_paired": ratio,
                     "on_all": times["on"], "off_all": times["off"]}
        how = "(shipped; measured switched off)" if switch == "off" else "(not the default; measured switched on)"
        log(f"  {name:<20} on {out[name]['on_s'] * 1e3:9.3f} ms  off {out[name]['off_s'] * 1e3:9.3f} ms  "
            f"off/on {ratio:.3f}  {how}")
    return out


# --------------------------------------------------------------------------- gather or dense
def density_sweep(s: Shape, device, dtype, ks, repeats: int = 3, log=print) -> dict:
    """sparse_decode forward + backward (values and weight gradients) in its
    gather and dense forms, side by side, at the shape ``s`` with each k in
    ``ks``, and its forward alone in the gather, dense and (on CUDA) tiled
    forms: the measurement behind the "auto" thresholds of
    :func:`dualenc_fast.ops.set_sparse_strategy` (cuda_min_density and the
    tiled_* settings)."""
    from . import ops

    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(s.F, s.d, generator=gen) * s.d ** -0.5).to(device, dtype).requires_grad_(True)
    rows = []
    log(f"sparse_decode forward + backward, B={s.B} F={s.F} d={s.d} {device} {dtype}:")
    tiled = torch.device(device).type == "cuda"
    log(f"  {'k':>6} {'density':>8} {'gather ms':>10} {'dense ms':>10} {'dense/gather':>12}  picks   "
        f"forward alone: {'gather ms':>9} {'dense ms':>9} {'tiled ms':>9}  picks")
    for k in ks:
        if not 0 < k <= s.F:
            raise ValueError(f"density sweep: need 0 < k <= F = {s.F}, got k = {k}")
        idx = torch.stack([torch.randperm(s.F, generator=gen)[:k] for _ in range(s.B)]).to(device)
        v = torch.rand(s.B, k, generator=gen).to(device, dtype).requires_grad_(True)
        up = torch.randn(s.B, s.d, generator=gen).to(device, dtype)
        step = lambda: torch.autograd.grad(ops.sparse_decode(v, idx, w), (v, w), up)  # noqa: E731

        def fwd():
            with torch.no_grad():
                return ops.sparse_decode(v, idx, w)

        cases = {"gather": _in_form("gather", step), "dense": _in_form("dense", step),
                 "gather_fwd": _in_form("gather", fwd), "dense_fwd": _in_form("dense", fwd)}
        if tiled:
            cases["tiled_fwd"] = _in_form("auto", fwd, tiled="on")
        med = {n: statistics.median(t) for n, t in time_paths(cases, None, device, repeats, warmup=1).items()}
        picks = "dense" if ops.uses_dense_path(v, s.F) else "gather"  # under the settings in force
        picks_fwd = "tiled" if ops.uses_tiled_forward(v, s.F) else picks
        row = dict(k=k, density=k / s.F, gather_s=med["gather"], dense_s=med["dense"],
                   dense_over_gather=med["dense"] / med["gather"], picks=picks,
                   gather_fwd_s=med["gather_fwd"], dense_fwd_s=med["dense_fwd"],
                   tiled_fwd_s=med.get("tiled_fwd"), picks_fwd=picks_fwd)
        if tiled:  # the tiled forward against the gather's, on this device
            with torch.no_grad():
                ref = _in_form("gather", fwd)(None).float()
                got = _in_form("auto", fwd, tiled="on")(None).float()
            row["tiled_max_abs_diff"] = float((got - ref).abs().max())
        rows.append(row)
        tiled_ms = f"{med['tiled_fwd'] * 1e3:>9.2f}" if tiled else f"{'-':>9}"
        log(f"  {k:>6} {k / s.F:>8.2%} {med['gather'] * 1e3:>10.2f} {med['dense'] * 1e3:>10.2f} "
            f"{row['dense_over_gather']:>12.2f}  {picks:<6}  {'':>14} {med['gather_fwd'] * 1e3:>9.2f} "
            f"{med['dense_fwd'] * 1e3:>9.2f} {tiled_ms}  {picks_fwd}")
    return {"shape": asdict(s), "strategy": ops.sparse_strategy(), "rows": rows}


# --------------------------------------------------------------------------- profile
def profile_step(step: Callable, x, device, top: int = 15, log=print) -> list:
    """Where one training step's time goes: torch.profiler over one step (after
    a warm-up step), aggregated by op name, sorted by self time on the device
    (CUDA) or the CPU. Returns the top rows as dicts."""
    from torch.profiler import ProfilerActivity, profile

    cuda = str(device).startswith("cuda")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    step(x)
    _sync(device)
    with profile(activities=acts) as prof:
        step(x)
        _sync(device)
    rows = []
    for e in prof.key_averages():
        dev = getattr(e, "self_device_time_total", None)
        if dev is None:
            dev = getattr(e, "self_cuda_time_total", 0.0)
        rows.append({"name": e.key, "calls": e.count, "self_cpu_us": e.self_cpu_time_total,
                     "self_device_us": dev if cuda else 0.0})
    key = "self_device_us" if cuda else "self_cpu_us"
    rows = [r for r in rows if r[key] > 0]
    rows.sort(key=lambda r: r[key], reverse=True)
    total = sum(r[key] for r in rows) or 1.0
    where = "device" if cuda else "CPU"
    log(f"profile of one fused step: self {where} time by op (top {top} of {len(rows)}, "
        f"{total / 1e3:.2f} ms in all):")
    for r in rows[:top]:
        log(f"  {r[key] / 1e3:9.3f} ms {100 * r[key] / total:5.1f}%  x{r['calls']:<4} {r['name']}")
    return rows[:top]


# --------------------------------------------------------------------------- driver
def run(config: str = "C1", device: str = "cpu", dtype: str = "float32", repeats: int = 5, warmup: int = 1,
        paths=PATHS, memory: bool = True, out: str | None = None, log=print,
        sweep_ks=None, profile: bool = False, designs=()) -> dict:
    if config not in CONFIGS:
        raise ValueError(f"unknown config {config!r}; choose one of {sorted(CONFIGS)}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' asked for but torch.cuda.is_available() is False")
    s = Shape(**CONFIGS[config])
    dt = getattr(torch, dtype)
    log(f"config {config}: {asdict(s)}  device={device} dtype={dtype} repeats={repeats}")
    torch.manual_seed(0)
    x = torch.randn(s.B, s.d, device=device, dtype=dt)
    steps = {name: build_step(name, s, device, dt) for name in paths}
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    times = time_paths(steps, x, device, repeats, warmup)
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
    med = {n: statistics.median(t) for n, t in times.items()}
    result = {
        "config": config,
        "shape": asdict(s),
        "device": device,
        "dtype": dtype,
        "repeats": repeats,
        "machine": machine_description(device),
        # 1/5/15-minute load averages before and after the timed steps: how busy the machine was
        "load_average": {"before": load_before, "after": load_after},
        "step_seconds": {n: {"median": med[n], "all": times[n]} for n in times},
    }
    if {"fused", "module", "dropin"} & set(paths):
        from . import ops

        result["sparse_strategy"] = ops.sparse_strategy()
        result["sparse_strategy"]["picks"] = "dense" if ops.uses_dense_path(x[:, : s.k], s.F) else "gather"
    ratios = {}
    for fast in ("fused", "module", "dropin"):
        if fast in med:
            for other in ("reference", "peer"):
                if other in med:
                    ratios[f"{fast}_vs_{other}"] = med[other] / med[fast]
    result["speedup"] = ratios
    if "floor" in med:
        result["over_floor"] = {n: med[n] / med["floor"] for n in med if n != "floor"}
        # the ratio of each timed step to the floor step timed in the same round, median over rounds
        result["over_floor_paired"] = {
            n: statistics.median(a / b for a, b in zip(times[n], times["floor"])) for n in med if n != "floor"
        }
    if "dropin" in med and "module" in med:
        result["dropin_over_module"] = med["dropin"] / med["module"]
        result["dropin_over_module_paired"] = statistics.median(
            a / b for a, b in zip(times["dropin"], times["module"]))
    if med:
        log("whole training step (forward + backward + Adam), median seconds:")
    for n in med:
        extra = f"  {result['over_floor'][n]:.2f}x the floor" if n in result.get("over_floor", {}) else ""
        log(f"  {n:<10} {med[n]:.4f} s{extra}")
    for n, r in ratios.items():
        log(f"  {n:<22} {r:.2f}x")
    if "dropin_over_module" in result:
        log(f"  dropin / module        {result['dropin_over_module']:.2f}x  (model(x) with the dense code "
            f"against forward_sparse)")
    if memory and device == "cpu":
        mem = {n: transient_memory(n, s, dtype) for n in paths if n != "floor"}
        result["transient_memory_bytes"] = {n: m["transient_bytes"] for n, m in mem.items()}
        log("transient memory of forward + backward (peak RSS minus params, grads and batch):")
        for n, m in mem.items():
            log(f"  {n:<10} {m['transient_bytes'] / 2**20:8.1f} MiB")
        if "fused" in mem and "reference" in mem and mem["reference"]["transient_bytes"] > 0:
            frac = mem["fused"]["transient_bytes"] / mem["reference"]["transient_bytes"]
            result["transient_memory_fused_over_reference"] = frac
            log(f"  fused / reference      {frac:.3f}")
    if "fused" in paths:
        figs = op_figures(s, device, dt, repeats=max(3, repeats))
        result["ops"] = figs
        log("op figures (limits measured in this run):")
        log(f"  sparse_decode {figs['sparse_decode_s'] * 1e3:.3f} ms = "
            f"{figs['sparse_decode_fraction_of_copy_bandwidth']:.2f} x device-copy bandwidth "
            f"({figs['device_copy_bytes_per_s'] / 1e9:.1f} GB/s), gather form")
        log(f"  sparse_decode dense form {figs['sparse_decode_dense_s'] * 1e3:.3f} ms "
            f"(dense / gather {figs['sparse_decode_dense_s'] / figs['sparse_decode_s']:.2f}; "
            f"the strategy in force picks {figs['sparse_decode_picks']})")
        log(f"  topk_encode {figs['topk_encode_s'] * 1e3:.3f} ms = "
            f"{figs['topk_encode_over_bare_gemm']:.2f} x a bare GEMM of the same shape "
            f"({figs['bare_gemm_s'] * 1e3:.3f} ms)")
    if profile and "fused" in steps:
        result["profile_fused"] = profile_step(steps["fused"], x, device, log=log)
    if designs:
        # the run's own fused step when it has one (no second copy of the parameters)
        ab_step = steps["fused"] if "fused" in steps else build_step("fused", s, device, dt)
        result["design_ab"] = design_ab(ab_step, x, device, designs, repeats=max(3, repeats), log=log)
    if sweep_ks:
        result["density_sweep"] = density_sweep(s, device, dt, sweep_ks, repeats=max(3, repeats), log=log)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as fh:
            json.dump(result, fh, indent=2)
        log(f"wrote {out}")
    return result
