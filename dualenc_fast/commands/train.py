"""``dualenc train``: train an SAE, the fair SAE+bias baseline, a sequential or a joint SAE+NFM."""
from __future__ import annotations

import json

import torch

from dualenc_fast.commands import add_run_options, apply_threads, resolve_device


def register(sub):
    p = sub.add_parser(
        "train",
        help="train sae | sae_bias | sequential | joint on an activation folder",
        description="Train on activations written by `dualenc collect`. Paper defaults: Adam lr 1e-4, "
                    "betas (0.9, 0.999), linear decay to 1e-5 over the first 80%% of steps. Writes "
                    "config.json, metrics.jsonl, checkpoints/, model/ and summary.json to --out.",
    )
    p.add_argument("--activations", required=True, help="activation folder (from `dualenc collect`)")
    p.add_argument("--kind", choices=("sae", "sae_bias", "sequential", "joint", "joint_linear"), default="joint",
                   help="what to train (default: joint); joint_linear = joint without the interaction path")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--features", type=int, default=4096, help="SAE features F (default: 4096)")
    p.add_argument("--k", type=int, default=32, help="active features per row (default: 32)")
    p.add_argument("--embedding-dim", type=int, default=64, help="NFM embedding width K (default: 64)")
    p.add_argument("--top-n", type=int, default=None, help="NFM re-selection: keep the N largest of k (default: off)")
    p.add_argument("--dropout", type=float, default=0.15, help="dropout on the FM pooling (default: 0.15)")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (default: 1000)")
    p.add_argument("--sae-steps", type=int, default=None, help="sequential: SAE stage steps (default: --steps)")
    p.add_argument("--init-sae", default=None, help="sequential: a trained SAE (model folder or run folder) to freeze")
    p.add_argument("--batch-size", type=int, default=256, help="rows per step (default: 256)")
    p.add_argument("--lr", type=float, default=1e-4, help="initial learning rate (default: 1e-4)")
    p.add_argument("--final-lr", type=float, default=1e-5, help="learning rate after the decay (default: 1e-5)")
    p.add_argument("--decay-fraction", type=float, default=0.8, help="fraction of steps to decay over (default: 0.8)")
    p.add_argument("--seed", type=int, default=0, help="seed for init, data order and dropout (default: 0)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held-out fraction of each shard (default: 0.1)")
    p.add_argument("--val-every", type=int, default=0, help="validate every N steps (default: 0 = at the end)")
    p.add_argument("--val-rows", type=int, default=16384, help="validation rows used (default: 16384)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="checkpoint every N steps (default: 0 = at the end)")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="checkpoints kept (default: 2)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--backend", choices=("auto", "fused", "reference"), default="auto",
                   help="ops backend (default: auto = compiled if available)")
    p.add_argument("--pre-bias", choices=("none", "zeros", "mean", "geometric_median"), default="none",
                   help="pre-encoder bias b_dec and its init (default: none)")
    p.add_argument("--unit-norm-decoder", action="store_true", help="unit-norm decoder columns, parallel grad removed")
    p.add_argument("--aux-k", type=int, default=None, help="AuxK loss over dead features with this k (default: off)")
    p.add_argument("--aux-coef", type=float, default=1 / 32, help="AuxK loss weight (default: 1/32)")
    p.add_argument("--dead-after-tokens", type=int, default=200_000,
                   help="a feature unfired for this many tokens counts as dead (default: 200000)")
    p.add_argument("--normalize-input", action="store_true",
                   help="scale inputs to unit mean squared norm (folded into the saved weights)")
    p.add_argument("--standardize", action="store_true",
                   help="train on per-dimension z-scores (mean/std of a 10k-row training sample, as the paper's "
                        "scripts do); the saved model/ takes raw activations (folded), model_standardized/ as trained")
    p.add_argument("--adam-eps", type=float, default=1e-8, help="Adam epsilon (default: 1e-8, torch's; the paper's "
                   "scripts use 1e-5)")
    p.add_argument("--outliers", choices=("keep", "drop", "clip"), default="keep",
                   help="rows whose norm exceeds --outlier-multiple x the median row norm: keep (default), drop "
                        "them, or clip them to that norm; the rows touched are counted in summary.json")
    p.add_argument("--outlier-multiple", type=float, default=10.0, help="outlier threshold as a multiple of the "
                   "median row norm (default: 10)")
    p.add_argument("--export-saelens", default=None, metavar="DIR", help="also export the SAE in SAELens layout to DIR")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="fp32, or bf16 autocast of the products and ops with float32 weights and Adam state "
                        "(default: fp32)")
    p.add_argument("--log-every", type=int, default=1,
                   help="copy losses and metrics to the host every N steps (NaN/Inf checked then; a metrics "
                        "row per N steps; default: 1; on a GPU use e.g. 50 so no step waits on the host)")
    p.add_argument("--dist-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="under torchrun: how long a rank waits for the others in a collective before it "
                        "stops with an error (default: 300)")
    p.add_argument("--wandb", default=None, metavar="PROJECT",
                   help="also log metrics to this Weights & Biases project (rank 0 only; needs `pip install wandb`; "
                        "the run id is kept in OUT/wandb.json so --resume continues the same W&B run; "
                        "WANDB_MODE=offline logs locally)")
    add_run_options(p)
    p.set_defaults(func=run)


