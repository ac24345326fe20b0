"""The `recsys` command line end to end: generate -> prepare in every input form, errors, --help."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from recsys.cli import main
from recsys.data.synthetic import generate

BLOCK_TORCH = (
    "import sys\n"
    "class _Block:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name.split('.')[0] in ('torch', 'transformers', 'onnxruntime', 'lightgbm'):\n"
    "            raise ImportError(f'blocked {name}')\n"
    "sys.meta_path.insert(0, _Block())\n"
    "from recsys.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def _recsys(*args: str, block_heavy: bool = False) -> subprocess.CompletedProcess[str]:
    code = BLOCK_TORCH if block_heavy else "import sys; from recsys.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=False)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_generate_then_prepare_every_file_format(tmp_path: Path, fmt: str) -> None:
    raw = tmp_path / "raw"
    assert main(["generate", "--out", str(raw), "--events", "6000", "--users", "80", "--items", "60", "--file-format", fmt]) == 0
    out = tmp_path / "prepared"
    code = main([
        "prepare", "--events", str(raw / f"events.{fmt}"), "--items", str(raw / f"items.{fmt}"),
        "--users", str(raw / f"users.{fmt}"), "--out", str(out), "--max-history", "5",
    ])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    log = generate(n_events=6000, n_users=80, n_items=60)
    assert manifest["rows"]["events"] == log.events.height
    assert manifest["rows"]["items"] == 60
    assert manifest["validation"]["dropped"] == {}
    assert pl.read_parquet(out / "pairs.parquet")["hist_item_idx"].dtype == pl.Array(pl.Int32, 5)


def _write_mind(log, out: Path) -> Path:
    """A MIND-layout sample (behaviors.tsv + news.tsv) from a synthetic log's slates and clicks."""
    out.mkdir(parents=True)
    events = log.events
    shown = events.filter(pl.col("event_type") == "impression")
    clicked = events.filter(pl.col("event_type") == "click").select("request_id", "item_id", pl.lit(1).alias("label"))
    slates = (
        shown.join(clicked, on=["request_id", "item_id"], how="left")
        .with_columns(pl.format("{}-{}", "item_id", pl.col("label").fill_null(0)).alias("cell"))
        .sort("position")
        .group_by("request_id", maintain_order=True)
        .agg(pl.col("user_id").first(), pl.col("timestamp").min(), pl.col("cell").str.join(" "))
        .sort("timestamp")
    )
    lines = [
        f"{row['request_id']}\t{row['user_id']}\t{row['timestamp'].strftime('%m/%d/%Y %I:%M:%S %p')}\t\t{row['cell']}"
        for row in slates.iter_rows(named=True)
    ]
    (out / "behaviors.tsv").write_text("\n".join(lines) + "\n")
    news = [
        f"{r['item_id']}\t{r['category']}\t{r['tags'].split('|')[1]}\t{r['title']}\t{r['description']}\thttps://x/{r['item_id']}\t[]\t[]"
        for r in log.items.iter_rows(named=True)
    ]
    (out / "news.tsv").write_text("\n".join(news) + "\n")
    return out


