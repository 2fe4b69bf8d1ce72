"""Matplotlib without a display, and figures saved the way every artifact is: atomically."""
from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the Agg backend (stages run headless, in worker processes too)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: Path | str, dpi: int = 120) -> None:
    """Lay out `fig`, write it as PNG to `path` through a temp file and rename, then free it."""
    from distillery.core.artifacts import atomic_path
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    pyplot().close(fig)