def config_from_args(args):
    from dualenc_fast.train.trainer import TrainConfig

    return TrainConfig(
        kind=args.kind, features=args.features, k=args.k, embedding_dim=args.embedding_dim, top_n=args.top_n,
        dropout=args.dropout, steps=args.steps, sae_steps=args.sae_steps, batch_size=args.batch_size, lr=args.lr,
        final_lr=args.final_lr, decay_fraction=args.decay_fraction, seed=args.seed, val_fraction=args.val_fraction,
        val_every=args.val_every, val_rows=args.val_rows, checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints, backend=args.backend, pre_bias=args.pre_bias,
        unit_norm_decoder=args.unit_norm_decoder, aux_k=args.aux_k, aux_coef=args.aux_coef,
        dead_after_tokens=args.dead_after_tokens, normalize_input=args.normalize_input, init_sae=args.init_sae,
        precision=args.precision, log_every=args.log_every,
        adam_eps=args.adam_eps, standardize=args.standardize, outliers=args.outliers,
        outlier_multiple=args.outlier_multiple,
    )


def run(args) -> int:
    from dualenc_fast.train.checkpoint import export_saelens
    from dualenc_fast.train.data import ActivationStore
    from dualenc_fast.train.trainer import train

    from dualenc_fast.train import distributed as dist_

    apply_threads(args)
    if args.log_every < 0:
        raise ValueError(f"--log-every must be >= 0, got {args.log_every}")
    config = config_from_args(args)
    device = dist_.resolve_device(args.device)
    multi = dist_.init_from_env(device, args.dist_timeout)
    try:
        device = resolve_device(args)
        if multi:
            dist_.print0(f"data-parallel: {dist_.world_size()} processes "
                         f"({torch.distributed.get_backend()}), global batch {config.batch_size}")
        store = ActivationStore(args.activations)
        result = train(config, store, args.out, resume=args.resume, overwrite=args.overwrite,
                       progress=not args.no_progress, device=device, wandb_project=args.wandb,
                       progress_every=args.progress_every)
    finally:
        dist_.shutdown()
    if dist_.rank_from_env() != 0:
        return 0
    val = result.summary["val"]
    line = {"kind": config.kind, "steps": result.summary["steps"], "val_mse": val["mse"],
            "val_fvu": val["fvu"], "l0": val["l0"], "out": str(args.out)}
    if "outliers" in result.summary:
        line["outlier_rows_touched"] = result.summary["outliers"]["train_rows_touched"]
    print(json.dumps(line))
    if args.export_saelens:
        from dualenc_fast.eval.sae_metrics import standard_metrics

        val_x = store.tensor("val", val_fraction=config.val_fraction, max_rows=config.val_rows)
        density = standard_metrics(result.model, val_x)[1] if val_x.shape[0] else None
        export_saelens(result.model, args.export_saelens, model_name=store.manifest.get("model"),
                       hook_layer=store.manifest.get("layer"), context_size=store.manifest.get("window", 50),
                       feature_density=density)
        print(f"exported SAELens folder {args.export_saelens}")
    return 0
