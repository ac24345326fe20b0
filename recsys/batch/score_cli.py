"""`recsys score`: offline batch scoring (light module: the model, LightGBM and Ray load in `run`)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "inputs (parquet or CSV):\n"
        "  pairs       user_id, item_id [, time] [, context columns] [, extra feature columns]\n"
        "              (rows of a user must be contiguous: a user's rows at one time are one request)\n"
        "  candidates  user_id, candidates (list of item ids; in CSV 'i1|i2|i3') [, time, context]\n"
        "  top-K       --top-k K [--input users file with user_id [, time]]; default every known user\n"
        "output: OUT/part-*.parquet (input_row, user_id, item_id, time, score, match_score, rank,\n"
        "model_version), OUT/rejects.parquet (input_row, user_id, item_id, code, reason), OUT/manifest.json.\n"
        "Rerunning the same command resumes: finished chunks are kept, the rest are scored."
    )
    model = parser.add_argument_group("model")
    model.add_argument("--registry", type=Path, default=os.environ.get("RECSYS_REGISTRY"),
                       help="model registry root (default: $RECSYS_REGISTRY)")
    model.add_argument("--version", help="registry version (default: the current one; kept on resume)")
    model.add_argument("--ranker", type=Path, help="ranker directory, when the version has no ranker/ subdirectory")
    model.add_argument("--data", type=Path, help="prepared dataset of the ranker (default: the one in ranker.json)")
    model.add_argument("--provider", default="auto", help="ONNX Runtime provider: auto, cpu, cuda, tensorrt (auto)")
    model.add_argument("--precision", default="fp32", help="item tower: fp32, int8, fp16, auto (fp32)")
    model.add_argument("--ort-threads", type=int, default=1, help="intra-op threads per ONNX session (1)")
    io = parser.add_argument_group("input and output")
    io.add_argument("--input", type=Path, help="parquet or CSV file of pairs, candidate lists or users")
    io.add_argument("--out", type=Path, required=True, help="output directory (parquet parts + manifest)")
    io.add_argument("--mode", choices=("auto", "pairs", "candidates", "topk"), default="auto",
                    help="what an input row is (auto: topk with --top-k, candidates when the column exists, else pairs)")
    io.add_argument("--user-col", default="user_id", help="user id column (user_id)")
    io.add_argument("--item-col", default="item_id", help="item id column (item_id)")
    io.add_argument("--time-col", default="time", help="request time column, ISO-8601 or epoch µs (time)")
    io.add_argument("--candidates-col", default="candidates", help="candidate list column (candidates)")
    io.add_argument("--time", help="request time for rows without one (default: now at the first start)")
    io.add_argument("--top-k", type=int, default=0, help="top-K mode: items kept per user")
    io.add_argument("--retrieve-k", type=int, default=200, help="top-K mode: embedding-search candidates blended (200)")
    io.add_argument("--include-seen", action="store_true", help="top-K mode: keep items the user already interacted with")
    io.add_argument("--overwrite", action="store_true", help="discard an earlier run in --out instead of resuming it")
    run_g = parser.add_argument_group("execution")
    run_g.add_argument("--engine", choices=("local", "ray"), default="local", help="local process or a Ray cluster (local)")
    run_g.add_argument("--chunk-rows", type=int, default=100_000,
                       help="pairs per chunk: memory and resume granularity (100000)")
    run_g.add_argument("--ray-address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    run_g.add_argument("--ray-actors", type=int, default=0, help="scoring actors (0 = one per CPU, or per GPU)")
    run_g.add_argument("--ray-gpus", type=float, help="GPUs per actor (default: 1 when the cluster has GPUs, else 0)")
    run_g.add_argument("--json", action="store_true", help="print the counts as JSON")


def run(args: argparse.Namespace) -> int:
    from recsys.batch.io import InputSpec
    from recsys.batch.job import BatchConfig, run_batch
    from recsys.errors import InputError
    from recsys.progress import enabled as progress_enabled

    if args.registry is None:
        raise InputError("pass --registry DIR (or set RECSYS_REGISTRY) to name the model registry")
    mode = args.mode
    if mode == "auto":
        mode = "topk" if args.top_k else "pairs"
        if mode == "pairs" and args.input is not None and args.input.suffix.lower() == ".parquet" and args.input.is_file():
            import pyarrow.parquet as pq

            if args.candidates_col in pq.ParquetFile(args.input).schema_arrow.names:
                mode = "candidates"
        elif mode == "pairs" and args.input is not None and args.input.is_file():
            with args.input.open() as fh:
                header = fh.readline()
            if args.candidates_col in [h.strip().strip('"') for h in header.replace("\t", ",").split(",")]:
                mode = "candidates"
    spec = InputSpec(mode, args.user_col, args.item_col, args.time_col, args.candidates_col)
    config = BatchConfig(
        out=args.out,
        registry=args.registry,
        input=args.input,
        version=args.version,
        ranker=args.ranker,
        data=args.data,
        spec=spec,
        time=args.time,
        top_k=args.top_k,
        retrieve_k=args.retrieve_k,
        include_seen=args.include_seen,
        chunk_rows=args.chunk_rows,
        engine=args.engine,
        provider=args.provider,
        precision=args.precision,
        threads=args.ort_threads,
        ray_address=args.ray_address,
        ray_actors=args.ray_actors,
        ray_gpus=args.ray_gpus,
        overwrite=args.overwrite,
        progress=progress_enabled(),
    )
    report = run_batch(config)
    print(json.dumps(report.to_dict(), indent=1) if args.json else report.summary())
    return 0
