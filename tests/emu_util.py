"""Shared by the emulated-CUDA tests: the emulated module or a skip (a failure
when DUALENC_REQUIRE_EMU=1, as in CI, where the module must have been built)."""
import os

import pytest

from dualenc_fast import emu

REQUIRE = os.environ.get("DUALENC_REQUIRE_EMU", "") not in ("", "0")
# Schedules every emulated test runs under: thread order and three seeds. With
# EMU_SEED=n (n > 0) set, seed n instead (the tests pick their schedules
# explicitly, which overrides the emulator's own reading of EMU_SEED), so
# `EMU_SEED=11 python -m pytest tests/test_emu_ops.py` reruns them under
# another set of random schedules.
_ENV_SEED = os.environ.get("EMU_SEED", "").strip()
SEEDS = [int(_ENV_SEED)] if _ENV_SEED not in ("", "0") else [0, 1, 2, 3]


def require_emu():
    try:
        return emu.module()
    except ImportError as exc:
        if REQUIRE:
            raise
        pytest.skip(f"the emulated CUDA module is not built (cmake -DDUALENC_EMU=ON): {exc}", allow_module_level=True)
