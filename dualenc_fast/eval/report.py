"""Markdown + PNG report of the analysis and evaluation (matplotlib, Agg backend).

Entry point: :func:`write_report`. It runs whatever the inputs allow:

* weight analysis (always): norm bimodality, contribution norms, group
  comparisons, correlations, Gram statistics, PCA - :mod:`dualenc_fast.analysis.weights`;
* reconstruction metrics and component ablations (with ``activations_val``) -
  :mod:`dualenc_fast.eval.metrics`;
* the KL / CE splice test (with ``lm``, ``layer`` and ``token_windows``);
* the integration-feature study (with ``integration=True``, a tokenizer and an
  LM) - :mod:`dualenc_fast.analysis.integration`;

and writes ``report.md``, ``results.json`` and the plots into ``out_dir``.
:func:`demo_hook` is what ``dualenc demo`` calls after training.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import numpy as np
import torch

from ..analysis import weights as A
from . import metrics as E
from .plotting import pyplot, save_figure


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    return obj


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if not math.isfinite(f):
        return "nan"
    if f != 0 and (abs(f) < 1e-3 or abs(f) >= 1e5):
        return f"{f:.{digits - 1}e}"
    return f"{f:.{digits}g}"


def _table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# plots
# ----------------------------------------------------------------------------

def plot_norm_histograms(bims: Mapping[str, A.BimodalityResult], path: Path, threshold: float) -> Path:
    """Squared-norm histogram with the fitted 1- and 2-component mixtures, one panel per model."""
    plt = pyplot()
    n = len(bims)
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 3.8), squeeze=False)
    for ax, (name, b) in zip(axes[0], bims.items()):
        sq = b.squared_norms
        ax.hist(sq, bins=min(120, max(20, sq.size // 50)), density=True, color="#9ab", alpha=0.8, label="features")
        xs = np.linspace(float(sq.min()), float(sq.max()), 400)
        comp = b.gmm2.component_pdfs(xs)
        ax.plot(xs, comp.sum(0), "k-", lw=1.5, label="2-component fit")
        for c in comp:
            ax.plot(xs, c, "--", lw=1)
        ax.plot(xs, b.gmm1.pdf(xs), ":", color="grey", lw=1.2, label="1-component fit")
        ax.axvline(threshold, color="r", lw=1, ls="-.", label=f"{threshold:g}")
        ax.axvline(b.split, color="m", lw=1, ls=":", label=f"split {b.split:.3f}")
        ax.set_title(f"{name}: {'bimodal' if b.bimodal else 'not bimodal'}\n"
                     f"dBIC={b.delta_bic:.0f}, dip p={b.dip.p_value:.3g}", fontsize=9)
        ax.set_xlabel("||W_dec[:, i]||^2")
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_norm_vs_ratio(arrays: Mapping[str, Dict[str, np.ndarray]], path: Path, threshold: float,
                       max_points: int = 20000) -> Optional[Path]:
    """Scatter of squared norm vs each component's share, for models with an NFM."""
    models = {k: v for k, v in arrays.items() if "linear_ratio" in v}
    if not models:
        return None
    plt = pyplot()
    keys = ["decoder_ratio", "linear_ratio", "embedding_ratio"]
    fig, axes = plt.subplots(len(models), 3, figsize=(13, 3.6 * len(models)), squeeze=False)
    rng = np.random.default_rng(0)
    for row, (name, arr) in zip(axes, models.items()):
        sq = arr["squared_norm"]
        sel = rng.choice(sq.size, max_points, replace=False) if sq.size > max_points else slice(None)
        for ax, key in zip(row, keys):
            ax.scatter(sq[sel], arr[key][sel], s=2, alpha=0.3)
            ax.axvline(threshold, color="r", lw=1, ls="-.")
            ax.set_xlabel("squared decoder norm")
            ax.set_ylabel(key.replace("_", " "))
            ax.set_title(name, fontsize=9)
    return save_figure(fig, path)


