"""What every figure of the package shares: the headless backend and one way to write a PNG.

Report figures (``analysis.plots``), interaction-graph figures (``interactions.plots``) and SGLD
figures (``llc.plots``) all end in ``save_figure``. matplotlib is the ``report`` extra: importing
this module needs it, the collectors and bases do not.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def save_figure(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` as a PNG (folders created), close it, return the path: every report figure goes here."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
