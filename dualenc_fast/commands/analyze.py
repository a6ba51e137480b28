"""``dualenc analyze``: weight analysis of trained models (norm bimodality with a
statistical test, per-feature contributions, group comparisons, correlations,
blocked Gram statistics, PCA) as a Markdown report with plots."""
from __future__ import annotations

import json
from pathlib import Path

from dualenc_fast.commands import add_device_option, resolve_device


def register(sub):
    p = sub.add_parser(
        "analyze",
        help="analyse trained model weights (norm bimodality, contributions, Gram, PCA); writes a report",
        description="Analyse the weights of one or more trained models (model folders or training-run "
                    "folders) and write DIR/report.md with plots and DIR/results.json. Needs no data.",
    )
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                   help="model folder, training-run folder or checkpoint folder")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for the report")
    p.add_argument("--names", nargs="+", metavar="NAME", help="display names, one per checkpoint")
    p.add_argument("--threshold", type=float, default=0.2,
                   help="squared-norm threshold for the group comparison (default 0.2, as the paper)")
    p.add_argument("--gram-max-features", type=int, default=8192,
                   help="subsample features above this for the Gram statistics (0: all, exact)")
    p.add_argument("--n-sim", type=int, default=500, help="Monte-Carlo samples for the dip-test p-value")
    p.add_argument("--backend", default="auto", choices=("auto", "fused", "reference"))
    add_device_option(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the bimodality results as JSON")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run)


def run(args) -> int:
    from dualenc_fast.commands.eval import load_models
    from dualenc_fast.eval.report import write_report

    args.device = str(resolve_device(args))
    models = load_models(args.checkpoints, args.names, backend=args.backend, device=args.device)
    path = write_report(
        args.out, models, None, threshold=args.threshold, gram_max_features=args.gram_max_features or None,
        n_sim=args.n_sim, seed=args.seed, title="dualenc_fast weight analysis",
        metadata={"checkpoints": ", ".join(args.checkpoints)}, verbose=True,
    )
    results = json.loads((Path(args.out) / "results.json").read_text())
    bim = {name: a["bimodality"] for name, a in results.get("analysis", {}).items()}
    if args.json:
        print(json.dumps(bim, indent=2))
    else:
        for name, b in bim.items():
            lo, hi = b["group_means"]
            wl, wh = b["group_fractions"]
            print(f"{name:>16}: {'BIMODAL' if b['bimodal'] else 'not bimodal'}  dBIC {b['delta_bic']:.1f}  "
                  f"dip {b['dip']['dip']:.4f} (p={b['dip']['p_value']:.3g})  groups {lo:.3f} ({wl:.0%}) / "
                  f"{hi:.3f} ({wh:.0%})")
    print(f"report: {path}")
    return 0
