"""Trainers: ``sae``, ``sae_bias`` (the fair baseline), ``sequential`` and ``joint``.

Paper defaults: Adam (lr 1e-4, betas 0.9/0.999), learning rate decayed
linearly to 1e-5 over the first 80% of steps, then flat; loss ``MSE(recon, x)``
with no sparsity penalty (TopK is the sparsity).

- ``sae``: the primary TopK SAE alone.
- ``sae_bias``: the same SAE plus an output bias. ``sae_recon + linear_out`` of
  the joint model is in exactly this function class, so it is the fair
  baseline for the NFM's linear part.
- ``sequential``: stage 1 trains the SAE (``sae_steps``, default ``steps``; or
  loads a trained SAE via ``init_sae``), stage 2 freezes it and trains the NFM
  on the residual ``x - sae_recon`` for ``steps``. With the same seed, stage 1
  is the ``sae`` run step for step.
- ``joint``: SAE and NFM together on one loss.
- ``joint_linear``: the joint model with the interaction path removed (SAE plus a
  second decoder matrix and bias on the same code, ``sae_recon + linear_out``),
  trained the same way: a control for what the interaction path adds.

Paper-fidelity options: ``standardize`` (train on per-dimension z-scores from a
10k-row sample, as the author's scripts do; the saved ``model/`` has the
standardisation folded in and takes raw activations, ``model_standardized/``
is the model as trained), ``adam_eps`` (the scripts use 1e-5), and
``outliers`` = ``drop`` / ``clip`` for rows whose norm exceeds
``outlier_multiple`` x the median row norm (counted in the summary).

Every run writes ``out/config.json``, ``out/metrics.jsonl`` (one line per step,
plus ``"split": "val"`` lines), ``out/checkpoints/`` (resumable, atomic),
``out/model/`` (final weights, :func:`dualenc_fast.train.checkpoint.load_model`) and
``out/summary.json``. ``resume=True`` continues from the newest checkpoint that
verifies (newer incomplete or corrupt ones are moved aside to
``checkpoints/corrupt-step_*`` with a warning) and reproduces the uninterrupted
run exactly; it refuses, rather than start again from step 0, a run that has
progress but no usable checkpoint.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Union

import torch

from . import checkpoint as ckpt
from .data import ActivationStore, BatchPrefetcher
from ..errors import DISK_FULL_ERRNOS, DiskFullError, NoGoodCheckpointError
from ..nn.modules import JointSAENFM, TopKSparseAutoencoder

KINDS = ("sae", "sae_bias", "sequential", "joint", "joint_linear")
PRE_BIAS_INIT = ("none", "zeros", "mean", "geometric_median")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class TrainConfig:
    kind: str = "joint"
    features: int = 4096
    k: int = 32
    embedding_dim: int = 64
    top_n: Optional[int] = None
    dropout: float = 0.15
    steps: int = 1000
    sae_steps: Optional[int] = None  # sequential stage 1; default = steps
    batch_size: int = 256
    lr: float = 1e-4
    final_lr: float = 1e-5
    decay_fraction: float = 0.8
    betas: tuple = (0.9, 0.999)
    seed: int = 0
    val_fraction: float = 0.1
    val_every: int = 0  # 0: validate at the end only
    val_rows: Optional[int] = 16384
    checkpoint_every: int = 0  # 0: checkpoint at the end only
    keep_checkpoints: int = 2
    log_every: int = 1
    backend: str = "auto"
    pre_bias: str = "none"  # none | zeros | mean | geometric_median
    unit_norm_decoder: bool = False
    aux_k: Optional[int] = None
    aux_coef: float = 1.0 / 32.0
    dead_after_tokens: int = 200_000
    normalize_input: bool = False
    shuffle_shards: int = 4
    init_sae: Optional[str] = None  # sequential: a trained SAE to start stage 2 from
    precision: str = "fp32"  # fp32 | bf16 (autocast; float32 weights and Adam state)
    adam_eps: float = 1e-8
    standardize: bool = False  # train on per-dimension z-scores (folded into model/ on save)
    standardize_rows: int = 10_000
    outliers: str = "keep"  # keep | drop | clip rows with norm > outlier_multiple x median norm
    outlier_multiple: float = 10.0

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.pre_bias not in PRE_BIAS_INIT:
            raise ValueError(f"pre_bias must be one of {PRE_BIAS_INIT}, got {self.pre_bias!r}")
        for name in ("features", "k", "embedding_dim", "steps", "batch_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.k > self.features:
            raise ValueError(f"k ({self.k}) must not exceed features ({self.features})")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ValueError(f"decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.lr <= 0 or self.final_lr < 0:
            raise ValueError("lr must be positive and final_lr non-negative")
        if self.init_sae is not None and self.kind != "sequential":
            raise ValueError("init_sae only applies to kind='sequential'")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if not self.adam_eps > 0:
            raise ValueError(f"adam_eps must be positive, got {self.adam_eps}")
        if self.outliers not in ("keep", "drop", "clip"):
            raise ValueError(f"outliers must be 'keep', 'drop' or 'clip', got {self.outliers!r}")
        if not self.outlier_multiple > 0:
            raise ValueError(f"outlier_multiple must be positive, got {self.outlier_multiple}")
        if self.standardize and self.normalize_input:
            raise ValueError("standardize and normalize_input are exclusive: pick one input scaling")
        if self.standardize_rows < 2:
            raise ValueError(f"standardize_rows must be at least 2, got {self.standardize_rows}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)


@dataclass
class TrainResult:
    model: torch.nn.Module
    out_dir: Path
    summary: dict = field(default_factory=dict)
    # with standardize: the model as trained (takes z-scores); ``model`` takes raw activations
    standardized_model: Optional[torch.nn.Module] = None


# --------------------------------------------------------------------------- building blocks


def build_model(config: TrainConfig, d: int) -> torch.nn.Module:
    """The module a kind trains, seeded by ``config.seed`` (same SAE init for every kind)."""
    torch.manual_seed(config.seed)
    sae_opts = dict(
        pre_bias=config.pre_bias != "none",
        unit_norm_decoder=config.unit_norm_decoder,
        aux_k=config.aux_k,
        aux_coef=config.aux_coef,
        normalize_input=config.normalize_input,
    )
    if config.kind in ("sae", "sae_bias"):
        return TopKSparseAutoencoder(d, config.features, config.k, backend=config.backend,
                                     decoder_bias=config.kind == "sae_bias", **sae_opts)
    return JointSAENFM(d, config.features, config.k, config.embedding_dim, top_n=config.top_n,
                       dropout=config.dropout, backend=config.backend,
                       interaction=config.kind != "joint_linear", **sae_opts)


def lr_factor(step: int, total: int, lr: float, final_lr: float, decay_fraction: float = 0.8) -> float:
    """Multiplier of ``lr`` after ``step`` updates: linear to ``final_lr`` over the first
    ``decay_fraction`` of ``total`` steps, then flat."""
    horizon = max(1.0, decay_fraction * total)
    t = min(step / horizon, 1.0)
    return 1.0 - (1.0 - final_lr / lr) * t


def make_optimizer(params, config: TrainConfig, total_steps: int):
    """Adam (torch's fused implementation: one kernel per step on CPU and CUDA; float32
    state for float32 parameters) and the linear-decay schedule."""
    params = list(params)
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    opt = torch.optim.Adam(params, lr=config.lr, betas=tuple(config.betas), eps=config.adam_eps,
                           fused=fused or None)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: lr_factor(i, total_steps, config.lr, config.final_lr, config.decay_fraction)
    )
    return opt, sched


def sae_of(model) -> TopKSparseAutoencoder:
    return model.primary_sae if isinstance(model, JointSAENFM) else model


def _stages(config: TrainConfig):
    """``[(name, steps)]`` for a kind."""
    if config.kind == "sequential":
        if config.init_sae is not None:
            return [("nfm", config.steps)]
        return [("sae", config.sae_steps or config.steps), ("nfm", config.steps)]
    return [(config.kind, config.steps)]


def _stage_module(model, stage: str):
    """The module whose forward_sparse the stage trains, and its trainable parameters."""
    if stage in ("sae", "sae_bias") and isinstance(model, JointSAENFM):
        return model.primary_sae, list(model.primary_sae.parameters())
    if stage == "nfm":
        for p in model.primary_sae.parameters():
            p.requires_grad_(False)
        return model, list(model.nfm.parameters())
    return model, list(model.parameters())


def _mean_abs(t: Optional[torch.Tensor]) -> float:
    return float(t.detach().abs().mean()) if t is not None else 0.0


def component_stats(out) -> dict:
    """Mean |sae_recon|, |linear_out|, |interaction_out| and their shares of the total."""
    a, b, c = _mean_abs(out.sae_recon), _mean_abs(out.linear_out), _mean_abs(out.interaction_out)
    total = a + b + c
    nfm = b + c
    return {
        "mean_abs_sae": a,
        "mean_abs_linear": b,
        "mean_abs_interaction": c,
        "share_linear": b / total if total > 0 else 0.0,
        "share_interaction": c / total if total > 0 else 0.0,
        "interaction_share_of_nfm": c / nfm if nfm > 0 else 0.0,
    }


@torch.no_grad()
def evaluate(model, x: torch.Tensor, *, batch_size: int = 4096) -> dict:
    """Reconstruction metrics of ``model`` on ``x`` (eval mode): mse, fvu, l0,
    component magnitudes and shares, and for joint models the component ablation
    (mse of sae only, sae + linear, sae + interaction), and the standard SAE metrics of
    :mod:`dualenc_fast.eval.sae_metrics` (explained variance, cossim, l2 ratio, dead and dense latents)."""
    from ..eval.sae_metrics import SAEMetrics

    std = SAEMetrics()
    was = model.training
    model.eval()
    n, d = x.shape
    dev = next(model.parameters()).device
    mean = x.mean(0).to(dev)
    sums = dict(se=0.0, var=0.0, l0=0.0, sae=0.0, lin=0.0, inter=0.0, se_sae=0.0, se_lin=0.0, se_int=0.0)
    fired = torch.zeros(sae_of(model).hidden_dim, dtype=torch.bool, device=dev)
    for i in range(0, n, batch_size):
        xb = x[i:i + batch_size].to(dev, non_blocking=True)
        out = model.forward_sparse(xb)
        std.update(xb, out.recon, out.code)
        sums["se"] += float((out.recon - xb).pow(2).sum())
        sums["var"] += float((xb - mean).pow(2).sum())
        sums["l0"] += float((out.code.values != 0).sum())
        fired[out.code.indices[out.code.values > 0]] = True
        sums["sae"] += float(out.sae_recon.abs().sum())
        if out.linear_out is not None:
            sums["lin"] += float(out.linear_out.abs().sum())
            sums["inter"] += float(out.interaction_out.abs().sum())
            sums["se_sae"] += float((out.sae_recon - xb).pow(2).sum())
            sums["se_lin"] += float((out.sae_recon + out.linear_out - xb).pow(2).sum())
            sums["se_int"] += float((out.sae_recon + out.interaction_out - xb).pow(2).sum())
    model.train(was)
    m = {
        "rows": n,
        "mse": sums["se"] / (n * d),
        "fvu": sums["se"] / sums["var"] if sums["var"] > 0 else float("nan"),
        "l0": sums["l0"] / n,
        "features_fired": int(fired.sum()),
    }
    m.update({key: v for key, v in std.result().items() if key not in ("l0", "latents", "density_tokens")})
    a, b, c = sums["sae"] / (n * d), sums["lin"] / (n * d), sums["inter"] / (n * d)
    total = a + b + c
    m.update({
        "mean_abs_sae": a, "mean_abs_linear": b, "mean_abs_interaction": c,
        "share_linear": b / total if total else 0.0, "share_interaction": c / total if total else 0.0,
        "interaction_share_of_nfm": c / (b + c) if b + c else 0.0,
    })
    if isinstance(model, JointSAENFM):
        m.update({
            "mse_sae_only": sums["se_sae"] / (n * d),
            "mse_sae_linear": sums["se_lin"] / (n * d),
            "mse_sae_interaction": sums["se_int"] / (n * d),
        })
    return m


# --------------------------------------------------------------------------- metrics file


class _MetricsLog:
    def __init__(self, path: Path):
        self.path = path
        self.fh = None

    def truncate_after(self, step: int) -> None:
        """Keep only lines with ``step <= step`` and no final validation (resume)."""
        if not self.path.exists():
            return
        keep = []
        with open(self.path, encoding="utf-8", errors="replace") as fh:
            lines = [line for line in fh if line.strip()]
        for i, line in enumerate(lines):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if i < len(lines) - 1:  # a torn last line is what a crash leaves; anything else is damage
                    warnings.warn(ckpt.CheckpointWarning(f"{self.path} line {i + 1} is unreadable: dropped"),
                                  stacklevel=3)
                continue
            if isinstance(row, dict) and row.get("step", 0) <= step and not row.get("final"):
                keep.append(line if line.endswith("\n") else line + "\n")
        ckpt.atomic_write_text(self.path, "".join(keep))

    def write(self, row: dict) -> None:
        with self._disk_full_is_clear():
            if self.fh is None:
                self.fh = open(self.path, "a", encoding="utf-8")
            self.fh.write(json.dumps(row) + "\n")

    def flush(self) -> None:
        if self.fh is not None:
            with self._disk_full_is_clear():
                self.fh.flush()

    @contextlib.contextmanager
    def _disk_full_is_clear(self):
        try:
            yield
        except OSError as exc:
            if exc.errno in DISK_FULL_ERRNOS:
                raise DiskFullError(self.path) from exc
            raise

    def close(self) -> None:
        if self.fh is not None:
            fh, self.fh = self.fh, None
            with self._disk_full_is_clear():
                fh.close()


def read_metrics(path) -> list:
    """The rows of a ``metrics.jsonl``."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


