"""The `recsys` command line: one entry point, subcommands import their heavy code lazily.

Each subcommand lives in a light module exposing `configure(parser)` and `run(args) -> int` (or, for
"module:name", `configure_name` and `run_name`); the module must not import torch, onnxruntime or
lightgbm at import time, so `--help` works anywhere.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
import textwrap
from collections.abc import Sequence

from recsys import __version__
from recsys.cli_config import CONFIGURABLE, add_config_flag, apply_config_file
from recsys.errors import RecsysError

# (command path, module with configure/run, one-line help)
_COMMANDS: list[tuple[tuple[str, ...], str, str]] = [
    (("prepare",), "recsys.data.prepare_cli", "validate logs and items, split by time, write training pairs"),
    (("generate",), "recsys.data.synthetic_cli", "write a synthetic behaviour log with planted preferences"),
    (("train", "matcher"), "training.matcher.cli", "fine-tune the text matching model (needs torch)"),
    (("train", "sasrec"), "training.sasrec_cli", "train the SASRec sequential baseline for recsys evaluate --sasrec (needs torch)"),
    (("train", "ranker"), "training.ranker_cli", "train the LightGBM LambdaMART blender over ranking features"),
    (("publish",), "training.publish_cli", "publish a matcher with its LightGBM blender as one registry version"),
    (("export",), "training.export_cli", "export a matcher checkpoint to ONNX and register a model version"),
    (("evaluate",), "recsys.evaluation.evaluate_cli", "compare baselines, text matchers and the blend on a time split"),
    (("models", "list"), "recsys.registry_cli:list", "list registered model versions"),
    (("models", "promote"), "recsys.registry_cli:promote", "make a model version current"),
    (("models", "rollback"), "recsys.registry_cli:rollback", "return to the previous current model version"),
    (("models", "gc"), "recsys.registry_cli:gc", "remove old model versions (never the current one or rollback targets)"),
    (("serve",), "recsys.serving.serve_cli", "serve Rank/Recommend over gRPC with hot reload and an exposure log"),
    (("state", "export"), "recsys.state.cli:export", "write the event log (journal or Redis stream) as an events table"),
    (("score",), "recsys.batch.score_cli", "score pairs, candidate lists or every user's top K offline (local or Ray)"),
    (("experiment", "validate"), "recsys.experiments.cli:validate", "check an experiment config and summarise its traffic"),
    (("experiment", "assign"), "recsys.experiments.cli:assign", "preview experiment assignment for a list of units"),
    (("experiment", "schema"), "recsys.experiments.cli:schema", "print the config's JSON Schema (docs/experiments.schema.json)"),
    (("experiment", "analyze"), "recsys.experiments.cli:analyze", "analyse an experiment: exposures + events -> lifts, CIs, SRM"),
    (("retrain",), "training.retrain_cli", "retrain on new events + exposure logs, compare with the current version, promote if not worse"),
    (("demo",), "recsys.demo", "run the whole pipeline on generated data"),
]


EPILOG = """environment:
  RECSYS_LOG_LEVEL  log level when -v is not given: DEBUG, INFO, WARNING, ERROR (default INFO)
  RECSYS_TRT_CACHE  TensorRT engine cache folder for --provider tensorrt (default ~/.cache/recsys/trt)

Run `recsys COMMAND --help` for a command's flags. Exit codes: 0 ok, 2 bad input, 3 a check failed."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recsys", description="Text-based recommender ranking engine.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"recsys {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (before or after the command)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (they show only when stderr is a terminal; before or after the command)")
    # Every command also accepts these; SUPPRESS keeps a command without them from resetting the top-level value.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    common.add_argument("--no-progress", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bars (shown only when stderr is a terminal)")
    top = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for path, module_name, help_text in _COMMANDS:
        module_path, _, suffix = module_name.partition(":")
        module = importlib.import_module(module_path)
        configure = getattr(module, f"configure_{suffix}" if suffix else "configure")
        run = getattr(module, f"run_{suffix}" if suffix else "run")
        if len(path) == 1:
            sub = top.add_parser(path[0], help=help_text, description=help_text, parents=[common])
        else:
            if path[0] not in groups:
                group_parser = top.add_parser(path[0], help=f"{path[0]} subcommands", parents=[common])
                group_parser.set_defaults(_parser=group_parser)  # `recsys models` alone prints this help
                groups[path[0]] = group_parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
            sub = groups[path[0]].add_parser(path[1], help=help_text, description=help_text, parents=[common])
        configure(sub)
        if path in CONFIGURABLE:
            add_config_flag(sub)
        sub.set_defaults(_run=run, _parser=sub)
    return parser


_PYTHON_OPTION = re.compile(r"\b([a-z][a-z0-9]*(?:_[a-z0-9]+)+)(?:=(?:'([^']*)'|\"([^\"]*)\"|([^\s,;)]+)))?")


def user_message(message: str, parser: argparse.ArgumentParser | None) -> str:
    """Speak in the flags the user typed: `valid_frac` -> `--valid-frac`, `on_invalid='drop'` ->
    `--on-invalid drop`, for the options of the command that ran; then wrap without splitting a flag."""
    flags = {a.dest: a.option_strings[-1] for a in (parser._actions if parser else []) if a.option_strings}

    def to_flag(m: re.Match[str]) -> str:
        flag = flags.get(m.group(1))
        if flag is None:
            return m.group(0)
        value = next((v for v in m.group(2, 3, 4) if v is not None), None)
        return flag if value is None else f"{flag} {value}"

    text = _PYTHON_OPTION.sub(to_flag, message)
    return "\n".join(textwrap.wrap(text, width=100, break_on_hyphens=False, break_long_words=False))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        apply_config_file(parser, argv)
    except RecsysError as exc:
        print(f"error: {user_message(str(exc), None)}", file=sys.stderr)
        return exc.exit_code
    args = parser.parse_args(argv)
    default_level = os.environ.get("RECSYS_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else getattr(logging, default_level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from recsys import progress

    progress.configure(enabled=not args.no_progress)
    run = getattr(args, "_run", None)
    command_parser: argparse.ArgumentParser | None = getattr(args, "_parser", None)
    if run is None:
        (command_parser or parser).print_help(sys.stderr)
        return 2
    try:
        return int(run(args) or 0)
    except RecsysError as exc:
        message = user_message(str(exc), command_parser) or type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
