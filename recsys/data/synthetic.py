"""Synthetic behaviour logs with planted structure: the embedded default dataset and test fixture.

Each user prefers a few topics (a sparse Dirichlet draw); each item belongs to one topic and its text
is written from that topic's words, so a text model can learn who likes what. Items arrive over time
and popularity is Zipf-skewed. Users are shown slates (impressions with request ids and positions);
the click probability grows with the user's affinity for the item's topic and mildly with popularity;
clicks lead to add-to-cart and purchases. Fully vectorised: 1M events take a few seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

TOPICS: dict[str, list[str]] = {
    "hiking": ["trail", "mountain", "backpack", "boots", "summit", "tent", "compass", "ridge", "canyon", "alpine", "camping", "forest", "map", "lantern", "rope"],
    "cooking": ["recipe", "kitchen", "spice", "pasta", "oven", "knife", "skillet", "sauce", "garlic", "bakery", "flour", "herbs", "grill", "soup", "chef"],
    "gaming": ["console", "controller", "quest", "arcade", "pixel", "dungeon", "multiplayer", "joystick", "level", "boss", "esports", "strategy", "puzzle", "racing", "shooter"],
    "gardening": ["seeds", "soil", "compost", "tulip", "greenhouse", "shovel", "orchid", "hose", "fertilizer", "bonsai", "cactus", "pruning", "mulch", "lawn", "vegetable"],
    "music": ["guitar", "piano", "drums", "melody", "concert", "vinyl", "album", "violin", "jazz", "chords", "amplifier", "rhythm", "orchestra", "singer", "headphones"],
    "fitness": ["workout", "dumbbell", "yoga", "running", "protein", "treadmill", "stretching", "cardio", "kettlebell", "marathon", "squat", "gym", "sneakers", "cycling", "pilates"],
    "photography": ["camera", "lens", "tripod", "shutter", "portrait", "aperture", "flash", "landscape", "zoom", "sensor", "darkroom", "film", "exposure", "drone", "studio"],
    "travel": ["passport", "luggage", "island", "hotel", "flight", "beach", "cruise", "itinerary", "museum", "souvenir", "airport", "resort", "guidebook", "train", "adventure"],
    "science": ["telescope", "microscope", "chemistry", "physics", "galaxy", "laboratory", "experiment", "robot", "fossil", "planet", "genome", "circuit", "magnet", "rocket", "atom"],
    "fashion": ["dress", "jacket", "silk", "denim", "handbag", "scarf", "runway", "leather", "jewelry", "sandals", "tailored", "vintage", "boutique", "cotton", "sunglasses"],
    "pets": ["puppy", "kitten", "leash", "aquarium", "birdcage", "collar", "grooming", "treats", "hamster", "litter", "kennel", "parrot", "veterinary", "catnip", "fetch"],
    "books": ["novel", "mystery", "poetry", "author", "chapter", "fantasy", "biography", "library", "thriller", "paperback", "romance", "saga", "memoir", "fiction", "bookmark"],
}
ADJECTIVES = ["classic", "premium", "compact", "deluxe", "essential", "modern", "rugged", "bright", "gentle", "bold", "smart", "simple", "ultimate", "handy", "fresh"]
FILLER = ["with", "for", "and", "the", "a", "new", "great", "everyday", "quality", "design", "set", "edition", "kit", "guide", "collection"]
VOCABULARY: list[str] = sorted({w for words in TOPICS.values() for w in words} | set(TOPICS) | set(ADJECTIVES) | set(FILLER))

START = np.datetime64("2026-01-01T00:00:00", "s")


@dataclass(frozen=True)
class SyntheticConfig:
    n_users: int = 2000
    n_items: int = 1000
    n_events: int = 200_000
    days: int = 60
    slate_size: int = 10
    seed: int = 0
    topic_concentration: float = 0.15  # Dirichlet alpha: lower = users stick to fewer topics
    initial_item_fraction: float = 0.6  # items present at the start; the rest arrive over time
    targeted_fraction: float = 0.6  # share of slate slots drawn from the user's favourite topics
    impressions: bool = True  # emit impression events (exposure) besides interactions


@dataclass(frozen=True)
class SyntheticLog:
    events: pl.DataFrame
    items: pl.DataFrame
    users: pl.DataFrame
    user_topic_pref: np.ndarray  # [n_users, n_topics], rows sum to 1: the planted preferences
    item_topic: np.ndarray  # [n_items] topic index per item

    def write(self, out_dir: Path, fmt: str = "parquet") -> dict[str, Path]:
        """Write events/items/users as parquet, csv or jsonl; return role -> path."""
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {}
        for role, frame in (("events", self.events), ("items", self.items), ("users", self.users)):
            path = out_dir / f"{role}.{fmt}"
            if fmt == "parquet":
                frame.write_parquet(path)
            elif fmt == "csv":
                frame.write_csv(path)
            elif fmt == "jsonl":
                frame.write_ndjson(path)
            else:
                raise ValueError(f"unknown format {fmt!r}: use parquet, csv or jsonl")
            paths[role] = path
        return paths


def _click_logit(affinity: np.ndarray, relative_popularity: np.ndarray, position: np.ndarray) -> np.ndarray:
    """The planted click model: topic affinity dominates, popularity and position bias nudge."""
    return -4.5 + 7.0 * affinity + 0.25 * np.log(relative_popularity) - 0.08 * position


def _pick(rng: np.random.Generator, words: np.ndarray, n: int, k: int) -> np.ndarray:
    """[n, k] words drawn without per-row Python loops (with replacement)."""
    return words[rng.integers(0, len(words), size=(n, k))]


def _item_texts(rng: np.random.Generator, item_topic: np.ndarray) -> tuple[list[str], list[str], list[str]]:
    topic_names = np.array(list(TOPICS))
    topic_words = np.array([TOPICS[t] for t in topic_names])  # [n_topics, 15]
    n = len(item_topic)
    own = topic_words[item_topic[:, None], rng.integers(0, topic_words.shape[1], size=(n, 9))]
    adjectives = _pick(rng, np.array(ADJECTIVES), n, 1)
    filler = _pick(rng, np.array(FILLER), n, 3)
    # One word from another topic: realistic noise a bag-of-words shortcut cannot fully trust.
    other_topic = (item_topic + rng.integers(1, len(topic_names), size=n)) % len(topic_names)
    noise = topic_words[other_topic, rng.integers(0, topic_words.shape[1], size=n)]
    titles = [f"{a} {w1} {w2}".capitalize() for a, w1, w2 in zip(adjectives[:, 0], own[:, 0], own[:, 1], strict=True)]
    descriptions = [
        f"{o[2]} {f[0]} {o[3]} {o[4]} {f[1]} {x} {o[5]} {f[2]} {o[6]}"
        for o, f, x in zip(own, filler, noise, strict=True)
    ]
    tags = [f"{topic_names[t]}|{o[7]}|{o[8]}" for t, o in zip(item_topic, own, strict=True)]
    return titles, descriptions, tags


def generate(config: SyntheticConfig | None = None, **overrides: object) -> SyntheticLog:
    """Generate a deterministic synthetic log (same config and seed -> identical tables)."""
    cfg = config or SyntheticConfig()
    if overrides:
        cfg = SyntheticConfig(**{**cfg.__dict__, **overrides})
    rng = np.random.default_rng(cfg.seed)  # one stream: the order of the draws below is the data
    catalogue = _Catalogue.draw(rng, cfg)

    # Users: sparse topic preferences, log-normal activity.
    pref = rng.dirichlet(np.full(len(TOPICS), cfg.topic_concentration), size=cfg.n_users)
    activity = rng.lognormal(0.0, 0.7, size=cfg.n_users)
    activity /= activity.sum()

    slates = _Slates.draw(rng, cfg, catalogue, pref, activity)
    affinity = pref[slates.user, catalogue.topic[slates.item]]
    logit = _click_logit(affinity, catalogue.popularity[slates.item] / catalogue.popularity.mean(), slates.position)
    clicked = rng.random(len(slates.item)) < 1.0 / (1.0 + np.exp(-logit))
    carted = clicked & (rng.random(len(slates.item)) < 0.3)
    bought = carted & (rng.random(len(slates.item)) < 0.5)
    kinds = [("click", clicked, 5), ("add_to_cart", carted, 60), ("purchase", bought, 300)]
    if cfg.impressions:
        kinds.insert(0, ("impression", np.ones(len(slates.item), dtype=bool), 0))
    events = _event_table(slates, kinds, catalogue.price)

    titles, descriptions, tags = _item_texts(rng, catalogue.topic)
    topic_names = np.array(list(TOPICS))
    items = pl.DataFrame(
        {
            "item_id": [f"i{i}" for i in range(cfg.n_items)],
            "title": titles,
            "description": descriptions,
            "tags": tags,
            "category": topic_names[catalogue.topic],
            "price": catalogue.price,
            "created_at": START.astype("datetime64[us]") + catalogue.created.astype("timedelta64[s]"),
        }
    ).with_columns(pl.col("created_at").dt.replace_time_zone("UTC"))
    users = pl.DataFrame(
        {
            "user_id": [f"u{u}" for u in range(cfg.n_users)],
            "favourite_topic": topic_names[pref.argmax(1)],
        }
    )
    return SyntheticLog(events=events, items=items, users=users, user_topic_pref=pref, item_topic=catalogue.topic)


@dataclass(frozen=True)
class _Catalogue:
    """Items: topic, Zipf popularity, arrival time in seconds (sorted, so "available at t" is a
    prefix), price."""

    topic: np.ndarray
    popularity: np.ndarray
    created: np.ndarray
    price: np.ndarray

    @classmethod
    def draw(cls, rng: np.random.Generator, cfg: SyntheticConfig) -> _Catalogue:
        topic = rng.integers(0, len(TOPICS), size=cfg.n_items)
        popularity = 1.0 / np.arange(1, cfg.n_items + 1) ** 0.9
        popularity = popularity[rng.permutation(cfg.n_items)]
        n_initial = max(1, int(cfg.initial_item_fraction * cfg.n_items))
        created = np.zeros(cfg.n_items, dtype=np.int64)
        created[n_initial:] = np.sort(rng.integers(0, int(cfg.days * 86400 * 0.9), size=cfg.n_items - n_initial))
        price = np.round(rng.lognormal(3.0, 0.8, size=cfg.n_items), 2)
        return cls(topic, popularity, created, price)


@dataclass(frozen=True)
class _Slates:
    """Shown slots, one per (request, distinct item): request number, user, item, position in the
    slate (0..), request time in seconds."""

    request: np.ndarray
    user: np.ndarray
    item: np.ndarray
    position: np.ndarray
    time: np.ndarray

    @classmethod
    def draw(cls, rng: np.random.Generator, cfg: SyntheticConfig, catalogue: _Catalogue, pref: np.ndarray,
             activity: np.ndarray) -> _Slates:
        """Requests by user activity at uniform times; slots targeted (favourite topic, popularity-
        weighted) or global (popularity-weighted), among the items available at the request."""
        per_request = cfg.slate_size * (1.15 if cfg.impressions else 0.15)
        n_requests = max(1, int(cfg.n_events / per_request))
        req_user = rng.choice(cfg.n_users, size=n_requests, p=activity)
        req_time = np.sort(rng.integers(0, cfg.days * 86400, size=n_requests))
        n_avail = np.searchsorted(catalogue.created, req_time, side="right")  # items available per request

        slots = n_requests * cfg.slate_size
        slot_req = np.repeat(np.arange(n_requests), cfg.slate_size)
        cum_all = np.cumsum(catalogue.popularity)
        slot_item = np.searchsorted(cum_all, rng.random(slots) * cum_all[n_avail[slot_req] - 1], side="right")
        targeted = rng.random(slots) < cfg.targeted_fraction
        # Favourite topic per targeted slot via inverse-CDF on the user's preference row.
        u_cdf = np.cumsum(pref[req_user[slot_req]], axis=1)
        slot_topic = (rng.random(slots)[:, None] > u_cdf).sum(1).clip(0, len(TOPICS) - 1)
        _draw_targeted(rng, catalogue, slot_item, targeted, slot_topic, req_time[slot_req])
        slot_item = np.minimum(slot_item, cfg.n_items - 1)
        # A slate shows an item once: drop repeats, then renumber positions 0.. within each request.
        order = np.lexsort((slot_item, slot_req))
        repeat = np.zeros(slots, dtype=bool)
        repeat[order[1:]] = (slot_req[order[1:]] == slot_req[order[:-1]]) & (slot_item[order[1:]] == slot_item[order[:-1]])
        slot_req, slot_item = slot_req[~repeat], slot_item[~repeat]
        position = np.arange(len(slot_req)) - np.searchsorted(slot_req, slot_req, side="left")
        return cls(slot_req, req_user[slot_req], slot_item, position, req_time[slot_req])


def _draw_targeted(rng: np.random.Generator, catalogue: _Catalogue, slot_item: np.ndarray, targeted: np.ndarray,
                   slot_topic: np.ndarray, slot_time: np.ndarray) -> None:
    """Overwrite the targeted slots of `slot_item` with a popularity-weighted item of the slot's topic
    available at its time (slots whose topic has nothing available yet keep their global draw)."""
    for topic in range(len(TOPICS)):
        members = np.flatnonzero(catalogue.topic == topic)
        chosen = targeted & (slot_topic == topic)
        if len(members) == 0 or not chosen.any():
            continue
        cum_t = np.cumsum(catalogue.popularity[members])
        avail_t = np.searchsorted(catalogue.created[members], slot_time[chosen], side="right")
        ok = avail_t > 0
        idx = np.flatnonzero(chosen)[ok]
        draw = rng.random(len(idx)) * cum_t[avail_t[ok] - 1]
        slot_item[idx] = members[np.searchsorted(cum_t, draw, side="right")]


def _event_table(slates: _Slates, kinds: list[tuple[str, np.ndarray, int]], price: np.ndarray) -> pl.DataFrame:
    """Canonical events: one row per (kind, slot where its mask is set), `delay` + position seconds
    after the request; purchases carry the item's price."""
    parts = []
    for name, mask, delay in kinds:
        sel = np.flatnonzero(mask)
        parts.append(
            pl.DataFrame(
                {
                    "user_id": slates.user[sel],
                    "item_id": slates.item[sel],
                    "event_type": np.full(len(sel), name),
                    "ts": slates.time[sel] + delay + slates.position[sel],
                    "request_id": slates.request[sel],
                    "position": slates.position[sel].astype(np.int32),
                    "value": np.where(name == "purchase", price[slates.item[sel]], np.nan),
                }
            )
        )
    return (
        pl.concat(parts)
        .sort("ts", "request_id", "position")
        .select(
            ("u" + pl.col("user_id").cast(pl.Utf8)).alias("user_id"),
            ("i" + pl.col("item_id").cast(pl.Utf8)).alias("item_id"),
            "event_type",
            (pl.lit(START.astype("datetime64[us]")) + pl.duration(seconds=pl.col("ts")))
            .dt.replace_time_zone("UTC")
            .alias("timestamp"),
            pl.col("value").fill_nan(None),
            ("r" + pl.col("request_id").cast(pl.Utf8)).alias("request_id"),
            "position",
            pl.when(pl.col("request_id") % 3 == 0).then(pl.lit("mobile")).otherwise(pl.lit("web")).alias("device"),
        )
    )