# --------------------------------------------------------------------------- training

RUN_FILES = ("checkpoints", "model", "metrics.jsonl", "summary.json", "config.json", "wandb.json")


def _run_progress(out_dir: Path) -> list:
    """What in ``out_dir`` shows a run made progress (config.json alone does not)."""
    found = []
    root = ckpt.checkpoint_dir(out_dir)
    if root.is_dir() and any(p.name.startswith("step_") for p in root.iterdir()):
        found.append("checkpoints/")
    metrics = out_dir / "metrics.jsonl"
    if metrics.exists() and metrics.stat().st_size > 0:
        found.append("metrics.jsonl")
    for name in ("model", "summary.json"):
        if (out_dir / name).exists():
            found.append(name)
    return found


def _set_aside(folder: Path) -> Path:
    """Rename a bad checkpoint folder to ``corrupt-<name>`` (kept for inspection, out of the way)."""
    dest = folder.with_name(f"corrupt-{folder.name}")
    if dest.exists():
        shutil.rmtree(dest, ignore_errors=True)
    os.replace(folder, dest)
    return dest


def _prepare_run_dir(config: TrainConfig, store: ActivationStore, out_dir: Path, resume: bool,
                     overwrite: bool) -> Optional[Path]:
    """Check, clear (overwrite) and describe the run folder (rank 0 only). Returns the
    checkpoint to resume from (the newest that verifies; newer bad ones are set aside
    with a warning), or None."""
    cfg_path = out_dir / "config.json"
    progress_found = _run_progress(out_dir)
    if progress_found and not resume:
        if not overwrite:
            raise ValueError(f"{out_dir} already holds a run ({', '.join(progress_found)}): pass resume (--resume) "
                             "to continue it, overwrite (--overwrite) to replace it, or choose another output folder")
        for name in RUN_FILES:
            p = out_dir / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    found = None
    if resume:
        found, skipped = ckpt.find_resumable(out_dir)
        if found is None and skipped:
            raise NoGoodCheckpointError(
                f"cannot resume {out_dir}: none of its {len(skipped)} checkpoint(s) verifies "
                f"({'; '.join(reason for _, reason in skipped)}); pass overwrite (--overwrite) to start again")
        if found is None and progress_found:
            raise NoGoodCheckpointError(
                f"cannot resume {out_dir}: it holds {', '.join(progress_found)} but no checkpoint; "
                "pass overwrite (--overwrite) to start again from step 0")
        from .tracking import is_rank0

        for folder, reason in skipped:
            where = f" (moved to corrupt-{folder.name})" if is_rank0() else ""
            if is_rank0():  # one process renames; the others only skip it
                _set_aside(folder)
            warnings.warn(ckpt.CheckpointWarning(f"skipping checkpoint {folder.name}: {reason}{where}"), stacklevel=2)
        if found is None:
            warnings.warn(ckpt.CheckpointWarning(f"nothing to resume in {out_dir}: starting a new run"), stacklevel=2)
    out_dir.mkdir(parents=True, exist_ok=True)
    if found is not None and cfg_path.exists():
        saved = TrainConfig.from_dict(ckpt.read_json(cfg_path)["train"])
        if saved.to_dict() != config.to_dict():
            diff = sorted(k for k, v in config.to_dict().items() if saved.to_dict().get(k) != v)
            raise ValueError(f"cannot resume {out_dir}: its config differs in {diff}; "
                             "resume with the same settings or use another output folder")
    ckpt.atomic_write_json(cfg_path, {"format": "dualenc_fast.run", "train": config.to_dict(), "data": {
        "folder": str(store.folder), "model": store.manifest.get("model"), "layer": store.manifest.get("layer"),
        "count": store.count, "d": store.d}})
    return found