def test_prepare_mind_sample(tmp_path: Path) -> None:
    log = generate(n_events=8000, n_users=100, n_items=80, seed=2)
    mind = _write_mind(log, tmp_path / "MINDsample")
    out = tmp_path / "prepared"
    assert main(["prepare", "--format", "auto", "--input", str(mind), "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    n_impressions = log.events.filter(pl.col("event_type") == "impression").height
    n_clicks = log.events.filter(pl.col("event_type") == "click").height
    assert manifest["rows"]["events"] == n_impressions + n_clicks
    assert manifest["rows"]["interactions"] == n_clicks
    # Impressions become hard negatives for nearly every click (slates of 10 with ~1-2 clicks).
    assert manifest["rows"]["pairs_with_hard_negatives"] > 0.9 * n_clicks
    items = pl.read_parquet(out / "items.parquet")
    assert items.height == 80 and items["text"].str.len_chars().min() > 10


def test_bad_input_exits_2_with_one_paragraph(tmp_path: Path) -> None:
    missing = _recsys("prepare", "--events", str(tmp_path / "nope.csv"), "--items", str(tmp_path / "i.csv"), "--out", str(tmp_path / "o"))
    assert missing.returncode == 2
    assert "Traceback" not in missing.stderr
    assert missing.stderr.startswith("error:") and "nope.csv" in missing.stderr
    (tmp_path / "items.csv").write_text("item_id,title\na,Alpha\n")
    (tmp_path / "events.csv").write_text("user_id,item_id,event_type,timestamp\nu1,a,click,not-a-time\n")
    bad_time = _recsys("prepare", "--events", str(tmp_path / "events.csv"), "--items", str(tmp_path / "items.csv"), "--out", str(tmp_path / "o"))
    assert bad_time.returncode == 2 and "Traceback" not in bad_time.stderr
    assert "timestamp" in bad_time.stderr and "not-a-time" in bad_time.stderr
    assert "--on-invalid drop" in bad_time.stderr and "on_invalid" not in bad_time.stderr  # the flag, not the kwarg
    assert not (tmp_path / "o").exists()
    no_input = _recsys("prepare", "--out", str(tmp_path / "o"))
    assert no_input.returncode == 2 and "--events" in no_input.stderr


def test_every_help_works_without_heavy_dependencies() -> None:
    from recsys.cli import _COMMANDS

    top = _recsys("--help", block_heavy=True)
    assert top.returncode == 0, top.stderr
    for path, _, _ in _COMMANDS:
        if path[0] == "train":
            continue  # training commands may need torch to describe themselves
        done = _recsys(*path, "--help", block_heavy=True)
        assert done.returncode == 0, (path, done.stderr)
        assert "usage: recsys" in done.stdout


def test_group_commands_alone_print_their_own_help(capsys: pytest.CaptureFixture[str]) -> None:
    for group, members in (("models", ("list", "promote", "rollback", "gc")), ("experiment", ("validate", "assign", "analyze"))):
        assert main([group]) == 2
        err = capsys.readouterr().err
        assert f"usage: recsys {group}" in err and all(m in err for m in members), err
        assert "prepare" not in err  # not the top-level help
    assert main([]) == 2 and "usage: recsys [-h]" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "verbose"), [
    (["-v", "models", "list", "--registry", "r"], True),
    (["models", "list", "--registry", "r", "-v"], True),
    (["generate", "--verbose", "--out", "o"], True),
    (["models", "-v", "list", "--registry", "r"], True),
    (["models", "list", "--registry", "r"], False),
])
def test_verbose_before_or_after_the_command(argv: list[str], verbose: bool) -> None:
    from recsys.cli import build_parser

    assert build_parser().parse_args(argv).verbose is verbose


def test_environment_variables_are_documented() -> None:
    top = _recsys("--help")
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name in ("RECSYS_LOG_LEVEL", "RECSYS_TRT_CACHE"):
        assert name in top.stdout and name in readme


def test_generate_and_evaluate_help_state_every_default() -> None:
    import argparse

    from recsys.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for action in commands["generate"]._actions:
        if not action.option_strings or action.dest in ("help", "verbose"):
            continue
        assert action.help, action.dest
        if action.default not in (None, False, argparse.SUPPRESS):
            assert f"({action.default})" in action.help, (action.dest, action.help)
    (scores_top,) = [a for a in commands["evaluate"]._actions if a.dest == "scores_top"]
    assert scores_top.default == 100 and "(100" in str(scores_top.help)


def test_messages_name_flags_and_wrapping_keeps_them_whole() -> None:
    from recsys.cli import build_parser, user_message

    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    prepare = commands["prepare"]
    padding = "x" * 93  # puts the flag across the 100-column wrap point
    text = user_message(f"{padding} bad rows. Or pass on_invalid='drop' to drop them; valid_frac + test_frac must be < 1", prepare)
    assert "--on-invalid drop" in text and "--valid-frac + --test-frac must be < 1" in text
    assert all(not line.endswith("-") for line in text.splitlines())
    assert "on_invalid" not in text and "--on-\n" not in text
    assert user_message("column user_id is missing", prepare) == "column user_id is missing"  # not a flag: kept
    assert user_message("on_invalid='drop'", None) == "on_invalid='drop'"


