"""Pictures next to a command's outputs (prepare's timeline, retrain's metrics, analyze's lift over time).

One mechanism for all of them: matplotlib (the `train` extra) is imported only when a picture is drawn,
with the Agg backend (no display needed); the PNG is written to a temp sibling and renamed, so a reader
never sees half an image; the numbers a picture shows are in a JSON file or report next to it, so a
test or another tool can check them without reading pixels. Every command that draws has `--no-plots`.
Without matplotlib the picture is skipped with a warning that names the install command: a runtime-only
install still prepares and retrains.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from recsys.errors import MissingDependencyError
from recsys.files import write_json_atomic

log = logging.getLogger(__name__)


def add_plots_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--no-plots", action="store_true", help=f"do not draw {what} (needs matplotlib)")


def write_plot(path: Path, draw: Callable[[Any], Any], *, series: dict[str, Any] | None = None) -> Path | None:
    """draw(pyplot) -> a Figure, saved as PNG at `path` (temp + rename); `series` to `path`.json beside it.

    Returns the PNG's path, or None when matplotlib is not installed (logged as a warning).
    """
    from recsys.compat import require

    try:
        matplotlib = require("matplotlib")
    except MissingDependencyError as exc:
        log.warning("%s not drawn: %s (or pass --no-plots)", path.name, exc)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = draw(plt)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    os.replace(tmp, path)
    if series is not None:
        write_json_atomic(path.with_suffix(".json"), series)
    return path
