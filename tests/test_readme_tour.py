"""The README quick tour, run as written.

The commands are parsed from README.md's "Quick tour" section (its bash block; its yaml block becomes
`experiments.yaml`), so the tour cannot drift from what the code does. Each runs as a real `recsys`
subprocess in a temp working directory, with only what a small test needs changed: a smaller log, a
tiny random BERT instead of MiniLM, one epoch, fewer bootstrap resamples, port 0. Half-way (after
`evaluate`) the whole working directory, registry and data, is moved elsewhere and the tour carries on
there: the registry is portable. Between `serve` and `analyze` the test plays the users: traffic
through the Python client, then responses simulated from the generator's planted preferences with a
planted difference (treatment users ignore 40% of their lists), as `recsys demo` does.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
LOG = {"--events": "20000", "--users": "200", "--items": "150", "--days": "30", "--seed": "0"}


def tour() -> tuple[list[list[str]], str]:
    """The quick tour's `recsys` commands (continuation lines joined, comments dropped) and its yaml."""
    section = README.read_text().split("## Quick tour", 1)[1].split("\n## ", 1)[0]
    bash = section.split("```bash\n", 1)[1].split("```", 1)[0]
    yaml_text = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    commands = []
    for line in bash.replace("\\\n", " ").splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("recsys "):
            commands.append(shlex.split(line)[1:])
    return commands, yaml_text


