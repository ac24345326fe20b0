"""`--config FILE` for the commands with many flags (train matcher, retrain, evaluate).

The file is a YAML or JSON mapping whose keys are the command's flags (`epochs: 5`, `base-model: ...`
or `base_model: ...`); its values become the command's defaults, so a flag typed on the command line
overrides the file and `--help` stays the one reference. Unknown keys and values a flag would refuse
are errors naming the file and the key.

The commands save the flags they ran with beside what they wrote (`flags_of`: `train matcher` into the
checkpoint's matcher_config.json, `retrain` into retrain_report.json, under `command` and `flags`), and
such a file is read as its `flags`: passing it back reproduces the run (`--out` is left out, so the
rerun names a new one).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from recsys.errors import InputError

CONFIGURABLE = {("train", "matcher"), ("retrain",), ("evaluate",)}
_NOT_IN_FILES = {"config", "help", "verbose", "no_progress"}


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help="YAML/JSON file whose keys are this command's flags (e.g. `epochs: 5`); "
                             "flags on the command line override it")


def apply_config_file(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """When argv runs a configurable command with --config FILE, make FILE's values its defaults."""
    found = _command(parser, list(argv))
    if found is None:
        return
    name, sub, rest = found
    path = _config_path(rest)
    if path is None:
        return
    # A key is a flag without its dashes (`no-bf16`, `no_bf16`) or the option's name as Python sees it.
    by_name: dict[str, tuple[argparse.Action, bool]] = {}
    for action in sub._actions:
        if action.option_strings and action.dest not in _NOT_IN_FILES:
            by_name.setdefault(action.dest, (action, False))
            for flag in action.option_strings:
                if flag.startswith("--"):
                    by_name[flag[2:].replace("-", "_")] = (action, True)
    defaults = {}
    for key, value in _read(path, name).items():
        match = by_name.get(str(key).lstrip("-").replace("-", "_"))
        if match is None:
            known = ", ".join(sorted({a.option_strings[-1][2:] for a, flag in by_name.values()}))
            raise InputError(f"--config {path}: unknown key {key!r}: the keys are the flags of `recsys {name}` "
                             f"without the dashes ({known})")
        action, by_flag = match
        defaults[action.dest] = _convert(action, value, f"--config {path}: key {key!r}", by_flag)
        action.required = False
    sub.set_defaults(**defaults)


def _command(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[str, argparse.ArgumentParser, list[str]] | None:
    path: list[str] = []
    current = parser
    for i, token in enumerate(argv):
        if token.startswith("-"):
            continue
        choices = next((a.choices for a in current._actions if isinstance(a, argparse._SubParsersAction)), None)
        if not choices or token not in choices:
            return None
        path.append(token)
        current = choices[token]
        if tuple(path) in CONFIGURABLE:
            return " ".join(path), current, argv[i + 1:]
    return None


def _config_path(argv: list[str]) -> Path | None:
    for i, token in enumerate(argv):
        if token == "--config":
            if i + 1 >= len(argv):
                return None  # argparse reports the missing value
            return Path(argv[i + 1])
        if token.startswith("--config="):
            return Path(token.split("=", 1)[1])
    return None


class Typed:
    """An argparse `type` whose parsed values can be written back as text that parses to them, so
    flags_of saves them (`--ks 5,10` -> (5, 10) -> "5,10"; `--matcher a=dir` -> ("a", Path) -> "a=dir")."""

    def __init__(self, parse: Callable[[str], Any], as_text: Callable[[Any], str]) -> None:
        self.parse, self.as_text = parse, as_text
        self.__name__ = getattr(parse, "__name__", "value")  # argparse names the type in its errors

    def __call__(self, text: str) -> Any:
        return self.parse(text)


def flags_of(args: argparse.Namespace, leave_out: tuple[str, ...] = ("out",)) -> dict[str, Any]:
    """The settings a command ran with, as a --config file gives them: {long flag without dashes: value}
    (paths absolute, so the file reproduces the run from any working directory; unset flags left out)."""
    parser: argparse.ArgumentParser = args._parser
    flags: dict[str, Any] = {}
    for action in parser._actions:
        if not action.option_strings or action.dest in _NOT_IN_FILES or action.dest in leave_out:
            continue
        value = getattr(args, action.dest, None)
        if value is None:
            continue
        if action.nargs == 0:  # a switch (store_true/store_false): whether it is on
            value = value == action.const
        elif isinstance(action.type, Typed):
            text = action.type.as_text
            value = [text(v) for v in value] if isinstance(action, argparse._AppendAction) else text(value)
        flags[action.option_strings[-1].lstrip("-")] = _plain(value)
    return flags


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value.absolute())
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _read(path: Path, command: str) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(f"--config {path} does not exist: pass a YAML or JSON file of flag values")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except (ValueError, Exception) as exc:  # yaml.YAMLError and json errors: the file, not a traceback
        raise InputError(f"--config {path} cannot be parsed ({exc}): write `flag: value` lines") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"--config {path} must be a mapping of flag: value, got {type(data).__name__}")
    if isinstance(data.get("flags"), dict):  # saved beside an artifact by the command that wrote it
        if data.get("command") != command:
            raise InputError(f"--config {path} holds the flags of `recsys {data.get('command')}`, not of "
                             f"`recsys {command}`: pass the file that command saved")
        return dict(data["flags"])
    return data


def _convert(action: argparse.Action, value: Any, where: str, by_flag: bool) -> Any:
    if action.nargs == 0:  # store_true / store_false: `flag: true` means the flag was given
        if not isinstance(value, bool):
            raise InputError(f"{where}: this flag takes true or false, got {value!r}")
        if not by_flag:
            return value
        return action.const if value else action.default
    if isinstance(action, argparse._AppendAction) or action.nargs in ("*", "+"):
        values = value if isinstance(value, list) else [value]
        return [_one(action, v, where) for v in values]
    return _one(action, value, where)


def _one(action: argparse.Action, value: Any, where: str) -> Any:
    if isinstance(value, dict | list) or value is None:
        raise InputError(f"{where}: expected a single value, got {value!r}")
    convert = action.type if callable(action.type) else None
    try:
        out = convert(str(value)) if convert is not None else (value if isinstance(value, str) else str(value))
    except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
        raise InputError(f"{where}: {exc}") from exc
    if action.choices is not None and out not in action.choices:
        raise InputError(f"{where}: {out!r} is not one of {', '.join(map(str, action.choices))}")
    return out