def test_prepare_config_errors_name_the_flags(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    assert main(["generate", "--out", str(raw), "--events", "500", "--users", "20", "--items", "20"]) == 0
    done = _recsys("prepare", "--events", str(raw / "events.parquet"), "--items", str(raw / "items.parquet"),
                   "--out", str(tmp_path / "o"), "--valid-frac", "0.6", "--test-frac", "0.5")
    assert done.returncode == 2 and "--valid-frac + --test-frac must be < 1" in done.stderr, done.stderr


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _with_stderr(stream: io.StringIO, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(sys, "stderr", stream)
    try:
        return main(argv)
    finally:
        from recsys import progress

        progress.configure(enabled=True)


@pytest.mark.parametrize("no_progress", [[], ["--no-progress"], ["NO_TTY"]])
def test_progress_shows_on_a_terminal_only_and_not_with_no_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_progress: list[str]
) -> None:
    config = tmp_path / "exp.yaml"
    config.write_text("schema: 1\nname: t\ndefault_ranker: a\nrankers:\n  a: {model: current}\nlayers: []\n")
    flags = [f for f in no_progress if f != "NO_TTY"]
    stream = io.StringIO() if "NO_TTY" in no_progress else _Terminal()
    assert _with_stderr(stream, ["experiment", "assign", str(config), "--count", "3000", *flags], monkeypatch) == 0
    stream2 = io.StringIO() if "NO_TTY" in no_progress else _Terminal()
    assert _with_stderr(stream2, [*flags, "generate", "--out", str(tmp_path / "g"), "--events", "300",
                                  "--users", "10", "--items", "10"], monkeypatch) == 0
    shown = not no_progress
    assert ("assign" in stream.getvalue() and "unit" in stream.getvalue()) is shown, stream.getvalue()
    assert ("generate: " in stream2.getvalue() and "stages" in stream2.getvalue()) is shown, stream2.getvalue()


def _parsed(argv: list[str]) -> dict[str, object]:
    from recsys.cli import build_parser
    from recsys.cli_config import apply_config_file

    parser = build_parser()
    apply_config_file(parser, argv)
    values = vars(parser.parse_args(argv))
    return {k: v for k, v in values.items() if k not in ("config", "_run", "_parser")}


def test_config_file_keys_are_flags_and_flags_override_it(tmp_path: Path) -> None:
    flags = ["--data", "d/prepared", "--out", "r", "--protocol", "tail", "--matcher", "ft=reg/v1", "--matcher",
             "zs=reg/v2", "--n-boot", "50", "--scores-top", "0", "--no-blend"]
    (tmp_path / "eval.yaml").write_text(
        "data: d/prepared\nout: r\nprotocol: tail\nmatcher: [ft=reg/v1, zs=reg/v2]\nn-boot: 50\nscores_top: 0\n"
        "no-blend: true\n"
    )
    from_file = _parsed(["evaluate", "--config", str(tmp_path / "eval.yaml")])
    assert from_file == _parsed(["evaluate", *flags])  # a required flag (--data) may come from the file
    overridden = _parsed(["evaluate", "--config", str(tmp_path / "eval.yaml"), "--n-boot", "7"])
    assert overridden["n_boot"] == 7 and overridden["protocol"] == "tail"
    (tmp_path / "retrain.json").write_text(json.dumps({"registry": "reg", "data": "d", "events": "e.parquet",
                                                       "out": "w", "epochs": 2}))
    retrain = _parsed(["retrain", "--config", str(tmp_path / "retrain.json")])
    assert retrain == _parsed(["retrain", "--registry", "reg", "--data", "d", "--events", "e.parquet", "--out", "w",
                               "--epochs", "2"])


@pytest.mark.parametrize(("text", "words"), [
    ("epochz: 3\n", ("unknown key 'epochz'", "without the dashes", "n-boot")),
    ("n-boot: many\n", ("key 'n-boot'", "invalid literal")),
    ("protocol: sideways\n", ("key 'protocol'", "not one of")),
    ("no-blend: yes please\n", ("key 'no-blend'", "true or false")),
    ("- just a list\n", ("must be a mapping",)),
])
def test_bad_config_files_exit_2_naming_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str,
                                                 words: tuple[str, ...]) -> None:
    (tmp_path / "c.yaml").write_text(text)
    assert main(["evaluate", "--config", str(tmp_path / "c.yaml"), "--data", "d", "--out", "o"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert all(w in err for w in words), err
    assert main(["evaluate", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
