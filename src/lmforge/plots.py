"""The one plotting module. Every figure lmforge draws (training curves, the dry run's plan, the data
report's removals, checkpoint sweeps, scaling fits, the run report) is drawn from the JSON / JSONL
files a run writes, with matplotlib's Agg backend (no display needed), through these helpers."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def subplots(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """`plt.subplots` on the Agg backend (imported on first use: matplotlib is slow to import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_figure(fig: Any, path: Path, dpi: int = 100) -> Path:
    """Lay out, write (creating the folder) and free a figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def figure_png(fig: Any, dpi: int = 90) -> bytes:
    """The figure as PNG bytes (for pages that inline their images), freed after."""
    import io

    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()