def plot_group_violins(arrays: Mapping[str, Dict[str, np.ndarray]], path: Path, threshold: float) -> Optional[Path]:
    """Violins of each per-feature ratio for the low (< threshold) and high groups."""
    models = {k: v for k, v in arrays.items() if "linear_ratio" in v}
    if not models:
        return None
    plt = pyplot()
    keys = ["decoder_ratio", "linear_ratio", "embedding_ratio"]
    fig, axes = plt.subplots(len(models), 3, figsize=(12, 3.4 * len(models)), squeeze=False)
    for row, (name, arr) in zip(axes, models.items()):
        low = arr["squared_norm"] < threshold
        for ax, key in zip(row, keys):
            data, labels = [], []
            for lab, m in (("low", low), ("high", ~low)):
                if m.sum() >= 2:
                    data.append(arr[key][m])
                    labels.append(f"{lab}\n(n={int(m.sum())})")
            if data:
                ax.violinplot(data, showmedians=True)
                ax.set_xticks(range(1, len(data) + 1))
                ax.set_xticklabels(labels, fontsize=8)
            ax.set_title(f"{name}: {key.replace('_', ' ')}", fontsize=9)
    return save_figure(fig, path)


def plot_ablation(ev: Dict[str, Any], path: Path) -> Optional[Path]:
    """Ablation bars per joint model: held-out MSE (y-axis zoomed to the data, baseline
    MSE as a dashed line) and error reduction in % against the baseline (or against
    the model's own SAE part when there is no baseline)."""
    abl = ev.get("ablation") or {}
    if not abl:
        return None
    plt = pyplot()
    names = list(abl)
    base = ev.get("baseline")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(4 + 4.4 * len(names), 3.8))
    width = 0.8 / len(E.ABLATIONS)
    red_key = "error_reduction" if base is not None else "reduction_vs_sae"
    all_mse = []
    for i, a in enumerate(E.ABLATIONS):
        xs = np.arange(len(names)) + (i - 1.5) * width
        mse = [abl[n].get(a, {}).get("mse", float("nan")) for n in names]
        red = [100 * abl[n].get(a, {}).get(red_key, float("nan")) for n in names]
        all_mse += mse
        a1.bar(xs, mse, width, label=a)
        a2.bar(xs, red, width, label=a)
    if base is not None:
        bm = ev["reconstruction"][base]["mse"]
        all_mse.append(bm)
        a1.axhline(bm, color="k", ls="--", lw=1, label=f"{base} (baseline)")
    finite = [m for m in all_mse if np.isfinite(m)]
    if finite:
        lo, hi = min(finite), max(finite)
        pad = max(hi - lo, 1e-12 * max(abs(hi), 1.0)) * 0.3
        a1.set_ylim(max(0.0, lo - pad), hi + pad)
    a1.set_ylabel("held-out MSE (axis zoomed)")
    a2.axhline(0, color="k", lw=0.8)
    a2.set_ylabel(f"error reduction vs {base} (%)" if base is not None else "error reduction vs own SAE part (%)")
    for ax in (a1, a2):
        ax.set_xticks(np.arange(len(names)))
        ax.set_xticklabels(names)
    a1.legend(fontsize=7)
    return save_figure(fig, path)


def plot_kl(splice: Dict[str, Any], path: Path) -> Path:
    """Bars of KL_recon / KL_eps and of the CE increase, with 95% bootstrap CIs."""
    plt = pyplot()
    names = list(splice["models"])
    res = [splice["models"][n] for n in names]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(4 + 2 * len(names), 3.8))
    for ax, key, ci, label in ((a1, "kl_ratio", "kl_ratio_ci", "KL(recon) / KL(eps-random)"),
                               (a2, "ce_increase", "ce_increase_ci", "CE increase (nats/token)")):
        ys = np.array([r[key] for r in res], dtype=float)
        lo = np.array([r[ci][0] for r in res], dtype=float)
        hi = np.array([r[ci][1] for r in res], dtype=float)
        err = np.vstack([np.clip(ys - lo, 0, None), np.clip(hi - ys, 0, None)])
        err = np.nan_to_num(err)
        ax.bar(names, np.nan_to_num(ys), yerr=err, capsize=4, color="#7a9")
        if key == "kl_ratio":
            ax.axhline(1.0, color="k", ls="--", lw=1)
        ax.set_ylabel(label)
        ax.tick_params(axis="x", labelsize=8)
    return save_figure(fig, path)


