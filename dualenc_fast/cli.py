"""The ``dualenc`` command line. Each subcommand lives in dualenc_fast/commands/."""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("demo", "collect", "train", "eval", "analyze", "import", "bench", "info")
_MODULES = {"import": "import_"}  # command names that are Python keywords


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dualenc",
        description="Dual-encoding dictionary learning: TopK SAE + Neural Factorization Machine.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"dualenc_fast.commands.{_MODULES.get(name, name)}").register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `dualenc info | head`: the reader left, stop quietly
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        if getattr(args, "debug", False):
            raise
        print(f"dualenc {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
