"""Subcommands of the ``dualenc`` CLI: each module defines ``register(subparsers)``."""


def add_run_options(p) -> None:
    """The options every long-running command shares: --threads, --no-progress, --debug."""
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
