"""``dualenc info``: what was built and what is registered."""
from __future__ import annotations

import json


def register(sub):
    p = sub.add_parser("info", help="print build information (version, torch, CUDA, ops)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from dualenc_fast import build_info

    info = build_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        if key == "ops":
            continue
        if isinstance(value, (list, tuple)):
            value = ", ".join(map(str, value)) or "-"
        print(f"{key:<{width}}  {value}")
    print("ops:")
    for name, keys in info.get("ops", {}).items():
        print(f"  dualenc_fast::{name:<26} {', '.join(keys)}")
    return 0
