"""Figures rendered to PNG bytes, off-screen (the reports of demo, train and tune write them)."""

from __future__ import annotations

import io


def new_figure(rows: int, cols: int, size: tuple[float, float]):
    """A matplotlib (figure, axes) on the off-screen Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(rows, cols, figsize=size)


def png_bytes(fig) -> bytes:
    """Lay out, render as PNG (100 dpi) and close the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
