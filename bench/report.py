"""The bench/results convention in one place: `<name>.json` holds the figures, `<name>.md` the table
(also printed), both under the --out folder (bench/results by default)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_results(out: Path, name: str, report: dict[str, Any], markdown: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=1, default=float))
    (out / f"{name}.md").write_text(markdown)
    print(markdown)
