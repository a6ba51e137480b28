"""Errors a user can fix (bad input, corrupt files, a full disk).

The ``dualenc`` command line prints these as one line on stderr and exits
non-zero (with a traceback only under ``--debug``). Each also derives from the
built-in exception a caller would expect (``ValueError``, ``FileNotFoundError``,
``OSError``), so ``except ValueError`` keeps working.
"""
from __future__ import annotations

import errno as _errno


class UserError(Exception):
    """An error in what the user gave us, not a bug: its message says what to fix."""


class CorruptFileError(UserError, ValueError):
    """A file exists but cannot be trusted: truncated, bit-flipped, not the expected format."""


class CheckpointError(CorruptFileError):
    """A training checkpoint is incomplete or fails its content hash."""


class NoGoodCheckpointError(UserError, FileNotFoundError):
    """``resume`` found a run but no checkpoint in it that verifies."""


class DataError(UserError, ValueError):
    """Activations (or other input data) hold NaN/Inf or are otherwise unusable."""


class DiskFullError(UserError, OSError):
    """Writing a file failed for lack of space (ENOSPC/EDQUOT); the previous file is kept."""

    def __init__(self, path, detail: str = ""):
        self.path = str(path)
        msg = (f"no space left on the device while writing {self.path}; the previous version (if any) is kept "
               "intact: free some space and run again")
        if detail:
            msg += f" ({detail})"
        super().__init__(_errno.ENOSPC, msg)
        self.message = msg

    def __str__(self) -> str:
        return self.message


DISK_FULL_ERRNOS = {_errno.ENOSPC} | ({_errno.EDQUOT} if hasattr(_errno, "EDQUOT") else set())
