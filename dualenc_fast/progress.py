"""Progress reporting: a tqdm bar on an interactive terminal, plain lines in a log.

When the stream (stderr by default) is a terminal, :class:`Progress` draws a tqdm
bar. Otherwise (output redirected to a file, a pipe, CI) it writes one line every
``every`` steps and one at the end instead of a carriage-return redraw per step,
so a log of a long run stays readable.
"""
from __future__ import annotations

import sys
import time
from typing import Optional


def default_every(total: int, lines: int = 20) -> int:
    """About ``lines`` lines over ``total`` steps."""
    return max(1, int(total) // max(1, lines))


class Progress:
    """``update(n)``, ``set_postfix(**kw)``, ``close()``; a context manager."""

    def __init__(self, total: int, desc: str = "", *, initial: int = 0, enabled: bool = True,
                 every: Optional[int] = None, unit: str = "step", stream=None):
        self.total = int(total)
        self.desc = desc
        self.n = int(initial)
        self.unit = unit
        self.stream = sys.stderr if stream is None else stream
        self.enabled = bool(enabled)
        if every is not None and every <= 0:
            raise ValueError(f"every must be positive, got {every}")
        self.every = int(every) if every is not None else default_every(self.total)
        self.postfix: dict = {}
        self._bar = None
        self._t0 = time.time()
        self._n0 = self.n
        self._last_line = self.n
        isatty = getattr(self.stream, "isatty", None)
        self.interactive = bool(self.enabled and callable(isatty) and isatty())
        if self.interactive:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, initial=self.n, desc=desc, unit=unit, file=self.stream)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and (self.n - self._last_line >= self.every or self.n >= self.total):
            self._line()

    def set_postfix(self, refresh: bool = False, **kw) -> None:
        """Values shown after the counts (``refresh`` as tqdm's: redraw the bar now)."""
        self.postfix = kw
        if self._bar is not None:
            self._bar.set_postfix(refresh=refresh, **kw)

    def _line(self) -> None:
        self._last_line = self.n
        dt = time.time() - self._t0
        done = self.n - self._n0
        rate = done / dt if dt > 0 else 0.0
        left = (self.total - self.n) / rate if rate > 0 else float("nan")
        pct = 100.0 * self.n / self.total if self.total else 100.0
        extra = " ".join(f"{k}={v}" for k, v in self.postfix.items())
        eta = f"{left:.0f}s" if left == left else "?"
        print(f"{self.desc}: {self.n}/{self.total} {self.unit}s ({pct:.0f}%), {dt:.0f}s elapsed, "
              f"{rate:.3g} {self.unit}/s, eta {eta}" + (f", {extra}" if extra else ""),
              file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and self.n != self._last_line:
            self._line()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
