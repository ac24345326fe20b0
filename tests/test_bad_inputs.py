"""Bad-input corpus: one parametrised table per command. A row is an input (files written into a fresh
case directory, and the command line), the expected exit code, words the message must contain, and
the paths the command may write; every other file of the case directory must be unchanged afterwards
(its tree is hashed before and after). Add a row for every bug found later.

Exit codes (README): 0 ok, 2 bad input or config (nothing written), 3 ran but the result failed a check.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pytest

from recsys.cli import main

T0 = 1_767_225_600  # 2026-01-01T00:00:00Z


@dataclass(frozen=True)
class Case:
    id: str
    argv: list[str]  # "{d}" is the case directory
    code: int
    words: tuple[str, ...]
    files: Callable[[Path], None] = lambda d: None
    writes: tuple[str, ...] = ()  # paths (relative to the case dir) the command may create or change
    cwd: bool = False  # run inside the case directory
    extra: dict[str, str] = field(default_factory=dict)


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_case(case: Case, root: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> str:
    case.files(root)
    before = tree(root)
    if case.cwd:
        monkeypatch.chdir(root)
    code = main([a.replace("{d}", str(root)) for a in case.argv])
    captured = capsys.readouterr()
    text = " ".join((captured.out + " " + captured.err).split())
    assert code == case.code, text
    for word in case.words:
        assert word in text, text
    assert "Traceback" not in text
    after = tree(root)
    allowed = tuple(case.writes)
    changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
    assert {p for p in changed if not p.startswith(allowed) or not allowed} == set(), changed
    assert not [p for p in after if p.endswith(".lock")], "a lock file was left behind"
    return text


# ------------------------------------------------------------------------------------------ data


def generic(d: Path, *, timestamps: list[int] | None = None, values: list[object] | None = None,
            types: list[str] | None = None, sub: str = "") -> None:
    """6 users x 8 items, 96 events over 24 days: events.csv + items.csv (in d/sub)."""
    where = d / sub
    where.mkdir(parents=True, exist_ok=True)
    n = 96
    ts = timestamps or [T0 + i * 6 * 3600 for i in range(n)]
    frame = pl.DataFrame({
        "user_id": [f"u{i % 6}" for i in range(n)], "item_id": [f"i{(i * 5) % 8}" for i in range(n)],
        "event_type": types or ["click"] * n, "timestamp": ts,
        "value": [str(v) for v in values] if values else [""] * n,
    })
    frame.write_csv(where / "events.csv")
    pl.DataFrame({"item_id": [f"i{j}" for j in range(8)], "title": [f"Item {j}" for j in range(8)]}).write_csv(
        where / "items.csv")


def movielens(d: Path, tags: str | None = None) -> None:
    ml = d / "ml"
    ml.mkdir()
    rows = ["userId,movieId,rating,timestamp"] + [f"{u},{m},4.0,{T0 + 3600 * (u * 10 + m)}" for u in range(5) for m in range(8)]
    (ml / "ratings.csv").write_text("\n".join(rows) + "\n")
    (ml / "movies.csv").write_text("movieId,title,genres\n" + "".join(f"{m},Movie {m} (2000),Drama|Comedy\n" for m in range(8)))
    if tags is not None:
        (ml / "tags.csv").write_text(tags)


def recbole_latin1(d: Path) -> None:
    rb = d / "rb"
    rb.mkdir()
    inter = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    inter += [f"u{u}\ti{m}\t4\t{T0 + 3600 * (u * 10 + m)}" for u in range(5) for m in range(6)]
    (rb / "x.inter").write_text("\n".join(inter) + "\n")
    (rb / "x.item").write_bytes(b"item_id:token\ttitle:token_seq\n" + "".join(
        f"i{m}\tCaf\xe9 {m}\n" for m in range(6)).encode("latin-1"))


def prepared_before(d: Path) -> None:
    generic(d)
    assert main(["prepare", "--events", str(d / "events.csv"), "--items", str(d / "items.csv"), "--out", str(d / "out")]) == 0


def other_dir(d: Path) -> None:
    generic(d)
    (d / "out").mkdir()
    (d / "out" / "notes.txt").write_text("keep me")


def out_file(d: Path) -> None:
    generic(d)
    (d / "out").write_text("keep me")


GEN = ["prepare", "--events", "{d}/events.csv", "--items", "{d}/items.csv"]
MIXED = [T0 + i * 6 * 3600 for i in range(80)] + [(T0 + i * 3600) * 1000 for i in range(16)]

PREPARE = [
    Case("out_is_another_directory", [*GEN, "--out", "{d}/out"], 2, ("refusing to replace", "--overwrite"), other_dir),
    Case("out_is_a_file", [*GEN, "--out", "{d}/out"], 2, ("is a file", "--overwrite"), out_file),
    Case("out_is_the_input_dir", ["prepare", "--format", "movielens", "--input", "{d}/ml", "--out", "{d}/ml"], 2,
         ("is the input", "would delete the input"), movielens),
    Case("out_holds_the_input_even_with_overwrite",
         ["prepare", "--events", "{d}/in/events.csv", "--items", "{d}/in/items.csv", "--out", "{d}/in", "--overwrite"],
         2, ("contains the input",), lambda d: generic(d, sub="in")),
    Case("out_dot", [*GEN, "--out", "."], 2, ("contains the input",), generic, cwd=True),
    Case("out_under_a_file", [*GEN, "--out", "{d}/events.csv/sub"], 2, ("is a file, not a directory",), generic),
    Case("out_in_proc", [*GEN, "--out", "/proc/x"], 2, ("/proc",), generic),
    Case("valid_start_not_a_time", [*GEN, "--out", "{d}/out", "--valid-start", "yesterday", "--test-start", "today"],
         2, ("--valid-start 'yesterday' is not an ISO-8601 time",), generic),
    Case("cutoffs_after_the_last_event",
         [*GEN, "--out", "{d}/out", "--valid-start", "2030-01-01", "--test-start", "2030-02-01"], 2,
         ("0 positive events in the validation window", "pick boundaries inside the data"), generic),
    Case("generic_files_with_format",
         ["prepare", "--format", "movielens", "--input", "{d}/ml", "--events", "{d}/events.csv", "--out", "{d}/out"], 2,
         ("--events cannot be combined with --format movielens",),
         lambda d: (generic(d), movielens(d))),
    Case("mixed_seconds_and_milliseconds", [*GEN, "--out", "{d}/out"], 2,
         ("16 unix timestamps in another unit", "data rows 81"), lambda d: generic(d, timestamps=MIXED)),
    Case("mixed_units_dropped_and_counted", [*GEN, "--out", "{d}/out", "--on-invalid", "drop"], 0,
         ("dropped 16 unix timestamps in another unit",), lambda d: generic(d, timestamps=MIXED), ("out/",)),
    Case("rating_far_out_of_range", [*GEN, "--out", "{d}/out"], 2, ("ratings outside [-100, 100]", "data rows 5 ("),
         lambda d: generic(d, types=["rating"] * 96, values=[4] * 4 + [1e9] + [3] * 91)),
    Case("non_numeric_value_dropped", [*GEN, "--out", "{d}/out", "--on-invalid", "drop"], 0,
         ("dropped 1 values that are not numbers [unparseable_value]",),
         lambda d: generic(d, values=["x"] + [1.0] * 95), ("out/",)),
    Case("ml_latest_malformed_tags",
         ["prepare", "--format", "movielens", "--input", "{d}/ml", "--out", "{d}/out"], 2,
         ("Could not read the MovieLens tags file",),
         lambda d: movielens(d, 'userId,movieId,tag,timestamp\n1,2,"unclosed,3\n1,2,x,4,5,6\n')),
    Case("recbole_item_not_utf8", ["prepare", "--format", "recbole", "--input", "{d}/rb", "--out", "{d}/out"], 2,
         ("x.item' is not UTF-8",), recbole_latin1),
    Case("replaces_a_previous_prepared_dataset", [*GEN, "--out", "{d}/out"], 0, ("prepared",), prepared_before,
         ("out/",)),
    Case("overwrite_replaces_another_directory", [*GEN, "--out", "{d}/out", "--overwrite"], 0, ("prepared",),
         other_dir, ("out/",)),
]


@pytest.mark.parametrize("case", PREPARE, ids=[c.id for c in PREPARE])
def test_prepare(case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    run_case(case, tmp_path, capsys, monkeypatch)


def test_prepare_refuses_a_locked_output_naming_the_holder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from recsys.files import file_lock, lock_path_for

    prepared_before(tmp_path)
    before = tree(tmp_path / "out")
    with file_lock(lock_path_for(tmp_path / "out"), what="test holder", command="the other prepare"):
        assert main([*[a.replace("{d}", str(tmp_path)) for a in GEN], "--out", str(tmp_path / "out")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "is locked by another run" in err and f'"pid": {os.getpid()}' in err and "the other prepare" in err
    assert tree(tmp_path / "out") == before


def test_prepare_cleans_what_a_killed_run_left(tmp_path: Path) -> None:
    """A stale temp dataset is removed, never read; a previous dataset parked in .out.old comes back."""
    from recsys.data.prepared import PreparedData

    prepared_before(tmp_path)
    stale = tmp_path / ".out.tmp-99999"
    stale.mkdir()
    (stale / "events.parquet").write_bytes(b"PAR1 truncated")
    os.rename(tmp_path / "out", tmp_path / ".out.old")  # killed between the two renames
    assert main([*[a.replace("{d}", str(tmp_path)) for a in GEN], "--out", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.csv", "items.csv", "out"]
    assert PreparedData.load(tmp_path / "out").manifest["rows"]["events"] == 96


# ------------------------------------------------------------------------------------------ experiments


def ab_config(w1: object = 1, w2: object = 1, *, model: str = "current", dup: bool = False) -> str:
    text = (
        "rankers:\n  control: {model: current}\n  new: {model: " + model + "}\n"
        "default_ranker: control\n" + ("default_ranker: new\n" if dup else "") +
        "layers:\n  - name: ranking\n    salt: layer-ab\n    experiments:\n      - name: ab\n        salt: salt-ab\n"
        f"        variants:\n          - {{name: control, ranker: control, weight: {w1}}}\n"
        f"          - {{name: treatment, ranker: new, weight: {w2}}}\n"
    )
    return text


def write(path: str, text: str) -> Callable[[Path], None]:
    def files(d: Path) -> None:
        (d / path).parent.mkdir(parents=True, exist_ok=True)
        (d / path).write_text(text)
    return files


def tiny_registry(d: Path) -> None:
    root = d / "reg" / "versions" / "v0001"
    root.mkdir(parents=True)
    (root / "manifest.json").write_text(json.dumps({"files": {}, "models": {"item": {}}, "metrics": {}}))
    (d / "reg" / "current.json").write_text(json.dumps({"version": "v0001", "history": []}))


def analysis_inputs(d: Path, *, srm: bool = False, unmatched: bool = False, version: str | None = None) -> None:
    from recsys.experiments.config import parse_config
    from recsys.experiments.simulate import simulate_clicks, simulate_exposures

    text = ab_config(model="v2")
    (d / "ab.yaml").write_text(text)
    config = parse_config(text)
    log = simulate_exposures(config, n_users=600, requests_per_user=2, list_size=4, seed=1)
    clicks = simulate_clicks(log, {"*": 0.2}, seed=2)
    if srm:  # a third of the treatment users' exposures were lost
        lost = log.filter(pl.col("variant").str.contains("treatment") & (pl.col("user_id").str.slice(-1).is_in(["0", "3", "6"])))
        log = log.join(lost, on=log.columns, how="anti")
    if unmatched:
        clicks = clicks.with_columns(pl.lit("x").add(pl.col("user_id")).alias("user_id"),
                                     pl.lit(None, pl.Utf8).alias("request_id"))
    if version is not None:
        log = log.with_columns(pl.col("variant").str.replace(r"@.*$", "@" + version))
    (d / "exp").mkdir()
    log.write_parquet(d / "exp" / "part-1.parquet")
    clicks.write_parquet(d / "events.parquet")


ANALYZE = ["experiment", "analyze", "--config", "{d}/ab.yaml", "--exposures", "{d}/exp", "--events",
           "{d}/events.parquet", "--out", "{d}/report"]

EXPERIMENT = [
    Case("weights_overflow", ["experiment", "validate", "{d}/c.yaml"], 2, ("the weights sum to inf (overflow)",),
         write("c.yaml", ab_config("1.0e+308", "1.0e+308"))),
    Case("assign_with_overflowing_weights", ["experiment", "assign", "{d}/c.yaml", "--count", "5"], 2, ("overflow",),
         write("c.yaml", ab_config("1.0e+308", "1.0e+308"))),
    Case("variant_with_zero_buckets", ["experiment", "validate", "{d}/c.yaml"], 2,
         ("variants[1].weight", "0 of the 10000 assignment buckets"), write("c.yaml", ab_config(1, "0.000001"))),
    Case("duplicate_yaml_key", ["experiment", "validate", "{d}/c.yaml"], 2,
         ("duplicate key 'default_ranker' (first at line 4)", "line 5"), write("c.yaml", ab_config(dup=True))),
    Case("model_not_in_registry", ["experiment", "validate", "{d}/c.yaml", "--registry", "{d}/reg"], 2,
         ("rankers.new.model: 'v0007' is not a version in the registry", "registered: v0001"),
         lambda d: (write("c.yaml", ab_config(model="v0007"))(d), tiny_registry(d))),
    Case("models_checked_against_registry", ["experiment", "validate", "{d}/c.yaml", "--registry", "{d}/reg"], 0,
         ("rankers.new: v0001 -> v0001 (registered)", "rankers.control: current -> v0001"),
         lambda d: (write("c.yaml", ab_config(model="v0001"))(d), tiny_registry(d))),
    Case("analyze_events_match_no_exposure", ANALYZE, 2, ("none of the", "click/conversion events matches"),
         lambda d: analysis_inputs(d, unmatched=True)),
    Case("analyze_other_config_version", ANALYZE, 0, ("were served under config version(s) 0123abcd",),
         lambda d: analysis_inputs(d, version="0123abcd"), ("report/",)),
    Case("analyze_sample_ratio_mismatch", ANALYZE, 3, ("sample-ratio mismatch in ab", "exit code 3"),
         lambda d: analysis_inputs(d, srm=True), ("report/",)),
]


@pytest.mark.parametrize("case", EXPERIMENT, ids=[c.id for c in EXPERIMENT])
def test_experiment(case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    run_case(case, tmp_path, capsys, monkeypatch)


# ------------------------------------------------------------------------------------------ models


def registry_with(d: Path, n: int = 4, corrupt: str | None = None, current: str = "v0003",
                  history: tuple[str, ...] = ("v0001",)) -> None:
    for i in range(1, n + 1):
        root = d / "reg" / "versions" / f"v{i:04d}"
        root.mkdir(parents=True)
        (root / "weights.bin").write_bytes(bytes([i]) * 1000)
        digest = hashlib.sha256((root / "weights.bin").read_bytes()).hexdigest()
        (root / "manifest.json").write_text(json.dumps({
            "version": root.name, "files": {"weights.bin": {"sha256": digest, "bytes": 1000}},
            "models": {"item": {"fp32": "item.onnx"}}, "metrics": {}}))
    if corrupt:
        (d / "reg" / "versions" / corrupt / "weights.bin").write_bytes(b"\0" * 1000)
    (d / "reg" / "current.json").write_text(json.dumps({"version": current, "history": list(history)}))


MODELS = [
    Case("list_verify_with_a_corrupt_version", ["models", "list", "--registry", "{d}/reg", "--verify"], 3,
         ("CORRUPT", "v0002", "exit code 3"), lambda d: registry_with(d, corrupt="v0002")),
    Case("list_verify_clean", ["models", "list", "--registry", "{d}/reg", "--verify"], 0, ("[ok]",), registry_with),
    Case("gc_keeps_current_and_rollback_targets", ["models", "gc", "--registry", "{d}/reg", "--keep", "0"], 0,
         ("removed 2 version(s): v0002, v0004", "current and rollback targets: v0001, v0003"), registry_with,
         ("reg/versions/v0002/", "reg/versions/v0004/")),
    Case("gc_dry_run_changes_nothing", ["models", "gc", "--registry", "{d}/reg", "--keep", "1", "--dry-run"], 0,
         ("would remove 1 version(s): v0002",), registry_with),
    Case("gc_negative_keep", ["models", "gc", "--registry", "{d}/reg", "--keep", "-1"], 2, ("--keep must be >= 0",),
         registry_with),
    Case("promote_unknown_version", ["models", "promote", "v0009", "--registry", "{d}/reg"], 2,
         ("'v0009' is not in the registry",), registry_with),
    Case("promote_a_path_not_a_version_name", ["models", "promote", "../versions/v0001", "--registry", "{d}/reg"], 2,
         ("is not a model version name", "never paths"), registry_with),
    Case("promote_a_version_that_cannot_load", ["models", "promote", "v0002", "--registry", "{d}/reg"], 2,
         ("model version v0002 refused by the load-and-score check", "tokenizer"), registry_with),
]


@pytest.mark.parametrize("case", MODELS, ids=[c.id for c in MODELS])
def test_models(case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    run_case(case, tmp_path, capsys, monkeypatch)


def test_gc_leaves_tombstones_so_version_numbers_are_never_reused(tmp_path: Path) -> None:
    from recsys.registry import Registry

    registry_with(tmp_path)
    reg = Registry(tmp_path / "reg")
    stale = reg.root / ".staging" / "999999999-dead"  # a publish that was killed (its pid is gone)
    stale.mkdir(parents=True)
    done = reg.gc(0)
    assert done["removed"] == ["v0002", "v0004"] and done["stale_staging"] == ["999999999-dead"] and not stale.exists()
    assert reg.versions() == ["v0001", "v0003"] and reg.current() == "v0003" and reg.history() == ["v0001"]
    assert (reg.versions_dir / "v0004" / "retired.json").is_file()
    staging = reg.staging_dir()
    (staging / "a.bin").write_bytes(b"x")
    assert reg.register(staging, {}, ["a.bin"]) == "v0005"
    assert reg.rollback() == "v0001"  # the rollback target survived gc


# ------------------------------------------------------------------------------------------ score


SCORE = [
    Case("no_registry", ["score", "--out", "{d}/out", "--top-k", "5"], 2, ("pass --registry",)),
    Case("out_under_a_file", ["score", "--registry", "{d}/reg", "--out", "{d}/f/sub", "--top-k", "5"], 2,
         ("creating the lock file", "f is a file, not a directory"), write("f", "x")),
    Case("missing_registry", ["score", "--registry", "{d}/none", "--out", "{d}/out", "--top-k", "5"], 2,
         ("does not exist",), writes=("out/",)),
]
if importlib.util.find_spec("ray") is None:  # issue 18: a missing Ray wrote manifest.json into --out first
    SCORE.append(Case("ray_engine_without_ray", ["score", "--registry", "{d}/none", "--out", "{d}/out", "--top-k", "5",
                                                 "--engine", "ray"], 2, ("pip install", "[distributed]")))


@pytest.mark.parametrize("case", SCORE, ids=[c.id for c in SCORE])
def test_score(case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    run_case(case, tmp_path, capsys, monkeypatch)


def test_score_overwrite_never_deletes_files_it_did_not_write(tmp_path: Path) -> None:
    """--out pointing at a directory of someone else's files (parquet parts included) is refused, even with
    --overwrite, and every file stays as it was."""
    from recsys.batch.manifest import RunManifest
    from recsys.errors import InputError

    out = tmp_path / "out"
    for name in ("part-00000.parquet", "notes.txt"):
        write(f"out/{name}", "not ours")(tmp_path)
    before = tree(tmp_path)
    for overwrite in (False, True):
        with pytest.raises(InputError, match="holds no batch run"):
            RunManifest.open(out, {"input": "x"}, overwrite=overwrite)
    assert tree(tmp_path) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    assert RunManifest.open(empty, {"input": "x"}).data["settings"] == {"input": "x"}


def test_score_refuses_a_locked_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from recsys.files import file_lock, lock_path_for

    tiny_registry(tmp_path)
    with file_lock(lock_path_for(tmp_path / "out"), what="test holder", command="recsys score (the first run)"):
        code = main(["score", "--registry", str(tmp_path / "reg"), "--out", str(tmp_path / "out"), "--top-k", "5"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "batch output" in err and "locked by another run" in err and "the first run" in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ retrain (flags)


RETRAIN = [
    Case("unknown_data_check", ["retrain", "--registry", "{d}/reg", "--out", "{d}/w", "--skip-data-check", "nope"], 2,
         ("--skip-data-check 'nope'", "exposure_coverage"), tiny_registry),
    Case("events_missing", ["retrain", "--registry", "{d}/reg", "--out", "{d}/w", "--events", "{d}/none.csv"], 2,
         ("--events", "does not exist"), tiny_registry),
]


@pytest.mark.parametrize("case", RETRAIN, ids=[c.id for c in RETRAIN])
def test_retrain_flags(case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    if case.id == "unknown_data_check":
        pytest.importorskip("torch")
        pytest.importorskip("lightgbm")
    run_case(case, tmp_path, capsys, monkeypatch)


def test_retrain_refuses_a_locked_work_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("lightgbm")
    from recsys.files import file_lock, lock_path_for

    tiny_registry(tmp_path)
    with file_lock(lock_path_for(tmp_path / "w"), what="test holder", command="recsys retrain (the first run)"):
        code = main(["retrain", "--registry", str(tmp_path / "reg"), "--out", str(tmp_path / "w")])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "retrain work directory" in err and "the first run" in err, err
    assert not (tmp_path / "w").exists()


# ------------------------------------------------------------------------------------------ serve / publish


def test_a_second_server_cannot_open_the_same_exposure_log(tmp_path: Path) -> None:
    from recsys.errors import InputError
    from recsys.serving.exposure import ExposureLog

    first = ExposureLog(tmp_path / "exp")
    with pytest.raises(InputError, match=r"exposure log .* is locked by another run"):
        ExposureLog(tmp_path / "exp")
    first.close()
    ExposureLog(tmp_path / "exp").close()  # released on close
    assert not list(tmp_path.glob(".*.lock"))


def test_publish_warns_when_a_trivial_alternative_wins(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from training.pipeline import quality_warnings

    manifest = {"ranker": {"metrics": {"holdout": {"ndcg@10/ranker": 0.41, "ndcg@10/match_score": 0.45}}}}
    (tmp_path / "training_report.json").write_text(json.dumps({
        "fine_tuned": {"valid": {"recall@10": 0.05, "ndcg@10": 0.03}},
        "popularity": {"valid": {"recall@10": 0.09, "ndcg@10": 0.05}}}))
    warnings = quality_warnings(manifest, tmp_path)
    assert len(warnings) == 2
    assert "blender loses to its own match_score feature" in warnings[0] and "0.4100 < 0.4500" in warnings[0]
    assert "fine-tuned matcher loses to popularity" in warnings[1] and "recall@10 0.0500 < 0.0900" in warnings[1]
    fine = {"ranker": {"metrics": {"holdout": {"ndcg@10/ranker": 0.5, "ndcg@10/match_score": 0.45}}}}
    assert quality_warnings(fine, tmp_path / "none") == []


# ------------------------------------------------------------------------------------------ training windows


def leaky_matcher(d: Path) -> None:
    """A prepared dataset, and a matcher trained on its leave-last-out train split: a checkpoint
    (training_window.json) and an export / registry version (manifest.json) recording that window."""
    from recsys.data.prepared import PreparedData
    from recsys.data.window import training_window, write_window

    prepared_before(d)
    window = training_window(PreparedData.load(d / "out"), "loo")
    write_window(d / "ckpt", window)
    (d / "v1").mkdir()
    (d / "v1" / "manifest.json").write_text(json.dumps({"kind": "matcher", "training_window": window}))


TRAINED_ON = "was trained on the train split of the loo protocol"
WINDOWS = [
    Case("evaluate_matcher_trained_on_the_test_window",
         ["evaluate", "--data", "{d}/out", "--protocol", "tail", "--matcher", "fine_tuned={d}/v1", "--out", "{d}/rep"],
         2, (TRAINED_ON, "the test split of the tail protocol", "--protocol tail"), leaky_matcher),
    Case("evaluate_blend_learns_from_the_matchers_training_data",
         ["evaluate", "--data", "{d}/out", "--protocol", "global", "--matcher", "fine_tuned={d}/v1", "--out", "{d}/rep"],
         2, (TRAINED_ON, "the valid split of the global protocol"), leaky_matcher),
    Case("train_ranker_on_the_matchers_training_data",
         ["train", "ranker", "--data", "{d}/out", "--matcher", "{d}/v1", "--out", "{d}/rk"],
         2, (TRAINED_ON, "the valid split of the global protocol", "--protocol global"), leaky_matcher),
    Case("publish_blender_window_overlaps_the_matchers",
         ["publish", "--checkpoint", "{d}/ckpt", "--data", "{d}/out", "--registry", "{d}/reg"],
         2, (TRAINED_ON, "the valid split of the global protocol", "--protocol global"), leaky_matcher, ("reg",)),
]


@pytest.mark.parametrize("case", WINDOWS, ids=[c.id for c in WINDOWS])
def test_training_windows(case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                          monkeypatch: pytest.MonkeyPatch) -> None:
    if case.argv[0] in ("train", "publish"):
        pytest.importorskip("torch")
        pytest.importorskip("lightgbm")
    run_case(case, tmp_path, capsys, monkeypatch)


# ------------------------------------------------------------------------------------------ online state

STATE = [
    Case("export-no-journal", ["state", "export", "--state-dir", "{d}/nothing", "--out", "{d}/ev.parquet"], 2,
         ("events.journal does not exist", "--state-dir")),
    Case("export-not-parquet", ["state", "export", "--state-dir", "{d}", "--out", "{d}/ev.csv"], 2, (".parquet",)),
    Case("export-bad-url", ["state", "export", "--state", "http://localhost:6379", "--out", "{d}/ev.parquet"], 2,
         ("redis://HOST:PORT/DB",)),
    Case("serve-bad-url", ["serve", "--registry", "{d}/reg", "--state", "localhost:6379"], 2, ("redis://HOST:PORT/DB",)),
    Case("serve-workers-journal", ["serve", "--registry", "{d}/reg", "--workers", "2", "--state-dir", "{d}/s"], 2,
         ("--workers 2 needs a shared event log", "--state redis://")),
    Case("serve-workers-zero", ["serve", "--registry", "{d}/reg", "--workers", "0", "--state", "redis://127.0.0.1:1/0"], 2,
         ("--workers must be >= 1",)),
]


@pytest.mark.parametrize("case", STATE, ids=lambda c: c.id)
def test_state(case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    run_case(case, tmp_path, capsys, monkeypatch)
