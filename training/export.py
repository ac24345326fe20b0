"""Export a matcher checkpoint to ONNX, prove parity, optimise, build variants, register a version.

Exporter choice: the TorchScript exporter (`torch.onnx.export(..., dynamo=False)`) with
`dynamic_axes`. Both towers are plain traceable modules; it needs no onnxscript, exports the BERT
graph that ONNX Runtime's transformer optimizer recognises (Attention/SkipLayerNorm/Gelu fusion),
and its dynamic batch/sequence axes are the long-proven path. Tracing records one control-flow path,
so the item tower is traced with a padded row and every export is checked against torch on fresh
random inputs of other shapes (cosine >= 0.9999) before anything is written to the registry.

Variants (int8 dynamic quantisation for CPU, fp16 for GPU) are only kept when ranking quality holds:
Recall@10 on a prepared dataset's validation users, encoded with fp32 vs the variant, must not drop by
more than `recall_tolerance`; without a dataset, mean embedding cosine vs fp32 is the (stated) proxy.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recsys.data.prepared import PreparedData
from recsys.data.window import read_window
from recsys.errors import InputError, ModelError
from recsys.evaluation.metrics import bootstrap_ci
from recsys.files import utc_now
from recsys.registry import MANIFEST, Registry, hash_files
from recsys.scoring.encoder import ItemEncoder, TextTokenizer, UserEncoder
from recsys.scoring.providers import CPU, CUDA, accelerator_status, ort
from recsys.scoring.store import EmbeddingStore, text_hash
from training.matcher.checkpoint import ITEM_ENCODER_DIR, Checkpoint, load_towers
from training.matcher.evaluate import EvalSet, RankingEvaluator
from training.matcher.model import (
    N_EVENT_TYPES,
    ItemTower,
)

log = logging.getLogger(__name__)

# --- ONNX export --------------------------------------------------------------------------------


def export_item_tower(tower: ItemTower, path: Path, opset: int = 17) -> None:
    """(input_ids [B,T] int64, attention_mask [B,T] int64) -> embedding [B,D] float32."""
    ids = torch.tensor([[2, 7, 9, 11, 13, 3, 0, 0], [2, 5, 6, 8, 10, 12, 14, 3]], dtype=torch.long)
    mask = (torch.arange(8) < torch.tensor([[6], [8]])).long()  # a padded row: trace the masking path
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}, "embedding": {0: "batch"}}
    _export(tower, (ids, mask), path, ["input_ids", "attention_mask"], ["embedding"], axes, opset)


def export_user_tower(tower: torch.nn.Module, path: Path, dim: int, opset: int = 17, items_path: Path | None = None) -> int:
    """hist_emb [B,N,W] f32, hist_type [B,N] i64 (-1 pad), hist_age [B,N] f32 s, hist_mask [B,N] i64
    -> user [B,D] f32; returns W. W = D (hist_emb: item embeddings), unless `items_path` is given and the
    tower has a history projection (the sequential tower): then that projection is exported there
    (item_emb [n, D] -> history [n, W]), applied to the catalogue once at model load, and hist_emb holds
    its rows (recsys.scoring.encoder.UserEncoder.history_table)."""
    width = dim
    split = getattr(tower, "history_projection", None)
    if items_path is not None and callable(split):
        projection, tower = split()
        with torch.no_grad():
            width = int(projection(torch.zeros(1, dim)).shape[-1])
        _export(projection, (torch.randn(3, dim),), items_path, ["item_emb"], ["history"],
                {"item_emb": {0: "items"}, "history": {0: "items"}}, opset)
    b, n = 2, 5
    emb = torch.nn.functional.normalize(torch.randn(b, n, width), dim=-1)
    types = torch.tensor([[0, 1, 2, -1, -1], [3, 1, 0, 2, 4]], dtype=torch.long)
    ages = torch.rand(b, n) * 1e6
    mask = (types >= 0).long()
    names = ["hist_emb", "hist_type", "hist_age", "hist_mask"]
    axes: dict[str, dict[int, str]] = {name: {0: "batch", 1: "history"} for name in names}
    axes["user"] = {0: "batch"}
    _export(tower, (emb, types, ages, mask), path, names, ["user"], axes, opset)
    return width


def _export(module: torch.nn.Module, args: tuple[torch.Tensor, ...], path: Path, inputs: list[str],
            outputs: list[str], axes: dict[str, dict[int, str]], opset: int) -> None:
    module.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings; parity checks below are the real test
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes=axes, opset_version=opset, dynamo=False, do_constant_folding=True)
    import onnx

    onnx.checker.check_model(str(path))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence ORT's python tools (they log at INFO/WARNING on their own and the root logger)."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def optimize_item_model(src: Path, dst: Path, num_heads: int, hidden: int) -> dict[str, int]:
    """Offline transformer fusions (Attention, SkipLayerNorm, BiasGelu, EmbedLayerNorm). opt_level=0
    runs only these portable fusions, so the saved graph runs on CPU and CUDA alike."""
    from onnxruntime.transformers.optimizer import optimize_model

    with _quiet():  # one INFO line per fusion otherwise
        model = optimize_model(str(src), model_type="bert", num_heads=num_heads, hidden_size=hidden, opt_level=0, use_gpu=False)
        model.save_model_to_file(str(dst))
    return {k: int(v) for k, v in model.get_fused_operator_statistics().items() if v}


def optimize_offline(src: Path, dst: Path) -> None:
    """ORT's basic (provider-independent) graph optimisations, saved so sessions start from them."""
    rt = ort()
    opts = rt.SessionOptions()
    opts.graph_optimization_level = rt.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(dst)
    opts.log_severity_level = 3
    rt.InferenceSession(str(src), sess_options=opts, providers=[CPU])


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 (weights per channel, activations per batch) for the CPU provider. Per-channel
    weights matter: per-tensor loses ~3 cosine points on MiniLM, per-channel under one."""
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet():  # it logs a pre-processing hint on the root logger
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                         extra_options={"DefaultTensorType": TensorProto.FLOAT})


def convert_fp16(src: Path, dst: Path) -> None:
    """fp16 weights and compute, fp32 inputs/outputs (callers need not change), for GPUs."""
    import onnx
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(onnx.load(str(src)))
    with _quiet():
        model.convert_float_to_float16(keep_io_types=True)
        model.save_model_to_file(str(dst))


# --- parity -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Parity:
    min_cosine: float
    max_abs_diff: float
    shapes: list[list[int]]

    @property
    def ok(self) -> bool:
        return self.min_cosine >= PARITY_COSINE


PARITY_COSINE = 0.9999


def _compare(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """(min cosine, max |diff|) per row; two zero vectors agree (the zero-shot user tower's empty history)."""
    ref_norm, got_norm = np.linalg.norm(ref, axis=1), np.linalg.norm(got, axis=1)
    cos = (ref * got).sum(1) / (ref_norm * got_norm + 1e-12)
    cos = np.where((ref_norm < 1e-6) & (got_norm < 1e-6), 1.0, cos)
    return float(cos.min()), float(np.abs(ref - got).max())


def random_token_batch(rng: np.random.Generator, b: int, t: int, vocab: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded random ids (lengths 2..t, one row full length) and their mask."""
    lengths = rng.integers(2, t + 1, size=b)
    lengths[0] = t
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask == 1, rng.integers(0, vocab, size=(b, t)), pad_id).astype(np.int64)
    return ids, mask


def item_parity(tower: ItemTower, model: Path, vocab: int, max_len: int, pad_id: int = 0, seed: int = 0) -> Parity:
    """torch vs ORT (CPU, fp32) on fresh random shapes unlike the traced one, incl. batch 1."""
    from recsys.scoring.providers import create_session

    session, _ = create_session(model, "cpu")
    rng = np.random.default_rng(seed)
    worst, diff, shapes = 1.0, 0.0, []
    for b, t in ((1, 3), (5, 17), (16, max_len)):
        ids, mask = random_token_batch(rng, b, t, vocab, pad_id)
        with torch.no_grad():
            ref = tower(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
        got = session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        c, d = _compare(ref, got)
        worst, diff = min(worst, c), max(diff, d)
        shapes.append([b, t])
    return Parity(worst, diff, shapes)


def user_parity(tower: torch.nn.Module, model: Path, dim: int, seed: int = 0, items: Path | None = None) -> Parity:
    """Includes an empty history (the cold-start branch) and histories longer than the traced one.
    `items`: the history projection (export_user_tower's items_path), run on the histories first,
    as the service runs it on the catalogue."""
    from recsys.scoring.encoder import UserEncoder

    encoder = UserEncoder(model, "cpu", items_path=items)
    rng = np.random.default_rng(seed)
    worst, diff, shapes = 1.0, 0.0, []
    for b, n in ((1, 1), (7, 20), (3, 50)):
        emb = rng.standard_normal((b, n, dim)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
        lengths = rng.integers(0, n + 1, size=b)
        lengths[0] = n
        if b > 1:
            lengths[1] = 0
        mask = (np.arange(n)[None, :] < lengths[:, None]).astype(np.int64)
        types = np.where(mask == 1, rng.integers(0, N_EVENT_TYPES, size=(b, n)), -1).astype(np.int64)
        ages = (rng.random((b, n)) * 1e7 * mask).astype(np.float32)
        feeds = {"hist_emb": (emb * mask[..., None]).astype(np.float32), "hist_type": types, "hist_age": ages, "hist_mask": mask}
        with torch.no_grad():
            ref = tower(*(torch.from_numpy(np.asarray(v)) for v in feeds.values())).numpy()
        rows = encoder.history_table(emb.reshape(b * n, dim)).reshape(b, n, -1) * mask[..., None]
        got = encoder.encode(rows, types, ages, mask)
        c, d = _compare(ref, got)
        worst, diff = min(worst, c), max(diff, d)
        shapes.append([b, n, dim])
    return Parity(worst, diff, shapes)


# --- quality of variants ------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportConfig:
    opset: int = 17
    int8: bool = False
    fp16: bool = False
    recall_tolerance: float = 0.01  # a variant may lose at most this much Recall@10 (absolute)
    cosine_tolerance: float = 0.99  # fallback without --data: mean cosine vs fp32 at least this
    protocol: str = "global"
    split: str = "valid"
    eval_users: int = 5000
    k: int = 10
    embeddings_dtype: str = "float32"
    batch_size: int = 64
    threads: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.recall_tolerance < 1 or not 0 < self.cosine_tolerance <= 1:
            raise InputError("recall tolerance must be in [0, 1) and cosine tolerance in (0, 1]")
        if self.embeddings_dtype not in ("float32", "float16"):
            raise InputError(f"--embeddings-dtype must be float32 or float16, got {self.embeddings_dtype!r}")


def catalogue_texts(data: PreparedData) -> tuple[list[str], list[str]]:
    """(item_id, text) of every item in item_idx order: what the embedding store is built from."""
    items = data.items.sort("item_idx")
    if "text" not in items.columns:
        raise InputError(f"{data.root / 'items.parquet'} has no 'text' column: rerun recsys prepare")
    return [str(i) for i in items["item_id"].to_list()], [str(t) for t in items["text"].to_list()]


def onnx_recall(evaluator: RankingEvaluator, item_emb: np.ndarray, users: UserEncoder) -> np.ndarray:
    """Per-user Recall@k of the matcher's one evaluator when the catalogue is encoded as `item_emb`
    [n_items, D] and users by the ONNX user tower over those embeddings (histories included)."""
    from recsys.scoring.matcher import tower_encoder

    ev = evaluator.ev
    assert ev is not None
    user_emb = tower_encoder(item_emb, users)(ev.hist_item, ev.hist_type, ev.hist_age)
    return evaluator.per_user(user_emb @ item_emb.T).recall


def fallback_texts(n: int = 512, seed: int = 0) -> list[str]:
    """Catalogue-like texts from the synthetic generator, for checks without a prepared dataset."""
    from recsys.data.synthetic import generate

    items = generate(n_users=20, n_items=n, n_events=200, seed=seed).items
    return [f"{t}. {d}. {g.replace('|', ', ')}" for t, d, g in
            zip(items["title"].to_list(), items["description"].to_list(), items["tags"].to_list(), strict=True)]


@dataclass
class Reference:
    """What variants are judged against: the fp32 item embeddings of `texts` (the catalogue with a
    prepared dataset, else synthetic texts) and, with a dataset, the evaluator and fp32 Recall@k."""

    texts: list[str]
    item_ids: list[str] | None  # None: synthetic texts (no dataset, no embedding store)
    emb: np.ndarray
    users: UserEncoder
    evaluator: RankingEvaluator | None
    recall: np.ndarray | None
    ids: ItemIdPart | None = None  # the checkpoint's ID residual, baked into every catalogue encoding

    def final(self, emb: np.ndarray) -> np.ndarray:
        """Text-tower encodings of `texts` -> the catalogue's item vectors (ID residual baked in)."""
        return emb if self.ids is None or self.item_ids is None else self.ids.bake(self.item_ids, emb)


@dataclass
class ItemIdPart:
    """A checkpoint's learned per-item ID residual (--item-ids): rows of the items it was trained on.

    `bake` gives the item vectors the trained model scores with, normalize(text + id[item]), for the
    items that have a row; every other item keeps its text-tower vector, which is what the ONNX item
    tower computes for items encoded on the fly (new items), so serving needs no change."""

    keys: list[str]
    weight: np.ndarray  # [rows, D]

    @classmethod
    def of(cls, keys: list[str], weight: torch.Tensor) -> ItemIdPart:
        """The nonzero rows (items with a training positive; the rest never left zero)."""
        w = weight.detach().float().cpu().numpy()
        live = np.flatnonzero(np.abs(w).sum(1) > 0)
        return cls([keys[i] for i in live], w[live])

    def bake(self, item_ids: list[str], emb: np.ndarray) -> np.ndarray:
        row = {k: i for i, k in enumerate(self.keys)}
        pairs = np.array([(j, row[k]) for j, k in enumerate(item_ids) if k in row], np.int64).reshape(-1, 2)
        out = np.array(emb, np.float32, copy=True)
        mixed = out[pairs[:, 0]] + self.weight[pairs[:, 1]]
        out[pairs[:, 0]] = mixed / np.maximum(np.linalg.norm(mixed, axis=1, keepdims=True), 1e-12)
        return out


# The catalogue is encoded on CPU with the plain export under ORT's own online fusions: at catalogue
# lengths (~15 tokens) its unfused attention (MatMul + softmax) does ~12% more per CPU-second than
# item.opt.onnx's fused Attention kernel (bench/encoder.py), which stays the model served on CUDA.
CATALOGUE_MODEL = "item.onnx"
USER_ITEMS_MODEL = "user_items.onnx"  # the user tower's history projection (export_user_tower), when it has one


def user_items(out_dir: Path) -> Path | None:
    """The export's user-tower history projection, None when the tower has none."""
    path = out_dir / USER_ITEMS_MODEL
    return path if path.exists() else None


def catalogue_encoder(model: Path, tokenizer: Path, max_len: int, provider: str, config: ExportConfig) -> ItemEncoder:
    """The item encoder a publish encodes the catalogue with: token-budget batches, and intra-op threads
    that sleep between ops instead of spinning (bench/encoder.py: spinning burns a fifth of the CPU time
    on a shared machine for no throughput)."""
    return ItemEncoder(model, tokenizer, max_len, provider, config.threads, config.batch_size, spinning=False)


def reference_embeddings(out_dir: Path, max_len: int, config: ExportConfig, prepared: PreparedData | None,
                         ids: ItemIdPart | None = None) -> Reference:
    """Encode the texts with the fp32 item model (with data: the ID residual `ids` baked in) and, with
    data, its per-user Recall@k on the eval users."""
    item_ids, evaluator = None, None
    if prepared is not None:
        item_ids, texts = catalogue_texts(prepared)
        eval_set = EvalSet.load(prepared, config.protocol, config.split, prepared.max_history,
                                limit=config.eval_users, seed=config.seed)
        evaluator = RankingEvaluator(eval_set, config.k)
    else:
        texts = fallback_texts(seed=config.seed)
    fp32 = catalogue_encoder(out_dir / CATALOGUE_MODEL, out_dir / "tokenizer.json", max_len, "cpu", config)
    users = UserEncoder(out_dir / "user.onnx", "cpu", config.threads, items_path=user_items(out_dir))
    ref = Reference(texts, item_ids, np.empty(0), users, evaluator, None, ids)
    ref.emb = ref.final(fp32.encode(texts))
    ref.recall = onnx_recall(evaluator, ref.emb, users) if evaluator is not None else None
    return ref


def judge_variant(name: str, variant: ItemEncoder, ref: Reference, config: ExportConfig) -> dict[str, Any]:
    """Encode the same texts with the variant; accept on Recall@k delta (or cosine, stated)."""
    texts = ref.texts
    emb = ref.final(variant.encode(texts))
    cos = (emb * ref.emb).sum(1)
    report: dict[str, Any] = {
        "provider": variant.info.primary,
        "cosine_mean": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "texts": len(texts),
    }
    if ref.evaluator is not None and ref.recall is not None:
        recall = onnx_recall(ref.evaluator, emb, ref.users)
        diff = recall - ref.recall
        report.update(
            criterion=f"Recall@{config.k} on {config.protocol}/{config.split} may drop by at most {config.recall_tolerance}",
            users=len(recall),
            recall_fp32=float(ref.recall.mean()),
            recall=float(recall.mean()),
            recall_delta=float(diff.mean()),
            recall_delta_ci95=list(bootstrap_ci(diff, n_boot=500, seed=config.seed)),
            accepted=bool(diff.mean() >= -config.recall_tolerance),
        )
    else:
        report.update(
            criterion=f"no --data: embedding cosine agreement with fp32 on {len(texts)} synthetic catalogue texts "
            f"(mean >= {config.cosine_tolerance}); Recall@{config.k} delta not measured",
            recall_delta=None,
            accepted=bool(cos.mean() >= config.cosine_tolerance),
        )
    log.info("%s variant: %s", name, {k: v for k, v in report.items() if k != "criterion"})
    return report


# --- the whole export ---------------------------------------------------------------------------


@dataclass
class ExportResult:
    out_dir: Path
    manifest: dict[str, Any]
    hashed: list[str] = field(default_factory=list)


def export_checkpoint(ckpt_path: Path | str, out_dir: Path, config: ExportConfig | None = None,
                      data: Path | str | None = None) -> ExportResult:
    """Write item.onnx, item.opt.onnx, user.onnx, tokenizer.json, accepted variants and (with data) the
    catalogue's embedding store into `out_dir`; return the manifest fields. Raises ModelError when
    parity fails, so a bad export never reaches the registry."""
    config = config or ExportConfig()
    ckpt = load_towers(ckpt_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer, metrics = write_towers(ckpt, out_dir, config)
    prepared = PreparedData.load(data) if data is not None else None
    ids = ItemIdPart.of(*ckpt.item_ids) if ckpt.item_ids is not None else None
    ref = reference_embeddings(out_dir, tokenizer.max_length, config, prepared, ids)
    if ref.evaluator is not None and ref.recall is not None:
        metrics[f"recall@{config.k}"] = {"protocol": config.protocol, "split": config.split, "users": len(ref.recall),
                                         "value": float(ref.recall.mean())}
    models = {"fp32": "item.opt.onnx", "fp32_raw": "item.onnx"} | build_variants(out_dir, tokenizer.max_length,
                                                                                 config, ref, metrics)
    embeddings = None
    if ref.item_ids is not None:
        with_id_part = [] if ids is None else sorted(set(ref.item_ids) & set(ids.keys))  # rows with an ID residual
        store = EmbeddingStore.write(out_dir / "embeddings", ref.item_ids, ref.emb,
                                     [text_hash(t) for t in ref.texts], config.embeddings_dtype,
                                     extra={"encoded_with": CATALOGUE_MODEL, "with_id_part": with_id_part})
        embeddings = {"path": "embeddings", "count": len(store), "dtype": config.embeddings_dtype,
                      "sha256_at_export": store.meta["sha256"], "item_id_residual": len(with_id_part)}
    manifest = {
        **_matcher_manifest(ckpt.config.dim, models, tokenizer, user_items(out_dir)),
        "embeddings": embeddings,
        "training_config": {**asdict(ckpt.config), **({"trainer": ckpt.extra_config} if ckpt.extra_config else {})},
        "export_config": asdict(config),
        "metrics": metrics,
        "source": {"checkpoint": str(Path(ckpt_path).resolve()), "data": str(Path(data).resolve()) if data else None},
        "training_window": read_window(ckpt_path),  # None: an untrained (zero-shot) checkpoint
        "runtime": _runtime(config.opset),
    }
    hashed = sorted(p.name for p in out_dir.iterdir() if p.is_file() and p.name != MANIFEST)
    return ExportResult(out_dir, manifest, hashed)


def write_towers(ckpt: Checkpoint, out_dir: Path, config: ExportConfig) -> tuple[TextTokenizer, dict[str, Any]]:
    """item.onnx, item.opt.onnx (fused), user.onnx and tokenizer.json, each proven against torch (a
    ModelError otherwise) -> (the serving tokenizer, metrics: parity, tokenizer check, fusions)."""
    cfg = ckpt.config
    enc_cfg: Any = ckpt.item_tower.encoder.config
    max_len = min(cfg.max_text_tokens, int(getattr(enc_cfg, "max_position_embeddings", cfg.max_text_tokens)))
    export_item_tower(ckpt.item_tower, out_dir / "item.onnx", config.opset)
    fusions = optimize_item_model(out_dir / "item.onnx", out_dir / "item.opt.onnx",
                                  int(enc_cfg.num_attention_heads), int(enc_cfg.hidden_size))
    export_user_tower(ckpt.user_tower, out_dir / "user.raw.onnx", cfg.dim, config.opset, items_path=out_dir / USER_ITEMS_MODEL)
    optimize_offline(out_dir / "user.raw.onnx", out_dir / "user.onnx")
    (out_dir / "user.raw.onnx").unlink()
    shutil.copyfile(ckpt.tokenizer_json, out_dir / "tokenizer.json")

    tokenizer = TextTokenizer(out_dir / "tokenizer.json", max_len)
    vocab = int(enc_cfg.vocab_size)
    parity = {
        "item.onnx": item_parity(ckpt.item_tower, out_dir / "item.onnx", vocab, max_len, tokenizer.pad_id, config.seed),
        "item.opt.onnx": item_parity(ckpt.item_tower, out_dir / "item.opt.onnx", vocab, max_len, tokenizer.pad_id, config.seed + 1),
        "user.onnx": user_parity(ckpt.user_tower, out_dir / "user.onnx", cfg.dim, config.seed,
                                 user_items(out_dir)),
    }
    for name, p in parity.items():
        log.info("parity %s: min cosine %.7f, max |diff| %.2e on shapes %s", name, p.min_cosine, p.max_abs_diff, p.shapes)
        if not p.ok:
            raise ModelError(
                f"ONNX parity failed for {out_dir / name}: min cosine {p.min_cosine:.6f} < {PARITY_COSINE} "
                f"(max |diff| {p.max_abs_diff:.2e}) against torch. The export is not registered; check that "
                f"the model is traceable (no data-dependent Python control flow) or try another --opset."
            )
    token_check = _check_tokenizer(ckpt, tokenizer, max_len)
    return tokenizer, {"parity": {k: asdict(v) for k, v in parity.items()}, "tokenizer_check": token_check,
                       "fusions": fusions, "variants": {}}


def build_variants(out_dir: Path, max_len: int, config: ExportConfig, ref: Reference,
                   metrics: dict[str, Any]) -> dict[str, str]:
    """Build the requested int8 / fp16 item models, judge each against `ref` (reports into
    metrics["variants"]) and keep the accepted ones -> {variant: file name}."""
    models: dict[str, str] = {}
    wanted = [("int8", quantize_int8, "cpu")] if config.int8 else []
    if config.fp16:
        wanted.append(("fp16", convert_fp16, "cuda" if accelerator_status()[CUDA] is None else "cpu"))
    for name, build, provider in wanted:
        path = out_dir / f"item.{name}.onnx"
        build(out_dir / "item.opt.onnx", path)
        variant = catalogue_encoder(path, out_dir / "tokenizer.json", max_len, provider, config)
        report = judge_variant(name, variant, ref, config)
        if provider == "cpu" and name == "fp16":
            report["note"] = "judged on CPU (no usable CUDA here); speed is only meaningful on a GPU"
        metrics["variants"][name] = report
        if report["accepted"]:
            models[name] = path.name
        else:
            path.unlink()
    return models


def _matcher_manifest(dim: int, models: dict[str, str], tokenizer: TextTokenizer, projection: Path | None) -> dict[str, Any]:
    """The manifest fields that describe the exported models' contract. `projection`: the user tower's
    history projection, when the export wrote one (its rows are hist_emb)."""
    hist_emb = (f"float32 [batch, history, width]: rows of {projection.name} (item_emb [items, {dim}] -> history "
                "[items, width], run on the catalogue at load)" if projection else f"float32 [batch, history, {dim}]")
    return {
        "kind": "matcher",
        "created": utc_now(),
        "dim": dim,
        "models": {"item": models, "user": "user.onnx", **({"user_items": projection.name} if projection else {})},
        "inputs": {
            "item": {"input_ids": "int64 [batch, seq]", "attention_mask": "int64 [batch, seq] (right-padded)"},
            "user": {"hist_emb": hist_emb, "hist_type": "int64 [batch, history] (-1 pad)",
                     "hist_age": "float32 [batch, history] seconds", "hist_mask": "int64 [batch, history]"},
        },
        "tokenizer": {"file": "tokenizer.json", "max_length": tokenizer.max_length, "pad_id": tokenizer.pad_id},
    }


def _runtime(opset: int) -> dict[str, Any]:
    import onnx

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort().__version__,
            "opset": opset, "exporter": "torch.onnx TorchScript (dynamo=False)"}


def _check_tokenizer(ckpt: Checkpoint, tokenizer: TextTokenizer, max_len: int) -> dict[str, Any]:
    """The serving tokenizer (tokenizers + tokenizer.json) must produce the training tokenizer's ids."""
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(ckpt.path / ITEM_ENCODER_DIR)
    samples = [*fallback_texts(64), "", "Émile's café: 100% naïve — ünïcödé", "word " * 200]
    expected = reference(samples, truncation=True, max_length=max_len)["input_ids"]
    got = [list(map(int, ids)) for ids in tokenizer.encode(samples)]
    mismatched = sum(a != b for a, b in zip(expected, got, strict=True))
    if mismatched:
        raise ModelError(
            f"{ckpt.tokenizer_json} tokenises {mismatched}/{len(samples)} sample texts differently from the "
            f"checkpoint's tokenizer; re-save the tokenizer with save_pretrained (fast tokenizer) and export again"
        )
    return {"texts": len(samples), "mismatched": 0}


def export_to_registry(ckpt_path: Path | str, registry_root: Path | str, config: ExportConfig | None = None,
                       data: Path | str | None = None, promote: bool | None = None) -> tuple[str, dict[str, Any]]:
    """Export into a staging directory and register it as a new version. `promote=None` promotes only
    when the registry has no current version yet."""
    registry = Registry(registry_root)
    staging = registry.staging_dir()
    try:
        result = export_checkpoint(ckpt_path, staging, config, data)
        version = registry.register(staging, result.manifest, result.hashed)
    except BaseException:
        registry.discard(staging)
        raise
    if promote or (promote is None and registry.current() is None):
        registry.promote(version)
    return version, registry.manifest(version)


def export_to_dir(ckpt_path: Path | str, out_dir: Path | str, config: ExportConfig | None = None,
                  data: Path | str | None = None) -> dict[str, Any]:
    """Same files in a plain directory, with a manifest (for use outside a registry)."""
    result = export_checkpoint(ckpt_path, Path(out_dir), config, data)
    manifest = {"format": 1, "version": None, **result.manifest, "files": hash_files(result.out_dir, result.hashed)}
    (result.out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest
