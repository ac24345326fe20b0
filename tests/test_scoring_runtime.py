"""Serving runtime: provider choice, length bucketing, user tower, embedding store, torch-free scoring."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from recsys.errors import ConfigError, InputError, ModelError  # noqa: E402


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, prepared_dir: Path) -> tuple[Path, Path]:
    """(registry root with one current version incl. the catalogue's embeddings, checkpoint)."""
    from tests.test_export import make_tiny_checkpoint
    from training.export import ExportConfig, export_to_registry

    base = tmp_path_factory.mktemp("runtime")
    ckpt = make_tiny_checkpoint(base / "ckpt", seed=2)
    export_to_registry(ckpt, base / "reg", ExportConfig(), data=prepared_dir)
    return base / "reg", ckpt


@pytest.fixture(scope="module")
def runtime(registry: tuple[Path, Path]):  # type: ignore[no-untyped-def]
    from recsys.scoring.matcher import MatcherRuntime

    return MatcherRuntime.from_registry(registry[0], provider="cpu", batch_size=8)


def test_provider_choice_is_verified_and_quiet(registry: tuple[Path, Path], capfd: pytest.CaptureFixture[str]) -> None:
    from recsys.scoring import providers as p

    p.accelerator_status.cache_clear()
    status = p.accelerator_status()
    plan = p.plan_providers("auto")
    assert plan.providers[-1] == p.CPU and status[p.CPU] is None
    assert set(plan.providers) == {name for name, reason in status.items() if reason is None}
    for name, reason in plan.skipped.items():  # every accelerator left out says why
        assert name in (p.CUDA, p.TENSORRT) and reason
    session, info = p.create_session(registry[0] / "versions" / "v0001" / "user.onnx", "auto")
    assert info.active == tuple(session.get_providers()) and info.primary == plan.providers[0]
    if status[p.CUDA] is not None:  # CPU-only machine: explicit GPU requests are clear errors
        with pytest.raises(ModelError, match="'cuda' was requested but cannot be used here"):
            p.plan_providers("cuda")
        with pytest.raises(ModelError, match="cannot be used here"):
            p.create_session(registry[0] / "versions" / "v0001" / "user.onnx", "tensorrt")
        captured = capfd.readouterr()
        assert "libcublas" not in captured.err + captured.out and "Failed to load" not in captured.err + captured.out
    with pytest.raises(ConfigError):
        p.plan_providers("npu")


def test_length_bucketing_restores_order_and_matches_other_paddings(runtime) -> None:  # type: ignore[no-untyped-def]
    from training.export import fallback_texts

    texts = fallback_texts(37, seed=5)
    texts[3], texts[20] = "x", "trail " * 40  # extremes: 3 tokens and truncated at 32
    enc = runtime.item_encoder
    lengths = [len(ids) for ids in enc.tokenizer.encode(texts)]
    assert min(lengths) == 3 and max(lengths) == 32
    bucketed = enc.encode(texts, batch_size=8)
    one_by_one = np.concatenate([enc.encode([t]) for t in texts])
    np.testing.assert_allclose(bucketed, one_by_one, atol=1e-5)
    np.testing.assert_allclose(enc.encode(texts, batch_size=8, bucketing=False), one_by_one, atol=1e-5)
    np.testing.assert_allclose(enc.encode(texts, batch_size=8, pad_to=32), one_by_one, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(bucketed, axis=1), 1.0, atol=1e-5)
    assert enc.encode([]).shape == (0, enc.dim)


def test_token_batches_respect_budget_and_cover_every_row_once() -> None:
    from recsys.scoring.encoder import token_batches

    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 30, size=200)
    lengths[17] = 500  # longer than the budget: a batch of its own
    for bucketing in (True, False):
        batches = token_batches(lengths, 64, max_rows=16, bucketing=bucketing)
        rows = np.concatenate(batches)
        assert sorted(rows.tolist()) == list(range(200))
        for b in batches:
            assert 1 <= len(b) <= 16
            assert len(b) * lengths[b].max() <= 64 or len(b) == 1
        assert [b.tolist() for b in batches if 17 in b] == [[17]]
        if not bucketing:
            assert rows.tolist() == list(range(200))
    assert np.diff(lengths[np.concatenate(token_batches(lengths, 64, max_rows=16))]).min() >= 0  # length-sorted
    # None: rows only, the old batching by sequence count
    assert [len(b) for b in token_batches(lengths, None, max_rows=64)] == [64, 64, 64, 8]
    assert token_batches(np.array([], dtype=np.int64), 64, 8) == []


