"""One request path: every caller of `RequestScorer` gives the same features and scores.

`RequestPathContract` is the shared mixin (as `implicit` runs every recommender through one base
test class): each subclass runs the same known-answer requests through one caller (service Rank and
Recommend over a real gRPC server, batch pairs and top-K through `run_batch`, ranker-training
features through `build_group_features`, evaluation features through `window_features`) and must
reproduce the reference bit for bit. The reference is the scorer itself over the ranker's saved
state, checked against hand-computed known answers first.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import polars as pl
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("lightgbm")
grpc = pytest.importorskip("grpc")
pytest.importorskip("torch")  # only to build the test artifacts

T0 = datetime(2026, 1, 31, 12, 0, tzinfo=timezone.utc)  # after the synthetic log (Jan 2026): one state
T0_US = int(T0.timestamp() * 1_000_000)
T1_US = T0_US + 5_400_000_000  # 13:30 the same day
RETRIEVE_K, TOP_K = 30, 5


@dataclass(frozen=True)
class Request:
    user: str
    time_us: int
    items: tuple[str, ...] = ()  # empty: a Recommend request
    device: str | None = None


RANK_REQUESTS = (
    Request("u5", T0_US, tuple(f"i{j}" for j in range(0, 60, 2)), "mobile"),
    Request("u12", T1_US, tuple(f"i{j}" for j in (7, 3, 99, 150, 41, 8, 0, 77)), None),
    Request("u40", T0_US, tuple(f"i{j}" for j in range(100, 140)), "desktop"),
    Request("never-seen-user", T1_US, tuple(f"i{j}" for j in range(20, 35)), None),
)
RECOMMEND_REQUESTS = (Request("u5", T0_US), Request("u33", T1_US), Request("never-seen-user", T0_US))


@dataclass
class Result:
    """One request's outcome: candidate ids in served (Recommend) or given (Rank) order."""

    items: list[str]
    scores: np.ndarray
    match: np.ndarray | None = None
    features: np.ndarray | None = None  # [n, F] in the reference's column order


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, prepared_dir: Path) -> dict[str, Any]:
    from recsys.data.prepared import PreparedData
    from recsys.ranker import Ranker
    from recsys.scoring.registry_matcher import registry_matcher
    from recsys.scoring.request import RequestScorer
    from tests.artifacts import build_scoring_artifacts

    artifacts = build_scoring_artifacts(tmp_path_factory.mktemp("request_path"), prepared_dir)
    data = PreparedData.load(prepared_dir)
    ranker = Ranker.load(artifacts["ranker"])
    matcher = registry_matcher(artifacts["registry"] / "versions" / "v0001", data)
    state = ranker.load_state()
    scorer = RequestScorer(state, ranker=ranker, matcher=matcher)
    items = data.items.sort("item_idx")["item_id"].cast(pl.Utf8).to_list()
    users = data.users.sort("user_idx")["user_id"].cast(pl.Utf8).to_list()
    return {
        "artifacts": artifacts, "data": data, "ranker": ranker, "matcher": matcher, "state": state,
        "scorer": scorer, "item_index": {i: j for j, i in enumerate(items)}, "items": items,
        "user_index": {u: j for j, u in enumerate(users)}, "tmp": tmp_path_factory.mktemp("runs"),
    }


def _batch(env: dict[str, Any], requests: tuple[Request, ...]) -> Any:
    from recsys.scoring.request import RequestBatch

    return RequestBatch.from_lists(
        [env["user_index"].get(r.user, -1) for r in requests], [r.time_us for r in requests],
        [np.asarray([env["item_index"][i] for i in r.items], np.int64) for r in requests],
        contexts=[{"device": r.device} for r in requests],
    )


def _reference(env: dict[str, Any], kind: str) -> list[Result]:
    """The scorer itself, one batch for all requests (rows are independent of the batch)."""
    scorer = env["scorer"]
    if kind == "rank":
        scored = scorer.score(_batch(env, RANK_REQUESTS))
    else:
        scored = scorer.recommend(_batch(env, RECOMMEND_REQUESTS), retrieve_k=RETRIEVE_K, top_k=TOP_K)
    out = []
    for r in range(len(scored.order)):
        lo, hi = int(scored.indptr[r]), int(scored.indptr[r + 1])
        rows = lo + (np.arange(hi - lo) if kind == "rank" else scored.order[r])
        out.append(Result(
            [env["items"][i] for i in scored.items[rows]], scored.scores[rows], scored.match[rows],
            scored.features.matrix[rows],
        ))
    return out


