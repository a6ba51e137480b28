"""Evaluation of SAE / sequential / joint models (SPEC, "The paper's measurements").

* :func:`reconstruction_metrics` - held-out MSE, FVU, error reduction against a
  baseline MSE, component magnitudes and shares.
* :func:`component_ablation` - reconstruction with SAE only, SAE + linear,
  SAE + interaction, all three.
* :func:`splice_test` - the KL / CE pathology test (Gurnee 2024): splice each
  model's reconstruction into the language model at the collected layer,
  compute per-token ``KL(p_clean || p_spliced)`` and next-token cross-entropy,
  and compare with the eps-random baseline (``x + eps``, ``eps`` a random
  direction with the norm of that token's reconstruction error, ``n_eps``
  samples); report ``KL_recon / KL_eps`` and the CE increase with bootstrap
  confidence intervals over windows.

Every function takes modules built from :mod:`dualenc_fast.reference.modules`
or the fused :mod:`dualenc_fast.nn.modules` (same forward outputs); anything else
that maps ``[B, d] -> [B, d]`` (or returns a tuple whose reconstruction is at
the documented position) also works, see :func:`reconstruct`.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterable, Iterator, Mapping, Optional, Union

import numpy as np
import torch
from torch import nn

from ..lm import LayerSplice as _LayerSplice  # noqa: F401
from ..nn.running import Activations, eval_mode, iter_batches, model_device_dtype  # noqa: F401

Tensor = torch.Tensor

ABLATIONS = ("sae", "sae+linear", "sae+interaction", "all")


# ----------------------------------------------------------------------------
# running a model
# ----------------------------------------------------------------------------

def is_joint(model) -> bool:
    """True for models with a primary SAE and an NFM (joint or sequential)."""
    return hasattr(model, "primary_sae") and hasattr(model, "nfm")


def components(model, x: Tensor) -> Dict[str, Tensor]:
    """The parts of a model's reconstruction of ``x [B, d]``.

    Joint/sequential models (``primary_sae`` + ``nfm``): ``sae``, ``linear``,
    ``interaction`` and ``recon`` (their sum, the model's first output).
    Fused modules are run through ``forward_sparse`` (no dense ``[B, F]`` code).
    Anything else: ``recon`` (and ``sae`` = ``recon``) from :func:`reconstruct`.
    Call inside :func:`eval_mode`.
    """
    fs = getattr(model, "forward_sparse", None)
    if callable(fs):  # fused modules: never builds the dense [B, F] code
        out = fs(x)
        if out.linear_out is not None:
            return {"recon": out.recon, "sae": out.sae_recon, "linear": out.linear_out,
                    "interaction": out.interaction_out}
        return {"recon": out.recon, "sae": out.recon}
    if is_joint(model):
        out = model(x)
        return {"recon": out[0], "sae": out[2], "linear": out[3], "interaction": out[4]}
    r = reconstruct(model, x)
    return {"recon": r, "sae": r}


def reconstruct(model, x: Tensor) -> Tensor:
    """A model's reconstruction of ``x``.

    Joint models return ``recon`` first; SAEs return ``(code, recon)``; plain
    callables may return the reconstruction tensor itself.
    """
    fs = getattr(model, "forward_sparse", None)
    if callable(fs):
        return fs(x).recon
    out = model(x)
    if isinstance(out, torch.Tensor):
        return out
    if is_joint(model):
        return out[0]
    if isinstance(out, (tuple, list)):
        return out[1] if len(out) == 2 else out[0]
    raise TypeError(f"cannot find the reconstruction in the output of {type(model).__name__}")


# ----------------------------------------------------------------------------
# reconstruction metrics and ablations
# ----------------------------------------------------------------------------

class _Moments:
    """Streaming sums for MSE and FVU over rows of width d."""

    def __init__(self):
        self.n = 0
        self.d = 0
        self.sum_x = None
        self.sum_x2 = 0.0
        self.sse: Dict[str, float] = {}
        self.abs: Dict[str, float] = {}

    def add_x(self, x: Tensor):
        x64 = x.to(torch.float64)
        self.n += x.shape[0]
        self.d = x.shape[1]
        s = x64.sum(0)
        self.sum_x = s if self.sum_x is None else self.sum_x + s
        self.sum_x2 += float((x64 * x64).sum())

    def add_err(self, name: str, x: Tensor, r: Tensor):
        e = (x.to(torch.float64) - r.to(torch.float64))
        self.sse[name] = self.sse.get(name, 0.0) + float((e * e).sum())

    def add_abs(self, name: str, t: Tensor):
        self.abs[name] = self.abs.get(name, 0.0) + float(t.to(torch.float64).abs().sum())

    @property
    def total_ss(self) -> float:
        """``sum ||x - mean(x)||^2`` over the rows."""
        return self.sum_x2 - float((self.sum_x * self.sum_x).sum()) / self.n

    def mse(self, name: str) -> float:
        return self.sse[name] / (self.n * self.d)

    def fvu(self, name: str) -> float:
        tss = self.total_ss
        return self.sse[name] / tss if tss > 0 else float("nan")


def _prep(x: Tensor, device, dtype) -> Tensor:
    return x.to(device=device, dtype=dtype, non_blocking=True)


def reconstruction_metrics(
    model, activations: Activations, *, baseline_mse: Optional[float] = None,
    batch_size: int = 1024, max_rows: Optional[int] = None,
) -> Dict[str, Any]:
    """Held-out reconstruction metrics of one model.

    ``mse`` (mean over all elements, as ``nn.MSELoss``), ``fvu`` (SSE over the
    total sum of squares about the data mean), ``error_reduction`` =
    ``(baseline_mse - mse) / baseline_mse`` when ``baseline_mse`` is given, and
    for joint models ``mse_sae_only``, the mean ``|sae|``, ``|linear|``,
    ``|interaction|`` outputs and the shares of linear and interaction in
    ``mean|linear| + mean|interaction|`` (the paper's component magnitudes).
    """
    device, dtype = model_device_dtype(model)
    m = _Moments()
    with eval_mode(model):
        for x in iter_batches(activations, batch_size, max_rows):
            xd = _prep(x, device, dtype)
            parts = components(model, xd)
            m.add_x(xd)
            m.add_err("recon", xd, parts["recon"])
            if "linear" in parts:
                m.add_err("sae", xd, parts["sae"])
                for k in ("sae", "linear", "interaction"):
                    m.add_abs(k, parts[k])
    if m.n == 0:
        raise ValueError("no activations to evaluate")
    out: Dict[str, Any] = {"n_rows": m.n, "d": m.d, "mse": m.mse("recon"), "fvu": m.fvu("recon")}
    if baseline_mse is not None:
        out["baseline_mse"] = float(baseline_mse)
        out["error_reduction"] = (float(baseline_mse) - out["mse"]) / float(baseline_mse)
    if "sae" in m.sse:
        out["mse_sae_only"] = m.mse("sae")
        denom = m.n * m.d
        mags = {k: m.abs[k] / denom for k in ("sae", "linear", "interaction")}
        out["mean_abs"] = mags
        nfm = mags["linear"] + mags["interaction"]
        out["nfm_shares"] = {"linear": mags["linear"] / nfm if nfm > 0 else float("nan"),
                             "interaction": mags["interaction"] / nfm if nfm > 0 else float("nan")}
    return out


def component_ablation(
    model, activations: Activations, *, batch_size: int = 1024, max_rows: Optional[int] = None,
    baseline_mse: Optional[float] = None,
) -> Dict[str, Dict[str, float]]:
    """MSE / FVU of the reconstruction with SAE only, + linear, + interaction, all three.

    For a model without an NFM only ``"sae"`` (= ``"all"``) is reported. With
    ``baseline_mse`` each entry also gets ``error_reduction`` against it; each
    entry always has ``reduction_vs_sae``, its error reduction against the
    model's own SAE-only reconstruction.
    """
    device, dtype = model_device_dtype(model)
    m = _Moments()
    joint = is_joint(model)
    with eval_mode(model):
        for x in iter_batches(activations, batch_size, max_rows):
            xd = _prep(x, device, dtype)
            parts = components(model, xd)
            m.add_x(xd)
            if joint:
                sae, lin, inter = parts["sae"], parts["linear"], parts["interaction"]
                m.add_err("sae", xd, sae)
                m.add_err("sae+linear", xd, sae + lin)
                m.add_err("sae+interaction", xd, sae + inter)
                m.add_err("all", xd, parts["recon"])
            else:
                m.add_err("sae", xd, parts["recon"])
    names = ABLATIONS if joint else ("sae",)
    out: Dict[str, Dict[str, float]] = {}
    ref = m.mse("sae")
    for name in names:
        row = {"mse": m.mse(name), "fvu": m.fvu(name),
               "reduction_vs_sae": (ref - m.mse(name)) / ref if ref > 0 else float("nan")}
        if baseline_mse is not None:
            row["error_reduction"] = (baseline_mse - row["mse"]) / baseline_mse
        out[name] = row
    return out


def evaluate_models(
    models: Mapping[str, Any], activations: Tensor, *, baseline: Optional[str] = None,
    batch_size: int = 1024, max_rows: Optional[int] = None,
) -> Dict[str, Any]:
    """Reconstruction metrics and ablations of several models on the same rows.

    ``baseline`` names the model whose MSE the error reductions are measured
    against (default: the first model without an NFM, if any).
    ``activations`` should be a tensor (it is read once per model).
    """
    if baseline is None:
        baseline = next((n for n, mdl in models.items() if not is_joint(mdl)), None)
    base_mse = None
    recon: Dict[str, Any] = {}
    if baseline is not None:
        if baseline not in models:
            raise ValueError(f"baseline {baseline!r} is not one of {list(models)}")
        recon[baseline] = reconstruction_metrics(models[baseline], activations, batch_size=batch_size,
                                                 max_rows=max_rows)
        base_mse = recon[baseline]["mse"]
    for name, mdl in models.items():
        recon[name] = reconstruction_metrics(mdl, activations, baseline_mse=base_mse,
                                             batch_size=batch_size, max_rows=max_rows)
    ablation = {name: component_ablation(mdl, activations, batch_size=batch_size, max_rows=max_rows,
                                         baseline_mse=base_mse)
                for name, mdl in models.items() if is_joint(mdl)}
    return {"baseline": baseline, "reconstruction": recon, "ablation": ablation}


# ----------------------------------------------------------------------------
# the KL / CE splice test
# ----------------------------------------------------------------------------

def eps_baseline(x: Tensor, recon: Tensor, *, generator: Optional[torch.Generator] = None) -> Tensor:
    """``x + eps`` with ``eps`` a uniformly random direction of norm ``||x - recon||`` per row.

    Works on any leading shape (the last dim is the feature dim). The random
    draw uses ``generator`` (a CPU generator) when given.
    """
    err_norm = (x.to(torch.float32) - recon.to(torch.float32)).norm(dim=-1, keepdim=True)
    direction = torch.randn(x.shape, generator=generator, dtype=torch.float32)
    direction = direction.to(x.device)
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (x.to(torch.float32) + direction * err_norm).to(x.dtype)


def _lm_logits(lm, ids: Tensor) -> Tensor:
    out = lm(input_ids=ids, use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits.float()


def _kl_ce(logp_clean: Tensor, logits: Tensor, ids: Tensor):
    """Per-token ``KL(clean || this)`` [b, T] and next-token CE [b, T-1]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    kl = (logp_clean.exp() * (logp_clean - logp)).sum(-1).clamp_min(0.0)
    ce = -logp[:, :-1].gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return kl, ce


def _bootstrap_ratio(num: np.ndarray, den: np.ndarray, n_boot: int, rng, level: float = 0.95):
    """Percentile CI of ``sum(num[idx]) / sum(den[idx])`` over resampled windows."""
    n = num.shape[0]
    if n < 2 or n_boot <= 0:
        return [float("nan"), float("nan")]
    idx = rng.integers(0, n, size=(n_boot, n))
    ratios = num[idx].sum(1) / np.maximum(den[idx].sum(1), 1e-300)
    a = (1 - level) / 2
    return [float(np.quantile(ratios, a)), float(np.quantile(ratios, 1 - a))]


def splice_test(
    lm, layer: int, token_windows, models: Mapping[str, Any], *, n_eps: int = 4,
    batch_size: int = 4, seed: int = 0, skip_first: int = 0, n_boot: int = 1000,
    scale: float = 1.0, device=None,
) -> Dict[str, Any]:
    """The KL / CE splice test of each model against its eps-random baseline.

    ``lm``: a causal LM (transformers); ``layer``: index into
    :func:`dualenc_fast.lm.decoder_layers` - the output of that block (the
    residual stream after it) is replaced; ``token_windows``: ``[N, T]`` token
    ids (full windows, no padding); ``models``: name -> model. ``scale``: the
    models see ``h * scale`` and their reconstructions are divided by it
    (for activations stored normalised). The first ``skip_first`` positions of
    every window are left unspliced and excluded from all statistics (e.g. a
    BOS position).

    Per model: ``kl_recon`` and ``kl_eps`` (mean per-token KL), ``kl_ratio`` =
    ``kl_recon / kl_eps`` with a bootstrap CI over windows, ``kl_excess`` =
    ``kl_recon - kl_eps``, ``ce_clean``, ``ce_recon``, ``ce_eps``,
    ``ce_increase`` (recon minus clean) with CI, ``ce_eps_increase``,
    ``mse_splice`` (per-element error of the spliced activations), and SAELens's
    ``ce_loss_score`` / ``kl_div_score`` against the zero ablation (the layer's
    output replaced by zeros; top-level ``ce_zero``, ``kl_zero``), see
    :func:`dualenc_fast.sae_metrics.recovered_scores`.
    """
    from ..lm import decoder_layers
    from .sae_metrics import recovered_scores

    ids_all = torch.as_tensor(token_windows, dtype=torch.long)
    if ids_all.dim() != 2 or ids_all.shape[1] < 2:
        raise ValueError("token_windows must be [N, T] with T >= 2")
    if device is None:
        device = next(lm.parameters()).device
    layers = decoder_layers(lm)
    if not -len(layers) <= layer < len(layers):
        raise ValueError(f"layer {layer} out of range for {len(layers)} decoder layers")
    gen = torch.Generator().manual_seed(seed)
    splice = _LayerSplice(layers[layer])
    names = list(models)
    N, T = ids_all.shape
    # per window sums
    acc = {name: {k: np.zeros(N) for k in ("kl_recon", "kl_eps", "ce_recon", "ce_eps", "sse")} for name in names}
    d = 1
    ce_clean_w = np.zeros(N)
    zero_w = {"kl": np.zeros(N), "ce": np.zeros(N)}  # zero ablation, once per window
    n_kl = T - skip_first
    n_ce = T - 1 - skip_first
    if n_kl <= 0 or n_ce <= 0:
        raise ValueError("skip_first leaves no positions to score")
    was_training = lm.training
    lm.eval()
    try:
        with torch.no_grad():
            for s in range(0, N, batch_size):
                ids = ids_all[s:s + batch_size].to(device)
                b = ids.shape[0]
                splice.replace = None
                logits_clean = _lm_logits(lm, ids)
                h = splice.captured
                d = h.shape[-1]
                logp_clean = torch.log_softmax(logits_clean, dim=-1)
                ce_c = -logp_clean[:, :-1].gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
                ce_clean_w[s:s + b] = ce_c[:, skip_first:].double().sum(1).cpu().numpy()
                zero = torch.zeros_like(h)
                if skip_first:
                    zero = torch.cat([h[:, :skip_first], zero[:, skip_first:]], dim=1)
                splice.replace = lambda _h, r=zero: r
                kl, ce = _kl_ce(logp_clean, _lm_logits(lm, ids), ids)
                zero_w["kl"][s:s + b] = kl[:, skip_first:].double().sum(1).cpu().numpy()
                zero_w["ce"][s:s + b] = ce[:, skip_first:].double().sum(1).cpu().numpy()
                splice.replace = None
                for name in names:
                    mdl = models[name]
                    mdev, mdt = model_device_dtype(mdl)
                    with eval_mode(mdl):
                        flat = h.reshape(-1, h.shape[-1]).to(mdev, mdt) * scale
                        rec = reconstruct(mdl, flat) / scale
                    rec = rec.reshape(h.shape).to(h.device, h.dtype)
                    if skip_first:
                        rec = torch.cat([h[:, :skip_first], rec[:, skip_first:]], dim=1)
                    err = (h.float() - rec.float())[:, skip_first:]
                    acc[name]["sse"][s:s + b] = err.double().pow(2).sum((1, 2)).cpu().numpy()
                    splice.replace = lambda _h, r=rec: r
                    kl, ce = _kl_ce(logp_clean, _lm_logits(lm, ids), ids)
                    acc[name]["kl_recon"][s:s + b] = kl[:, skip_first:].double().sum(1).cpu().numpy()
                    acc[name]["ce_recon"][s:s + b] = ce[:, skip_first:].double().sum(1).cpu().numpy()
                    kl_e = torch.zeros(b, dtype=torch.float64)
                    ce_e = torch.zeros(b, dtype=torch.float64)
                    for _ in range(n_eps):
                        pert = eps_baseline(h, rec, generator=gen)
                        if skip_first:
                            pert = torch.cat([h[:, :skip_first], pert[:, skip_first:]], dim=1)
                        splice.replace = lambda _h, r=pert: r
                        kl, ce = _kl_ce(logp_clean, _lm_logits(lm, ids), ids)
                        kl_e += kl[:, skip_first:].double().sum(1).cpu()
                        ce_e += ce[:, skip_first:].double().sum(1).cpu()
                    acc[name]["kl_eps"][s:s + b] = (kl_e / max(n_eps, 1)).numpy()
                    acc[name]["ce_eps"][s:s + b] = (ce_e / max(n_eps, 1)).numpy()
                    splice.replace = None
    finally:
        splice.remove()
        lm.train(was_training)

    rng = np.random.default_rng(seed)
    out: Dict[str, Any] = {
        "layer": int(layer), "n_windows": int(N), "window_len": int(T), "n_eps": int(n_eps),
        "skip_first": int(skip_first), "n_kl_tokens": int(N * n_kl), "n_ce_tokens": int(N * n_ce),
        "ce_clean": float(ce_clean_w.sum() / (N * n_ce)),
        "ce_zero": float(zero_w["ce"].sum() / (N * n_ce)), "kl_zero": float(zero_w["kl"].sum() / (N * n_kl)),
        "models": {},
    }
    for name in names:
        a = acc[name]
        kl_r = a["kl_recon"].sum() / (N * n_kl)
        kl_e = a["kl_eps"].sum() / (N * n_kl) if n_eps > 0 else float("nan")
        ce_r = a["ce_recon"].sum() / (N * n_ce)
        ce_e = a["ce_eps"].sum() / (N * n_ce) if n_eps > 0 else float("nan")
        diff = a["ce_recon"] - ce_clean_w  # per-window summed CE increase
        res = {
            "kl_recon": float(kl_r), "kl_eps": float(kl_e),
            "kl_ratio": float(kl_r / kl_e) if n_eps > 0 and kl_e > 0 else float("nan"),
            "kl_ratio_ci": _bootstrap_ratio(a["kl_recon"], a["kl_eps"], n_boot, rng) if n_eps > 0 else [float("nan")] * 2,
            "kl_excess": float(kl_r - kl_e),
            "ce_recon": float(ce_r), "ce_eps": float(ce_e),
            "ce_increase": float(ce_r - out["ce_clean"]),
            "ce_increase_ci": _bootstrap_ratio(diff, np.full(N, float(n_ce)), n_boot, rng),
            "ce_eps_increase": float(ce_e - out["ce_clean"]),
            "kl_recon_ci": _bootstrap_ratio(a["kl_recon"], np.full(N, float(n_kl)), n_boot, rng),
            "mse_splice": float(a["sse"].sum() / (N * n_kl * d)),
            **recovered_scores(ce_clean=out["ce_clean"], ce_sae=float(ce_r), ce_zero=out["ce_zero"],
                               kl_sae=float(kl_r), kl_zero=out["kl_zero"]),
        }
        out["models"][name] = res
    return out


def token_windows_from_text(tokenizer, text: str, window_len: int, n_windows: Optional[int] = None,
                            bos: bool = False) -> Tensor:
    """Tokenise ``text`` and cut it into ``[N, window_len]`` non-overlapping windows.

    With ``bos`` each window starts with the tokenizer's BOS token followed by
    ``window_len - 1`` text tokens.
    """
    ids = tokenizer.encode(text, add_special_tokens=False) if hasattr(tokenizer, "encode") else tokenizer(text)
    ids = list(ids)
    step = window_len - (1 if bos else 0)
    windows = []
    for s in range(0, len(ids) - step + 1, step):
        w = ids[s:s + step]
        if bos:
            w = [tokenizer.bos_token_id] + w
        windows.append(w)
        if n_windows is not None and len(windows) >= n_windows:
            break
    if not windows:
        raise ValueError(f"text too short for one window of {window_len} tokens")
    return torch.tensor(windows, dtype=torch.long)


def windows_from_store(store, n_windows: int = 64, val_fraction: float = 0.1):
    """Token windows for the splice test, rebuilt from an activation store's
    validation rows (each shard stores its rows' token ids and window positions).

    Returns ``(windows [N, T], skip_first)``. When the store dropped the first
    ``s`` positions of each window (``skip_first`` in its manifest), those
    tokens are unknown: the windows are then the stored ``window - s`` tokens
    and ``skip_first = s`` (their first positions act as the attention sink the
    models never saw, so they are neither spliced nor scored).
    """
    from ..storage import load_tensors

    window = int(store.manifest.get("window") or 0)
    skip = int(store.manifest.get("skip_first") or 0)
    T = window - skip
    if T < 2:
        raise ValueError("the activation store has no usable window length; pass token windows explicitly")
    expect = torch.arange(skip, window)
    out = []
    for shard in store.shards:
        t = load_tensors(store.folder / shard["file"])
        if "tokens" not in t or "positions" not in t:
            raise ValueError(f"{shard['file']} stores no token ids; pass token windows explicitly")
        toks, pos = t["tokens"].long(), t["positions"].long()
        n = toks.numel()
        lo = n - int(round(n * val_fraction))
        starts = (pos[lo:] == skip).nonzero().squeeze(1) + lo
        for s in starts.tolist():
            if s + T <= n and torch.equal(pos[s:s + T], expect):
                out.append(toks[s:s + T])
                if len(out) >= n_windows:
                    return torch.stack(out), skip
    if not out:
        raise ValueError("no complete token window in the store's validation split; pass token windows explicitly")
    return torch.stack(out), skip
