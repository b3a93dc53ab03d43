"""PNG plots of training curves (matplotlib, no display needed)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def plot_curves(rows: list[dict[str, Any]], keys: list[str], path: str | Path, *, x: str = "update",
                title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(k in r for r in rows)]
    cols = min(3, max(1, len(keys)))
    n_rows = math.ceil(len(keys) / cols) or 1
    fig, axes = plt.subplots(n_rows, cols, figsize=(4.2 * cols, 3.0 * n_rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(r[x], r[key]) for r in rows if key in r and r[key] is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.5)
        ax.set_title(key)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def save_figure(fig: Any, path: str | Path) -> Path:
    """Write a figure as PNG atomically (a reader never sees half an image) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)
    return path
