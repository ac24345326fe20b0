"""Sequence models: the causal encoder, the sequential user tower of the matcher and SASRec, on the
tiny random BERT and generated data: causality, ONNX parity, training end to end through the CLI,
export, scoring by `recsys evaluate`, and the leak refusal."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from recsys.cli import main  # noqa: E402
from recsys.data.prepared import PreparedData  # noqa: E402
from recsys.evaluation.sequence import load_sequence_system, ordered_histories, user_sequences  # noqa: E402
from tests.test_matcher import bert  # noqa: E402, F401  (the tiny BERT with a working tokenizer)
from training.matcher.model import SequentialUserTower  # noqa: E402
from training.sasrec import SASRec, SASRecConfig  # noqa: E402
from training.sequential import CausalEncoder  # noqa: E402


def _history(b: int, n: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(b, n, dim, generator=g), dim=-1)
    types = torch.randint(0, 4, (b, n), generator=g)
    ages = torch.sort(torch.rand(b, n, generator=g) * 1e6, dim=1).values  # older items further back
    return emb, types, ages, torch.ones(b, n, dtype=torch.long)


@pytest.mark.parametrize("which", ["encoder", "tower", "sasrec"])
def test_a_newer_history_item_never_changes_an_older_position(which: str) -> None:
    """Position j (0 = newest) summarises items j..: changing item i < j (newer) leaves j unchanged,
    and changing it does change position i itself (the test could fail)."""
    torch.manual_seed(0)
    dim, n = 16, 6
    emb, types, ages, mask = _history(3, n, dim)
    if which == "encoder":
        model = CausalEncoder(dim, blocks=2, heads=2, max_len=n).eval()
        run = lambda e, t, a: model(e, mask.bool())  # noqa: E731
    elif which == "tower":
        tower = SequentialUserTower(dim, heads=2, dropout=0.0, max_history=n, width=8).eval()
        run = lambda e, t, a: tower.states(e, t, a, mask)  # noqa: E731
    else:
        sas = SASRec(30, SASRecConfig(dim=dim, max_length=n, dropout=0.0)).eval()
        run = lambda e, t, a: sas.tower.states(e, mask.bool())  # noqa: E731
    with torch.no_grad():
        before = run(emb, types, ages)
        for i in range(n - 1):
            changed_emb, changed_types = emb.clone(), types.clone()
            changed_emb[:, i] = torch.nn.functional.normalize(torch.randn(3, dim), dim=-1)
            changed_types[:, i] = (types[:, i] + 1) % 4
            after = run(changed_emb, changed_types, ages)
            assert torch.allclose(after[:, i + 1 :], before[:, i + 1 :], atol=1e-6), f"position > {i} saw item {i}"
            assert not torch.allclose(after[:, i], before[:, i], atol=1e-4)


@pytest.mark.parametrize(("blocks", "heads"), [(1, 1), (2, 2), (3, 4)])
def test_the_newest_only_path_equals_position_0_of_all_states(blocks: int, heads: int) -> None:
    """Serving's path (the last block runs position 0's query alone, attention folded into the
    weights) gives states[:, 0] for ragged, full, single-item and empty histories, longer than max_len
    too. Every bias is non-zero: the value bias, which the fold adds once after pooling, moves the
    output here, so a fold that dropped it would fail."""
    torch.manual_seed(blocks)
    encoder = CausalEncoder(16, blocks=blocks, heads=heads, max_len=7, dropout=0.0).eval()
    for p in encoder.parameters():  # non-zero biases everywhere, so every term of the fold matters
        torch.nn.init.normal_(p, std=0.3)
    inputs = torch.randn(5, 9, 16)
    mask = torch.arange(9) < torch.tensor([[9], [4], [1], [0], [7]])
    with torch.no_grad():
        full, newest = encoder(inputs, mask)[:, 0], encoder(inputs, mask, newest_only=True)
        assert newest.shape == (5, 16) and torch.allclose(newest, full, atol=1e-5)
        encoder.blocks[-1].qkv.bias[32:].zero_()
        assert not torch.allclose(encoder(inputs, mask, newest_only=True), full, atol=1e-3)


def test_sequential_tower_reads_the_newest_position_and_pads_like_the_pooling_tower() -> None:
    torch.manual_seed(0)
    tower = SequentialUserTower(16, heads=2, dropout=0.0, max_history=8, width=8).eval()
    emb, types, ages, mask = _history(2, 5, 16)
    with torch.no_grad():
        out = tower(emb, types, ages, mask)
        states = torch.nn.functional.normalize(tower.states(emb, types, ages, mask)[:, 0], dim=-1)
        # Right padding changes nothing; an empty history gets the learned cold-start vector.
        pad_emb = torch.cat([emb, torch.zeros(2, 3, 16)], 1)
        pad = tower(pad_emb, torch.cat([types, -torch.ones(2, 3, dtype=torch.long)], 1),
                    torch.cat([ages, torch.zeros(2, 3)], 1), torch.cat([mask, torch.zeros(2, 3, dtype=torch.long)], 1))
        empty = tower(torch.zeros(1, 3, 16), -torch.ones(1, 3, dtype=torch.long), torch.zeros(1, 3), torch.zeros(1, 3, dtype=torch.long))
    assert torch.allclose(out, states, atol=1e-6) and torch.allclose(out, pad, atol=1e-5)
    assert torch.allclose(empty[0], torch.nn.functional.normalize(tower.empty, dim=0), atol=1e-6)


@pytest.mark.parametrize("blocks", [1, 2, 3])
@pytest.mark.parametrize("split", [False, True])
def test_sequential_tower_onnx_matches_torch_through_the_user_tower_export(tmp_path: Path, blocks: int, split: bool) -> None:
    """Plain, and as served: the per-item projection exported apart (run on the catalogue at load) and
    the rest in its serving form (last block folded, gap buckets as thresholds)."""
    from training.export import export_user_tower, user_parity

    torch.manual_seed(0)
    tower = SequentialUserTower(32, heads=4, dropout=0.1, max_history=20, width=16, blocks=blocks)
    for p in tower.parameters():  # away from the init (zero biases, unit norms) so every folded term counts
        torch.nn.init.normal_(p, std=0.3)
    tower.eval()
    items = tmp_path / "items.onnx" if split else None
    assert export_user_tower(tower, tmp_path / "user.onnx", 32, items_path=items) == (16 if split else 32)
    parity = user_parity(tower, tmp_path / "user.onnx", 32, items=items)  # includes empty and longer-than-traced histories
    assert parity.ok and parity.max_abs_diff < 1e-4, parity
    if split:  # a tower reading projected rows never runs without its projection, nor with another one's
        from recsys.errors import ModelError
        from recsys.scoring.encoder import UserEncoder

        with pytest.raises(ModelError, match=r"user_items\.onnx"):
            UserEncoder(tmp_path / "user.onnx", "cpu")
        other = SequentialUserTower(32, heads=4, dropout=0.1, max_history=20, width=8, blocks=blocks).eval()
        export_user_tower(other, tmp_path / "other.onnx", 32, items_path=tmp_path / "other_items.onnx")
        with pytest.raises(ModelError, match="not this user tower's history projection"):
            UserEncoder(tmp_path / "user.onnx", "cpu", items_path=tmp_path / "other_items.onnx")


def test_ordered_histories_are_the_earlier_splits_newest_first(prepared_dir: Path) -> None:
    data = PreparedData.load(prepared_dir)
    frame = data.eval_set("loo", "test")
    users = frame["user_idx"].to_numpy()[:20]
    cutoff = np.full(len(users), 10**18, np.int64)
    hist = ordered_histories(data, "loo", "test", users, cutoff, 500)
    seqs = user_sequences(data, "loo", ("train", "valid"))
    lookup = dict(zip(seqs["user_idx"].to_list(), seqs["items"].to_list(), strict=True))
    for row, user in enumerate(users.tolist()):
        got = hist.item_idx[row][hist.item_idx[row] >= 0]
        assert got.tolist() == lookup[user][::-1]
        assert set(got.tolist()) == set(data.seen_items(frame[row : row + 1], "loo", "test")[0].tolist())
    assert (np.diff(hist.age_s, axis=1)[hist.item_idx[:, 1:] >= 0] >= 0).all()  # ages grow with the index


@pytest.fixture(scope="module")
def sasrec_dir(prepared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sasrec") / "model"
    code = main(["train", "sasrec", "--data", str(prepared_dir), "--out", str(out), "--protocol", "loo",
                 "--epochs", "15", "--patience", "5", "--max-length", "50", "--dim", "32", "--lr", "5e-3", "--threads", "1"])
    assert code == 0
    return out


def test_sasrec_trains_exports_and_is_scored_by_evaluate(sasrec_dir: Path, prepared_dir: Path, tmp_path: Path) -> None:
    manifest = json.loads((sasrec_dir / "manifest.json").read_text())
    assert manifest["kind"] == "sasrec" and manifest["onnx_max_abs_diff"] < 1e-4
    assert manifest["training"]["stopped_by"] in ("patience", "epochs")
    assert manifest["training_window"]["splits"] == ["train"] and manifest["training_window"]["protocol"] == "loo"
    curve = [row["loss"] for row in manifest["curve"]]
    assert curve[-1] < curve[0]
    out = tmp_path / "report"
    code = main(["evaluate", "--data", str(prepared_dir), "--protocol", "loo", "--sasrec", str(sasrec_dir),
                 "--no-blend", "--systems", "popularity", "--n-boot", "50", "--scores-top", "0", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "evaluation.json").read_text())
    assert report["systems"] == ["popularity", "sasrec"]
    # Trained on the planted preferences, SASRec ranks the held-out next items above popularity.
    metrics = report["metrics"]["all"]
    assert metrics["sasrec"]["ndcg@10"] > metrics["popularity"]["ndcg@10"]


def test_sasrec_export_scores_equal_torch(prepared_dir: Path, tmp_path: Path) -> None:
    """What the evaluator scores with ONNX Runtime is the torch model: state at the newest item x item table."""
    from training.sasrec import export

    torch.manual_seed(1)
    data = PreparedData.load(prepared_dir)
    config = SASRecConfig(protocol="loo", dim=16, heads=2, max_length=30)
    model = SASRec(data.n_items, config).eval()
    export(model, data, config, {"curve": []}, tmp_path / "m")
    system = load_sequence_system(tmp_path / "m", data)
    frame = data.eval_set("loo", "test")
    users = frame["user_idx"].to_numpy()[:16]
    cutoff = np.zeros(len(users), np.int64)
    got = system.scores(data, "loo", "test", users, cutoff)
    hist = ordered_histories(data, "loo", "test", users, cutoff, config.max_length)
    with torch.no_grad():
        want = (model.states(torch.from_numpy(hist.item_idx.astype(np.int64)))[:, 0] @ model.table.T).numpy()
    assert np.abs(got - want).max() < 1e-4
    assert len(set(np.argmax(got, 1).tolist())) > 1  # user-dependent, not a constant


def test_sasrec_is_refused_on_the_window_it_trained_on(sasrec_dir: Path, prepared_dir: Path, tmp_path: Path, capsys) -> None:
    """Trained on loo's train split; the global protocol's test window is inside it: exit 2."""
    code = main(["evaluate", "--data", str(prepared_dir), "--protocol", "global", "--sasrec", str(sasrec_dir),
                 "--no-blend", "--systems", "popularity", "--n-boot", "20", "--out", str(tmp_path / "r")])
    assert code == 2
    err = capsys.readouterr().err
    assert "--sasrec" in err and "overlaps the window being scored" in err


def test_sasrec_directory_errors_name_the_fix(prepared_dir: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "x").mkdir()
    code = main(["evaluate", "--data", str(prepared_dir), "--sasrec", str(tmp_path / "x"), "--out", str(tmp_path / "r")])
    assert code == 2 and "recsys train sasrec" in capsys.readouterr().err
    with pytest.raises(Exception, match="heads"):
        SASRecConfig(dim=10, heads=3)


def test_sequential_user_tower_trains_end_to_end_and_exports(prepared_dir: Path, bert: Path, tmp_path: Path) -> None:  # noqa: F811
    from training.matcher.checkpoint import load_towers
    from training.matcher.config import MatcherModelConfig

    ckpt = tmp_path / "seq"
    code = main(["train", "matcher", "--data", str(prepared_dir), "--out", str(ckpt), "--base-model", str(bert),
                 "--protocol", "loo", "--user-tower", "sequential", "--freeze-encoder", "--item-head", "16",
                 "--cache-negatives", "10000", "--logq", "--epochs", "2", "--batch-size", "64", "--head-lr", "3e-3",
                 "--threads", "1"])
    assert code == 0
    report = json.loads((ckpt / "training_report.json").read_text())
    assert report["matcher_config"]["user_tower"] == "sequential"
    assert report["history"][-1]["train_loss"] < report["history"][0]["train_loss"] + 1e-9
    assert report["fine_tuned"]["test"]["ndcg@10"] > report["zero_shot"]["test"]["ndcg@10"]
    assert isinstance(load_towers(ckpt).user_tower, SequentialUserTower)
    # Export: the same ONNX user-tower contract, so the service / batch scorer load it unchanged.
    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--data", str(prepared_dir)]) == 0
    from recsys.scoring.registry_matcher import registry_matcher

    matcher = registry_matcher(out, PreparedData.load(prepared_dir))
    frame = PreparedData.load(prepared_dir).eval_set("loo", "test")
    from recsys.data.prepared import Histories

    hist = Histories.from_frame(frame[:8])
    vectors = matcher.user_vectors(hist)
    assert vectors.shape == (8, matcher.dim) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)
    # The tower's first (per-item) layer is exported apart and run on the catalogue once, at load: the
    # served vectors still equal torch's tower over the same item embeddings.
    assert json.loads((out / "manifest.json").read_text())["models"]["user_items"] == "user_items.onnx"
    mask = hist.item_idx >= 0
    emb = torch.from_numpy(matcher.item_embeddings[np.maximum(hist.item_idx, 0)] * mask[..., None])
    with torch.no_grad():
        ref = load_towers(ckpt).user_tower.eval()(emb, torch.from_numpy(np.where(mask, hist.event_code, -1).astype(np.int64)),
                                                  torch.from_numpy(hist.age_s), torch.from_numpy(mask.astype(np.int64)))
    assert np.abs(ref.numpy() - vectors).max() < 1e-4
    with pytest.raises(Exception, match="user_tower"):
        MatcherModelConfig(user_tower="sequential")  # needs the frozen-encoder path
    with pytest.raises(Exception, match="sequence_blocks"):
        MatcherModelConfig(user_tower="sequential", freeze_encoder=True, item_head=16, sequence_blocks=0)


def test_a_warm_start_from_the_pooling_tower_keeps_its_item_tower(prepared_dir: Path, bert: Path, tmp_path: Path) -> None:  # noqa: F811
    """--user-tower sequential --warm-start POOLING_CKPT: the trained item head carries over, the user
    tower starts fresh as the sequential kind."""
    from training.matcher.checkpoint import load_checkpoint
    from training.matcher.config import MatcherModelConfig, RunConfig, TrainConfig
    from training.matcher.train import _initial_model, train

    run = RunConfig(batch_size=128, lr=1e-3, progress=False, threads=1, max_steps=2, zero_shot=False, eval_test=False)
    pooled = tmp_path / "pooled"
    common = dict(protocol="loo", freeze_encoder=True, item_head=16, cache_negatives=10_000)
    train(TrainConfig(data=str(prepared_dir), out=str(pooled), model=MatcherModelConfig(base_model=str(bert), **common), run=run))
    cfg = TrainConfig(data=str(prepared_dir), out=str(tmp_path / "seq"), run=run,
                      model=MatcherModelConfig(warm_start=str(pooled), user_tower="sequential", **common))
    model, _ = _initial_model(cfg, [])  # no --item-ids: no ID rows
    source, _ = load_checkpoint(pooled)
    assert isinstance(model.user_tower, SequentialUserTower) and model.config.user_tower == "sequential"
    assert model.item_tower.head is not None and source.item_tower.head is not None
    assert torch.equal(model.item_tower.head.fc2.weight, source.item_tower.head.fc2.weight)
    assert source.item_tower.head.fc2.weight.abs().sum() > 0  # trained, not the identity start
    # A warm start from a sequential tower of another depth starts a fresh tower of the asked depth.
    deeper = replace(cfg, model=replace(cfg.model, warm_start=None, base_model=str(bert)))
    model2, tokenizer2 = _initial_model(deeper, [])
    seq = tmp_path / "seq2"
    from training.matcher.checkpoint import save_checkpoint

    save_checkpoint(model2, tokenizer2, seq)
    shallow = replace(cfg, model=replace(cfg.model, warm_start=str(seq), sequence_blocks=1))
    model1, _ = _initial_model(shallow, [])
    assert model1.config.sequence_blocks == 1 and len(model1.user_tower.encoder.blocks) == 1


def test_sasrec_time_budget_keeps_the_best_epoch(prepared_dir: Path) -> None:
    from training.sasrec import fit

    data = PreparedData.load(prepared_dir)
    model, report = fit(data, SASRecConfig(protocol="loo", dim=16, max_length=20, epochs=50, budget_minutes=1e-9, threads=1))
    assert report["stopped_by"] == "time budget" and report["epochs_run"] == 1 == report["best_epoch"]
    assert not model.training


def test_item_id_residual_is_trained_and_baked_into_the_store_new_items_stay_text_only(
        prepared_dir: Path, bert: Path, tmp_path: Path) -> None:  # noqa: F811
    """--item-ids: trained items get a learned ID part, exported into the embedding store (so serving
    and batch scoring read it unchanged); an item without a training positive keeps exactly its text
    vector, the one the ONNX item tower computes for a new item."""
    from recsys.errors import ConfigError, InputError, ModelError
    from recsys.scoring.encoder import ItemEncoder
    from recsys.scoring.store import EmbeddingStore
    from training.export import catalogue_texts
    from training.matcher.checkpoint import ITEM_KEYS_FILE, load_checkpoint, load_towers
    from training.matcher.config import MatcherModelConfig
    from training.matcher.data import ItemTokens, item_texts
    from training.matcher.evaluate import encode_items

    ckpt = tmp_path / "ids"
    assert main(["train", "matcher", "--data", str(prepared_dir), "--out", str(ckpt), "--base-model", str(bert),
                 "--protocol", "loo", "--user-tower", "sequential", "--freeze-encoder", "--item-head", "16",
                 "--item-ids", "--id-dropout", "0.2", "--epochs", "2", "--batch-size", "64", "--head-lr", "3e-3",
                 "--threads", "1", "--no-zero-shot"]) == 0
    data = PreparedData.load(prepared_dir)
    model, tokenizer = load_checkpoint(ckpt)
    assert model.item_ids is not None and model.config.item_id_rows == data.n_items
    ids, texts = catalogue_texts(data)
    assert model.item_ids.keys == ids
    trained = np.zeros(data.n_items, bool)
    trained[np.asarray(data.pairs("loo", "train")["item_idx"])] = True
    live = model.item_ids.weight.detach().abs().sum(1).numpy() > 0
    assert live[trained].all() and not live[~trained].any() and (~trained).any()
    tokens = ItemTokens.build(item_texts(data), tokenizer, model.config.max_text_tokens)
    with torch.no_grad():
        final = encode_items(model, tokens, np.arange(data.n_items), torch.device("cpu")).numpy()
        model.item_ids = None
        text_only = encode_items(model, tokens, np.arange(data.n_items), torch.device("cpu")).numpy()
    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--data", str(prepared_dir)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["embeddings"]["item_id_residual"] == int(trained.sum())
    store = EmbeddingStore.load(out / "embeddings")
    stored = np.asarray(store.matrix[store.positions(ids)], np.float32)
    onnx_text = ItemEncoder(out / "item.onnx", out / "tokenizer.json", model.config.max_text_tokens, "cpu").encode(texts)
    assert np.abs(stored - final).max() < 1e-3  # the store holds what the trained model scores with
    assert np.abs(stored[~trained] - onnx_text[~trained]).max() < 1e-5  # untrained items: the ONNX tower's vector
    assert np.abs(onnx_text - text_only).max() < 1e-3  # the ONNX item tower has no ID part
    assert ((stored[trained] * onnx_text[trained]).sum(1) < 0.99999).all()  # trained items: the ID part is in
    # A changed text would be re-encoded text-only: refused for an item with an ID part, by name; an item
    # without one, and a new item, are encoded as before.
    encoder = ItemEncoder(out / "item.onnx", out / "tokenizer.json", model.config.max_text_tokens, "cpu")
    first_trained, first_untrained = ids[int(np.flatnonzero(trained)[0])], ids[int(np.flatnonzero(~trained)[0])]
    with pytest.raises(InputError, match=f"ID part.*{re.escape(first_trained)}"):
        store.upsert(encoder, [first_trained], ["a completely new description"])
    report = store.upsert(encoder, [first_untrained, "brand-new-item"], ["another new description", "a new item"])
    assert (report.updated, report.added) == (1, 1)
    # A broken ID table names the file; the option needs the sequential tower.
    (ckpt / ITEM_KEYS_FILE).unlink()
    with pytest.raises(ModelError, match=ITEM_KEYS_FILE):
        load_towers(ckpt)
    with pytest.raises(ConfigError, match="item_ids"):
        MatcherModelConfig(item_ids=True)
