"""Model registry: immutable versioned directories, a manifest with file hashes, an atomic pointer.

    ROOT/versions/<version>/manifest.json   format, version, created, files {name: sha256, bytes},
                                            models, tokenizer, dim, training config, metrics, source
    ROOT/versions/<version>/...             item.onnx, user.onnx, tokenizer.json, embeddings/, ...
    ROOT/current.json                       {"version", "history" (earlier current versions), "updated"}

A version is built in a staging directory and renamed into place, so it appears whole or not at all.
`current.json` is replaced with os.replace under a lock, so readers never see a half-written pointer;
its history makes `rollback` go back through earlier promotions. Every file listed in the manifest is
checked against its sha256 on load, and a version that fails is refused with the file named, leaving
whichever version was serving untouched. The embedding store is mutable (incremental item updates)
and carries its own hash in its index (see recsys.scoring.store), so it is checked by the store.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recsys.errors import InputError, ModelError
from recsys.files import fault_point, file_lock, sha256_file, utc_now, write_json_atomic

MANIFEST = "manifest.json"
POINTER = "current.json"
RETIRED = "retired.json"  # left in a deleted version's directory: its number is never handed out again
FORMAT = 1
_VERSION_RE = re.compile(r"^v(\d{4,})$")


def is_version_name(name: str) -> bool:
    """`v` + at least four digits, nothing else: a version is looked up under versions/ by name only."""
    return _VERSION_RE.fullmatch(name) is not None


def hash_files(root: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    return {name: {"sha256": sha256_file(root / name), "bytes": (root / name).stat().st_size} for name in names}


@dataclass(frozen=True)
class RegisteredVersion:
    version: str
    path: Path
    manifest: dict[str, Any]

    def file(self, name: str) -> Path:
        return self.path / name


class Registry:
    """Versioned model directories under `root`; see the module docstring for the layout."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.versions_dir = self.root / "versions"

    # --- reading ----------------------------------------------------------------------------------

    def versions(self) -> list[str]:
        """Registered versions, oldest first."""
        if not self.versions_dir.is_dir():
            return []
        found = [p.name for p in self.versions_dir.iterdir() if _VERSION_RE.match(p.name) and (p / MANIFEST).exists()]
        return sorted(found, key=lambda v: int(v[1:]))

    def _pointer(self) -> dict[str, Any]:
        path = self.root / POINTER
        if not path.exists():
            return {"version": None, "history": []}
        try:
            pointer = json.loads(path.read_text())
            _ = (pointer["version"], list(pointer["history"]))
            return pointer
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelError(
                f"registry pointer {path} is unreadable ({exc}). Set it again with "
                f"`recsys models promote VERSION --registry {self.root}`."
            ) from exc

    def current(self) -> str | None:
        return self._pointer()["version"]

    def history(self) -> list[str]:
        """Earlier current versions, most recent last (what rollback returns to)."""
        return list(self._pointer()["history"])

    def path(self, version: str) -> Path:
        if not is_version_name(version):
            raise InputError(
                f"{version!r} is not a model version name: versions are names like v0001 under "
                f"{self.versions_dir}, never paths (registered: {', '.join(self.versions()) or 'none'})"
            )
        path = self.versions_dir / version
        if not (path / MANIFEST).is_file():
            known = ", ".join(self.versions()) or "none"
            raise InputError(f"model version {version!r} is not in the registry {self.root} (registered: {known})")
        return path

    def manifest(self, version: str) -> dict[str, Any]:
        path = self.path(version) / MANIFEST
        try:
            manifest: dict[str, Any] = json.loads(path.read_text())
            _ = manifest["files"].items()
        except (ValueError, KeyError, AttributeError) as exc:
            raise ModelError(f"manifest {path} is unreadable ({exc}). {self._fix(version)}") from exc
        return manifest

    def _fix(self, version: str) -> str:
        others = [v for v in self.versions() if v != version]
        back = f"`recsys models rollback --registry {self.root}`" if others else "a fresh export"
        return f"Re-export with `recsys export --checkpoint CKPT --registry {self.root}`, or serve another version ({back})."

    def verify(self, version: str) -> dict[str, Any]:
        """Check every manifest file's size and sha256; raise ModelError naming the first bad file."""
        root = self.path(version)
        manifest = self.manifest(version)
        for name, meta in manifest["files"].items():
            path = root / name
            if not path.is_file():
                raise ModelError(f"{path} is missing from model version {version}. {self._fix(version)}")
            size = path.stat().st_size
            if size != meta["bytes"]:
                raise ModelError(
                    f"{path} is truncated or altered: {size} bytes, the manifest says {meta['bytes']}. {self._fix(version)}"
                )
            if sha256_file(path) != meta["sha256"]:
                raise ModelError(f"{path} is corrupt: its sha256 does not match {root / MANIFEST}. {self._fix(version)}")
        if manifest.get("embeddings"):
            from recsys.scoring.store import EmbeddingStore  # lazy: numpy, only to verify

            EmbeddingStore.load(root / manifest["embeddings"]["path"], verify=True)
        return manifest

    def resolve(self, version: str | None = None) -> str:
        version = version or self.current()
        if version is None:
            raise InputError(
                f"the registry {self.root} has no current version: register one with "
                f"`recsys export --checkpoint CKPT --registry {self.root}` or promote one with "
                f"`recsys models promote VERSION --registry {self.root}`"
            )
        return version

    def load(self, version: str | None = None, verify: bool = True) -> RegisteredVersion:
        """The current (or given) version, integrity-checked."""
        version = self.resolve(version)
        manifest = self.verify(version) if verify else self.manifest(version)
        return RegisteredVersion(version, self.path(version), manifest)

    # --- writing ----------------------------------------------------------------------------------

    def staging_dir(self) -> Path:
        """A fresh directory on the registry's filesystem to build a version in (renamed by register)."""
        path = self.root / ".staging" / f"{os.getpid()}-{uuid.uuid4().hex}"
        path.mkdir(parents=True)
        return path

    def register(self, staging: Path, manifest: dict[str, Any], hashed: list[str]) -> str:
        """Hash `hashed` files in `staging`, write the manifest and move the directory in as a new
        version (os.rename: atomic, and it fails rather than overwrite if the name was taken)."""
        manifest = {"format": FORMAT, **manifest, "files": hash_files(staging, hashed)}
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        fault_point("registry:register")
        with self._lock():  # writers of other processes (publish, retrain, gc) take turns
            for _ in range(100):
                existing = [int(m.group(1)) for p in self.versions_dir.iterdir() if (m := _VERSION_RE.match(p.name))]
                version = f"v{max(existing, default=0) + 1:04d}"
                manifest.update(version=version, created=manifest.get("created") or utc_now())
                (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
                try:
                    os.rename(staging, self.versions_dir / version)
                except OSError:  # a writer without the lock (an older release) took this number
                    continue
                return version
        raise ModelError(f"could not allocate a version number in {self.versions_dir}")

    def discard(self, staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """The registry's writer lock (recsys.files.file_lock; pointer moves and gc wait for it)."""
        with file_lock(self.root / ".lock", what=f"model registry {self.root}", wait=True):
            yield

    def protected(self) -> list[str]:
        """Versions gc never removes: the current one and every rollback target."""
        pointer = self._pointer()
        return [v for v in dict.fromkeys([*pointer["history"], pointer["version"]]) if v]

    def retire(self, version: str, reason: str) -> int:
        """Delete a version's files, keeping its directory with a `retired.json` tombstone (so its
        number is never reused). Refused for the current version and rollback targets. -> bytes freed."""
        with self._lock():
            return self._retire(version, reason)

    def _retire(self, version: str, reason: str) -> int:
        if version in self.protected():
            raise InputError(f"model version {version} is current or a rollback target in {self.root}: not removed")
        path = self.path(version)
        trash = self.root / ".staging" / f"{os.getpid()}-retire-{version}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        freed = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        os.rename(path, trash)  # the version disappears at once, never half-deleted
        path.mkdir()
        write_json_atomic(path / RETIRED, {"version": version, "retired": utc_now(), "reason": reason})
        shutil.rmtree(trash, ignore_errors=True)
        return freed

    def gc(self, keep: int, dry_run: bool = False) -> dict[str, Any]:
        """Remove all but the newest `keep` versions, never the current one or a rollback target, and
        staging directories of publishes that died (their process is gone). -> what was (or would be) removed."""
        if keep < 0:
            raise InputError(f"--keep must be >= 0, got {keep}")
        with self._lock():
            protected = set(self.protected())
            versions = self.versions()
            newest = set(versions[len(versions) - keep:]) if keep else set()
            doomed = [v for v in versions if v not in newest and v not in protected]
            freed = 0
            for version in doomed:
                freed += 0 if dry_run else self._retire(version, f"recsys models gc --keep {keep}")
            stale = [p for p in (self.root / ".staging").glob("*") if not _alive(p.name.split("-", 1)[0])]
            if not dry_run:
                for path in stale:
                    shutil.rmtree(path, ignore_errors=True)
        return {"removed": doomed, "kept": [v for v in versions if v not in doomed], "protected": sorted(protected),
                "bytes_freed": freed, "stale_staging": [p.name for p in stale], "dry_run": dry_run}

    def promote(self, version: str, verify: bool = True) -> str:
        """Make `version` current (after checking its files); the old current goes on the history."""
        self.path(version)
        if verify:
            self.verify(version)
        with self._lock():
            pointer = self._pointer()
            if pointer["version"] == version:
                return version
            history = list(pointer["history"])
            if pointer["version"] is not None:
                history.append(pointer["version"])
            write_json_atomic(self.root / POINTER, {"version": version, "history": history, "updated": utc_now()})
        return version

    def rollback(self, verify: bool = True) -> str:
        """Return to the most recent earlier current version; entries that no longer pass verification
        are skipped (and reported in the error if none is left)."""
        with self._lock():
            pointer = self._pointer()
            history = list(pointer["history"])
            problems = []
            while history:
                candidate = history.pop()
                try:
                    if verify:
                        self.verify(candidate)
                    else:
                        self.path(candidate)
                except (ModelError, InputError) as exc:
                    problems.append(f"{candidate}: {exc}")
                    continue
                write_json_atomic(self.root / POINTER, {"version": candidate, "history": history, "updated": utc_now()})
                return candidate
        detail = f" ({'; '.join(problems)})" if problems else ""
        raise InputError(f"nothing to roll back to in {self.root}: no earlier usable current version{detail}")


def _alive(pid_text: str) -> bool:
    """Whether a staging directory's writer (pid in its name) still runs on this host."""
    if not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
