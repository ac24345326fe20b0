"""Serving-side encoders: the exported item and user towers on ONNX Runtime, no torch, no transformers.

Item texts are tokenised with the fast tokenizer's own `tokenizer.json` (the `tokenizers` library) and
scored in length buckets: texts are sorted by token count, packed into batches of at most
`tokens_per_batch` padded tokens (rows x the batch's longest), each batch padded only to its own
longest sequence, and results put back in input order. Catalogue texts are short and uneven, so this
does far less work than padding everything to a fixed maximum; a token budget rather than a row count
keeps every batch's activations about the same size (in cache on CPU) whether texts are 10 or 100
tokens long. bench/encoder.py measures the budget's knee and the share of the CPU's GEMM peak.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from recsys.compat import require
from recsys.errors import InputError, ModelError
from recsys.scoring.providers import TENSORRT, SessionInfo, create_session

ITEM_INPUTS = ("input_ids", "attention_mask")
# Padded tokens per item-encoder batch on CPU: the knee in bench/results/encoder.md (256 ahead of 512 and
# 1,024 in three runs, per CPU-second); larger batches spill the [tokens, 1536] FFN activations out of the
# cores' L2 caches, and per-op overhead stays small down to batches of 8 short texts.
TOKENS_PER_BATCH = 256
USER_INPUTS = ("hist_emb", "hist_type", "hist_age", "hist_mask")


class TextTokenizer:
    """`tokenizer.json` -> token id arrays, truncated to `max_length`, unpadded (the encoder pads)."""

    def __init__(self, path: Path | str, max_length: int) -> None:
        tokenizers = require("tokenizers")
        path = Path(path)
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:
            raise ModelError(
                f"cannot read tokenizer {path}: {exc}. Re-export the model with "
                f"`recsys export --checkpoint CKPT --registry DIR` (it writes tokenizer.json)."
            ) from exc
        self._tok.no_padding()
        self._tok.enable_truncation(max_length=max_length)
        self.max_length = max_length
        pad = self._tok.token_to_id("[PAD]")
        self.pad_id = int(pad) if pad is not None else 0

    def encode(self, texts: Sequence[str]) -> list[np.ndarray]:
        """One int64 id array per text, special tokens included ([CLS] ... [SEP] for BERT)."""
        encodings = self._tok.encode_batch(list(texts))
        return [np.asarray(e.ids, dtype=np.int64) for e in encodings]


def pad_batch(ids: Sequence[np.ndarray], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad (the fused attention kernels expect mask = prefix of ones) to [B, length]."""
    input_ids = np.full((len(ids), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(ids), length), dtype=np.int64)
    for row, seq in enumerate(ids):
        seq = seq[:length]
        input_ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    return input_ids, mask


def token_batches(lengths: np.ndarray, tokens_per_batch: int | None, max_rows: int, bucketing: bool = True) -> list[np.ndarray]:
    """Row indices in batches of at most `max_rows` rows whose padded size (rows x the batch's longest)
    stays within `tokens_per_batch` (None: rows only); a text longer than the budget gets a batch of
    its own. `bucketing` sorts by length first (little padding); otherwise batches keep input order."""
    n = len(lengths)
    order = np.argsort(lengths, kind="stable") if bucketing else np.arange(n)
    ordered = np.asarray(lengths)[order]
    batches: list[np.ndarray] = []
    start = 0
    while start < n:
        window = ordered[start : start + max_rows]
        if tokens_per_batch is None:
            rows = len(window)
        else:  # padded size of the first k rows: k x their running longest, non-decreasing in k
            padded = np.arange(1, len(window) + 1) * np.maximum.accumulate(window)
            rows = max(1, int(np.searchsorted(padded, tokens_per_batch, side="right")))
        batches.append(order[start : start + rows])
        start += rows
    return batches


