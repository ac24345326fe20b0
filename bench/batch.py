"""Batch scoring throughput and memory: local engine vs a naive row loop with torch eager, and vs Ray.

    python bench/batch.py                         # 1M and 10M pairs, naive on a subsample, Ray at 1M
    python bench/batch.py --sizes 200000 --ray-sizes 200000 --naive-pairs 1000   # quick look

Setup (cached in --work): a synthetic log (20k users, 2k items), `recsys prepare`, the tiny matcher
exported to ONNX with its catalogue embedding store, a LightGBM ranker. Inputs: pairs files of
100 candidates per request, >= 5 request times per user (more when the input needs more requests than
there are users), grouped by user (as the engine needs).

Every measurement runs in a fresh child process; peak memory is the peak of the summed RSS of the
child's whole process tree (Ray's raylet and actors included), sampled every 0.2 s. The machine is
shared and loaded, so compare the ratios measured in the same run, not absolute numbers.

Naive baselines (what a user would otherwise write), on the first --naive-pairs pairs, extrapolated
per pair:
  * row loop: pandas `itertuples`, per pair one torch eager item-tower forward on the item's text and
    one user-tower forward on the stored history; per request the shared features and one LightGBM
    call (list features need the whole request);
  * per-request torch: per request one user-tower forward and one padded item-tower batch over its
    candidates' texts, then features and LightGBM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
T0 = "2026-01-31T12:00:00Z"
PER_REQUEST = 100
TIMES_PER_USER = 5


# ------------------------------------------------------------------------------------------ setup


def build(work: Path) -> dict[str, Path]:
    """Dataset + registry + ranker, built once per --work directory."""
    done = work / "built.json"
    if done.exists():
        return {k: Path(v) for k, v in json.loads(done.read_text()).items()}
    from recsys.data.prepare import PrepareConfig, prepare_tables
    from recsys.data.schema import StrengthRule
    from recsys.data.synthetic import generate
    from tests.artifacts import build_scoring_artifacts

    t = time.perf_counter()
    log = generate(n_users=20_000, n_items=2_000, n_events=300_000, days=30, seed=11)
    events = log.events.with_columns(StrengthRule().expr())
    prepare_tables(events, log.items, log.users, work / "data", PrepareConfig(max_history=20))
    paths = build_scoring_artifacts(work / "art", work / "data", rounds=60)
    done.write_text(json.dumps({k: str(v) for k, v in paths.items()}))
    print(f"built dataset and models in {time.perf_counter() - t:.0f}s", flush=True)
    return paths


def make_pairs(work: Path, data: Path, n_pairs: int) -> Path:
    """n_pairs rows (user_id, item_id, time, device): requests of PER_REQUEST candidates, a user's
    TIMES_PER_USER requests contiguous, written in row groups (never the whole file in memory)."""
    import polars as pl
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = work / f"pairs_{n_pairs}.parquet"
    if path.exists():
        return path
    users = pl.read_parquet(data / "users.parquet")["user_id"].to_numpy()
    items = pl.read_parquet(data / "items.parquet")["item_id"].to_numpy()
    rng = np.random.default_rng(n_pairs)
    n_requests = n_pairs // PER_REQUEST
    per_user = max(TIMES_PER_USER, -(-n_requests // len(users)))  # each user once, contiguous
    times = np.array([np.datetime64("2026-01-31T12:00:00") + np.timedelta64(2 * k, "h") for k in range(per_user)])
    block = 2_000  # requests per row group
    schema = pa.schema([("user_id", pa.string()), ("item_id", pa.string()), ("time", pa.timestamp("us", "UTC")),
                        ("device", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for lo in range(0, n_requests, block):
            req = np.arange(lo, min(lo + block, n_requests))
            user = users[req // per_user]
            cand = rng.integers(0, len(items), (len(req), PER_REQUEST))
            table = pa.table(
                {
                    "user_id": np.repeat(user, PER_REQUEST),
                    "item_id": items[cand.ravel()],
                    "time": pa.array(np.repeat(times[req % per_user], PER_REQUEST).astype("datetime64[us]"),
                                     pa.timestamp("us", "UTC")),
                    "device": np.repeat(np.array(["mobile", "desktop", "tablet"])[req % 3], PER_REQUEST),
                },
                schema=schema,
            )
            writer.write_table(table)
    return path


# ------------------------------------------------------------------------------------------ children


def child_engine(paths: dict[str, Path], input_path: Path, out: Path, engine: str, chunk_rows: int) -> dict[str, Any]:
    from recsys.batch.job import BatchConfig, run_batch
    from recsys.batch.scorer import ChunkScorer, ModelRef, resolve_data_dir

    config = BatchConfig(out=out, registry=paths["registry"], ranker=paths["ranker"], data=paths["data"],
                         input=input_path, time=T0, chunk_rows=chunk_rows, engine=engine, provider="cpu",
                         overwrite=True, progress=False)
    t = time.perf_counter()
    scorer = None
    if engine == "local":
        data, ranker = resolve_data_dir(paths["registry"], "v0001", paths["ranker"], paths["data"])
        scorer = ChunkScorer(ModelRef(str(paths["registry"]), "v0001", str(ranker), str(data), "cpu"))
    else:
        import ray

        ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False)
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
    load_s = time.perf_counter() - t
    report = run_batch(config, scorer=scorer)
    wall = time.perf_counter() - t
    return {"pairs": report.scored_rows, "wall_s": wall, "load_s": load_s, "score_s": report.seconds,
            "chunks": report.chunks, "rejected": report.rejected_rows}


def child_naive(paths: dict[str, Path], input_path: Path, n_pairs: int, kind: str) -> dict[str, Any]:
    import pandas as pd
    import polars as pl
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoTokenizer

    from recsys.features import FeatureState, to_us
    from recsys.ranker import Ranker
    from recsys.scoring.store import EmbeddingStore
    from training.matcher.checkpoint import load_towers

    torch.set_num_threads(1)
    ckpt = load_towers(paths["ckpt"])
    tok = AutoTokenizer.from_pretrained(paths["ckpt"] / "item_encoder")
    max_len = ckpt.config.max_text_tokens
    ranker = Ranker.load(paths["ranker"])
    state = FeatureState.load(paths["ranker"] / "feature_state")
    items = pl.read_parquet(paths["data"] / "items.parquet").sort("item_idx")
    item_index = {i: k for k, i in enumerate(items["item_id"].to_list())}
    texts = items["text"].to_list()
    user_index = dict(pl.read_parquet(paths["data"] / "users.parquet").select("user_id", "user_idx").iter_rows())
    store = EmbeddingStore.load(paths["registry"] / "versions" / "v0001" / "embeddings")
    emb = np.asarray(store.matrix[store.positions(items["item_id"].to_list())], np.float32)
    df = pq.ParquetFile(input_path).read_row_groups([0]).to_pandas().head(n_pairs)
    df = pd.concat([df, df.iloc[:0]])

    def user_vector(u: int, t: int) -> torch.Tensor:
        h = state.history(u, t)
        mask = torch.from_numpy(h.item_idx >= 0)
        hist = torch.from_numpy(emb[np.maximum(h.item_idx, 0)]) * mask[..., None]
        return ckpt.user_tower(hist, torch.from_numpy(h.event_code.astype(np.int64)),
                               torch.from_numpy(h.age_s), mask)[0]

    scores: list[float] = []
    t0 = time.perf_counter()
    with torch.no_grad():
        rows = list(df.itertuples(index=False))
        start = 0
        while start < len(rows):  # one request = consecutive rows of a (user, time)
            end = start
            key = (rows[start].user_id, rows[start].time)
            while end < len(rows) and (rows[end].user_id, rows[end].time) == key:
                end += 1
            u, t = user_index.get(key[0], -1), to_us(key[1].to_pydatetime())
            cand = np.array([item_index[r.item_id] for r in rows[start:end]])
            if kind == "row":
                match = []
                for r in rows[start:end]:  # the row loop: two forwards per pair
                    batch = tok([texts[item_index[r.item_id]]], truncation=True, max_length=max_len,
                                return_tensors="pt")
                    item_vec = ckpt.item_tower(batch["input_ids"], batch["attention_mask"])[0]
                    match.append(float(item_vec @ user_vector(u, t)))
            else:
                batch = tok([texts[i] for i in cand], truncation=True, max_length=max_len, padding=True,
                            return_tensors="pt")
                match = (ckpt.item_tower(batch["input_ids"], batch["attention_mask"]) @ user_vector(u, t)).tolist()
            features = state.compute(u, cand, t, match_scores=np.asarray(match, np.float32),
                                     context={"device": rows[start].device})
            scores.extend(ranker.score(features).tolist())
            start = end
    seconds = time.perf_counter() - t0
    return {"pairs": len(scores), "wall_s": seconds, "pairs_per_s": len(scores) / seconds}


class TreeRss:
    """Peak summed RSS of a process and all its descendants, sampled in a thread."""

    def __init__(self, pid: int, period: float = 0.2) -> None:
        import psutil

        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)
        self._thread.start()

    def _run(self, period: float) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                total = 0
                for p in procs:
                    with contextlib.suppress(psutil.Error):
                        total += p.memory_info().rss
                self.peak = max(self.peak, total)
            except psutil.Error:
                pass
            self._stop.wait(period)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_child(args: list[str], timeout: float) -> dict[str, Any]:
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    rss = TreeRss(proc.pid)
    out, _ = proc.communicate(timeout=timeout)
    peak = rss.stop()
    if proc.returncode:
        raise RuntimeError(f"child {args} failed with {proc.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_mb"] = round(peak / 2**20)
    return result


# ------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/recsys_bench_batch"))
    parser.add_argument("--sizes", default="1000000,10000000", help="pairs per local run")
    parser.add_argument("--ray-sizes", default="1000000", help="pairs per Ray run ('' = none)")
    parser.add_argument("--naive-pairs", type=int, default=2000, help="subsample for the naive loops")
    parser.add_argument("--chunk-rows", type=int, default=100_000)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    paths = build(args.work)
    if args.child:
        if args.child in ("local", "ray"):
            result = child_engine(paths, args.input, args.out, args.child, args.chunk_rows)
        else:
            result = child_naive(paths, args.input, args.naive_pairs, args.child)
        print(json.dumps(result), flush=True)
        return

    sizes = [int(s) for s in args.sizes.split(",") if s]
    ray_sizes = [int(s) for s in args.ray_sizes.split(",") if s]
    rows: list[dict[str, Any]] = []

    def record(name: str, n: int, result: dict[str, Any], extrapolated: bool = False) -> dict[str, Any]:
        rate = result.get("pairs_per_s") or result["pairs"] / result["wall_s"]
        row = {"engine": name, "pairs": n, "measured_pairs": result["pairs"], "wall_s": round(result["wall_s"], 2),
               "pairs_per_s": round(rate), "peak_rss_mb": result["peak_rss_mb"], "extrapolated": extrapolated}
        for key in ("load_s", "score_s", "chunks"):
            if key in result:
                row[key] = round(result[key], 2) if isinstance(result[key], float) else result[key]
        rows.append(row)
        print(json.dumps(row), flush=True)
        return row

    inputs = {n: make_pairs(args.work, paths["data"], n) for n in sorted(set(sizes) | set(ray_sizes))}
    first = inputs[min(inputs)]
    naive = {}
    for kind in ("row", "request"):
        res = run_child(["--work", str(args.work), "--child", kind, "--input", str(first),
                         "--naive-pairs", str(args.naive_pairs)], timeout=3600)
        naive[kind] = res
        record(f"naive {kind} loop + torch eager", res["pairs"], res)
    local: dict[int, dict[str, Any]] = {}
    for n in sizes:
        res = run_child(["--work", str(args.work), "--child", "local", "--input", str(inputs[n]),
                         "--out", str(args.work / f"out_local_{n}"), "--chunk-rows", str(args.chunk_rows)], timeout=7200)
        local[n] = record("local", n, res)
    ray_rows: dict[int, dict[str, Any]] = {}
    for n in ray_sizes:
        res = run_child(["--work", str(args.work), "--child", "ray", "--input", str(inputs[n]),
                         "--out", str(args.work / f"out_ray_{n}"), "--chunk-rows", str(args.chunk_rows)], timeout=7200)
        ray_rows[n] = record("ray (local cluster)", n, res)

    ratios: dict[str, Any] = {}
    for n, row in local.items():
        for kind, res in naive.items():
            ratios[f"local_vs_naive_{kind}@{n}"] = round(row["pairs_per_s"] / res["pairs_per_s"], 1)
        if n in ray_rows:
            ratios[f"ray_vs_local@{n}"] = round(ray_rows[n]["pairs_per_s"] / row["pairs_per_s"], 2)
    if len(local) > 1:
        lo, hi = min(local), max(local)
        ratios[f"peak_rss_{hi}_over_{lo}"] = round(local[hi]["peak_rss_mb"] / local[lo]["peak_rss_mb"], 2)
    payload = {
        "bench": "batch",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_avg_start": os.getloadavg()},
        "setup": {"users": 20_000, "items": 2_000, "candidates_per_request": PER_REQUEST,
                  "min_times_per_user": TIMES_PER_USER, "chunk_rows": args.chunk_rows, "naive_pairs": args.naive_pairs,
                  "model": "tiny random BERT (hidden 32, 2 layers) + user tower; LightGBM ranker",
                  "naive_extrapolation": "naive rates are measured on the first naive_pairs pairs; their time "
                                         "for N pairs is N / rate"},
        "rows": rows,
        "ratios": ratios,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "batch.json").write_text(json.dumps(payload, indent=1))
    md = ["# Batch scoring benchmark", "",
          f"Machine: {os.cpu_count()} CPUs, shared and loaded (load avg at start {os.getloadavg()[0]:.1f}); "
          "compare ratios from the same run.", "",
          "| engine | pairs | pairs/s | wall s | peak RSS MB (process tree) | note |",
          "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        note = f"measured on {r['measured_pairs']:,} pairs, rate extrapolated" if r["engine"].startswith("naive") else \
            f"startup {r.get('load_s', 0)} s (model load; ray.init for Ray), {r.get('chunks', '?')} chunks"
        md.append(f"| {r['engine']} | {r['pairs']:,} | {r['pairs_per_s']:,} | {r['wall_s']} | {r['peak_rss_mb']} | {note} |")
    for n in sizes:
        for kind, res in naive.items():
            md.append(f"| naive {kind} (extrapolated) | {n:,} | {res['pairs_per_s']:,.0f} | "
                      f"{n / res['pairs_per_s']:,.0f} | - | {n:,} / measured rate |")
    md += ["", "Ratios: " + ", ".join(f"{k} = {v}" for k, v in ratios.items()), ""]
    (RESULTS / "batch.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
