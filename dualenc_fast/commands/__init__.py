"""Subcommands of the ``dualenc`` CLI: each module defines ``register(subparsers)``."""


def add_device_option(p) -> None:
    """--device cpu|cuda|cuda:N (default: cuda when available, else cpu)."""
    p.add_argument("--device", default=None, metavar="DEVICE",
                   help="cpu, cuda or cuda:N (default: cuda when available, else cpu; under torchrun "
                        "cuda:LOCAL_RANK)")


def resolve_device(args):
    """The torch.device of --device, printed to stderr (rank 0 under torchrun)."""
    import sys

    from dualenc_fast.train.distributed import describe_device, rank
    from dualenc_fast.train.distributed import resolve_device as _resolve

    dev = _resolve(getattr(args, "device", None))
    if rank() == 0:
        print(f"device: {describe_device(dev)}", file=sys.stderr)
    return dev


def add_run_options(p) -> None:
    """The options every long-running command shares: --device, --threads, --no-progress, --debug."""
    add_device_option(p)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--progress-every", type=int, default=None, metavar="N",
                   help="when stderr is not a terminal (a log file), training prints one progress line every N "
                        "steps instead of a bar (default: about 20 lines per run; collection always about 20)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def apply_threads(args) -> None:
    """Honour --threads."""
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