def test_reference_known_answers(env: dict[str, Any]) -> None:
    """Hand-computed facts about the reference: match = cosine of the ONNX user vector (from the
    store rows, another code path) and the item embedding; clock, history and seen features."""
    scorer, state = env["scorer"], env["state"]
    runtime_user = _store_row_user_vector(env, "u5", T0_US)
    ref = _reference(env, "rank")[0]
    names = scorer.features(_batch(env, RANK_REQUESTS[:1]))[0].names
    col = {n: j for j, n in enumerate(names)}
    cand = np.asarray([env["item_index"][i] for i in RANK_REQUESTS[0].items])
    np.testing.assert_allclose(ref.match, env["matcher"].item_embeddings[cand] @ runtime_user, rtol=0, atol=1e-6)
    assert (ref.features[:, col["hour_of_day"]] == 12.0).all() and (ref.features[:, col["day_of_week"]] == 5).all()
    user = env["user_index"]["u5"]
    history = state.history(user, T0_US).item_idx
    assert (ref.features[:, col["user_hist_len"]] == (history >= 0).sum()).all()
    seen = set(state.user_item.row(user)[0].tolist())
    np.testing.assert_array_equal(ref.features[:, col["seen"]], [float(c in seen) for c in cand])
    assert (ref.features[:, col["ctx_device"]] == state.context_vocab["device"].index("mobile")).all()
    np.testing.assert_array_equal(ref.scores, env["ranker"].score(ref.features, names))
    unknown = _reference(env, "rank")[3]
    assert np.isnan(unknown.features[:, col["user_days_since_last"]]).all()
    assert np.isnan(unknown.features[:, col["ctx_device"]]).all()  # no context given: NaN


def _store_row_user_vector(env: dict[str, Any], user: str, t_us: int) -> np.ndarray:
    from recsys.registry import Registry
    from recsys.scoring.matcher import MatcherRuntime

    runtime = MatcherRuntime.from_version(Registry(env["artifacts"]["registry"]).load("v0001"), "cpu")
    hist = env["state"].history(env["user_index"][user], t_us)
    assert runtime.store is not None
    ids = [env["items"][i] if i >= 0 else "" for i in hist.item_idx[0]]
    rows = np.where(hist.item_idx[0] >= 0, runtime.store.positions(ids), -1)[None, :]
    return runtime.user_embeddings_from_rows(rows, hist.event_code, hist.age_s)[0]


# ------------------------------------------------------------------------------------------ the contract


class RequestPathContract:
    """Run `kind` requests through one caller; compare with the reference bit for bit."""

    kind: ClassVar[str] = "rank"
    gives_match: ClassVar[bool] = True
    takes_context: ClassVar[bool] = True  # False: only the requests without context are compared

    def run(self, env: dict[str, Any], requests: tuple[Request, ...]) -> list[Result]:
        raise NotImplementedError

    def test_same_features_and_scores_as_the_reference(self, env: dict[str, Any]) -> None:
        requests = RANK_REQUESTS if self.kind == "rank" else RECOMMEND_REQUESTS
        keep = [j for j, r in enumerate(requests) if self.takes_context or r.device is None]
        requests = tuple(requests[j] for j in keep)
        got = self.run(env, requests)
        expected = [_reference(env, self.kind)[j] for j in keep]
        assert len(got) == len(expected) == len(requests)
        for request, g, e in zip(requests, got, expected, strict=True):
            assert g.items == e.items, request
            np.testing.assert_array_equal(g.scores, e.scores, err_msg=str(request))
            if self.gives_match:
                np.testing.assert_array_equal(g.match, e.match, err_msg=str(request))
            if g.features is not None:
                np.testing.assert_array_equal(g.features, e.features, err_msg=str(request))


@pytest.fixture(scope="module")
def server(env: dict[str, Any]) -> Any:
    from recsys.serving.config import ServeConfig
    from tests.artifacts import ServerThread

    art = env["artifacts"]
    srv = ServerThread(ServeConfig(registry=art["registry"], ranker=art["ranker"], data=art["data"],
                                   host="127.0.0.1", port=0, workers=2))
    yield srv
    srv.stop()


