"""Matplotlib figures embedded in self-contained HTML pages."""

from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")  # no display: render to memory

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def png_data_uri(fig: Figure, dpi: int = 110) -> str:
    """Render ``fig`` to a ``data:image/png;base64,...`` URI and close it (figures are not kept open)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
