"""``dualenc bench``: whole-step and op benchmarks, paths side by side in one run."""
from __future__ import annotations


def register(sub):
    p = sub.add_parser(
        "bench",
        help="time a joint training step: reference vs plain-PyTorch peer vs fused kernels",
        description="Times one whole joint training step (forward, backward, Adam) on the reference "
        "path, the best plain-PyTorch path, the fused kernels and the drop-in module, interleaved in "
        "one run beside the floor (the encoder GEMM alone + one Adam step), plus "
        "transient memory (CPU) and op figures against limits measured in the same run. "
        "Prints ratios and writes JSON that names the machine.",
    )
    p.add_argument("--config", default="C1", help="C1 (CPU config), CPU-S (a modern SAE's F and density on a CPU), P (paper "
                   "scale), S (a modern SAE) or tiny (default C1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--repeats", type=int, default=5, help="timed steps per path (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per path first (default 1)")
    p.add_argument("--paths", default="reference,peer,fused,module,dropin,floor",
                   help="comma-separated subset of reference,peer,fused,module,dropin,floor (default: all); "
                   "'' for none (with --sweep-k: the sweep alone)")
    p.add_argument("--no-memory", action="store_true", help="skip the transient-memory measurement")
    p.add_argument("--sweep-k", default=None, metavar="K1,K2,...",
                   help="also time sparse_decode (forward + backward) in its gather and dense forms at "
                   "the config's B, F, d with each of these k: the evidence for the 'auto' density "
                   "thresholds (dualenc_fast.ops.set_sparse_strategy)")
    p.add_argument("--profile", action="store_true",
                   help="also profile one fused step and print where its time goes, by op")
    p.add_argument("--ab", default=None, metavar="DESIGN,...",
                   help="also time the fused step with each named design switched off, interleaved with it "
                   "on (paired ratio off/on): 'all' or a comma-separated subset of "
                   "dualenc_fast.bench.DESIGNS (e.g. shared_transposes)")
    p.add_argument("--out", default=None, help="write the JSON result here")
    p.add_argument("--ddp", type=int, default=None, metavar="N",
                   help="instead: rows/s of one joint training step in 1 process and in N data-parallel "
                   "processes (torch.distributed, gloo, CPU) at the config's global batch, and the ratio")
    p.add_argument("--threads", type=int, default=1, help="with --ddp: threads per process (default 1)")
    p.add_argument("--rounds", type=int, default=2, help="with --ddp: alternating 1/N-process rounds (default 2)")
    p.set_defaults(func=run)


def run(args) -> int:
    from dualenc_fast import bench

    if args.ddp is not None:
        if args.device != "cpu":
            raise ValueError("--ddp measures gloo processes on the CPU; on GPUs run "
                             "`torchrun --nproc-per-node N -m dualenc_fast train ...`")
        from dualenc_fast import bench_ddp

        if args.repeats < 1 or args.rounds < 1 or args.threads < 1:
            raise ValueError("--repeats, --rounds and --threads must be >= 1")
        bench_ddp.run(args.config, args.ddp, args.repeats, args.warmup, args.rounds, args.threads, out=args.out)
        return 0
    paths = tuple(x.strip() for x in args.paths.split(",") if x.strip())
    known = bench.PATHS
    bad = [x for x in paths if x not in known]
    if bad:
        raise ValueError(f"--paths: unknown path(s) {bad}; choose from {', '.join(known)}")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    sweep = None
    if args.sweep_k:
        try:
            sweep = [int(x) for x in args.sweep_k.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--sweep-k must be comma-separated integers, got {args.sweep_k!r}") from None
    designs = ()
    if args.ab:
        designs = tuple(bench.DESIGNS) if args.ab.strip() == "all" else tuple(
            x.strip() for x in args.ab.split(",") if x.strip())
        bad = [x for x in designs if x not in bench.DESIGNS]
        if bad or not designs:
            raise ValueError(f"--ab: unknown design(s) {bad or args.ab!r}; choose 'all' or from "
                             f"{', '.join(bench.DESIGNS)}")
    bench.run(args.config, args.device, args.dtype, args.repeats, args.warmup, paths,
              memory=not args.no_memory, out=args.out, sweep_ks=sweep,
              profile=args.profile, designs=designs)
    return 0
