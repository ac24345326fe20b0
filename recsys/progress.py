"""One progress convention for every step that can take more than a few seconds: tqdm on stderr.

Bars show only when stderr is a terminal and `--no-progress` was not given (`recsys` calls
`configure` once from the flag); so logs, pipes, CI and the demo's captured subprocesses stay clean.
Two shapes cover the commands: `bar` over counted work (units assigned, rows scored, training steps)
and `Stages` for a command made of a few long steps (publish: export, blender, register, check).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

_disabled_by_flag = False


def configure(*, enabled: bool) -> None:
    """`recsys --no-progress` (before or after the command) -> configure(enabled=False)."""
    global _disabled_by_flag
    _disabled_by_flag = not enabled


def enabled() -> bool:
    """Bars on: stderr is a terminal and progress was not switched off."""
    if _disabled_by_flag:
        return False
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def bar(iterable: Iterable[Any] | None = None, *, desc: str, total: int | None = None, unit: str = "it",
        unit_scale: bool = False) -> Any:
    """A tqdm bar (a silent pass-through when disabled); use as an iterable or call update(n)."""
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, unit_scale=unit_scale, file=sys.stderr,
                disable=not enabled(), dynamic_ncols=True, mininterval=0.5, leave=False)


class Stages:
    """A bar of named stages: `next(name)` closes the previous stage and starts `name`.

        stages = Stages("publish", 4)
        stages.next("export ONNX towers")  ...  stages.next("register")  ...  stages.close()
    """

    def __init__(self, desc: str, total: int) -> None:
        from tqdm import tqdm

        self.started = False
        self._bar = tqdm(total=total, desc=desc, file=sys.stderr, disable=not enabled(), leave=False,
                         bar_format="{desc}: {n_fmt}/{total_fmt} stages |{bar:20}| {postfix} [{elapsed}]")

    def next(self, name: str) -> None:
        if self.started:
            self._bar.update(1)
        self.started = True
        self._bar.set_postfix_str(name)

    def close(self) -> None:
        if self.started:
            self._bar.update(1)
            self.started = False
        self._bar.close()

    def __enter__(self) -> Stages:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
