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

Every run writes ``out/config.json``, ``out/metrics.jsonl`` (one line per step,
plus ``"split": "val"`` lines), ``out/checkpoints/`` (resumable, atomic),
``out/model/`` (final weights, :func:`dualenc_fast.train.checkpoint.load_model`) and
``out/summary.json``. ``resume=True`` continues from the newest checkpoint and
reproduces the uninterrupted run exactly.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Union

import torch

from . import checkpoint as ckpt
from .data import ActivationStore
from ..nn.modules import JointSAENFM, TopKSparseAutoencoder

KINDS = ("sae", "sae_bias", "sequential", "joint")
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
                       dropout=config.dropout, backend=config.backend, **sae_opts)


def lr_factor(step: int, total: int, lr: float, final_lr: float, decay_fraction: float = 0.8) -> float:
    """Multiplier of ``lr`` after ``step`` updates: linear to ``final_lr`` over the first
    ``decay_fraction`` of ``total`` steps, then flat."""
    horizon = max(1.0, decay_fraction * total)
    t = min(step / horizon, 1.0)
    return 1.0 - (1.0 - final_lr / lr) * t


def make_optimizer(params, config: TrainConfig, total_steps: int):
    opt = torch.optim.Adam(params, lr=config.lr, betas=tuple(config.betas))
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
    (mse of sae only, sae + linear, sae + interaction)."""
    was = model.training
    model.eval()
    n, d = x.shape
    mean = x.mean(0)
    sums = dict(se=0.0, var=0.0, l0=0.0, sae=0.0, lin=0.0, inter=0.0, se_sae=0.0, se_lin=0.0, se_int=0.0)
    fired = torch.zeros(sae_of(model).hidden_dim, dtype=torch.bool)
    for i in range(0, n, batch_size):
        xb = x[i:i + batch_size]
        out = model.forward_sparse(xb)
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
        """Keep only lines with ``step <= step`` (resume)."""
        if not self.path.exists():
            return
        keep = []
        with open(self.path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    if json.loads(line).get("step", 0) <= step:
                        keep.append(line if line.endswith("\n") else line + "\n")
                except json.JSONDecodeError:
                    break  # a torn last line
        ckpt.atomic_write_text(self.path, "".join(keep))

    def write(self, row: dict) -> None:
        if self.fh is None:
            self.fh = open(self.path, "a", encoding="utf-8")
        self.fh.write(json.dumps(row) + "\n")

    def flush(self) -> None:
        if self.fh is not None:
            self.fh.flush()

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None


def read_metrics(path) -> list:
    """The rows of a ``metrics.jsonl``."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


