"""``dualenc eval``: held-out reconstruction, component ablations, the KL/CE splice
test against the eps-random baseline (and optionally integration features), as a
Markdown report with plots."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Sequence

from dualenc_fast.commands import add_device_option, resolve_device


def register(sub):
    p = sub.add_parser(
        "eval",
        help="evaluate trained models: reconstruction, ablations, KL/CE splice test; writes a report",
        description="Evaluate one or more trained models (model folders or training-run folders) on the "
                    "validation split of an activation folder, splice their reconstructions into the language "
                    "model, and write DIR/report.md with plots and DIR/results.json.",
    )
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                   help="model folder, training-run folder or checkpoint folder")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for the report")
    p.add_argument("--data", metavar="DIR",
                   help="activation folder (default: the one recorded in the first run's config.json)")
    p.add_argument("--names", nargs="+", metavar="NAME", help="display names, one per checkpoint")
    p.add_argument("--baseline", metavar="NAME",
                   help="model the error reductions are measured against (default: first model without an NFM)")
    p.add_argument("--val-rows", type=int, default=50_000, help="validation rows to evaluate (default 50000)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="validation fraction of each shard (default 0.1)")
    p.add_argument("--lm", metavar="MODEL",
                   help="language model for the splice test: a local folder or 'smollm2' (default: the store's "
                        "model when loadable); 'none' skips the splice test")
    p.add_argument("--layer", type=int, help="decoder layer to splice (default: the store's layer)")
    p.add_argument("--windows", type=int, default=64, help="token windows for the splice test (default 64)")
    p.add_argument("--text", nargs="+", metavar="FILE",
                   help="held-out text (.txt / .jsonl) for the splice windows (default: the store's validation windows)")
    p.add_argument("--n-eps", type=int, default=4, help="eps-random samples per token (default 4)")
    p.add_argument("--skip-first", type=int, default=None,
                   help="leave the first positions of each window unspliced and unscored (default: the store's)")
    p.add_argument("--integration", action="store_true",
                   help="also train a secondary SAE on the integration MLP and run the clamping ANOVA")
    p.add_argument("--integration-steps", type=int, default=2000, help="secondary SAE training steps")
    p.add_argument("--no-analysis", action="store_true", help="skip the weight analysis")
    p.add_argument("--gram-max-features", type=int, default=8192,
                   help="subsample features above this for the Gram statistics (0: all)")
    p.add_argument("--n-sim", type=int, default=500, help="Monte-Carlo samples for the dip-test p-value")
    p.add_argument("--backend", default="auto", choices=("auto", "fused", "reference"))
    add_device_option(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run)


# ----------------------------------------------------------------------------
# shared helpers (also used by ``dualenc analyze``)
# ----------------------------------------------------------------------------

def _run_info(path: Path) -> dict:
    """``config.json`` of a training-run folder (``{"train": ..., "data": ...}``), or {}."""
    for folder in (path, path.parent):
        cfg = folder / "config.json"
        if cfg.exists():
            try:
                doc = json.loads(cfg.read_text())
            except ValueError:
                continue
            if isinstance(doc, dict) and "train" in doc:
                return doc
    return {}


def load_one(path, *, backend: str = "auto", device: str = "cpu"):
    """Load a model from a model folder, a training-run folder (its ``model/``) or a checkpoint."""
    from dualenc_fast.train.checkpoint import load_model

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no model at {path}")
    if (path / "model" / "config.json").exists() and _run_info(path):
        path = path / "model"
    return load_model(path, backend=backend, device=device)


def load_models(paths: Sequence[str], names: Optional[Sequence[str]] = None, *, backend: str = "auto",
                device: str = "cpu") -> Dict[str, object]:
    """name -> model for each path (names: given, else the run's ``kind``, else the folder name)."""
    if names is not None and len(names) != len(paths):
        raise ValueError(f"got {len(names)} names for {len(paths)} checkpoints")
    out: Dict[str, object] = {}
    for i, p in enumerate(paths):
        path = Path(p)
        if names is not None:
            name = names[i]
        else:
            kind = _run_info(path).get("train", {}).get("kind")
            name = kind or (path.parent.name if path.name == "model" else path.name)
        base, n = name, 2
        while name in out:
            name, n = f"{base}_{n}", n + 1
        out[name] = load_one(path, backend=backend, device=device)
    return out


def run(args) -> int:
    from dualenc_fast.eval.report import write_report
    from dualenc_fast.storage import atomic_write_json
    from dualenc_fast.train.data import ActivationStore

    args.device = str(resolve_device(args))
    models = load_models(args.checkpoints, args.names, backend=args.backend, device=args.device)
    data = args.data
    if data is None:
        data = _run_info(Path(args.checkpoints[0])).get("data", {}).get("folder")
        if data is None:
            raise ValueError("pass --data DIR (the activation folder)")
    store = ActivationStore(data)
    val = store.tensor("val", val_fraction=args.val_fraction, max_rows=args.val_rows)
    if val.shape[0] == 0:
        raise ValueError(f"the validation split of {data} is empty")
    layer = args.layer if args.layer is not None else store.manifest.get("layer")
    skip_first = args.skip_first if args.skip_first is not None else int(store.manifest.get("skip_first", 0) or 0)

    lm = tok = windows = None
    lm_name = args.lm if args.lm is not None else store.manifest.get("model")
    if lm_name and lm_name != "none":
        from dualenc_fast.lm import load_causal_lm

        try:
            lm, tok = load_causal_lm(lm_name, device=args.device)
        except (FileNotFoundError, OSError, ValueError) as exc:
            if args.lm is not None:
                raise
            print(f"splice test skipped: cannot load the language model {lm_name!r} ({exc}); pass --lm")
            lm = None
    if lm is not None:
        if args.text:
            from dualenc_fast.train.data import read_text_files, token_windows

            windows = token_windows(read_text_files(args.text), tok, int(store.manifest.get("window") or 50),
                                    max_windows=args.windows)
        else:
            from dualenc_fast.eval.metrics import windows_from_store

            windows, skip_first = windows_from_store(store, args.windows, args.val_fraction)
    meta = {"data": str(data), "language model": lm_name or "-", "layer": layer, "validation rows": val.shape[0],
            "checkpoints": ", ".join(args.checkpoints)}
    path = write_report(
        args.out, models, val, lm=lm, tokenizer=tok, layer=layer if lm is not None else None,
        token_windows=windows, baseline=args.baseline, n_eps=args.n_eps, skip_first=skip_first,
        integration=args.integration and lm is not None,
        integration_kwargs={"sae2_kwargs": {"steps": args.integration_steps}},
        gram_max_features=args.gram_max_features or None, n_sim=args.n_sim, seed=args.seed,
        title="dualenc_fast evaluation", metadata=meta, analysis=not args.no_analysis, verbose=True,
    )
    results = json.loads((Path(args.out) / "results.json").read_text())
    results["standard_metrics"] = write_standard_metrics(args.out, models, val, results.get("splice"))
    atomic_write_json(Path(args.out) / "results.json", results)
    for name, r in results.get("evaluation", {}).get("reconstruction", {}).items():
        red = r.get("error_reduction")
        print(f"{name:>16}: mse {r['mse']:.5g}  fvu {r['fvu']:.4f}"
              + (f"  error reduction {red:+.2%}" if red is not None else ""))
    for name, r in results.get("splice", {}).get("models", {}).items():
        ratio = r.get("kl_ratio")
        print(f"{name:>16}: KL/KL_eps {'nan' if ratio is None else f'{ratio:.3f}'}  "
              f"CE increase {r['ce_increase']:+.4g}")
    for name, r in results["standard_metrics"]["models"].items():
        line = (f"{name:>16}: explained variance {r['explained_variance']:.4f}  cossim {r['cossim']:.4f}  "
                f"l2 ratio {r['l2_ratio']:.4f}  dead {r['dead_latents']}  dense {r['dense_latents']}")
        if "ce_loss_score" in r:
            line += f"  CE recovered {r['ce_loss_score']:.4f}  KL recovered {r['kl_div_score']:.4f}"
        print(line)
    print(f"report: {path}")
    return 0


STANDARD_KEYS = ("explained_variance", "cossim", "l2_ratio", "relative_reconstruction_bias", "l0",
                 "dead_latents", "dense_latents", "ce_loss_score", "kl_div_score")


def write_standard_metrics(out, models, val, splice=None) -> dict:
    """SAELens's standard metrics per model on the validation rows (and, from the splice test,
    CE / KL recovered against zero ablation): ``feature_density.png`` and a section
    appended to ``report.md``; returns the dict stored under ``standard_metrics`` in results.json."""
    from dualenc_fast.eval.sae_metrics import DENSE_THRESHOLD, density_histogram, standard_metrics

    out = Path(out)
    res, dens = {}, {}
    for name, model in models.items():
        metrics, density = standard_metrics(model, val)
        sp = (splice or {}).get("models", {}).get(name, {})
        metrics.update({key: sp[key] for key in ("ce_loss_score", "kl_div_score") if key in sp})
        res[name], dens[name] = metrics, density
    density_histogram(dens, out / "feature_density.png", title=f"Feature density over {val.shape[0]} validation rows")
    rows = ["", "## Standard SAE metrics", "",
            f"SAELens definitions (README, \"Standard SAE metrics\") on {val.shape[0]} validation rows; dead: never "
            f"active on them, dense: active on more than {DENSE_THRESHOLD:.0%} of them.", "",
            "| model | " + " | ".join(STANDARD_KEYS) + " |", "|---" * (len(STANDARD_KEYS) + 1) + "|"]
    for name, m in res.items():
        cells = [("-" if m.get(key) is None else (f"{m[key]:.4g}" if isinstance(m[key], float) else str(m[key])))
                 for key in STANDARD_KEYS]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    rows += ["", "![feature density](feature_density.png)", ""]
    report = out / "report.md"
    if report.exists():
        with open(report, "a", encoding="utf-8") as fh:
            fh.write("\n".join(rows))
    return {"rows": int(val.shape[0]), "dense_threshold": DENSE_THRESHOLD, "models": res,
            "density_histogram": "feature_density.png"}