# ----------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------

def write_report(
    out_dir, models: Mapping[str, Any], activations_val: Optional[torch.Tensor] = None, lm=None,
    tokenizer=None, layer: Optional[int] = None, token_windows=None, *, baseline: Optional[str] = None,
    threshold: float = A.DEFAULT_THRESHOLD, n_eps: int = 4, scale: float = 1.0, skip_first: int = 0,
    splice_batch_size: int = 4, integration: bool = False, integration_kwargs: Optional[dict] = None,
    gram_max_features: Optional[int] = 8192, n_sim: int = 500, max_rows: Optional[int] = None,
    seed: int = 0, title: str = "dualenc_fast report", metadata: Optional[dict] = None,
    analysis: bool = True, verbose: bool = False,
) -> Path:
    """Run the analyses the inputs allow and write ``out_dir/report.md`` (returned).

    ``models``: name -> module (reference or fused: SAE, sequential, joint...).
    ``activations_val``: held-out ``[N, d]`` activations (tensor) for the
    reconstruction metrics and ablations; ``baseline`` names the model the error
    reductions are measured against (default: the first model without an NFM).
    ``lm``/``layer``/``token_windows`` (``[N, T]`` ids): the KL/CE splice test,
    ``layer`` indexing :func:`dualenc_fast.lm.decoder_layers` (the block's
    output is spliced), ``scale`` the activation scale the models expect.
    ``integration=True`` (needs ``lm``, ``tokenizer``, ``layer``,
    ``activations_val``) runs :func:`dualenc_fast.analysis.integration.integration_study`
    on every joint model (``integration_kwargs`` are passed on).
    ``gram_max_features``: subsample features for the Gram statistics above
    this count (None: all, exact; costs ``F^2 d`` flops). ``analysis=False``
    skips the weight analysis; ``verbose`` prints progress to stderr.
    Also writes ``results.json`` (all numbers) and PNG plots.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    timings: Dict[str, float] = {}

    def log(msg: str) -> None:
        if verbose:
            import sys

            print(f"[report] {msg} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)

    results: Dict[str, Any] = {"title": title, "threshold": threshold, "metadata": metadata or {}}
    md = [f"# {title}", ""]
    if metadata:
        md += ["", _table(["key", "value"], [[str(k), str(v)] for k, v in metadata.items()]), ""]

    # --- weight analysis
    analyses, bims, arrays = {}, {}, {}
    for name, mdl in (models.items() if analysis else ()):
        try:
            A.decoder_weight(mdl)
        except ValueError:
            continue
        log(f"weight analysis of {name}")
        bims[name] = A.norm_bimodality(mdl, n_sim=n_sim, seed=seed)
        fa = A.feature_analysis(mdl, bimodality=bims[name], threshold=threshold,
                                gram_max_features=gram_max_features, seed=seed)
        arrays[name] = fa.pop("_arrays")
        analyses[name] = fa
    results["analysis"] = analyses
    plots = {}
    if bims:
        plots["hist"] = plot_norm_histograms(bims, out / "norm_histogram.png", threshold)
        plots["scatter"] = plot_norm_vs_ratio(arrays, out / "norm_vs_ratio.png", threshold)
        plots["violin"] = plot_group_violins(arrays, out / "group_violins.png", threshold)
        md += ["## Decoder norm bimodality", "",
               "Squared norms of the primary SAE decoder columns. Decision: bimodal iff the 2-component "
               "Gaussian mixture beats the 1-component fit by BIC_1 - BIC_2 > 10 **and** Hartigan's dip test "
               "rejects unimodality at p < 0.05 (Monte-Carlo p-value, uniform null).", ""]
        rows = []
        for name, b in bims.items():
            d = b.to_dict()
            rows.append([name, d["bimodal"], d["n_features"], d["mean"], d["delta_bic"], d["dip"]["dip"],
                         d["dip"]["p_value"], f"{d['group_means'][0]:.3f} / {d['group_means'][1]:.3f}",
                         f"{d['group_fractions'][0]:.1%} / {d['group_fractions'][1]:.1%}", d["split"],
                         d["fraction_below_0.2"], d["ashman_d"]])
        md += [_table(["model", "bimodal", "F", "mean", "dBIC", "dip", "dip p", "group means (low/high)",
                       "group fractions", "fitted split", f"frac < {threshold:g}", "Ashman D"], rows), "",
               f"![squared-norm histograms]({plots['hist'].name})", ""]

        md += ["## Per-feature contributions", "",
               "Norms `||W_dec[:, i]||`, `||W_lin[:, i]||`, `||V[i]||`; ratios are each norm over their sum.",
               ""]
        for name, fa in analyses.items():
            grp = fa["groups_at_threshold"]
            rows = [[q, g["n_low"], g["n_high"], g["mean_low"], g["mean_high"], g["mannwhitney_p"], g["cohens_d"]]
                    for q, g in grp.items()]
            md += [f"### {name}: groups at squared norm {threshold:g}", "",
                   _table(["quantity", "n low", "n high", "mean low", "mean high", "Mann-Whitney p", "Cohen d"],
                          rows), ""]
            gs = fa["groups_at_split"]
            rows = [[q, g["n_low"], g["n_high"], g["mean_low"], g["mean_high"], g["mannwhitney_p"], g["cohens_d"]]
                    for q, g in gs.items()]
            split = fa["bimodality"]["split"]
            md += [f"### {name}: groups at the fitted split {split:.3f}", "",
                   _table(["quantity", "n low", "n high", "mean low", "mean high", "Mann-Whitney p", "Cohen d"],
                          rows), ""]
            rows = [[q, c["spearman_rho"], c["spearman_p"], c["pearson_r"], c["pearson_p"]]
                    for q, c in fa["correlations"].items()]
            md += [f"### {name}: correlation with squared decoder norm", "",
                   _table(["quantity", "Spearman rho", "p", "Pearson r", "p"], rows), ""]
            g = fa["gram"]
            rows = [["Gram (raw)", g["gram"].get("mean"), g["gram"].get("std"), g["gram"].get("mean_abs"),
                     g["gram"].get("max_abs")],
                    ["cosine", g["cosine"].get("mean"), g["cosine"].get("std"), g["cosine"].get("mean_abs"),
                     g["cosine"].get("max_abs")]]
            for k, v in (g.get("cosine_by_group") or {}).items():
                rows.append([f"cosine {k}", v.get("mean"), v.get("std"), v.get("mean_abs"), v.get("max_abs")])
            note = f" (random sample of {g['sampled_features']} features)" if "sampled_features" in g else ""
            md += [f"### {name}: off-diagonal decoder Gram{note}", "",
                   _table(["entries", "mean", "std", "mean |.|", "max |.|"], rows), ""]
            if "pca" in fa:
                rows = [[k, v.get("dim"), v.get("n_components_50"), v.get("n_components_90"),
                         v.get("participation_ratio")] for k, v in fa["pca"].items()]
                md += [f"### {name}: PCA of per-feature weight vectors", "",
                       _table(["weights", "dim", "PCs for 50%", "PCs for 90%", "participation ratio"], rows), ""]
        if plots["scatter"]:
            md += [f"![squared norm vs contribution ratio]({plots['scatter'].name})", ""]
        if plots["violin"]:
            md += [f"![ratios by norm group]({plots['violin'].name})", ""]

    # --- reconstruction + ablations
    timings["analysis"] = time.time() - t0
    if activations_val is not None:
        log("reconstruction metrics and ablations")
        ev = E.evaluate_models(models, activations_val, baseline=baseline, max_rows=max_rows)
        results["evaluation"] = ev
        base = ev["baseline"]
        md += ["## Held-out reconstruction", "",
               f"Error reduction is `(mse_{base} - mse) / mse_{base}`." if base else "", ""]
        rows = []
        for name, r in ev["reconstruction"].items():
            shares = r.get("nfm_shares", {})
            rows.append([name, r["mse"], r["fvu"], r.get("error_reduction"), r.get("mse_sae_only"),
                         (r.get("mean_abs") or {}).get("linear"), (r.get("mean_abs") or {}).get("interaction"),
                         shares.get("interaction")])
        md += [_table(["model", "MSE", "FVU", "error reduction", "MSE (SAE part only)", "mean |linear|",
                       "mean |interaction|", "interaction share"], rows), ""]
        if ev["ablation"]:
            rows = []
            for name, ab in ev["ablation"].items():
                for a, r in ab.items():
                    rows.append([name, a, r["mse"], r["fvu"], r["reduction_vs_sae"], r.get("error_reduction")])
            p = plot_ablation(ev, out / "ablation.png")
            md += ["## Component ablation", "",
                   _table(["model", "components", "MSE", "FVU", "reduction vs own SAE part",
                           f"reduction vs {base}" if base else "reduction vs baseline"], rows), "",
                   f"![ablation]({p.name})", ""]

    # --- KL / CE splice test
    if lm is not None and layer is not None and token_windows is not None:
        log("KL / CE splice test")
        t1 = time.time()
        sp = E.splice_test(lm, layer, token_windows, models, n_eps=n_eps, seed=seed, scale=scale,
                           skip_first=skip_first, batch_size=splice_batch_size)
        results["splice"] = sp
        timings["splice"] = time.time() - t1
        p = plot_kl(sp, out / "kl_ratio.png")
        rows = [[n, r["kl_recon"], r["kl_eps"], r["kl_ratio"], f"[{_fmt(r['kl_ratio_ci'][0])}, "
                 f"{_fmt(r['kl_ratio_ci'][1])}]", r["kl_excess"], r["ce_increase"],
                 f"[{_fmt(r['ce_increase_ci'][0])}, {_fmt(r['ce_increase_ci'][1])}]", r["ce_eps_increase"]]
                for n, r in sp["models"].items()]
        md += ["## KL / CE splice test", "",
               f"Layer {sp['layer']} output replaced by each reconstruction; {sp['n_windows']} windows of "
               f"{sp['window_len']} tokens; eps-random baseline: {sp['n_eps']} random directions per token with "
               f"the norm of that token's reconstruction error. Clean CE {sp['ce_clean']:.4f} nats/token. "
               "95% CIs: bootstrap over windows.", "",
               _table(["model", "KL recon", "KL eps", "KL ratio", "95% CI", "excess KL", "CE increase", "95% CI",
                       "CE increase (eps)"], rows), ""]
        ref = baseline or next((n for n, m in models.items() if not E.is_joint(m)), None)
        if ref in sp["models"] and sp["models"][ref]["kl_excess"] > 0:
            base_ex = sp["models"][ref]["kl_excess"]
            rows = [[n, r["kl_excess"], (base_ex - r["kl_excess"]) / base_ex]
                    for n, r in sp["models"].items() if n != ref]
            if rows:
                md += [f"Pathological (excess) KL `KL_recon - KL_eps` relative to {ref}:", "",
                       _table(["model", "excess KL", f"reduction vs {ref}"], rows), ""]
        md += [f"![KL ratio]({p.name})", ""]

    # --- integration features
    if integration and lm is not None and tokenizer is not None and layer is not None and activations_val is not None:
        from ..analysis.integration import integration_study

        results["integration"] = {}
        md += ["## Integration features", "",
               "Secondary TopK SAE on the integration MLP's hidden pre-activation; one secondary feature at a time "
               "is clamped to multiplier x its mean active value while the LM generates; the dependent variable is "
               "the word set's mean logit change (minus the vocabulary-mean change); two-way ANOVA "
               "(formality x emotion, Type III).", ""]
        for name, mdl in models.items():
            if not E.is_joint(mdl):
                continue
            log(f"integration features of {name}")
            t1 = time.time()
            kw = {"skip_first": skip_first, **(integration_kwargs or {})}
            st = integration_study(lm, tokenizer, layer, mdl, activations_val, scale=scale, **kw)
            timings[f"integration_{name}"] = time.time() - t1
            st.pop("_sae2", None)
            results["integration"][name] = st
            s2 = st["secondary_sae"]
            md += [f"### {name}", "", f"Secondary SAE {s2['input_dim']} -> {s2['n_features']}, k = {s2['k']}, "
                   f"training FVU {s2['train_fvu']:.3f} on {s2['n_rows']} rows.", ""]
            rows = []
            for fid, eff in st["features"].items():
                for key, an in eff["anova"].items():
                    rows.append([fid, key, an.get("mean_abs_delta"), an["A"]["F"], an["A"]["p"], an["B"]["F"],
                                 an["B"]["p"], an["A:B"]["F"], an["A:B"]["p"]])
            md += [_table(["feature", "multiplier / word set", "mean |logit change|", "F formality", "p",
                           "F emotion", "p", "F interaction", "p"], rows), ""]
            gen_rows = []
            for fid, eff in st["features"].items():
                for g in eff.get("generations", []):
                    cont = " ".join(str(g["continuation"]).split()).replace("|", "/")[:60]
                    gen_rows.append([fid, "/".join(g["cell"]), f"x{g['multiplier']:g}", cont])
            if gen_rows:
                md += ["Greedy continuations under the clamp (first prompt of each cell):", "",
                       _table(["feature", "cell", "multiplier", "continuation"], gen_rows), ""]
    results["elapsed_s"] = time.time() - t0
    results["timings_s"] = timings
    log(f"report written to {out / 'report.md'}")
    (out / "results.json").write_text(json.dumps(_jsonable(results), indent=2))
    md += ["", f"All numbers: [results.json](results.json). Generated in {results['elapsed_s']:.1f} s.", ""]
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path


def demo_hook(context: dict) -> dict:
    """Called by ``dualenc demo`` after training: the full evaluation + analysis report.

    Writes ``OUT/report/report.md`` (plots, results.json) for the demo's models
    (sae, sae_bias, sequential, joint) with ``sae`` as the baseline, the KL/CE
    splice test on validation windows of the store (32 windows, 2 eps samples;
    quick: 4 and 1), and (unless ``quick``) the integration-feature study
    (2 secondary features, 2 generated tokens). Returns the report path and headline numbers.
    """
    import sys
    from pathlib import Path

    quick = bool(context.get("quick"))
    store = context["store"]
    models = context["models"]
    out = Path(context["out"]) / "report"
    val = store.tensor("val", max_rows=5000 if quick else 50_000)
    lm, tok, layer = context.get("lm"), context.get("tokenizer"), context.get("layer")
    windows, skip = (None, 0)
    if lm is not None:
        try:
            windows, skip = E.windows_from_store(store, 4 if quick else 32)
        except ValueError as exc:
            print(f"[demo] splice test skipped: {exc}", file=sys.stderr)
    path = write_report(
        out, models, val, lm=lm, tokenizer=tok, layer=layer, token_windows=windows,
        baseline="sae" if "sae" in models else None, n_eps=1 if quick else 2, skip_first=skip,
        n_sim=50 if quick else 500, gram_max_features=1024 if quick else 8192, seed=int(context.get("seed", 0)),
        integration=not quick and lm is not None and tok is not None,
        integration_kwargs={"n_features": 2, "max_new_tokens": 2, "max_rows": 20000,
                            "sae2_kwargs": {"steps": 1000}},
        title="dualenc demo: evaluation and analysis", verbose=True,
        metadata={"language model": store.manifest.get("model"), "layer": layer,
                  "activations": store.count, "validation rows": int(val.shape[0])},
    )
    print(f"[demo] report: {path}", file=sys.stderr)
    import json

    res = json.loads((out / "results.json").read_text())
    summary = {"report": str(path)}
    summary["bimodal"] = {n: a["bimodality"]["bimodal"] for n, a in res.get("analysis", {}).items()}
    summary["kl_ratio"] = {n: r["kl_ratio"] for n, r in res.get("splice", {}).get("models", {}).items()}
    summary["ce_increase"] = {n: r["ce_increase"] for n, r in res.get("splice", {}).get("models", {}).items()}
    return summary