# --------------------------------------------------------------------------- training


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
) -> TrainResult:
    """Train ``config.kind`` on the activations in ``store``; write everything to ``out_dir``.

    ``resume``: continue from the newest checkpoint in ``out_dir`` (exactly).
    ``overwrite``: delete an existing run in ``out_dir`` first.
    ``stop_after``: stop once this many steps are done (testing interruptions).
    """
    from tqdm.auto import tqdm

    config.validate()
    if not isinstance(store, ActivationStore):
        store = ActivationStore(store)
    out_dir = Path(out_dir)
    cfg_path = out_dir / "config.json"
    existing = cfg_path.exists() or ckpt.checkpoint_dir(out_dir).exists()
    if existing and not resume:
        if not overwrite:
            raise ValueError(f"{out_dir} already holds a run: pass resume (--resume) to continue it, "
                             "overwrite (--overwrite) to replace it, or choose another output folder")
        for name in ("checkpoints", "model", "metrics.jsonl", "summary.json", "config.json"):
            p = out_dir / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    if resume and cfg_path.exists():
        saved = TrainConfig.from_dict(ckpt.read_json(cfg_path)["train"])
        if saved.to_dict() != config.to_dict():
            diff = sorted(k for k, v in config.to_dict().items() if saved.to_dict().get(k) != v)
            raise ValueError(f"cannot resume {out_dir}: its config differs in {diff}; "
                             "resume with the same settings or use another output folder")
    ckpt.atomic_write_json(cfg_path, {"format": "dualenc_fast.run", "train": config.to_dict(), "data": {
        "folder": str(store.folder), "model": store.manifest.get("model"), "layer": store.manifest.get("layer"),
        "count": store.count, "d": store.d}})

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
    latest = ckpt.latest_checkpoint(out_dir) if resume else None
    if latest is not None:
        info = ckpt.load_checkpoint(latest, model, restore_rng=False)
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
        torch.manual_seed(config.seed)
    if resume:
        log.truncate_after(done)
    val_x = store.tensor("val", config.val_fraction, max_rows=config.val_rows)

    loader = store.loader(config.batch_size, seed=config.seed, split="train", val_fraction=config.val_fraction,
                          start_batch=done, shuffle_shards=config.shuffle_shards)
    t0 = time.time()
    bar = tqdm(total=total, initial=done, desc=f"train {config.kind}", unit="step", disable=not progress)
    stage_start = 0
    result_summary = {}
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
                                     restore_rng=True)
                latest = None
            trains_sae = stage != "nfm"
            module.train()
            while done < stage_end:
                if stop_after is not None and done >= stop_after:
                    return TrainResult(model, out_dir, {"stopped_at": done})
                x = next(loader)
                out = module.forward_sparse(x)
                mse = (out.recon - x).pow(2).mean()
                loss = mse
                if sae.normalizes_input:
                    loss = mse * sae.input_scale.pow(2)
                aux = None
                with torch.no_grad():
                    active = out.code.indices[out.code.values > 0]
                    dead_counter += x.shape[0]
                    dead_counter[active] = 0
                    dead_mask = dead_counter >= config.dead_after_tokens
                if trains_sae and config.aux_k:
                    aux = sae.auxk_loss(x, (x - out.recon).detach(), dead_mask)
                    loss = loss + config.aux_coef * aux
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    raise TrainingDiverged(
                        f"{config.kind}: loss became {loss_value} at step {done + 1} (stage {stage}); "
                        f"lower the learning rate (now {sched.get_last_lr()[0]:.3g}), check the activations "
                        f"for NaN/Inf, or resume from the last checkpoint in {ckpt.checkpoint_dir(out_dir)}"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if trains_sae and sae.unit_norm_decoder:
                    sae.remove_parallel_decoder_grad()
                lr_now = sched.get_last_lr()[0]
                opt.step()
                sched.step()
                if trains_sae and sae.unit_norm_decoder:
                    sae.normalize_decoder()
                done += 1
                if config.log_every and (done % config.log_every == 0 or done == total):
                    with torch.no_grad():
                        var = (x - x.mean(0)).pow(2).sum()
                        row = {
                            "step": done, "stage": stage, "loss": loss_value, "mse": float(mse.detach()),
                            "fvu": float((out.recon - x).pow(2).sum() / var) if var > 0 else float("nan"),
                            "l0": float(out.code.l0()), "dead": int(dead_mask.sum()), "lr": lr_now,
                            **component_stats(out),
                        }
                        if aux is not None:
                            row["aux_loss"] = float(aux.detach())
                    log.write(row)
                bar.update(1)
                if progress:
                    bar.set_postfix(loss=f"{loss_value:.4g}", refresh=False)
                if config.val_every and done % config.val_every == 0 and done < total:
                    log.write({"step": done, "split": "val", **evaluate(model if stage != "sae" else module, val_x)})
                if (config.checkpoint_every and done % config.checkpoint_every == 0) or done == total:
                    log.flush()
                    ckpt.save_checkpoint(out_dir, done, model, opt, sched, keep=config.keep_checkpoints, extra={
                        "stage": stage, "dead_counter": dead_counter,
                        "elapsed": elapsed_before + time.time() - t0})
            stage_start = stage_end
        for p in model.parameters():  # unfreeze what a sequential stage froze
            p.requires_grad_(True)
        final_model = model
        val = evaluate(final_model, val_x)
        log.write({"step": done, "split": "val", "final": True, **val})
        result_summary = {
            "kind": config.kind, "steps": done, "tokens_seen": done * config.batch_size,
            "train_seconds": elapsed_before + time.time() - t0, "val": val,
            "backend": sae.backend_name, "d": d, "features": config.features, "k": config.k,
        }
        if save_final:
            final_model.save(out_dir / "model")
        ckpt.atomic_write_json(out_dir / "summary.json", result_summary)
    finally:
        bar.close()
        log.close()
    return TrainResult(model, out_dir, result_summary)


def error_reduction(mse_base: float, mse_new: float) -> float:
    """``(mse_base - mse_new) / mse_base``."""
    return (mse_base - mse_new) / mse_base if mse_base else float("nan")


# --------------------------------------------------------------------------- SAELens convenience

export_saelens = ckpt.export_saelens
import_saelens = ckpt.import_saelens
