"""Resumable output: one parquet part per chunk, committed by a manifest entry.

    OUT/manifest.json           settings (the run's identity), chunks done {index: counts}, totals
    OUT/part-00000.parquet      scored rows of chunk 0 (input order within the chunk)
    OUT/rejects/part-00000.parquet   rejected rows of chunk 0 (only when there are some)
    OUT/rejects.parquet         all rejects, merged at the end

A part is written to a temp name and renamed, then the manifest is replaced atomically: a crash at
any point leaves either no entry (the chunk is redone and its part overwritten under the same name,
so rows are never duplicated) or a complete part. A rerun with the same settings skips finished
chunks; different settings (input file changed, other model version, chunk size, ...) are refused.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from recsys.batch.io import REJECT_SCHEMA
from recsys.errors import InputError
from recsys.files import utc_now, write_json_atomic

MANIFEST = "manifest.json"
FORMAT = 1


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


class RunManifest:
    def __init__(self, out: Path, data: dict[str, Any]) -> None:
        self.out = out
        self.data = data

    @classmethod
    def open(cls, out: Path, settings: dict[str, Any], overwrite: bool = False) -> RunManifest:
        """Start a run in `out`, or resume the one there when its settings are the same."""
        import json

        path = out / MANIFEST
        foreign = sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) if out.is_dir() else []
        if foreign and not path.exists():  # --overwrite replaces a batch run's own files, never someone else's
            raise InputError(
                f"--out {out} is not empty ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}) and holds "
                f"no batch run (no {MANIFEST}): score writes only into a new or empty directory or one of its own "
                f"earlier runs; choose another --out"
            )
        out.mkdir(parents=True, exist_ok=True)
        for stale in [*out.glob(".*.tmp"), *out.glob("rejects/.*.tmp")]:  # parts of a killed run (we hold the lock)
            stale.unlink(missing_ok=True)
        if path.exists() and not overwrite:
            try:
                old = json.loads(path.read_text())
            except ValueError as exc:
                raise InputError(f"{path} is not valid JSON ({exc}): pass --overwrite to start again") from exc
            if old.get("format") == FORMAT and old.get("settings") == settings:
                return cls(out, old)
            changed = sorted(
                k for k in set(settings) | set(old.get("settings", {}))
                if settings.get(k) != old.get("settings", {}).get(k)
            )
            raise InputError(
                f"{out} holds a batch run with other settings (differs in: {', '.join(changed) or 'format'}), so "
                f"its parts cannot be reused: pass --overwrite to replace it, or choose another --out"
            )
        if overwrite:
            for old_part in [*out.glob("part-*.parquet"), *out.glob("rejects/part-*.parquet")]:
                old_part.unlink()
            for name in ("rejects.parquet", "rejects/malformed.parquet", MANIFEST):
                (out / name).unlink(missing_ok=True)
        manifest = cls(out, {"format": FORMAT, "settings": settings, "started": utc_now(), "chunks": {}})
        manifest.save()
        return manifest

    def save(self) -> None:
        write_json_atomic(self.out / MANIFEST, self.data)

    @property
    def chunks(self) -> dict[str, dict[str, Any]]:
        return self.data["chunks"]

    def done(self, index: int) -> bool:
        return str(index) in self.chunks and (self.out / part_name(index)).exists()

    def commit(self, index: int, start: int, scored: pa.Table, rejects: pa.Table, stats: dict[str, int]) -> None:
        """Write the chunk's part (and rejects part), then record it: the commit point."""
        write_parquet_atomic(scored, self.out / part_name(index))
        reject_path = self.out / "rejects" / part_name(index)
        if rejects.num_rows:
            reject_path.parent.mkdir(exist_ok=True)
            write_parquet_atomic(rejects, reject_path)
        else:
            reject_path.unlink(missing_ok=True)
        self.chunks[str(index)] = {"start": start, **stats}
        self.save()

    def finish(self, totals: dict[str, Any], malformed: pa.Table | None) -> Path:
        """Merge reject parts (streaming, chunk order) into OUT/rejects.parquet; record totals."""
        path = self.out / "rejects.parquet"
        tmp = path.with_name(f".{path.name}.tmp")
        with pq.ParquetWriter(tmp, REJECT_SCHEMA) as writer:
            if malformed is not None and malformed.num_rows:
                writer.write_table(malformed)
            for index in sorted(int(i) for i in self.chunks):
                part = self.out / "rejects" / part_name(index)
                if part.exists():
                    writer.write_table(pq.read_table(part).cast(REJECT_SCHEMA))
        os.replace(tmp, path)
        self.data["totals"] = totals
        self.data["finished"] = utc_now()
        self.save()
        return path