def _rank_seed(seed: int, rank: int) -> int:
    """The dropout stream of ``rank``: rank 0 keeps ``seed`` (a one-process run is rank 0)."""
    return int(seed) if rank == 0 else (int(seed) * 1_000_003 + 7919 * rank + 1) % (2**63 - 1)


def _device_rng(device: torch.device) -> Optional[torch.Tensor]:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def train(
    config: TrainConfig,
    store: Union[ActivationStore, str, Path],
    out_dir: Union[str, Path],
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    stop_after: Optional[int] = None,
    save_final: bool = True,
    device=None,
    wandb_project: Optional[str] = None,
    progress_every: Optional[int] = None,
) -> TrainResult:
    """Train ``config.kind`` on the activations in ``store``; write everything to ``out_dir``.

    ``resume``: continue from the newest checkpoint in ``out_dir`` that verifies (exactly);
    a folder with no run in it starts a new one (with a warning); a run with progress
    but no usable checkpoint raises :class:`NoGoodCheckpointError`.
    ``overwrite``: delete an existing run in ``out_dir`` first.
    ``stop_after``: stop once this many steps are done (testing interruptions).
    ``wandb_project``: also log the metrics to this Weights & Biases project (rank 0 only).
    ``progress_every``: without a terminal, one progress line every this many steps.
    ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or None (CUDA when available).

    Inside a ``torch.distributed`` process group (torchrun), every rank calls this
    with the same arguments: ``config.batch_size`` is the global batch, each rank
    trains on its slice, gradients and dead-feature counts are summed across ranks,
    and rank 0 alone writes files. No step reads a value back to the host: losses
    stay on the device and are checked (NaN/Inf) and logged every ``log_every``
    steps, before each checkpoint and validation, and at the end.
    """
    from ..nn.modules import fold_standardization_
    from ..progress import Progress
    from .data import outlier_filter, standardization_stats

    from . import distributed as dist_

    config.validate()
    dev = dist_.resolve_device(device)
    rank, world = dist_.rank(), dist_.world_size()
    main = rank == 0
    if config.batch_size % world:
        raise ValueError(f"batch_size ({config.batch_size}) must be a multiple of the number of processes "
                         f"({world}): it is the global batch, split evenly across them")
    if not isinstance(store, ActivationStore):
        store = ActivationStore(store)
    out_dir = Path(out_dir)
    error, failure, found = None, None, None
    if main:
        try:
            found = _prepare_run_dir(config, store, out_dir, resume, overwrite)
        except (ValueError, NoGoodCheckpointError) as exc:
            failure = exc
            error = (isinstance(exc, NoGoodCheckpointError), str(exc))
    error, found = dist_.broadcast_object((error, found))
    if failure is not None:
        raise failure
    if error is not None:
        raise (NoGoodCheckpointError if error[0] else ValueError)(error[1])

    d = store.d
    model = build_model(config, d)
    sae = sae_of(model)
    stages = _stages(config)
    total = sum(n for _, n in stages)
    log = _MetricsLog(out_dir / "metrics.jsonl")
    dead_counter = torch.zeros(sae.hidden_dim, dtype=torch.long)
    done = 0
    extra: dict = {}
    elapsed_before = 0.0
    latest = found
    if latest is not None:
        info = ckpt.load_checkpoint(latest, model, restore_rng=False, verify=False)  # verified just above
        done = int(info["step"])
        extra = info["extra"]
        dead_counter = extra.get("dead_counter", dead_counter)
        elapsed_before = float(extra.get("elapsed", 0.0))
    else:
        if config.init_sae is not None:
            src = sae_of(ckpt.load_model(config.init_sae, backend="reference"))
            if (src.input_dim, src.hidden_dim, src.k) != (sae.input_dim, sae.hidden_dim, sae.k):
                raise ValueError(f"init_sae {config.init_sae} has (d, F, k) = {(src.input_dim, src.hidden_dim, src.k)}, "
                                 f"this run needs {(sae.input_dim, sae.hidden_dim, sae.k)}")
            src_sd = src.state_dict()
            missing = sae.load_state_dict(src_sd, strict=False)
            if missing.unexpected_keys:
                raise ValueError(f"init_sae has parameters this SAE lacks: {missing.unexpected_keys}")
        if config.normalize_input:
            sae.fit_input_normalization(mean_squared_norm=store.mean_squared_norm)
        if config.pre_bias in ("mean", "geometric_median") and config.init_sae is None:
            sample = store.sample(4096, seed=config.seed, val_fraction=config.val_fraction)
            sae.init_pre_bias(sample, method=config.pre_bias)
        torch.manual_seed(_rank_seed(config.seed, rank))
    model.to(dev)
    dead_counter = dead_counter.to(dev)
    if resume and main:
        log.truncate_after(done)
    # input preparation: outlier rows (raw norms), then the per-dimension z-score
    prep_stats = None
    if config.standardize or config.outliers != "keep":
        prep_stats = standardization_stats(store, config.standardize_rows, val_fraction=config.val_fraction)
    outlier_threshold = config.outlier_multiple * prep_stats["median_norm"] if config.outliers != "keep" else None
    needs_prep = prep_stats is not None

    def prep(x: torch.Tensor):
        n = 0
        if outlier_threshold is not None:
            x, n = outlier_filter(x, config.outliers, outlier_threshold)
        if config.standardize:
            x = (x - prep_stats["mean"]) / prep_stats["std"]
        return x, n

    touched = {"train": int(extra.get("outlier_rows", 0)), "val": 0}
    val_x = None
    if main:
        val_x, touched["val"] = prep(store.tensor("val", config.val_fraction, max_rows=config.val_rows))
        val_x = val_x.to(dev)

    # the loader prepares batches on the host; the rows each touched are counted as it is consumed
    batch_touched: collections.deque = collections.deque()

    def prepared(batches):
        for b in batches:
            b, n = prep(b)
            batch_touched.append(n)
            yield b

    raw = store.loader(config.batch_size, seed=config.seed, split="train", val_fraction=config.val_fraction,
                       start_batch=done, shuffle_shards=config.shuffle_shards, rank=rank, world_size=world)
    loader = BatchPrefetcher(prepared(raw) if needs_prep else raw, dev)
    amp = dist_.autocast(dev, config.precision)
    # losses of the steps since the last host read, on the device
    interval = config.log_every if config.log_every and config.log_every > 0 else 256
    losses = torch.zeros(interval, dtype=torch.float32, device=dev)
    pending: list = []  # (step, stage, lr) of the losses not yet read
    row_stats = None  # the device-side figures of the step to log
    tracker = None
    if main:
        from .tracking import start_wandb

        tracker = start_wandb(wandb_project, out_dir, config=config.to_dict(), resume=found is not None)
    t0 = time.time()
    bar = Progress(total, f"train {config.kind}", initial=done, enabled=progress and main, every=progress_every)
    stage_start = 0
    result_summary = {}

    def read_back(sched) -> None:
        """Copy the pending losses (and the logged step's figures) to the host: the
        only device->host reads of training. Raises TrainingDiverged naming the
        first non-finite step."""
        nonlocal row_stats
        if not pending:
            return
        n = len(pending)
        vals = losses[:n]
        if world > 1:
            vals = dist_.all_reduce_sum_(vals.clone(), "loss all-reduce") / world
        values = vals.tolist()
        for (step, stage, _lr), v in zip(pending, values):
            if not math.isfinite(v):
                first, last = pending[0][0], pending[-1][0]
                raise TrainingDiverged(
                    f"{config.kind}: loss became {v} at step {step} (stage {stage}; the losses of steps "
                    f"{first}-{last} were read back together, they are read every {interval} steps and at "
                    f"checkpoints); lower the learning rate (now "
                    f"{sched.get_last_lr()[0]:.3g}), check the activations for NaN/Inf, or resume from the "
                    f"last checkpoint in {ckpt.checkpoint_dir(out_dir)}"
                )
        if row_stats is not None:
            step, stage, lr_now, stats = row_stats
            if world > 1:
                stats["mse"] = dist_.all_reduce_sum_(stats["mse"].clone(), "metrics all-reduce") / world
            row = {"step": step, "stage": stage, "loss": values[[p[0] for p in pending].index(step)],
                   "mse": float(stats["mse"]), "fvu": float(stats["fvu"]), "l0": float(stats["l0"]),
                   "dead": int(stats["dead"]), "lr": lr_now, **component_stats(stats["out"])}
            if stats.get("aux") is not None:
                row["aux_loss"] = float(stats["aux"])
            if main:
                log.write(row)
                if tracker is not None:
                    tracker.log(row, step)
                if progress:
                    bar.set_postfix(loss=f"{row['loss']:.4g}", refresh=False)
            row_stats = None
        pending.clear()

    ok = False
    try:
        for stage, n_steps in stages:
            stage_end = stage_start + n_steps
            if done >= stage_end:
                stage_start = stage_end
                continue
            module, params = _stage_module(model, stage)
            opt, sched = make_optimizer(params, config, n_steps)
            if latest is not None:
                # the optimizer/scheduler saved belong to the checkpoint's stage; a stage
                # that starts right at the checkpoint gets fresh ones, as in an unbroken run
                same_stage = extra.get("stage") == stage
                ckpt.load_checkpoint(latest, None, opt if same_stage else None, sched if same_stage else None,
                                     restore_rng=True, verify=False)
                rank_rng = extra.get("rank_rng")
                if rank_rng is not None and len(rank_rng) == world:
                    torch.set_rng_state(rank_rng[rank])
                    if dev.type == "cuda" and extra.get("rank_device_rng") is not None:
                        torch.cuda.set_rng_state(extra["rank_device_rng"][rank], dev)
                elif world > 1:
                    torch.manual_seed(_rank_seed(config.seed, rank) + done)
                    dist_.print0(f"note: {latest} was written by a run with another number of processes; "
                                 "the data order continues exactly, the dropout streams are new")
                latest = None
            trains_sae = stage != "nfm"
            module.train()
            while done < stage_end:
                if stop_after is not None and done >= stop_after:
                    read_back(sched)
                    return TrainResult(model, out_dir, {"stopped_at": done})
                try:
                    x = next(loader)
                    if needs_prep:
                        touched["train"] += batch_touched.popleft()
                    with amp:
                        out = module.forward_sparse(x)
                    recon = out.recon.float()
                    mse = (recon - x).pow(2).mean()
                    loss = mse
                    if sae.normalizes_input:
                        loss = mse * sae.input_scale.pow(2)
                    aux = None
                    with torch.no_grad():
                        # features fired anywhere in the global batch: a scatter, no host read
                        fired = torch.zeros(sae.hidden_dim, dtype=torch.int32, device=dev)
                        fired.scatter_add_(0, out.code.indices.reshape(-1), (out.code.values > 0).to(torch.int32).reshape(-1))
                        if world > 1:
                            dist_.all_reduce_sum_(fired, "dead-feature all-reduce")
                        dead_counter += config.batch_size
                        dead_counter.masked_fill_(fired > 0, 0)
                        dead_mask = dead_counter >= config.dead_after_tokens
                    if trains_sae and config.aux_k:
                        with amp:
                            aux = sae.auxk_loss(x, (x - recon).detach(), dead_mask).float()
                        loss = loss + config.aux_coef * aux
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    dist_.average_gradients(params)
                    if trains_sae and sae.unit_norm_decoder:
                        sae.remove_parallel_decoder_grad()
                    lr_now = sched.get_last_lr()[0]
                    opt.step()
                    sched.step()
                    if trains_sae and sae.unit_norm_decoder:
                        sae.normalize_decoder()
                except dist_.PeerFailure:
                    raise
                except (ValueError, RuntimeError):
                    # an op that rejects NaN input (e.g. topk_encode) after an unread
                    # divergence: report the step where the loss went bad first
                    read_back(sched)
                    raise
                done += 1
                losses[len(pending)] = loss.detach()
                pending.append((done, stage, lr_now))
                logged = bool(config.log_every) and (done % config.log_every == 0 or done == total)
                if logged:
                    with torch.no_grad():
                        var = (x - x.mean(0)).pow(2).sum()
                        row_stats = (done, stage, lr_now, {
                            "mse": mse.detach(), "fvu": (recon - x).pow(2).sum() / var, "l0": out.code.l0(),
                            "dead": dead_mask.sum(), "aux": None if aux is None else aux.detach(), "out": out})
                val_now = bool(config.val_every) and done % config.val_every == 0 and done < total
                ckpt_now = bool(config.checkpoint_every and done % config.checkpoint_every == 0) or done == total
                if logged or val_now or ckpt_now or len(pending) == interval:
                    read_back(sched)
                bar.update(1)
                if val_now and main:
                    row = {"step": done, "split": "val", **evaluate(model if stage != "sae" else module, val_x)}
                    log.write(row)
                    if tracker is not None:
                        tracker.log(row, done)
                if ckpt_now:
                    states = dist_.all_gather_object((torch.get_rng_state(), _device_rng(dev)))
                    if main:
                        log.flush()
                        rng_extra = {}
                        if world > 1:
                            rng_extra["rank_rng"] = [s[0] for s in states]
                            if dev.type == "cuda":
                                rng_extra["rank_device_rng"] = [s[1] for s in states]
                        ckpt.save_checkpoint(out_dir, done, model, opt, sched, keep=config.keep_checkpoints, extra={
                            "stage": stage, "dead_counter": dead_counter, "world_size": world, **rng_extra,
                            "outlier_rows": touched["train"],
                            "elapsed": elapsed_before + time.time() - t0})
            stage_start = stage_end
        for p in model.parameters():  # unfreeze what a sequential stage froze
            p.requires_grad_(True)
        final_model = model
        standardized_model = None
        if main:
            val = evaluate(final_model, val_x)
            log.write({"step": done, "split": "val", "final": True, **val})
            if tracker is not None:
                tracker.log({"split": "val", **val}, done)
            result_summary = {
                "kind": config.kind, "steps": done, "tokens_seen": done * config.batch_size,
                "train_seconds": elapsed_before + time.time() - t0, "val": val,
                "backend": sae.backend_name, "d": d, "features": config.features, "k": config.k,
                "parameters": sum(p.numel() for p in model.parameters()),
                "device": str(dev), "precision": config.precision, "processes": world,
            }
            if config.standardize:
                result_summary["standardize"] = {
                    "rows": prep_stats["rows"], "val_metrics_space": "standardized (z-scores)",
                    "note": "model/ takes raw activations (standardisation folded in); "
                            "model_standardized/ is the model as trained"}
                standardized_model = model
                final_model = fold_standardization_(copy.deepcopy(model).cpu(), prep_stats["mean"], prep_stats["std"]).to(dev)
            if outlier_threshold is not None:
                result_summary["outliers"] = {
                    "mode": config.outliers, "multiple_of_median_norm": config.outlier_multiple,
                    "median_norm": prep_stats["median_norm"], "threshold": outlier_threshold,
                    "train_rows_touched": touched["train"], "train_rows_seen": done * config.batch_size,
                    "val_rows_touched": touched["val"],
                    "counted_on": "rank 0's share of each batch" if world > 1 else "every row"}
            if save_final:
                final_model.save(out_dir / "model")
                if standardized_model is not None:
                    standardized_model.save(out_dir / "model_standardized")
            ckpt.atomic_write_json(out_dir / "summary.json", result_summary)
        result_summary = dist_.broadcast_object(result_summary)
        ok = True
    finally:
        loader.close()
        bar.close()
        log.close()
        if tracker is not None:
            tracker.finish(ok)
    return TrainResult(final_model, out_dir, result_summary, standardized_model)


def error_reduction(mse_base: float, mse_new: float) -> float:
    """``(mse_base - mse_new) / mse_base``."""
    return (mse_base - mse_new) / mse_base if mse_base else float("nan")


# --------------------------------------------------------------------------- SAELens convenience

export_saelens = ckpt.export_saelens
import_saelens = ckpt.import_saelens