def simulate_responses(log: SyntheticLog, shown: pl.DataFrame, seed: int = 0, delay_s: int = 5) -> pl.DataFrame:
    """Clicks, carts and purchases of the log's users on served lists, by the planted click model.

    `shown`: user_id, item_id, request_id, position, timestamp (an exposure log). Items or users the log
    does not know get no response. Returns canonical events (the input contract of `recsys prepare`),
    so served lists plus these responses close the feedback loop.
    """
    rng = np.random.default_rng(seed)
    user = shown["user_id"].str.strip_prefix("u").cast(pl.Int64, strict=False).fill_null(-1).to_numpy()
    item = shown["item_id"].str.strip_prefix("i").cast(pl.Int64, strict=False).fill_null(-1).to_numpy()
    known = (user >= 0) & (user < len(log.user_topic_pref)) & (item >= 0) & (item < len(log.item_topic))
    counts = log.events.filter(pl.col("event_type") == "click").group_by("item_id").len()
    popularity = np.ones(len(log.item_topic))
    ids = counts["item_id"].str.strip_prefix("i").cast(pl.Int64).to_numpy()
    popularity[ids] += counts["len"].to_numpy()
    u, i = np.where(known, user, 0), np.where(known, item, 0)
    affinity = log.user_topic_pref[u, log.item_topic[i]]
    position = shown["position"].fill_null(0).to_numpy()
    logit = _click_logit(affinity, popularity[i] / popularity.mean(), position)
    clicked = known & (rng.random(len(u)) < 1.0 / (1.0 + np.exp(-logit)))
    carted = clicked & (rng.random(len(u)) < 0.3)
    bought = carted & (rng.random(len(u)) < 0.5)
    parts = []
    for name, mask, delay in (("click", clicked, delay_s), ("add_to_cart", carted, 60), ("purchase", bought, 300)):
        rows = shown.filter(pl.Series(mask))
        parts.append(
            rows.select(
                "user_id", "item_id", pl.lit(name).alias("event_type"),
                (pl.col("timestamp") + pl.duration(seconds=delay)).alias("timestamp"),
                pl.lit(None, dtype=pl.Float64).alias("value"), "request_id", pl.col("position").cast(pl.Int32),
            )
        )
    return pl.concat(parts).sort("timestamp")
