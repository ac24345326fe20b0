"""A saved config reproduces its run: the flags a command ran with are saved beside what it wrote
(recsys.cli_config.flags_of), and `--config THAT_FILE` gives the same settings back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from recsys.cli import build_parser, main
from recsys.cli_config import apply_config_file, flags_of


def _parsed(argv: list[str]) -> Any:
    parser = build_parser()
    apply_config_file(parser, argv)
    return parser.parse_args(argv)


def _settings(args: Any) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k not in ("config", "_run", "_parser", "out")}


def test_saved_matcher_config_reruns_the_same_training(prepared_dir: Path, tiny_bert: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch")
    first = tmp_path / "first"
    argv = ["train", "matcher", "--data", str(prepared_dir), "--out", str(first), "--base-model", str(tiny_bert),
            "--epochs", "1", "--max-steps", "3", "--batch-size", "64", "--temperature", "0.07", "--logq",
            "--hard-negatives", "2", "--no-zero-shot", "--threads", "1", "--lr", "1e-4", "--seed", "5"]
    assert main(argv) == 0, capsys.readouterr().err
    saved = json.loads((first / "matcher_config.json").read_text())
    assert saved["command"] == "train matcher" and saved["flags"]["temperature"] == 0.07 and saved["flags"]["logq"]
    assert "out" not in saved["flags"] and saved["dim"] > 0  # the model's own settings stay for loading

    again = tmp_path / "again"
    rerun = ["train", "matcher", "--config", str(first / "matcher_config.json"), "--out", str(again)]
    assert _settings(_parsed(rerun)) == _settings(_parsed(argv))
    assert main(rerun) == 0, capsys.readouterr().err
    one, two = (json.loads((d / "training_report.json").read_text())["config"] for d in (first, again))
    assert one.pop("out") != two.pop("out") and one == two
    assert (first / "user_tower.safetensors").read_bytes() == (again / "user_tower.safetensors").read_bytes()
    assert json.loads((again / "matcher_config.json").read_text()) == saved  # the rerun saves the same flags


def test_retrain_flags_round_trip_through_the_saved_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["retrain", "--registry", "reg", "--data", "d", "--events", "a.parquet", "--events", "b.parquet",
            "--exposures", "x", "--out", "w", "--epochs", "2", "--no-guard", "--skip-data-check", "volume",
            "--tolerance", "0.01", "--no-plots"]
    args = _parsed(argv)
    report = tmp_path / "retrain_report.json"  # what retrain writes, reduced to the part --config reads
    report.write_text(json.dumps({"candidate": "v0002", "command": "retrain", "flags": flags_of(args)}))
    back = _parsed(["retrain", "--config", str(report), "--out", "w2"])
    expected = _settings(args)
    for key in ("registry", "data", "events", "exposures"):  # saved absolute: reruns from any directory
        expected[key] = [p.absolute() for p in expected[key]] if isinstance(expected[key], list) else expected[key].absolute()
    assert _settings(back) == expected and back.out == Path("w2")
    # The file of another command is refused, naming both.
    assert main(["train", "matcher", "--config", str(report), "--out", str(tmp_path / "m")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "holds the flags of `recsys retrain`, not of `recsys train matcher`" in err


def test_saved_evaluate_flags_rerun_the_same_evaluation(prepared_dir: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Typed flags (`--ks 5,20`, `--matcher NAME=DIR`) are saved as the text that parses back to them."""
    argv = ["evaluate", "--data", str(prepared_dir), "--out", str(tmp_path / "first"), "--systems", "popularity",
            "--no-blend", "--ks", "5,20", "--k", "5", "--n-boot", "20", "--scores-top", "0", "--seed", "3"]
    assert main(argv) == 0, capsys.readouterr().err
    saved = json.loads((tmp_path / "first" / "evaluation.json").read_text())
    assert saved["command"] == "evaluate" and saved["flags"]["ks"] == "5,20" and saved["flags"]["no-blend"] is True
    rerun = ["evaluate", "--config", str(tmp_path / "first" / "evaluation.json"), "--out", str(tmp_path / "again")]
    assert _settings(_parsed(rerun)) == _settings(_parsed(argv))
    assert main(rerun) == 0, capsys.readouterr().err
    again = json.loads((tmp_path / "again" / "evaluation.json").read_text())
    assert again["flags"] == saved["flags"]
    strip = ("flags", "timings_s")
    assert {k: v for k, v in again.items() if k not in strip} == {k: v for k, v in saved.items() if k not in strip}
    with_matcher = _parsed(["evaluate", "--data", "d", "--matcher", "ft=reg/v1", "--out", "o"])
    assert flags_of(with_matcher)["matcher"] == [f"ft={Path('reg/v1').absolute()}"]
