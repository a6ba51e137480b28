"""Standard SAE metrics, with SAELens's definitions (``sae_lens/evals.py``).

Over N tokens with inputs ``x`` and reconstructions ``x_hat`` (rows of ``[N, d]``):

- ``explained_variance = 1 - E||x - x_hat||^2 / (E||x||^2 - ||E x||^2)`` (the
  total variance summed over dimensions; every token weighs the same);
- ``cossim``: mean over tokens of ``<x, x_hat> / (||x|| ||x_hat||)`` (a zero
  vector counts as cosine 0);
- ``l2_ratio``: mean over tokens of ``||x_hat|| / ||x||``, with ``||x|| < 1e-4``
  replaced by 1;
- ``relative_reconstruction_bias = E||x_hat||^2 / E<x, x_hat>`` (Rajamanoharan
  et al. 2024, eq. 10);
- ``l0``: mean number of active latents per token;
- feature density: the fraction of tokens on which a latent is active (> 0);
  **dead** latents never fire in the N tokens, **dense** latents fire on more
  than 10% of them (``DENSE_THRESHOLD``); SAELens stores
  ``log10(density + 1e-10)`` as ``sparsity.safetensors`` (written by
  :func:`dualenc_fast.train.checkpoint.export_saelens` when given the density);
- from the splice test (:func:`dualenc_fast.eval.metrics.splice_test`), with CE the
  next-token cross-entropy and KL the per-token ``KL(p_clean || p)``:
  ``ce_loss_score = (CE_zero - CE_sae) / (CE_zero - CE_clean)`` and
  ``kl_div_score = (KL_zero - KL_sae) / KL_zero``, "zero" being the language
  model with the layer's output replaced by zeros (zero ablation):
  :func:`recovered_scores`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Mapping, Optional

import torch

Tensor = torch.Tensor

DENSE_THRESHOLD = 0.1
LOG_DENSITY_EPS = 1e-10
SPARSITY_FILENAME = "sparsity.safetensors"


class SAEMetrics:
    """Streaming accumulator of the metrics above: call :meth:`update` per batch,
    then :meth:`result` (scalars) and :attr:`feature_density`.

    Sums are kept in float64 on the CPU, so batches of any size and order give
    the same result as one pass over all tokens."""

    def __init__(self, num_features: Optional[int] = None):
        self.num_features = num_features
        self.n = 0
        self.sum_x: Optional[Tensor] = None
        self.sum_sq = 0.0
        self.sum_resid = 0.0
        self.sum_cos = 0.0
        self.sum_l2_ratio = 0.0
        self.sum_xhat_sq = 0.0
        self.sum_dot = 0.0
        self.sum_l0 = 0.0
        self.counts: Optional[Tensor] = None if num_features is None else torch.zeros(num_features, dtype=torch.int64)

    @torch.no_grad()
    def update(self, x: Tensor, recon: Tensor, code=None) -> "SAEMetrics":
        """Add a batch: ``x``, ``recon`` ``[B, d]``; ``code`` a :class:`~dualenc_fast.modules.SparseCode`,
        a ``(values, indices)`` pair or a dense ``[B, F]`` code (optional: without it no
        l0 / density)."""
        if x.shape != recon.shape or x.dim() != 2:
            raise ValueError(f"x and recon must both be [B, d], got {tuple(x.shape)} and {tuple(recon.shape)}")
        # reduce on the inputs' device in float64; only scalars, [d] and [F] vectors reach the host
        dev = x.device
        x64 = x.detach().to(torch.float64)
        r64 = recon.detach().to(dev, torch.float64)
        nx = x64.norm(dim=-1)
        nr = r64.norm(dim=-1)
        dot = (x64 * r64).sum(-1)
        parts = [nx.pow(2).sum(), (x64 - r64).pow(2).sum(), (dot / (nx * nr).clamp_min(1e-300)).sum(),
                 (nr / torch.where(nx.abs() < 1e-4, torch.ones_like(nx), nx)).sum(), nr.pow(2).sum(), dot.sum()]
        counts = None
        if code is not None:
            counts, active = self._count(code, x.shape[0], dev)
            parts.append(active.to(torch.float64))
        vals = torch.stack(parts).tolist()
        s = x64.sum(0).cpu()
        self.sum_x = s if self.sum_x is None else self.sum_x + s
        self.sum_sq += vals[0]
        self.sum_resid += vals[1]
        self.sum_cos += vals[2]
        self.sum_l2_ratio += vals[3]
        self.sum_xhat_sq += vals[4]
        self.sum_dot += vals[5]
        self.n += x.shape[0]
        if counts is not None:
            self.counts += counts.cpu()
            self.sum_l0 += vals[6]
        return self

    def _count(self, code, rows: int, dev):
        """(per-feature activation counts [F] int64, number of active entries) of one batch, on ``dev``."""
        if isinstance(code, torch.Tensor):
            if code.dim() != 2 or code.shape[0] != rows:
                raise ValueError(f"a dense code must be [{rows}, F], got {tuple(code.shape)}")
            active = code.detach().to(dev) > 0
            self._ensure_counts(code.shape[1])
            return active.sum(0).to(torch.int64), active.sum()
        if isinstance(code, (tuple, list)) and len(code) == 2:
            (values, indices), F = code, None
        elif isinstance(getattr(code, "values", None), torch.Tensor) and isinstance(getattr(code, "indices", None), torch.Tensor):
            values, indices, F = code.values, code.indices, getattr(code, "num_features", None)
        else:
            raise TypeError(f"code must be a SparseCode, a (values, indices) pair or a dense [B, F] tensor, "
                            f"got {type(code).__name__}")
        if values.shape[0] != rows:
            raise ValueError(f"code has {values.shape[0]} rows, x has {rows}")
        F = F or self.num_features
        if F is None:
            raise ValueError("pass num_features to SAEMetrics for a (values, indices) code")
        self._ensure_counts(F)
        active = values.detach().to(dev) > 0
        idx = indices.detach().to(dev)[active].to(torch.int64)
        if not getattr(code, "trusted", False) and idx.numel():
            lo, hi = torch.aminmax(idx)
            lo, hi = int(lo), int(hi)
            if lo < 0 or hi >= F:
                raise IndexError(f"code indices must lie in [0, {F}), got [{lo}, {hi}]")
        return torch.bincount(idx, minlength=F)[:F], active.sum()

    def _ensure_counts(self, F: int) -> None:
        if self.counts is None:
            self.num_features = F
            self.counts = torch.zeros(F, dtype=torch.int64)
        elif self.counts.numel() != F:
            raise ValueError(f"code has {F} features, earlier batches had {self.counts.numel()}")

    @property
    def feature_density(self) -> Optional[Tensor]:
        """Fraction of the tokens seen on which each latent fired, ``[F]`` float64 (None without codes)."""
        if self.counts is None or self.n == 0:
            return None
        return self.counts.double() / self.n

    def result(self) -> Dict[str, float]:
        if self.n == 0:
            raise ValueError("no tokens were added")
        n = self.n
        mean_sq = self.sum_sq / n
        total_var = mean_sq - float((self.sum_x / n).pow(2).sum())
        mse_tok = self.sum_resid / n
        if total_var < 1e-10:  # as SAELens: no variance to explain
            ev = 1.0 if mse_tok < 1e-10 else 0.0
        else:
            ev = 1.0 - mse_tok / total_var
        out = {
            "explained_variance": ev,
            "cossim": self.sum_cos / n,
            "l2_ratio": self.sum_l2_ratio / n,
            "relative_reconstruction_bias": self.sum_xhat_sq / self.sum_dot if self.sum_dot != 0 else float("nan"),
            "density_tokens": n,
        }
        dens = self.feature_density
        if dens is not None:
            out.update({
                "l0": self.sum_l0 / n,
                "dead_latents": int((self.counts == 0).sum()),
                "dense_latents": int((dens > DENSE_THRESHOLD).sum()),
                "latents": int(dens.numel()),
            })
        return out


@torch.no_grad()
def standard_metrics(model, x: Tensor, *, batch_size: int = 4096) -> tuple:
    """``(metrics dict, feature density [F])`` of a model with ``forward_sparse`` (the
    dualenc_fast modules) on the rows of ``x``, in eval mode."""
    was = getattr(model, "training", False)
    model.eval()
    acc = SAEMetrics()
    try:
        dev, dt = None, None
        for p in model.parameters():
            dev, dt = p.device, p.dtype
            break
        for i in range(0, x.shape[0], batch_size):
            xb = x[i:i + batch_size]
            if dev is not None:
                xb = xb.to(dev, dt)
            out = model.forward_sparse(xb)
            acc.update(xb, out.recon, out.code)
    finally:
        model.train(was)
    return acc.result(), acc.feature_density


def recovered_scores(*, ce_clean: float, ce_sae: float, ce_zero: float, kl_sae: float, kl_zero: float) -> dict:
    """SAELens's ``ce_loss_score`` and ``kl_div_score`` (see the module docstring); NaN where
    the denominator is 0."""
    den = ce_zero - ce_clean
    return {
        "ce_loss_score": (ce_zero - ce_sae) / den if den != 0 else float("nan"),
        "kl_div_score": (kl_zero - kl_sae) / kl_zero if kl_zero != 0 else float("nan"),
    }


def log_feature_density(density: Tensor) -> Tensor:
    """``log10(density + 1e-10)`` as float32: SAELens's ``log_feature_sparsity``."""
    return torch.log10(torch.as_tensor(density, dtype=torch.float64) + LOG_DENSITY_EPS).float()


