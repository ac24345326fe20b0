"""Registry: versions, integrity on load, atomic promote/rollback pointer, refusal of damaged files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("torch")

from recsys.errors import InputError, ModelError
from recsys.registry import Registry


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, prepared_dir: Path) -> Path:
    """A registry holding one real export (with the catalogue's embeddings)."""
    from tests.test_export import make_tiny_checkpoint
    from training.export import ExportConfig, export_to_registry

    base = tmp_path_factory.mktemp("registry")
    ckpt = make_tiny_checkpoint(base / "ckpt", seed=3)
    export_to_registry(ckpt, base / "reg", ExportConfig(), data=prepared_dir)
    return base / "reg"


def add_copy(registry: Registry, source: str = "v0001") -> str:
    """Register a copy of `source` as a new version (the registry does not care how files were made)."""
    staging = registry.staging_dir()
    src = registry.path(source)
    for item in src.iterdir():
        if item.name != "manifest.json":
            (shutil.copytree if item.is_dir() else shutil.copyfile)(item, staging / item.name)
    manifest = {k: v for k, v in registry.manifest(source).items() if k not in ("files", "version", "created")}
    return registry.register(staging, manifest, sorted(p.name for p in staging.iterdir() if p.is_file()))


@pytest.fixture
def registry(exported: Path, tmp_path: Path) -> Registry:
    shutil.copytree(exported, tmp_path / "reg")
    reg = Registry(tmp_path / "reg")
    assert add_copy(reg) == "v0002"
    return reg


def flip_byte(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x5A
    path.write_bytes(bytes(raw))


def test_versions_promote_and_rollback_keep_history(registry: Registry) -> None:
    assert registry.versions() == ["v0001", "v0002"]
    assert registry.current() == "v0001"  # the first export was promoted automatically
    manifest = registry.manifest("v0002")
    assert manifest["version"] == "v0002" and manifest["created"].endswith("Z") and manifest["format"] == 1
    assert {"tokenizer", "training_config", "metrics", "files", "models"} <= set(manifest)
    assert registry.promote("v0002") == "v0002"
    assert registry.current() == "v0002" and registry.history() == ["v0001"]
    registry.promote("v0002")  # promoting the current version changes nothing
    assert registry.history() == ["v0001"]
    assert add_copy(registry, "v0002") == "v0003"
    registry.promote("v0003")
    assert registry.history() == ["v0001", "v0002"]
    assert registry.rollback() == "v0002" and registry.rollback() == "v0001"
    assert registry.current() == "v0001" and registry.history() == []
    with pytest.raises(InputError, match="nothing to roll back"):
        registry.rollback()
    with pytest.raises(InputError, match=r"'v0042' is not in the registry"):
        registry.promote("v0042")
    leftovers = [p.name for p in registry.root.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == [] and json.loads((registry.root / "current.json").read_text())["version"] == "v0001"


def test_corrupt_onnx_is_refused_and_previous_version_keeps_serving(registry: Registry) -> None:
    from recsys.cli import main
    from recsys.scoring.matcher import MatcherRuntime

    good = MatcherRuntime.from_registry(registry.root, provider="cpu")
    expected = good.item_encoder.encode(["trail boots"])
    registry.promote("v0002")
    bad = registry.path("v0002") / "item.opt.onnx"
    flip_byte(bad, bad.stat().st_size // 2)  # same size, different bytes: only the hash can tell
    with pytest.raises(ModelError, match=r"(?s)item\.opt\.onnx is corrupt.*recsys models rollback"):
        MatcherRuntime.from_registry(registry.root, provider="cpu")
    with pytest.raises(ModelError, match=r"item\.opt\.onnx"):
        registry.promote("v0002")
    assert main(["models", "rollback", "--registry", str(registry.root)]) == 0
    assert registry.current() == "v0001"
    again = MatcherRuntime.from_registry(registry.root, provider="cpu")
    np.testing.assert_allclose(again.item_encoder.encode(["trail boots"]), expected, atol=1e-6)


def test_truncated_files_are_refused_with_the_file_named(registry: Registry, tmp_path: Path) -> None:
    from recsys.scoring.encoder import ItemEncoder
    from recsys.scoring.matcher import MatcherRuntime
    from recsys.scoring.providers import create_session

    vdir = registry.path("v0002")
    onnx_path = vdir / "item.onnx"
    onnx_path.write_bytes(onnx_path.read_bytes()[: onnx_path.stat().st_size // 3])
    with pytest.raises(ModelError, match=r"item\.onnx is truncated or altered"):
        registry.load("v0002")
    # without the manifest check, ONNX Runtime's parse error still becomes a ModelError with the fix
    with pytest.raises(ModelError, match=r"(?s)cannot load ONNX model .*item\.onnx.*re-export|Re-export"):
        create_session(onnx_path, "cpu")
    with pytest.raises(ModelError, match="missing"):
        ItemEncoder(tmp_path / "absent.onnx", vdir / "tokenizer.json", 32, provider="cpu")
    # a truncated embedding file in the current version: refused, the old version still loads
    store = add_copy(registry)
    store_dir = registry.path(store) / "embeddings"
    data = store_dir / json.loads((store_dir / "index.json").read_text())["data"]
    registry.promote(store)
    data.write_bytes(data.read_bytes()[:-64])
    with pytest.raises(ModelError, match=r"embedding file .*embeddings\.0\.npy is corrupt"):
        MatcherRuntime.from_registry(registry.root, provider="cpu")
    with pytest.raises(ModelError, match="truncated"):
        MatcherRuntime.from_registry(registry.root, provider="cpu", verify=False)
    registry.rollback()
    assert MatcherRuntime.from_registry(registry.root, provider="cpu").version == "v0001"


def test_models_cli_list_promote_rollback(registry: Registry, capsys: pytest.CaptureFixture[str]) -> None:
    from recsys.cli import main

    root = str(registry.root)
    assert main(["models", "list", "--registry", root]) == 0
    out = capsys.readouterr().out
    assert "* v0001" in out and "  v0002" in out and "current: v0001" in out
    assert "ONNX Runtime provider here (--provider auto): " in out and "ExecutionProvider" in out
    assert main(["models", "promote", "v0002", "--registry", root]) == 0
    assert "current: v0002 (was v0001)" in capsys.readouterr().out
    assert main(["models", "list", "--registry", root, "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["current"] == "v0002" and listing["history"] == ["v0001"]
    assert listing["provider"]["provider"] in listing["provider"]["usable"]
    assert listing["versions"][1]["items"] == registry.manifest("v0002")["embeddings"]["count"]
    assert main(["models", "promote", "v0009", "--registry", root]) == 2
    assert "not in the registry" in capsys.readouterr().err
    assert main(["models", "rollback", "--registry", root]) == 0
    assert main(["models", "rollback", "--registry", root]) == 2
    assert "nothing to roll back" in capsys.readouterr().err
    assert main(["models", "list", "--registry", str(registry.root / "nope")]) == 2
