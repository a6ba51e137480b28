"""Emulated build: copies a CUDA source for g++, turning each
``extern __shared__ T name[];`` into a pointer to the launch's dynamic shared
buffer (the one construct a forced-include header cannot express). Line
numbers are kept (``#line``), so errors point at the original file.

    python prepare.py SRC.cu OUT.cpp
"""
import os
import re
import sys

EXTERN_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([A-Za-z_][\w:<>\s\*]*?)\s*\b([A-Za-z_]\w*)\s*\[\s*\]\s*;"
)


def convert(text: str) -> str:
    return EXTERN_SHARED.sub(
        lambda m: f"{m.group(1)}* const {m.group(2)} = static_cast<{m.group(1)}*>(::emu::detail::dynamic_shared());",
        text,
    )


def main() -> int:
    src, dst = sys.argv[1], sys.argv[2]
    with open(src) as f:
        text = f.read()
    out = '#line 1 "%s"\n' % os.path.abspath(src).replace("\\", "/") + convert(text)
    old = None
    if os.path.exists(dst):
        with open(dst) as f:
            old = f.read()
    if old != out:
        with open(dst, "w") as f:
            f.write(out)
    else:
        os.utime(dst)
    return 0


if __name__ == "__main__":
    sys.exit(main())