def density_histogram(densities: Mapping[str, Tensor], path, *, title: str = "Feature density") -> Path:
    """A PNG histogram of ``log10(density + 1e-10)`` per model, with the dense threshold
    (10%) marked and the dead / dense counts in the legend."""
    from .plotting import pyplot, save_figure

    plt = pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    lo = math.log10(LOG_DENSITY_EPS)
    bins = torch.linspace(lo - 0.25, 0.25, 60).tolist()
    for name, dens in densities.items():
        dens = torch.as_tensor(dens, dtype=torch.float64)
        logd = log_feature_density(dens).clamp(lo, 0).numpy()
        dead = int((dens == 0).sum())
        dense = int((dens > DENSE_THRESHOLD).sum())
        ax.hist(logd, bins=bins, alpha=0.55, label=f"{name} (dead {dead}, dense {dense} of {dens.numel()})")
    ax.axvline(math.log10(DENSE_THRESHOLD), color="k", linestyle="--", linewidth=1, label="dense threshold (10%)")
    ax.set_xlabel("log10(feature density + 1e-10)   (dead latents sit at -10)")
    ax.set_ylabel("latents")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


__all__ = [
    "DENSE_THRESHOLD",
    "SAEMetrics",
    "SPARSITY_FILENAME",
    "density_histogram",
    "log_feature_density",
    "recovered_scores",
    "standard_metrics",
]
