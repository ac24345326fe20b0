"""The `recsys` command line end to end: generate -> prepare in every input form, errors, --help."""

from __future__ import annotations

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
