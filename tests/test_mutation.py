"""The mutation check of the emulated CUDA tests (scripts/mutation_check.py):
every planted kernel bug must make the emulated tests fail. Builds the
emulated module once per mutant (minutes each on a small machine): long."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.long
def test_every_planted_bug_is_caught(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "mutation_check.py")], cwd=ROOT,
                         capture_output=True, text=True)
    print(out.stdout[-4000:], out.stderr[-2000:])
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "SURVIVED" not in out.stdout
    assert "(100%)" in out.stdout
