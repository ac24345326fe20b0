"""Matcher fine-tuning on a tiny random BERT and planted-preference data: behaviour, not mocks."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

torch = pytest.importorskip("torch")

from recsys.cli import main  # noqa: E402
from recsys.errors import ConfigError, InputError, ModelError  # noqa: E402
from training.matcher.checkpoint import load_checkpoint  # noqa: E402
from training.matcher.config import MatcherModelConfig, RunConfig, TrainConfig  # noqa: E402
from training.matcher.loss import false_negative_mask, in_batch_softmax  # noqa: E402
from training.matcher.model import (  # noqa: E402
    N_EVENT_TYPES,
    TwoTower,
    UserTower,
    age_bucket,
    load_encoder,
)
from training.matcher.train import train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FAST = RunConfig(batch_size=128, lr=1e-3, progress=False, threads=1, cache_refresh=4)  # 1 thread: tiny ops
QUICK = replace(FAST, zero_shot=False, eval_test=False)  # no baselines, no test-window evaluation


def config(data: Path, out: Path, run: RunConfig = FAST, **model: Any) -> TrainConfig:
    return TrainConfig(data=str(data), out=str(out), model=MatcherModelConfig(**model), run=run)


@pytest.fixture(scope="module")
def bert(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT, with a working tokenizer: transformers 5 ignores BertTokenizerFast(vocab_file=...)
    (the saved tokenizer has 5 tokens), so rebuild it from vocab.txt in a private copy if needed."""
    from transformers import AutoTokenizer, BertTokenizer

    out = tmp_path_factory.mktemp("matcher_bert") / "model"
    shutil.copytree(tiny_bert, out)
    if len(AutoTokenizer.from_pretrained(out)) < 10:
        vocab = (out / "vocab.txt").read_text().splitlines()
        BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def trained(prepared_dir: Path, bert: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("matcher") / "ckpt"
    report = train(
        config(prepared_dir, out, replace(FAST, epochs=4), base_model=str(bert), protocol="loo", logq=True)
    )
    return out, report


def _run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


# ---- model pieces ------------------------------------------------------------------------------

def _reference_user_tower(t: UserTower, emb: Any, typ: Any, age: Any, mask: Any) -> Any:
    """The textbook formulation (project every history item to keys) the fast path must equal."""
    b, n, d = emb.shape
    h = t.heads
    types = torch.where(typ < 0, torch.full_like(typ, N_EVENT_TYPES), typ).long()
    x = emb + t.type_emb(types) + t.age_emb(age_bucket(age))
    keys = t.key(x).view(b, n, h, d // h)
    logits = (keys * t.query.view(1, 1, h, d // h)).sum(-1) / math.sqrt(d // h)
    logits = logits.masked_fill(~mask.bool().unsqueeze(-1), float("-inf"))
    w = torch.nan_to_num(torch.softmax(logits, 1)) * mask.unsqueeze(-1)
    pooled = (w.unsqueeze(-1) * emb.view(b, n, h, d // h)).sum(1).reshape(b, d)
    pooled = pooled + t.out(pooled)
    pooled = torch.where(mask.bool().any(1, keepdim=True), pooled, t.empty.expand(b, d))
    return torch.nn.functional.normalize(pooled, dim=-1)


def test_user_tower_fast_path_equals_reference_and_starts_as_mean() -> None:
    torch.manual_seed(0)
    tower = UserTower(dim=32, heads=4, dropout=0.1).eval()
    torch.nn.init.normal_(tower.out.weight, std=0.1)  # a trained-looking tower, not the zero init
    emb = torch.nn.functional.normalize(torch.randn(5, 6, 32), dim=-1)
    typ = torch.randint(-1, N_EVENT_TYPES, (5, 6))
    age = torch.rand(5, 6) * 1e6
    mask = torch.rand(5, 6) > 0.3
    mask[0] = False  # a cold-start user
    with torch.no_grad():
        assert torch.allclose(tower(emb, typ, age, mask), _reference_user_tower(tower, emb, typ, age, mask), atol=1e-5)
        fresh = UserTower(dim=32).eval()
        mean = torch.nn.functional.normalize((emb * mask[..., None]).sum(1), dim=-1)
        cos = (fresh(emb, typ, age, mask) * mean).sum(-1)[1:]
    assert cos.min() > 0.99  # untrained attention pooling ≈ mean of history: the zero-shot user


def test_layer_cache_equals_full_forward(bert: Path) -> None:
    from training.matcher.model import MatcherConfig

    encoder, tokenizer = load_encoder(str(bert))
    model = TwoTower(encoder, MatcherConfig(base_model=str(bert), dim=32)).eval()
    model.top_layers = 1
    batch = tokenizer(["trail mountain boots", "jazz piano concert vinyl album"], padding=True, return_tensors="pt")
    with torch.no_grad():
        full = model.item_tower(batch["input_ids"], batch["attention_mask"])
        lower = model.lower_hidden_states(batch["input_ids"], batch["attention_mask"])
        cached = model.encode_chunk(lower, batch["attention_mask"])
    assert torch.allclose(full, cached, atol=1e-5)


def test_loss_masks_false_negatives_and_applies_logq() -> None:
    torch.manual_seed(0)
    users = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    items = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    labels = torch.tensor([0, 1, 2])
    columns = np.array([10, 11, 12, 13])
    # user 0 also likes item 13 (a training positive); user 1 has item 10 in its history.
    positives = np.sort(np.array([0 * 100 + 10, 0 * 100 + 13, 1 * 100 + 11, 2 * 100 + 12]))
    hist = np.array([[-1], [10], [-1]])
    mask = false_negative_mask(np.array([0, 1, 2]), columns, 100, positives, hist)
    assert mask.tolist() == [[True, False, False, True], [True, True, False, False], [False, False, True, False]]
    masked = in_batch_softmax(users, items, labels, 0.1, torch.from_numpy(mask))
    logits = users @ items.T / 0.1
    expected = [
        -torch.log_softmax(logits[0, [0, 1, 2]], 0)[0],  # column 3 (item 13) removed for user 0
        -torch.log_softmax(logits[1, [1, 2, 3]], 0)[0],  # column 0 (history item) removed for user 1
        -torch.log_softmax(logits[2], 0)[2],
    ]
    assert torch.allclose(masked, torch.stack(expected).mean(), atol=1e-5)
    log_q = torch.tensor([0.0, -1.0, -2.0, -3.0])
    corrected = in_batch_softmax(users, items, labels, 0.1, log_q=log_q)
    assert torch.allclose(corrected, torch.nn.functional.cross_entropy(logits - log_q, labels), atol=1e-5)


# ---- training ----------------------------------------------------------------------------------

def test_training_loss_falls_and_beats_zero_shot_and_popularity(trained: tuple[Path, dict]) -> None:
    out, report = trained
    first_loss = report["history"][0]["train_loss"]
    assert report["history"][-1]["train_loss"] < 0.8 * first_loss
    fine, zero, pop = (report[k]["test"]["recall@10"] for k in ("fine_tuned", "zero_shot", "popularity"))
    assert fine > zero + 0.05 and fine > pop + 0.05, (fine, zero, pop)
    assert report["fine_tuned"]["test"]["recall@10_ci"][0] > pop  # beyond the interval, not by luck
    saved = json.loads((out / "training_report.json").read_text())
    assert saved["fine_tuned"] == json.loads(json.dumps(report["fine_tuned"]))
    assert (out / "training_curves.png").stat().st_size > 1000
    assert {p.name for p in out.iterdir()} >= {"item_encoder", "user_tower.safetensors", "matcher_config.json"}


def test_checkpoint_reloads_to_the_reported_scores(trained: tuple[Path, dict], prepared_dir: Path) -> None:
    from recsys.data.prepared import PreparedData
    from training.matcher.data import ItemTokens, item_texts
    from training.matcher.evaluate import EvalSet, encode_items, model_scores, ranking_metrics

    out, report = trained
    model, tokenizer = load_checkpoint(out)
    data = PreparedData.load(prepared_dir)
    tokens = ItemTokens.build(item_texts(data), tokenizer, model.config.max_text_tokens)
    emb = encode_items(model, tokens, np.arange(data.n_items), torch.device("cpu"))
    ev = EvalSet.load(data, "loo", "test", model.config.max_history)
    metrics = ranking_metrics(model_scores(model, emb, ev, torch.device("cpu")), ev, 10)
    assert metrics["recall@10"] == pytest.approx(report["fine_tuned"]["test"]["recall@10"], abs=1e-9)


def test_lora_trains_only_adapter_weights_and_saves_a_plain_encoder(prepared_dir: Path, bert: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModel

    out = tmp_path / "lora"
    train(config(prepared_dir, out, replace(QUICK, max_steps=3), base_model=str(bert), lora=True))
    state = load_file(str(out / "state" / "model.safetensors"))
    base = AutoModel.from_pretrained(bert).state_dict()
    lora_keys = [k for k in state if "lora_" in k]
    assert lora_keys and any(state[k].abs().sum() > 0 for k in lora_keys if "lora_B" in k)
    for key, value in state.items():
        if key.startswith("item_tower.encoder.") and "lora_" not in key:
            name = key.removeprefix("item_tower.encoder.base_model.model.").replace(".base_layer", "")
            assert torch.equal(value, base[name]), f"frozen weight {name} changed"
    merged = AutoModel.from_pretrained(out / "item_encoder")  # plain model: export loads it the same way
    assert not any("lora" in k for k in merged.state_dict())
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, base[k])]
    assert changed and all(("query" in k or "value" in k) and k.endswith("weight") for k in changed)


def test_benchmark_only_step_modes_live_in_bench_and_the_default_equals_production(
    prepared_dir: Path, bert: Path, tmp_path: Path
) -> None:
    """bench/matcher.py's naive modes (per-pair encoding, history with gradients, no bucketing) run
    one step each; with none of them on, its step is the production step to the bit."""
    import importlib.util

    from training.matcher.train import _Trainer

    spec = importlib.util.spec_from_file_location("bench_matcher", Path(__file__).resolve().parents[1] / "bench" / "matcher.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_matcher"] = bench  # the importlib recipe: dataclasses look their module up there
    spec.loader.exec_module(bench)
    cfg = config(prepared_dir, tmp_path / "o", QUICK, base_model=str(bert))
    losses = {}
    for modes in ({}, {"dedupe": False, "history_grad": True, "bucket": False}, {"history_grad": True}):
        trainer = bench.naive_modes_trainer(cfg, **modes)
        trainer.model.train()
        losses[tuple(modes)] = trainer.train_step(trainer.batch_rows(0, 0), 0)
    production = _Trainer(cfg)
    production.model.train()
    assert production.train_step(production.batch_rows(0, 0), 0) == losses[()]
    assert all(np.isfinite(v) for v in losses.values())


def test_resume_continues_from_the_saved_step_and_matches_an_uninterrupted_run(
    prepared_dir: Path, bert: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    model = MatcherModelConfig(base_model=str(bert))
    train(TrainConfig(str(prepared_dir), str(tmp_path / "a"), model, replace(QUICK, max_steps=4)))
    saved = torch.load(tmp_path / "a" / "state" / "trainer_state.pt", weights_only=False)
    assert saved["step"] == 4
    report = train(TrainConfig(str(prepared_dir), str(tmp_path / "a"), model, replace(QUICK, max_steps=8, resume=True)))
    assert report["steps"] == 8 and [h["step"] for h in report["history"]] == [4, 8]
    train(TrainConfig(str(prepared_dir), str(tmp_path / "b"), model, replace(QUICK, max_steps=8)))
    resumed = load_file(str(tmp_path / "a" / "state" / "model.safetensors"))
    straight = load_file(str(tmp_path / "b" / "state" / "model.safetensors"))
    assert all(torch.allclose(resumed[k], straight[k], atol=1e-5) for k in straight)


def test_warm_start_continues_from_a_checkpoint(trained: tuple[Path, dict], prepared_dir: Path, tmp_path: Path) -> None:
    ckpt, report = trained
    out = tmp_path / "warm"
    warm = train(config(prepared_dir, out, replace(FAST, max_steps=2), warm_start=str(ckpt), protocol="loo"))
    # The "before training" baseline of a warm start is the earlier model, not the raw encoder.
    assert warm["zero_shot"]["test"]["recall@10"] == pytest.approx(report["fine_tuned"]["test"]["recall@10"])


def test_train_layers_freezes_the_lower_encoder(prepared_dir: Path, bert: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModel

    out = tmp_path / "top1"
    report = train(config(prepared_dir, out, replace(QUICK, max_steps=3), base_model=str(bert), train_layers=1))
    base = AutoModel.from_pretrained(bert).state_dict()
    state = load_file(str(out / "state" / "model.safetensors"))
    changed = {k.removeprefix("item_tower.encoder.") for k in state if k.startswith("item_tower.encoder.")
               and not torch.equal(state[k], base[k.removeprefix("item_tower.encoder.")])}
    assert changed and all(k.startswith("encoder.layer.1.") for k in changed)
    assert report["steps"] == 3


def test_lora_on_the_top_layers_adapts_only_those_blocks_over_the_layer_cache(prepared_dir: Path, bert: Path,
                                                                            tmp_path: Path) -> None:
    """--lora --train-layers 1: adapters on the top block only, lower blocks cached once per item text;
    the cached path's item embeddings equal a full encoder pass of the trained model."""
    from safetensors.torch import load_file
    from transformers import AutoModel

    from training.matcher.evaluate import encode_items
    from training.matcher.train import _Trainer

    out = tmp_path / "lora_top1"
    report = train(config(prepared_dir, out, replace(QUICK, max_steps=3), base_model=str(bert), lora=True, train_layers=1))
    state = load_file(str(out / "state" / "model.safetensors"))
    lora_keys = [k for k in state if "lora_" in k]
    assert lora_keys and all(".layer.1." in k for k in lora_keys)
    assert any(state[k].abs().sum() > 0 for k in lora_keys if "lora_B" in k)
    merged = AutoModel.from_pretrained(out / "item_encoder").state_dict()
    base = AutoModel.from_pretrained(bert).state_dict()
    changed = [k for k in merged if not torch.equal(merged[k], base[k])]
    assert changed and all(k.startswith("encoder.layer.1.") for k in changed)
    assert report["steps"] == 3

    trainer = _Trainer(config(prepared_dir, tmp_path / "probe", QUICK, base_model=str(bert), lora=True, train_layers=1))
    assert trainer.lower is not None and trainer.lower.ndim == 3  # the lower block's cached outputs
    with torch.no_grad():  # move the adapters off zero, then compare the two paths
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    trainer.model.eval()
    items = np.arange(trainer.n_items)
    cached = encode_items(trainer.model, trainer.tokens, items, trainer.device, lower=trainer.lower)
    full = encode_items(trainer.model, trainer.tokens, items, trainer.device)
    assert torch.allclose(cached, full, atol=1e-5)


def test_item_head_with_frozen_encoder_trains_head_and_user_tower_only(prepared_dir: Path, bert: Path,
                                                                      tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModel

    from training.matcher.checkpoint import load_checkpoint, load_towers

    out = tmp_path / "head"
    report = train(config(prepared_dir, out, replace(FAST, epochs=2), base_model=str(bert), protocol="loo",
                          freeze_encoder=True, item_head=16, cache_negatives=10_000))
    base = AutoModel.from_pretrained(bert).state_dict()
    state = load_file(str(out / "state" / "model.safetensors"))
    assert all(torch.equal(state[k], base[k.removeprefix("item_tower.encoder.")])
               for k in state if k.startswith("item_tower.encoder."))
    assert not torch.equal(state["item_tower.head.fc2.weight"], torch.zeros_like(state["item_tower.head.fc2.weight"]))
    assert (out / "item_head.safetensors").exists()
    assert report["fine_tuned"]["test"]["recall@10"] > report["zero_shot"]["test"]["recall@10"]
    # The checkpoint reloads with its head (training and export agree on the item tower).
    model, tokenizer = load_checkpoint(out)
    ckpt = load_towers(out)
    batch = tokenizer(["trail mountain boots", "jazz piano concert vinyl album"], padding=True, return_tensors="pt")
    with torch.no_grad():
        a = model.eval().item_tower(batch["input_ids"], batch["attention_mask"])
        b = ckpt.item_tower(batch["input_ids"], batch["attention_mask"])
        plain = torch.nn.functional.normalize(
            ckpt.item_tower.encoder(**batch).last_hidden_state.mul(batch["attention_mask"][..., None]).sum(1), dim=-1)
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(a, plain, atol=1e-3)


def test_catalogue_negatives_never_include_items_without_a_training_positive(
    prepared_dir: Path, bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An item nobody has interacted with yet is not everyone's negative (that would bury new items)."""
    import training.matcher.train as train_module
    from recsys.data.prepared import PreparedData

    seen: list[np.ndarray] = []

    def spy(users: Any, columns: np.ndarray, *args: Any) -> Any:  # records, then runs the real mask
        seen.append(np.asarray(columns))
        return false_negative_mask(users, columns, *args)

    monkeypatch.setattr(train_module, "false_negative_mask", spy)
    train(config(prepared_dir, tmp_path / "m", replace(QUICK, max_steps=2), base_model=str(bert), protocol="loo",
                 freeze_encoder=True, item_head=16, cache_negatives=10_000))
    data = PreparedData.load(prepared_dir)
    trained = np.unique(data.pairs("loo", "train")["item_idx"].to_numpy())
    assert len(trained) < data.n_items  # the dataset has items without a training positive
    assert seen and all(np.isin(cols, trained).all() for cols in seen)
    assert any(len(cols) == len(trained) for cols in seen)  # and the pool is every trained item


def test_freeze_encoder_needs_an_item_head() -> None:
    with pytest.raises(ConfigError, match="freeze_encoder"):
        MatcherModelConfig(freeze_encoder=True)


def test_torchrun_two_processes_on_cpu_train_one_model(prepared_dir: Path, bert: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "recsys.cli", "train", "matcher", "--data", str(prepared_dir), "--out", str(out),
        "--base-model", str(bert), "--batch-size", "64", "--max-steps", "3", "--lr", "1e-3",
        "--no-progress", "--no-zero-shot", "--device", "cpu",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "training_report.json").read_text())
    assert report["world_size"] == 2 and report["steps"] == 3
    assert report["pairs_per_second"] > 0
    model, _ = load_checkpoint(out)  # one model, loadable
    assert model.config.dim == 32


# ---- bad input -----------------------------------------------------------------------------

def test_base_model_that_is_not_a_transformer_is_a_model_error(prepared_dir: Path, tmp_path: Path, capsys) -> None:
    junk = tmp_path / "not_a_model"
    junk.mkdir()
    (junk / "weights.bin").write_bytes(b"\x00" * 16)
    with pytest.raises(ModelError, match="cannot load a transformer encoder"):
        load_encoder(str(junk))
    code, err = _run_cli(["train", "matcher", "--data", str(prepared_dir), "--out", str(tmp_path / "o"),
                          "--base-model", str(junk), "--no-progress"], capsys)
    assert code == 2 and "error: cannot load a transformer encoder" in " ".join(err.split()) and "Traceback" not in err


def test_empty_training_set_is_an_input_error(prepared_dir: Path, bert: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "empty"
    shutil.copytree(prepared_dir, data)
    pairs = pl.read_parquet(data / "pairs.parquet")
    pairs.filter(pl.col("split_global") != "train").write_parquet(data / "pairs.parquet")
    with pytest.raises(InputError, match="no positive pairs"):
        train(config(data, tmp_path / "o", RunConfig(progress=False), base_model=str(bert)))
    code, err = _run_cli(["train", "matcher", "--data", str(data), "--out", str(tmp_path / "o"),
                          "--base-model", str(bert)], capsys)
    assert code == 2 and "nothing to train on" in " ".join(err.split()) and "Traceback" not in err


def test_warm_start_with_another_tokenizer_is_a_model_error(trained: tuple[Path, dict], prepared_dir: Path,
                                                            tmp_path: Path, capsys) -> None:
    from transformers import BertConfig, BertModel, BertTokenizer

    other = tmp_path / "other_bert"
    BertTokenizer(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"])}).save_pretrained(other)
    BertModel(BertConfig(vocab_size=7, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=64)).save_pretrained(other)
    ckpt, _ = trained
    code, err = _run_cli(["train", "matcher", "--data", str(prepared_dir), "--out", str(tmp_path / "o"),
                          "--warm-start", str(ckpt), "--base-model", str(other)], capsys)
    assert code == 2 and "tokenizer mismatch" in " ".join(err.split()) and "Traceback" not in err


def test_cli_module_does_not_import_torch() -> None:
    code = "import sys, training.matcher.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"


def test_train_config_reads_its_nested_form_and_the_flat_one_written_before_the_split(tmp_path: Path) -> None:
    """Training reports and resume state hold `TrainConfig.to_dict()`; checkpoints written before the
    model/run split hold one flat dict (with the benchmark-only modes of that time): both load, and
    `recsys retrain` warm-starts from an old checkpoint with its settings."""
    from training.retrain import matcher_config

    cfg = config(tmp_path / "d", tmp_path / "o", replace(FAST, epochs=5, seed=3), item_head=32, protocol="loo")
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    flat = {
        "data": str(tmp_path / "d"), "out": str(tmp_path / "o"), "base_model": None, "protocol": "loo", "lora": False,
        "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "epochs": 5, "batch_size": 128, "lr": 1e-3, "head_lr": 1e-3,
        "weight_decay": 0.01, "warmup": 0.1, "temperature": 0.05, "dropout": 0.1, "max_history": 20,
        "max_text_tokens": 64, "hard_negatives": 0, "logq": False, "cache_negatives": 0, "cache_refresh": 4,
        "encode_chunk": 128, "dedupe": True, "history_grad": False, "bucket": True, "train_layers": 0, "item_head": 32,
        "freeze_encoder": False, "layer_cache": True, "max_grad_norm": 1.0, "patience": 2, "eval_k": 10,
        "weight_by_strength": True, "seed": 3, "warm_start": None, "resume": False, "max_steps": 0, "save_every": 0,
        "device": "auto", "bf16": True, "threads": 1, "progress": False, "zero_shot": True, "eval_test": True,
    }
    assert TrainConfig.from_dict(flat) == cfg
    with pytest.raises(ConfigError, match="epochs=0"):
        TrainConfig.from_dict({**flat, "epochs": 0})

    ckpt = tmp_path / "old_ckpt"
    ckpt.mkdir()
    (ckpt / "training_report.json").write_text(json.dumps({"config": flat}))
    (ckpt / "matcher_config.json").write_text(json.dumps({"base_model": "b", "dim": 32, "max_history": 12, "item_head": 32}))
    warm = matcher_config(ckpt, tmp_path / "new", tmp_path / "next", {"epochs": 1, "batch_size": 64})
    assert warm.data == str(tmp_path / "new") and warm.model.warm_start == str(ckpt) and warm.model.base_model is None
    assert (warm.model.protocol, warm.model.item_head, warm.model.max_history) == ("loo", 32, 12)
    assert (warm.run.epochs, warm.run.batch_size, warm.run.seed, warm.run.progress) == (1, 64, 3, False)


def test_gpu_check_fine_tuning_step_dry_runs_on_cpu(tmp_path: Path) -> None:
    """bench/gpu_check.sh cannot run without a GPU: its shell must parse, and its fine-tuning step
    (bench/gpu_finetune.py, full + LoRA) must run end to end on a CPU with a tiny BERT."""
    subprocess.run(["bash", "-n", str(REPO / "bench" / "gpu_check.sh")], check=True)
    assert "bench/gpu_finetune.py" in (REPO / "bench" / "gpu_check.sh").read_text()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_finetune.py"), "--dry-run", "--work", str(tmp_path),
                           "--out", str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "finetune_gpu.json").read_text())
    rows = {r["mode"]: r for r in report["rows"]}
    assert set(rows) == {"full", "lora"} and all(r["steps"] == 2 and r["pairs_per_second"] > 0 for r in rows.values())
    assert rows["lora"]["trainable_parameters"] < rows["full"]["trainable_parameters"]
