"""Headless matplotlib for the PNGs the package writes (reports, density
histograms, reproduce plots): ``pyplot()`` on the Agg backend, and
``save_figure`` to lay out, write and close a figure."""
from __future__ import annotations

from pathlib import Path


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """Tight layout, write ``path`` at 110 dpi, close the figure; returns ``path``."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path
