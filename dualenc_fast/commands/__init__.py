"""Subcommands of the ``dualenc`` CLI: each module defines ``register(subparsers)``."""
