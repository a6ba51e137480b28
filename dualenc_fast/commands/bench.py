"""``dualenc bench``: not implemented yet."""
from __future__ import annotations

import sys


def register(sub):
    p = sub.add_parser("bench", help="(not implemented yet)")
    p.set_defaults(func=run)


def run(args) -> int:
    print("dualenc bench is not implemented yet in this version.", file=sys.stderr)
    return 2
