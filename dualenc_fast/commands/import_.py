"""``dualenc import``: bring a TopK SAE trained with another library into a dualenc_fast model folder."""
from __future__ import annotations

import json
from pathlib import Path


def register(sub):
    p = sub.add_parser(
        "import",
        help="import an SAE from sparsify, SAELens, dictionary_learning or a research .pt checkpoint",
        description="Read a TopK SAE written by another library and write a dualenc_fast model folder "
                    "(config.json + model.safetensors) that `dualenc eval`, `dualenc analyze` and "
                    "`dualenc train --init-sae` accept. .pt files are read with torch.load(weights_only=True): "
                    "a pickle holding code is refused.",
    )
    p.add_argument("path", metavar="PATH",
                   help="sparsify: folder with cfg.json + sae.safetensors; saelens: folder with cfg.json + "
                        "sae_weights.safetensors; dictionary_learning: ae.pt or its folder; research-pt: a .pt file")
    p.add_argument("--from", dest="source", required=True,
                   choices=("sparsify", "saelens", "dictionary_learning", "research-pt"), help="the library that wrote PATH")
    p.add_argument("--out", required=True, metavar="DIR", help="model folder to write")
    p.add_argument("--k", type=int, default=None,
                   help="active features per row, where the source does not record it (research-pt) or to check it")
    p.add_argument("--nfm", default=None, metavar="PT",
                   help="research-pt: the NFM .pt trained on this SAE (sequential model) -> a JointSAENFM")
    p.add_argument("--top-n", type=int, default=None, help="research-pt with an NFM: its re-selection N (default: off)")
    p.add_argument("--dropout", type=float, default=0.15, help="research-pt with an NFM: its dropout (default 0.15)")
    p.add_argument("--hookpoint", default=None, help="sparsify: the hookpoint subfolder when PATH holds several")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model folder at --out")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run)


def run(args) -> int:
    from dualenc_fast.train.checkpoint import save_model
    from dualenc_fast.interop import import_sae

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(f"--out {out} exists and is not empty; pass --overwrite to replace it")
    kwargs = {}
    if args.source in ("dictionary_learning", "research-pt"):
        kwargs["k"] = args.k
    elif args.k is not None:
        raise ValueError(f"--k applies to dictionary_learning and research-pt; {args.source} records k itself")
    if args.source == "research-pt":
        kwargs.update(nfm=args.nfm, top_n=args.top_n, dropout=args.dropout)
    elif args.nfm is not None or args.top_n is not None:
        raise ValueError("--nfm and --top-n apply to --from research-pt only")
    if args.source == "sparsify":
        kwargs["hookpoint"] = args.hookpoint
    elif args.hookpoint is not None:
        raise ValueError("--hookpoint applies to --from sparsify only")
    model = import_sae(args.source, args.path, backend="reference", **kwargs)
    save_model(model, out, extra={"imported_from": {"source": args.source, "path": str(Path(args.path).resolve())}})
    sae = getattr(model, "primary_sae", model)
    print(json.dumps({"imported": type(model).__name__, "from": args.source, "d": sae.input_dim,
                      "features": sae.hidden_dim, "k": sae.k, "pre_bias": sae.b_dec is not None, "out": str(out)}))
    return 0