def _served(env: dict[str, Any], items: Any, order: list[str]) -> Result:
    """Reply items -> Result in `order`, features from the explain values in the reference's columns."""
    by_id = {i.item_id: i for i in items}
    names = env["scorer"].features(_batch(env, RANK_REQUESTS[:1]))[0].names
    features = np.asarray([[{c.name: c.value for c in by_id[i].contributions}[n] for n in names] for i in order])
    return Result(list(order), np.asarray([by_id[i].score for i in order]),
                  np.asarray([by_id[i].match_score for i in order]), features.astype(np.float32))


def _timestamp(t_us: int) -> Any:
    from google.protobuf.timestamp_pb2 import Timestamp

    stamp = Timestamp()
    stamp.FromMicroseconds(t_us)
    return stamp


class TestServiceRank(RequestPathContract):
    def run(self, env: dict[str, Any], requests: tuple[Request, ...]) -> list[Result]:
        from recsys.serving.proto import ranking_pb2 as pb

        server = env["_server"]
        out = []
        for j, r in enumerate(requests):
            request = pb.RankRequest(request_id=f"rank-{j}", user_id=r.user, candidate_ids=list(r.items), explain=True,
                                     request_time=_timestamp(r.time_us))
            if r.device is not None:
                request.context["device"].text = r.device
            out.append(_served(env, server.stub.Rank(request).items, list(r.items)))
        return out

    @pytest.fixture(autouse=True)
    def _attach(self, env: dict[str, Any], server: Any) -> None:
        env["_server"] = server


class TestServiceRecommend(TestServiceRank):
    kind = "recommend"

    def run(self, env: dict[str, Any], requests: tuple[Request, ...]) -> list[Result]:
        from recsys.serving.proto import ranking_pb2 as pb

        out = []
        for j, r in enumerate(requests):
            response = env["_server"].stub.Recommend(pb.RecommendRequest(
                request_id=f"rec-{j}", user_id=r.user, top_k=TOP_K, retrieve_k=RETRIEVE_K, explain=True,
                request_time=_timestamp(r.time_us),
            ))
            out.append(_served(env, response.items, [i.item_id for i in response.items]))
        return out


def _run_batch(env: dict[str, Any], name: str, frame: pl.DataFrame, **config: Any) -> pl.DataFrame:
    from recsys.batch.job import BatchConfig, run_batch

    art, out = env["artifacts"], env["tmp"] / name
    frame.write_parquet(env["tmp"] / f"{name}.parquet")
    run_batch(BatchConfig(out=out, registry=art["registry"], ranker=art["ranker"], data=art["data"], provider="cpu",
                          progress=False, input=env["tmp"] / f"{name}.parquet", chunk_rows=40, **config))
    return pl.read_parquet(sorted(out.glob("part-*.parquet")))


def _iso(t_us: int) -> str:
    return datetime.fromtimestamp(t_us / 1e6, timezone.utc).isoformat()


class TestBatchPairs(RequestPathContract):
    def run(self, env: dict[str, Any], requests: tuple[Request, ...]) -> list[Result]:
        rows = [{"user_id": r.user, "item_id": i, "time": _iso(r.time_us), "device": r.device}
                for r in requests for i in r.items]
        got = _run_batch(env, "pairs", pl.DataFrame(rows, schema_overrides={"device": pl.Utf8})).sort("input_row")
        out, lo = [], 0
        for r in requests:
            part = got.slice(lo, len(r.items))
            lo += len(r.items)
            out.append(Result(part["item_id"].to_list(), part["score"].to_numpy(), part["match_score"].to_numpy()))
        return out


class TestBatchTopK(RequestPathContract):
    kind = "recommend"

    def run(self, env: dict[str, Any], requests: tuple[Request, ...]) -> list[Result]:
        from recsys.batch.io import InputSpec

        frame = pl.DataFrame({"user_id": [r.user for r in requests], "time": [_iso(r.time_us) for r in requests]})
        got = _run_batch(env, "topk", frame, spec=InputSpec("topk"), top_k=TOP_K, retrieve_k=RETRIEVE_K)
        return [
            Result(part["item_id"].to_list(), part["score"].to_numpy(), part["match_score"].to_numpy())
            for part in got.sort("input_row", "rank").partition_by("input_row", maintain_order=True)
        ]


def _groups(env: dict[str, Any], requests: tuple[Request, ...]) -> pl.DataFrame:
    rows = [
        {"request_id": f"g{j:02d}", "time_us": r.time_us, "user_idx": env["user_index"].get(r.user, -1),
         "item_idx": env["item_index"][i], "strength": 0.0, "device": r.device}
        for j, r in enumerate(requests) for i in r.items
    ]
    return pl.DataFrame(rows, schema_overrides={"device": pl.Utf8}).sort("time_us", "request_id", maintain_order=True)


