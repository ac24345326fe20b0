"""`recsys models list|promote|rollback|gc`: inspect the registry, move its current-version pointer, free disk.

`models list` exits 3 (recsys.errors.EXIT_CHECK_FAILED) when a version is CORRUPT, so scripts and CI
notice; the table is printed either way."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from recsys.errors import EXIT_CHECK_FAILED, EXIT_OK, InputError, ModelError
from recsys.registry import Registry


def _registry_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--registry", type=Path, default=os.environ.get("RECSYS_REGISTRY"),
                        help="model registry directory (default: $RECSYS_REGISTRY)")


def _open(args: argparse.Namespace) -> Registry:
    if args.registry is None:
        raise InputError("pass --registry DIR (or set RECSYS_REGISTRY) to name the model registry")
    if not Path(args.registry).is_dir():
        raise InputError(f"model registry {args.registry} does not exist; create it with recsys export --registry")
    return Registry(args.registry)


def configure_list(parser: argparse.ArgumentParser) -> None:
    _registry_arg(parser)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--verify", action="store_true", help="check every file's sha256 (reads all files)")


def _provider_here() -> dict[str, Any]:
    """What `serve`/`score --provider auto` would run the towers on here, and why accelerators were skipped."""
    from recsys.scoring.providers import plan_providers

    plan = plan_providers("auto")
    return {"provider": plan.providers[0] if plan.providers else None, "usable": list(plan.providers),
            "skipped": dict(plan.skipped)}


def run_list(args: argparse.Namespace) -> int:
    registry = _open(args)
    current = registry.current()
    rows: list[dict[str, Any]] = []
    for version in registry.versions():
        try:
            manifest = registry.manifest(version)
        except ModelError as exc:
            rows.append({"version": version, "current": version == current, "created": None, "dim": None,
                         "variants": [], "recall@10": None, "items": None, "integrity": f"CORRUPT: {exc}"})
            continue
        status = "unchecked"
        if args.verify:
            try:
                registry.verify(version)
                status = "ok"
            except ModelError as exc:
                status = f"CORRUPT: {exc}"
        variants = sorted(k for k in manifest["models"]["item"] if k not in ("fp32", "fp32_raw"))
        recall = next((v["value"] for k, v in manifest["metrics"].items() if k.startswith("recall@")), None)
        rows.append({"version": version, "current": version == current, "created": manifest.get("created"),
                     "dim": manifest.get("dim"), "variants": variants, "recall@10": recall,
                     "items": (manifest.get("embeddings") or {}).get("count"), "integrity": status})
    corrupt = [r["version"] for r in rows if r["integrity"].startswith("CORRUPT")]
    code = EXIT_CHECK_FAILED if corrupt else EXIT_OK
    provider = _provider_here()
    if args.json:
        print(json.dumps({"current": current, "history": registry.history(), "versions": rows, "provider": provider},
                         indent=1))
        return code
    if not rows:
        print(f"no versions in {registry.root}")
        return code
    print(f"{'':2}{'version':8}  {'created':20}  {'dim':>4}  {'items':>7}  {'recall@10':>9}  variants")
    for r in rows:
        recall = f"{r['recall@10']:.4f}" if r["recall@10"] is not None else "-"
        line = (f"{'*' if r['current'] else ' ':2}{r['version']:8}  {r['created'] or '-':20}  {r['dim'] or '-':>4}  "
                f"{r['items'] if r['items'] is not None else '-':>7}  {recall:>9}  {','.join(map(str, r['variants'])) or '-'}")
        shown = args.verify or r["integrity"].startswith("CORRUPT")
        print(line + (f"  [{r['integrity']}]" if shown else ""))
    print(f"current: {current or 'none'}; rollback history: {', '.join(registry.history()) or 'empty'}")
    skipped = "; ".join(f"{p}: {why}" for p, why in provider["skipped"].items())
    print(f"ONNX Runtime provider here (--provider auto): {provider['provider']}" + (f" ({skipped})" if skipped else ""))
    if corrupt:
        print(f"error: {len(corrupt)} CORRUPT version(s): {', '.join(corrupt)} (exit code {code})", file=sys.stderr)
    return code


def configure_promote(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("version", help="version to make current, e.g. v0003")
    _registry_arg(parser)
    parser.add_argument("--ranker", type=Path,
                        help="the ranker servers use with this version when it has no ranker/ of its own")
    parser.add_argument("--data", type=Path,
                        help="prepared dataset for the load-and-score check (default: the one in ranker.json)")


def run_promote(args: argparse.Namespace) -> int:
    from recsys.candidate import vet_version

    registry = _open(args)
    before = registry.current()
    # Servers watching the registry load what this points to: the version must load and score first,
    # in a child process (a malformed LightGBM model crashes the process that parses it).
    vet_version(registry.root, args.version, ranker=args.ranker, data=args.data)
    registry.promote(args.version)
    print(f"current: {args.version} (was {before or 'none'})")
    return 0


def configure_rollback(parser: argparse.ArgumentParser) -> None:
    _registry_arg(parser)


def run_rollback(args: argparse.Namespace) -> int:
    registry = _open(args)
    before = registry.current()
    version = registry.rollback()
    print(f"current: {version} (was {before or 'none'})")
    return 0


def configure_gc(parser: argparse.ArgumentParser) -> None:
    _registry_arg(parser)
    parser.add_argument("--keep", type=int, required=True,
                        help="keep the newest N versions; the current version and rollback targets are always kept")
    parser.add_argument("--dry-run", action="store_true", help="only say what would be removed")


def run_gc(args: argparse.Namespace) -> int:
    registry = _open(args)
    done = registry.gc(args.keep, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {len(done['removed'])} version(s): {', '.join(done['removed']) or 'none'}"
          + ("" if args.dry_run else f" ({done['bytes_freed'] / 1e6:,.1f} MB freed)"))
    print(f"kept: {', '.join(done['kept']) or 'none'} (current and rollback targets: {', '.join(done['protected']) or 'none'})")
    if done["stale_staging"]:
        print(f"{verb} {len(done['stale_staging'])} staging director(ies) of publishes that died")
    return 0
