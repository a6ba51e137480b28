"""The ``dualenc`` command line. Each subcommand lives in dualenc_fast/commands/.

Errors a user can fix (a missing folder, a file in the wrong format, a bad
argument, a corrupt checkpoint, NaN/Inf data, a full disk) end the command with
one line on stderr, ``dualenc COMMAND: error: ...``, and exit status 2; every
command takes ``--debug`` to show the traceback instead. Anything else is a bug
and keeps its traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import warnings

COMMANDS = ("demo", "reproduce", "collect", "train", "eval", "analyze", "import", "bench", "info")
_MODULES = {"import": "import_"}  # command names that are Python keywords


class _Parser(argparse.ArgumentParser):
    """An argument error is one line (no usage block): what is wrong, and where help is."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dualenc",
        description="Dual-encoding dictionary learning: TopK SAE + Neural Factorization Machine.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"dualenc_fast.commands.{_MODULES.get(name, name)}").register(sub)
    for p in sub.choices.values():  # every command takes --debug
        if "--debug" not in p._option_string_actions:
            p.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def user_errors() -> tuple:
    """The exception types reported as one line (without --debug)."""
    from dualenc_fast.errors import UserError

    return (UserError, ValueError, OSError, RuntimeError, MemoryError)


def error_line(exc: BaseException) -> str:
    """One line saying what went wrong."""
    if isinstance(exc, OSError) and type(exc).__str__ is OSError.__str__ and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        text = f"{where}{exc.strerror}"
    elif isinstance(exc, MemoryError):
        text = f"out of memory{': ' + str(exc) if str(exc) else ''}; use smaller batches or fewer features"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


@contextlib.contextmanager
def _one_line_warnings(command: str):
    """Our own warnings (a skipped checkpoint, a new run started) as one stderr line each."""
    from dualenc_fast.train.checkpoint import CheckpointWarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, CheckpointWarning):
            print(f"dualenc {command}: warning: {' '.join(str(message).split())}", file=sys.stderr)
        else:
            original(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        original = warnings.showwarning
        warnings.simplefilter("always", CheckpointWarning)
        warnings.showwarning = show
        yield


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with _one_line_warnings(args.command):
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `dualenc info | head`: the reader left, stop quietly
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except user_errors() as exc:
        if getattr(args, "debug", False):
            raise
        print(f"dualenc {args.command}: error: {error_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