class TestRankerTrainingFeatures(RequestPathContract):
    """`train ranker`'s replay from its window start: the same features, so the same scores."""

    def run(self, env: dict[str, Any], requests: tuple[Request, ...]) -> list[Result]:
        from recsys.features import EventBatch, FeatureState, to_us
        from training.ranker import build_group_features

        data, ranker = env["data"], env["ranker"]
        events = data.events().sort("timestamp", maintain_order=True).collect()
        start = to_us(ranker.meta["windows"]["fit_and_holdout"][0])
        state = FeatureState.build(data.items, events, before=start, config=ranker.feature_config,
                                   n_users=data.users.height)
        groups = _groups(env, requests)
        table = build_group_features(state, EventBatch.from_frame(events), groups, env["matcher"])
        by_group = dict(zip(table.group_id, np.split(np.arange(len(table.labels)), np.cumsum(table.sizes)[:-1]), strict=True))
        out = []
        for j, r in enumerate(requests):
            rows = by_group[f"g{j:02d}"]
            x = table.matrix[rows]
            out.append(Result(list(r.items), ranker.score(x, table.names), x[:, table.names.index("match_score")], x))
        return out


class TestEvaluationFeatures(RequestPathContract):
    """`recsys evaluate`'s cutoff replay with the ranker's contexts (evaluation windows carry none, so
    only the requests without context are compared)."""

    takes_context = False

    def run(self, env: dict[str, Any], requests: tuple[Request, ...]) -> list[Result]:
        from recsys.evaluation.evaluate import Window, window_features

        cands = [np.asarray([env["item_index"][i] for i in r.items], np.int64) for r in requests]
        users = np.asarray([env["user_index"].get(r.user, -1) for r in requests], np.int64)
        empty = np.zeros(0, np.int64)
        window = Window("test", users, np.asarray([r.time_us for r in requests]), env["state"].history(0, T0_US),
                        [c[:1] for c in cands], [empty] * len(cands), empty, empty)
        ranker = env["ranker"]
        blocks, names = window_features(env["data"], window, cands, env["matcher"], extra={}, config=ranker.feature_config,
                                        drop_items=empty, context_names=ranker.context_names)
        return [
            Result(list(r.items), ranker.score(x, names), x[:, names.index("match_score")], x)
            for r, x in zip(requests, blocks, strict=True)
        ]


def test_served_cold_slots_give_cold_candidates_the_configured_places(env: dict[str, Any]) -> None:
    """A ranker recording --cold-slots 2 (of the first 10): every list's places 9-10 go to the two
    candidates without behaviour the matcher scores highest, places 1-8 keep the plain order, and
    text-less cold candidates are never picked."""
    from recsys.ranker import Ranker
    from recsys.scoring.request import ENCODED, RequestBatch, RequestScorer

    plain, ranker = env["scorer"], env["ranker"]
    meta = {**ranker.meta, "config": {**ranker.meta["config"], "cold_slots": 2}}
    explore = RequestScorer(env["state"], ranker=Ranker(ranker.booster, meta), matcher=env["matcher"])
    warm = np.flatnonzero(env["state"].item_count > 0)[:30]
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(4, env["matcher"].dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    items = np.concatenate([warm, [-1] * 5])  # 4 cold candidates with text, the last without
    has_text = np.concatenate([np.zeros(len(warm), bool), [True] * 4, [False]])
    batch = RequestBatch.from_lists([env["user_index"]["u5"]], [T0_US], [items], cold_vectors=vectors, has_text=has_text)
    base = plain.score(batch)  # every candidate, the plain order
    got = explore.score(batch, top_k=10)
    np.testing.assert_array_equal(got.scores, base.scores)  # same scores, a different order
    order = got.order[0]
    assert len(order) == 10 and order[:8].tolist() == [o for o in base.order[0] if items[o] >= 0][:8]
    encoded = np.flatnonzero(got.source == ENCODED)
    best_cold = encoded[np.argsort(-got.match[encoded], kind="stable")[:2]]
    assert order[8:].tolist() == best_cold.tolist()
    rest = [o for o in base.order[0] if o not in set(order.tolist())]
    assert explore.score(batch).order[0][10:].tolist() == rest
    assert ranker.cold_slots == 0
