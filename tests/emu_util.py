"""Shared by the emulated-CUDA tests: the emulated module or a skip (a failure
when DUALENC_REQUIRE_EMU=1, as in CI, where the module must have been built)."""
import os

import pytest

from dualenc_fast import emu

REQUIRE = os.environ.get("DUALENC_REQUIRE_EMU", "") not in ("", "0")
# schedules every emulated test runs under: thread order and three seeds
SEEDS = [0, 1, 2, 3]


def require_emu():
    try:
        return emu.module()
    except ImportError as exc:
        if REQUIRE:
            raise
        pytest.skip(f"the emulated CUDA module is not built (cmake -DDUALENC_EMU=ON): {exc}", allow_module_level=True)