class _OnnxModel:
    """A session plus the CUDA IO-binding path (inputs copied once, output allocated on device)."""

    def __init__(self, session: Any, info: SessionInfo) -> None:
        self.session = session
        self.info = info
        self.output_name = session.get_outputs()[0].name
        self.input_names = [i.name for i in session.get_inputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        if not self.info.on_gpu:
            return np.asarray(self.session.run([self.output_name], feeds)[0])
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        binding.bind_output(self.output_name, "cuda", 0)
        self.session.run_with_iobinding(binding)
        return np.asarray(binding.copy_outputs_to_cpu()[0])


class ItemEncoder:
    """Item tower: texts -> L2-normalised embeddings [n, D] float32.

    Batches hold at most `batch_size` rows and `tokens_per_batch` padded tokens (None: TOKENS_PER_BATCH
    on CPU, rows only on GPUs, which want the largest batches). `bucketing=True` sorts by length and pads
    per batch; `bucketing=False` batches in input order (still padded to each batch's longest);
    `pad_to=N` pads every batch to N tokens (the naive way).
    """

    def __init__(
        self,
        model_path: Path | str,
        tokenizer_path: Path | str,
        max_length: int,
        provider: str = "auto",
        threads: int | None = None,
        batch_size: int = 64,
        fp16: bool = False,
        *,
        tokens_per_batch: int | None = None,
        spinning: bool = True,
    ) -> None:
        self.tokenizer = TextTokenizer(tokenizer_path, max_length)
        profile = {
            "min": "input_ids:1x1,attention_mask:1x1",
            "opt": f"input_ids:{batch_size}x{min(32, max_length)},attention_mask:{batch_size}x{min(32, max_length)}",
            "max": f"input_ids:{batch_size}x{max_length},attention_mask:{batch_size}x{max_length}",
        }
        session, info = create_session(model_path, provider, threads, trt_profile=profile, fp16=fp16, spinning=spinning)
        self.model = _OnnxModel(session, info)
        missing = set(ITEM_INPUTS) - set(self.model.input_names)
        if missing:
            raise ModelError(f"{model_path} is not an item tower: inputs {self.model.input_names}, missing {sorted(missing)}")
        if tokens_per_batch is not None and tokens_per_batch < 1:
            raise InputError(f"tokens_per_batch must be at least 1, got {tokens_per_batch}")
        self.batch_size = batch_size
        self.tokens_per_batch = tokens_per_batch if tokens_per_batch is not None or info.on_gpu else TOKENS_PER_BATCH
        # Tensor cores like multiples of 8; on CPU padding further only adds work.
        self.pad_multiple = 8 if info.on_gpu else 1
        self.dim = int(session.get_outputs()[0].shape[-1])

    @property
    def info(self) -> SessionInfo:
        return self.model.info

    def encode_tokens(
        self,
        ids: Sequence[np.ndarray],
        batch_size: int | None = None,
        bucketing: bool = True,
        pad_to: int | None = None,
        *,
        tokens_per_batch: int | Literal["default"] | None = "default",
    ) -> np.ndarray:
        """Token id arrays -> [n, D] float32 in input order. `tokens_per_batch` overrides the encoder's
        budget (None: batch by row count only, the way before token budgets)."""
        batch_size = batch_size or self.batch_size
        if self.info.primary == TENSORRT:  # its optimisation profile ends at the constructor's batch size
            batch_size = min(batch_size, self.batch_size)
        budget = self.tokens_per_batch if tokens_per_batch == "default" else tokens_per_batch
        n = len(ids)
        out = np.empty((n, self.dim), dtype=np.float32)
        if n == 0:
            return out
        lengths = np.fromiter((len(s) for s in ids), dtype=np.int64, count=n)
        if pad_to is not None:
            lengths = np.full(n, pad_to, dtype=np.int64)
        for rows in token_batches(lengths, budget, batch_size, bucketing):
            longest = int(lengths[rows].max())
            length = -(-longest // self.pad_multiple) * self.pad_multiple
            input_ids, mask = pad_batch([ids[r] for r in rows], length, self.tokenizer.pad_id)
            out[rows] = self.model.run({"input_ids": input_ids, "attention_mask": mask})
        return out

    def encode(
        self,
        texts: Sequence[str],
        batch_size: int | None = None,
        bucketing: bool = True,
        pad_to: int | None = None,
        *,
        tokens_per_batch: int | Literal["default"] | None = "default",
    ) -> np.ndarray:
        """texts -> [n, D] float32, in input order."""
        return self.encode_tokens(self.tokenizer.encode(texts), batch_size, bucketing, pad_to, tokens_per_batch=tokens_per_batch)


class UserEncoder:
    """User tower: padded histories of history rows -> user embeddings [B, D] float32.

    A history row is an item's embedding, or with `items_path` (the tower's history projection, an
    export's `user_items.onnx`) that model's output for it: `history_table` maps the catalogue's
    embeddings to rows once (at model load), so no request repeats the projection."""

    def __init__(
        self,
        model_path: Path | str,
        provider: str = "auto",
        threads: int | None = None,
        batch_size: int = 1024,
        items_path: Path | str | None = None,
    ) -> None:
        session, info = create_session(model_path, provider, threads)
        self.model = _OnnxModel(session, info)
        missing = set(USER_INPUTS) - set(self.model.input_names)
        if missing:
            raise ModelError(f"{model_path} is not a user tower: inputs {self.model.input_names}, missing {sorted(missing)}")
        self.batch_size = batch_size
        self.dim = int(session.get_outputs()[0].shape[-1])
        self.width = int(session.get_inputs()[self.model.input_names.index("hist_emb")].shape[-1])
        self.items: _OnnxModel | None = None
        if items_path is not None:
            items, items_info = create_session(items_path, provider, threads)
            self.items = _OnnxModel(items, items_info)
            shape = items.get_outputs()[0].shape
            if self.items.input_names != ["item_emb"] or shape[-1] != self.width:
                raise ModelError(f"{items_path} is not this user tower's history projection: inputs "
                                 f"{self.items.input_names}, output {shape} (the tower reads rows of width {self.width})")
        elif self.width != self.dim:
            raise ModelError(f"{model_path} reads history rows of width {self.width}, not item embeddings ({self.dim}): "
                             "load it with its history projection (the version's user_items.onnx)")

    def history_table(self, item_emb: np.ndarray) -> np.ndarray:
        """Item embeddings [n, D] -> the history rows [n, width] the tower reads (the embeddings
        themselves when it has no projection)."""
        item_emb = np.asarray(item_emb, np.float32)
        if self.items is None:
            return item_emb
        out = np.empty((len(item_emb), self.width), np.float32)
        for start in range(0, len(item_emb), self.batch_size):
            chunk = item_emb[start : start + self.batch_size]
            out[start : start + len(chunk)] = self.items.run({"item_emb": np.ascontiguousarray(chunk)})
        return out

    @property
    def info(self) -> SessionInfo:
        return self.model.info

    def encode(
        self,
        hist_emb: np.ndarray,
        hist_type: np.ndarray,
        hist_age: np.ndarray,
        hist_mask: np.ndarray,
    ) -> np.ndarray:
        """hist_emb [B, N, width] history rows, hist_type [B, N] (event codes, -1 pad), hist_age [B, N]
        seconds, hist_mask [B, N] (true = real) -> [B, D]. Empty histories get the learned cold-start vector."""
        hist_emb = np.asarray(hist_emb, dtype=np.float32)
        if hist_emb.ndim != 3 or hist_emb.shape[2] != self.width:
            raise InputError(f"hist_emb must be [B, N, {self.width}], got {list(hist_emb.shape)}")
        b = hist_emb.shape[0]
        out = np.empty((b, self.dim), dtype=np.float32)
        for start in range(0, b, self.batch_size):
            sl = slice(start, start + self.batch_size)
            out[sl] = self.model.run(
                {
                    "hist_emb": np.ascontiguousarray(hist_emb[sl]),
                    "hist_type": np.asarray(hist_type[sl], dtype=np.int64),
                    "hist_age": np.asarray(hist_age[sl], dtype=np.float32),
                    "hist_mask": np.asarray(hist_mask[sl], dtype=np.int64),
                }
            )
        return out
