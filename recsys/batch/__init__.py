"""Offline batch scoring: the service's request path over large tables, streamed in bounded chunks.

    io.py        inputs (parquet; CSV converted once to parquet), user-contiguous chunking, row-range
                 reads, normalisation and rejects
    scorer.py    `ChunkScorer`: one chunk -> scored rows + rejects through `RequestScorer` (R = chunk)
                 with the user tower and LightGBM batched per chunk
    manifest.py  per-chunk outputs and a manifest, so an interrupted run resumes without duplicates
    job.py       `BatchConfig`, `run_batch`: orchestration, local engine, counts
    ray_engine.py  the same chunks scored by a Ray Data actor pool (imported only for --engine ray)

Nothing here imports torch; onnxruntime/LightGBM load with the model, Ray only for its engine.
"""