def test_token_budget_batching_matches_plain_path_in_input_order(runtime) -> None:  # type: ignore[no-untyped-def]
    """The packed path (small token budget: many uneven batches) gives the rows-only path's and the
    one-at-a-time embeddings, in input order, including an empty text and one very long text."""
    from recsys.scoring.encoder import ItemEncoder
    from training.export import fallback_texts

    texts = fallback_texts(29, seed=11)
    texts[4], texts[9], texts[21] = "", "trail " * 200, "x"
    enc = runtime.item_encoder
    lengths = [len(ids) for ids in enc.tokenizer.encode(texts)]
    assert lengths[4] == 2 and lengths[9] == enc.tokenizer.max_length == 32
    one_by_one = np.concatenate([enc.encode([t]) for t in texts])
    packed = enc.encode(texts, batch_size=64, tokens_per_batch=24)  # the 32-token text exceeds it: alone
    np.testing.assert_allclose(packed, one_by_one, atol=1e-5)
    np.testing.assert_allclose(enc.encode(texts, tokens_per_batch=None), one_by_one, atol=1e-5)
    np.testing.assert_allclose(enc.encode(texts), one_by_one, atol=1e-5)  # the default budget
    np.testing.assert_allclose(enc.encode(texts[::-1], tokens_per_batch=24), one_by_one[::-1], atol=1e-5)
    assert enc.tokens_per_batch is not None and enc.tokens_per_batch >= enc.tokenizer.max_length
    # the settings the bench compares are the same model: spinning off changes scheduling, not results
    vdir = Path(runtime.item_encoder.info.path).parent
    quiet = ItemEncoder(vdir / "item.opt.onnx", vdir / "tokenizer.json", 32, provider="cpu", spinning=False, tokens_per_batch=40)
    np.testing.assert_allclose(quiet.encode(texts), one_by_one, atol=1e-5)
    with pytest.raises(InputError, match="tokens_per_batch"):
        ItemEncoder(vdir / "item.opt.onnx", vdir / "tokenizer.json", 32, provider="cpu", tokens_per_batch=0)


def test_user_tower_runtime_matches_torch(runtime, registry: tuple[Path, Path]) -> None:  # type: ignore[no-untyped-def]
    from training.matcher.checkpoint import load_towers

    tower = load_towers(registry[1]).user_tower
    rng = np.random.default_rng(0)
    n_items = len(runtime.store)
    rows = rng.integers(0, n_items, size=(6, 10))
    rows[1, :] = -1  # empty history: the cold-start vector
    rows[2, 4:] = -1
    types = rng.integers(0, 7, size=(6, 10))
    ages = rng.random((6, 10)).astype(np.float32) * 1e6
    got = runtime.user_embeddings_from_rows(rows, types, ages)
    mask = rows >= 0
    emb = np.asarray(runtime.store.matrix)[np.maximum(rows, 0)] * mask[..., None]
    with torch.no_grad():
        ref = tower(torch.from_numpy(emb), torch.from_numpy(np.where(mask, types, -1)),
                    torch.from_numpy(np.where(mask, ages, 0).astype(np.float32)), torch.from_numpy(mask.astype(np.int64))).numpy()
    assert (got * ref).sum(1).min() >= 0.9999
    np.testing.assert_allclose(got[1], tower.empty.detach().numpy() / np.linalg.norm(tower.empty.detach().numpy()), atol=1e-5)


def test_runtime_serves_known_items_from_store_and_encodes_cold_ones(runtime) -> None:  # type: ignore[no-untyped-def]
    ids = runtime.store.ids[:4]
    np.testing.assert_array_equal(runtime.item_embeddings(ids), np.asarray(runtime.store.matrix[:4]))
    cold = runtime.item_embeddings([ids[0], "brand-new"], texts={"brand-new": "compact camera tripod"})
    np.testing.assert_allclose(cold[1], runtime.item_encoder.encode(["compact camera tripod"])[0], atol=1e-6)
    with pytest.raises(InputError, match="brand-new"):
        runtime.item_embeddings(["brand-new"])
    users = runtime.user_embeddings([ids[:2], [], ["unknown", ids[3]]], [[1, 2], [], [0, 1]], [[60.0, 7200.0], [], [5.0, 9.0]])
    scores = runtime.score(users, runtime.item_embeddings(ids))
    assert scores.shape == (3, 4) and np.all(np.abs(scores) <= 1.0 + 1e-5)


class CountingEncoder:
    """A real encoder that records how many texts it was asked to encode."""

    def __init__(self, inner) -> None:  # type: ignore[no-untyped-def]
        self.inner, self.dim, self.calls = inner, inner.dim, 0

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.calls += len(texts)
        return self.inner.encode(texts)