def _flag(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def _replace(argv: list[str], flag: str, value: str) -> list[str]:
    out = list(argv)
    out[out.index(flag) + 1] = value
    return out


class _Tour:
    def __init__(self, cwd: Path, tiny_bert: Path) -> None:
        self.cwd = cwd
        self.tiny_bert = str(tiny_bert)
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                    "RECSYS_LOG_LEVEL": "WARNING"}
        self.outputs: dict[str, str] = {}

    def small(self, argv: list[str]) -> list[str]:
        """The README command with only what a small test needs changed (flags appended win in argparse)."""
        command = " ".join(argv[:2]) if argv[0] == "train" else argv[0]
        if command == "publish" and "--base-model" in argv:
            argv = _replace(argv, "--base-model", self.tiny_bert)
        extra = {
            "generate": [x for kv in LOG.items() for x in kv],
            "train matcher": ["--base-model", self.tiny_bert, "--epochs", "1", "--threads", "1"],
            "publish": ["--threads", "1"],
            "evaluate": ["--systems", "popularity,ease", "--n-boot", "50", "--scores-top", "0"],
            "retrain": ["--epochs", "1", "--threads", "1", "--ranker-rounds", "40", "--bootstrap", "100"],
        }
        return [*argv, *extra.get(command, [])]

    def run(self, argv: list[str], *, cwd: Path | None = None, codes: tuple[int, ...] = (0,)) -> str:
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "recsys.cli", *argv], cwd=cwd or self.cwd, env=self.env,
                              capture_output=True, text=True, check=False, timeout=600)
        out = done.stdout + done.stderr
        assert done.returncode in codes, f"`recsys {shlex.join(argv)}` exited {done.returncode}:\n{out[-3000:]}"
        assert "Traceback" not in out, out[-3000:]
        self.outputs[" ".join(argv[:2])] = out
        print(f"{time.perf_counter() - started:6.1f}s  recsys {shlex.join(argv)}")
        return out

    def start_server(self, argv: list[str]) -> tuple[subprocess.Popen[bytes], int]:
        ready = self.cwd / "serve.ready.json"
        argv = _replace(_replace(argv, "--port", "0"), "--metrics-port", "0")
        argv += ["--ready-file", str(ready), "--exposure-flush-records", "50", "--drain-seconds", "0", "--threads", "1"]
        log = open(self.cwd / "serve.log", "wb")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen([sys.executable, "-m", "recsys.cli", *argv], cwd=self.cwd, env=self.env,
                                stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 120
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("`recsys serve` did not start:\n" + (self.cwd / "serve.log").read_text()[-3000:])
            time.sleep(0.2)
        info = json.loads(ready.read_text())
        assert info.get("metrics_port"), info
        return proc, int(info["port"])


def _traffic(port: int, data: Path, n: int) -> dict[str, int]:
    """n Rank requests of 20 random candidates; -> requests per variant."""
    import numpy as np

    from recsys.serving.client import RankingClient

    users = pl.read_parquet(data / "users.parquet")["user_id"].to_list()
    ids = np.array(pl.read_parquet(data / "items.parquet")["item_id"].to_list())
    rng = np.random.default_rng(0)
    variants: dict[str, int] = {}
    with RankingClient(f"localhost:{port}") as client:
        for k in range(n):
            reply = client.rank(users[k % len(users)], rng.choice(ids, size=20, replace=False).tolist(), top_k=10)
            arm = reply.variant.split("/")[-1].split("@")[0]
            variants[arm] = variants.get(arm, 0) + 1
    return variants


def _feedback(site: Path, out: Path) -> int:
    """The users' responses to what they were shown; treatment users ignore 40% of their lists."""
    from recsys.data.synthetic import SyntheticConfig, generate, simulate_responses
    from recsys.serving.exposure import read_exposures

    shown = read_exposures(site / "runs" / "exposures")
    log = generate(SyntheticConfig(n_users=int(LOG["--users"]), n_items=int(LOG["--items"]),
                                   n_events=int(LOG["--events"]), days=int(LOG["--days"]), seed=int(LOG["--seed"])))
    responses = simulate_responses(log, shown.select("user_id", "item_id", "request_id", "position", "timestamp"), seed=1)
    treated = shown.filter(pl.col("variant").str.contains("/treatment@"))["request_id"].unique()
    ignored = treated.sample(fraction=0.4, seed=2)
    responses.filter(~pl.col("request_id").is_in(ignored.implode())).write_parquet(out)
    return shown.height


def test_readme_tour_runs_as_written_with_the_site_moved_half_way(tiny_bert: Path, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("lightgbm")
    pytest.importorskip("grpc")
    commands, experiments_yaml = tour()
    names = [" ".join(c[:2]) for c in commands]
    assert names[0] == "generate --out" and "serve --registry" in names and names[-1].startswith("retrain")
    site = tmp_path / "site"
    site.mkdir()
    (site / "experiments.yaml").write_text(experiments_yaml)
    t = _Tour(site, tiny_bert)
    moved = tmp_path / "elsewhere" / "mounted-site"
    server = None
    try:
        for argv in commands:
            if argv[0] == "prepare" and "--format" in argv:
                continue  # public datasets (not shipped): tests/test_importers.py covers each layout
            argv = t.small(argv)
            if argv[0] == "experiment" and argv[1] == "validate":
                # Registry, data and this tour's files move to another directory: paths recorded by
                # publish (absolute ones included) must not pin the site to where it was built.
                shutil.move(str(site), moved)
                site = t.cwd = moved
            if argv[0] == "serve":
                server, port = t.start_server(argv)
                variants = _traffic(port, site / "data" / "prepared", 400)
                assert set(variants) == {"control", "treatment"} and min(variants.values()) > 100, variants
                continue
            if argv[0] == "experiment" and argv[1] == "analyze":
                assert server is not None
                server.send_signal(signal.SIGTERM)  # drains and flushes the exposure log
                assert server.wait(timeout=60) == 0, (site / "serve.log").read_text()[-3000:]
                server = None
                assert _feedback(site, site / "new_events.parquet") >= 4000
            t.run(argv)
    finally:
        if server is not None:
            server.kill()
            server.wait()

    # Key output of each step.
    png = b"\x89PNG\r\n\x1a\n"
    assert (site / "data" / "prepared" / "timeline.png").read_bytes()[:8] == png
    listing = t.outputs["models list"]
    assert "v0001" in listing and "v0002" in listing and "CPUExecutionProvider" in listing, listing
    assert "fine_tuned" in (site / "runs" / "report" / "evaluation.md").read_text()
    assert "valid" in t.outputs["experiment validate"]
    assert list((site / "runs" / "scores").glob("part-*.parquet"))
    report = json.loads((site / "runs" / "ab" / "report.json").read_text())
    for name in ("lift.png", "lift_over_time.png"):
        assert (site / "runs" / "ab" / name).read_bytes()[:8] == png
    (experiment,) = report["experiments"]
    assert experiment["srm"]["mismatch"] is False
    assert experiment["over_time"][-1]["units"] == {a["arm"]: a["units"] for a in experiment["arms"]}
    ctr = next(r for r in experiment["results"] if r["metric"] == "ctr")
    assert ctr["rel_lift"] < 0  # the planted difference: treatment users ignore 40% of their lists
    retrain = json.loads((site / "runs" / "retrain" / "retrain_report.json").read_text())
    assert retrain["plot"] == "metrics.png" and (site / "runs" / "retrain" / "metrics.png").read_bytes()[:8] == png
    for row in retrain["metrics"].values():
        if row.get("bootstrap95"):
            for who in ("current", "candidate"):
                lo, hi = row[f"{who}95"]
                assert lo - 1e-9 <= row[who] <= hi + 1e-9, (who, row)
    assert retrain["command"] == "retrain" and retrain["flags"]["exposures"] == [str(site / "runs" / "exposures")]
    assert "](metrics.png)" in (site / "runs" / "retrain" / "retrain_report.md").read_text()
    assert not (tmp_path / "site").exists()

    # The moved registry also scores without --data, from another working directory (README: Ray example).
    t.run(["score", "--registry", str(site / "runs" / "registry"), "--mode", "topk", "--top-k", "5",
           "--out", str(tmp_path / "scores-elsewhere"), "--no-progress"], cwd=tmp_path)
    assert list((tmp_path / "scores-elsewhere").glob("part-*.parquet"))