def test_store_build_mmap_and_incremental_upsert(runtime, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from recsys.scoring.store import EmbeddingStore

    enc = CountingEncoder(runtime.item_encoder)
    ids, texts = ["a", "b", "c"], ["trail boots", "pasta sauce", "vinyl album"]
    store = EmbeddingStore.build(tmp_path / "s", enc, ids, texts)
    assert enc.calls == 3 and isinstance(store.matrix, np.memmap) and not store.matrix.flags.writeable
    first_file = tmp_path / "s" / store.meta["data"]
    report = store.upsert(enc, ["a", "b", "d"], ["trail boots", "garlic bread", "chess set"])
    assert (report.added, report.updated, report.unchanged) == (1, 1, 1) and enc.calls == 5  # only b and d encoded
    reloaded = EmbeddingStore.load(tmp_path / "s")
    assert reloaded.ids == ["a", "b", "c", "d"] and not first_file.exists()
    np.testing.assert_allclose(reloaded.get(["b", "d"]), runtime.item_encoder.encode(["garlic bread", "chess set"]), atol=1e-6)
    np.testing.assert_allclose(reloaded.get(["a", "c"]), runtime.item_encoder.encode(["trail boots", "vinyl album"]), atol=1e-6)
    assert reloaded.positions(["d", "zzz"]).tolist() == [3, -1]
    half = EmbeddingStore.build(tmp_path / "h", enc, ids, texts, dtype="float16")
    assert half.matrix.dtype == np.float16
    np.testing.assert_allclose(half.get(["a", "c"]), reloaded.get(["a", "c"]), atol=1e-3)
    with pytest.raises(InputError, match="not unique"):
        EmbeddingStore.write(tmp_path / "x", ["a", "a"], np.zeros((2, 4), np.float32))


def test_store_refuses_truncated_or_corrupt_files(runtime, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from recsys.scoring.store import EmbeddingStore

    src = runtime.store.path
    for damage in ("truncate", "flip", "index"):
        path = tmp_path / damage
        shutil.copytree(src, path)
        data = path / json.loads((path / "index.json").read_text())["data"]
        if damage == "truncate":
            data.write_bytes(data.read_bytes()[:-100])
            with pytest.raises(ModelError, match=r"(?s)truncated.*rollback"):
                EmbeddingStore.load(path, verify=False)  # caught by the shape check even without hashing
        elif damage == "flip":
            raw = bytearray(data.read_bytes())
            raw[-7] ^= 0xFF
            data.write_bytes(bytes(raw))
            EmbeddingStore.load(path, verify=False)  # same size: only the hash can tell
            with pytest.raises(ModelError, match=rf"{data.name} is corrupt"):
                EmbeddingStore.load(path)
        else:
            (path / "index.json").write_text("{not json")
            with pytest.raises(ModelError, match=r"index\.json is unreadable"):
                EmbeddingStore.load(path)


TORCH_FREE = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers", "training"):
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Block())
    from recsys.registry import Registry
    from recsys.scoring import MatcherRuntime
    import recsys.registry_cli, recsys.scoring.providers, recsys.scoring.store, recsys.scoring.encoder

    root, ids = sys.argv[1], json.loads(sys.argv[2])
    rt = MatcherRuntime.from_registry(root, provider="auto")
    users = rt.user_embeddings([ids[:3], []], [[1, 2, 3], []], [[60.0, 3600.0, 86400.0], []])
    items = rt.item_embeddings(ids + ["new"], texts={"new": "trail boots for the summit"})
    print(json.dumps({"scores": rt.score(users, items).tolist(), "providers": rt.item_encoder.info.active,
                      "version": rt.version, "heavy": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))}))
    """
)


def test_serving_imports_and_scores_without_torch(runtime, registry: tuple[Path, Path], tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ids = runtime.store.ids[:5]
    script = tmp_path / "torch_free.py"
    script.write_text(TORCH_FREE)
    proc = subprocess.run([sys.executable, str(script), str(registry[0]), json.dumps(ids)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["heavy"] == [] and result["version"] == "v0001" and "CPUExecutionProvider" in result["providers"]
    users = runtime.user_embeddings([ids[:3], []], [[1, 2, 3], []], [[60.0, 3600.0, 86400.0], []])
    items = runtime.item_embeddings([*ids, "new"], texts={"new": "trail boots for the summit"})
    np.testing.assert_allclose(np.array(result["scores"]), runtime.score(users, items), atol=1e-5)
