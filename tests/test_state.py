"""The event log (recsys.state): embedded journal (group commit, torn tails, damage), Redis Streams on
a real redis-server, the follower (replay, idempotency keys, snapshots), `recsys state export`, and
served-lists records (round trip through the journal and Redis, the same state as their impression
events, journals written before the record kind still replay)."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from recsys.errors import ModelError
from recsys.serving.validation import EventsInput, ServedLists
from recsys.state.codec import decode, encode, to_frame
from recsys.state.journal import HEADER, Journal
from recsys.state.log import START, MemoryLog, StateUnavailable, format_position, parse_position

T0_US = 1_769_860_800_000_000  # 2026-01-31 12:00 UTC, after the synthetic log


def _events(users: list[str], items: list[str], kind: str = "click", t: int = T0_US) -> Any:
    n = len(users)
    return EventsInput(list(users), list(items), [kind] * n, np.arange(t, t + n, dtype=np.int64), [None] * n,
                       np.full(n, np.nan))


def test_codec_round_trip_keeps_ids_values_and_key() -> None:
    ev = _events(["u1", "u2"], ["i3", "i4"])
    ev.values[1] = 4.5
    ev.request_ids[0] = "r-1"
    back, key = decode(encode(ev, "k-1"))
    assert (back.user_ids, back.item_ids, back.request_ids, key) == (ev.user_ids, ev.item_ids, ev.request_ids, "k-1")
    assert np.array_equal(back.ts_us, ev.ts_us) and np.isnan(back.values[0]) and back.values[1] == 4.5


def test_tokens_round_trip_and_bad_token_names_the_field() -> None:
    from recsys.errors import InputError

    assert parse_position(format_position((12, 3))) == (12, 3)
    with pytest.raises(InputError, match="consistency_token"):
        parse_position("abc")


# ------------------------------------------------------------------------------------------ journal


def test_journal_group_commit_orders_and_survives_reopen(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    payloads = [f"record-{i}".encode() * (1 + i % 7) for i in range(400)]
    positions: list[Any] = [None] * len(payloads)

    def writer(lo: int) -> None:
        for i in range(lo, len(payloads), 8):
            positions[i] = journal.append_wait(payloads[i])

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert journal.commits < journal.appended == 400  # concurrent appends shared fsyncs
    records = journal.read(START, 10_000)
    assert sorted(p for p, _ in records) == [p for p, _ in records] == sorted(positions)
    by_pos = dict(records)
    assert all(by_pos[positions[i]] == payloads[i] for i in range(400))
    journal.close()
    again = Journal(tmp_path)
    assert again.recover() == 0
    assert again.read(START, 10_000) == records
    again.close()


@pytest.mark.parametrize("tail", [b"RSJ", HEADER.pack(b"RSJ1", 100, 0) + b"short", HEADER.pack(b"RSJ1", 4, 1) + b"abcd"])
def test_journal_truncates_a_torn_tail_and_appends_after_it(tmp_path: Path, tail: bytes) -> None:
    journal = Journal(tmp_path)
    for i in range(3):
        journal.append_wait(f"ok-{i}".encode())
    size = journal.head()[0]
    journal.close()
    with open(tmp_path / "events.journal", "ab") as fh:  # what a kill -9 mid-write leaves
        fh.write(tail)
    journal = Journal(tmp_path)
    assert journal.recover() == len(tail)
    assert os.path.getsize(tmp_path / "events.journal") == size
    journal.append_wait(b"after")
    assert [p for _, p in journal.read(START)] == [b"ok-0", b"ok-1", b"ok-2", b"after"]
    journal.close()


def test_journal_refuses_to_truncate_damage_before_valid_records(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    for i in range(3):
        journal.append_wait(f"record-{i}".encode())
    journal.close()
    data = bytearray((tmp_path / "events.journal").read_bytes())
    data[HEADER.size + 2] ^= 0xFF  # flip a payload byte of the first record
    (tmp_path / "events.journal").write_bytes(bytes(data))
    journal = Journal(tmp_path)
    with pytest.raises(ModelError, match="damaged record at byte 0"):
        journal.recover()
    journal.close()


def test_one_process_writes_a_journal(tmp_path: Path) -> None:
    first = Journal(tmp_path)
    with pytest.raises(ModelError, match="in use by another process"):
        Journal(tmp_path)
    first.close()


# ------------------------------------------------------------------------------------------ redis


def test_redis_log_appends_reads_in_order_and_counts_lag(redis_server: Any) -> None:
    from recsys.state.redis_log import RedisLog

    rlog = RedisLog(redis_server.url + "?stream=test:order")
    assert rlog.check() == "yes"
    futures = [rlog.append(f"r{i}".encode()) for i in range(300)]
    positions = [f.result(10) for f in futures]
    assert positions == sorted(positions) and rlog.commits < 300
    records = rlog.read(START, 1000)
    assert [p for p, _ in records] == positions and records[5][1] == b"r5"
    assert rlog.head() == positions[-1]
    assert rlog.count_after(positions[99]) == 200
    assert rlog.read(positions[-1], 10, block_s=0.05) == []
    rlog.close()


def test_redis_down_refuses_appends(tmp_path: Path) -> None:
    pytest.importorskip("redis")
    import shutil

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    from recsys.state.redis_log import RedisLog
    from tests.redis_server import RedisServer

    server = RedisServer(tmp_path / "redis")
    server.start()
    rlog = RedisLog(server.url)
    first = rlog.append_wait(b"kept")
    server.stop(kill=True)
    with pytest.raises(StateUnavailable, match="unreachable"):
        rlog.append_wait(b"lost", timeout=20)
    with pytest.raises(StateUnavailable):
        rlog.read(START)
    server.start()  # same dir: the AOF brings back what was acknowledged
    assert [p for _, p in rlog.read(START)] == [b"kept"]
    assert rlog.append_wait(b"again") > first
    rlog.close()
    server.stop()


# ------------------------------------------------------------------------------------------ follower


@pytest.fixture(scope="module")
def base_state(prepared_dir: Path) -> Any:
    from recsys.data.prepared import PreparedData
    from recsys.features import FeatureState

    data = PreparedData.load(prepared_dir)
    return data, FeatureState.build(data.items, data.events().collect())


def _live(base_state: Any) -> Any:
    import copy

    from recsys.serving.engine import LiveState
    from recsys.serving.model import ItemCatalogue

    data, state = base_state
    items = data.items.sort("item_idx")
    catalogue = ItemCatalogue.from_lists(items["item_id"].cast(pl.Utf8).to_list(), items["text"].cast(pl.Utf8).to_list())
    users = data.users.sort("user_idx")["user_id"].cast(pl.Utf8).to_list()
    return LiveState(copy.deepcopy(state), users, catalogue)


def _item_ids(live: Any, n: int) -> list[str]:
    return list(live.catalogue.ids[:n])


def test_follower_folds_dedupes_keys_and_restores_snapshots(base_state: Any, tmp_path: Path) -> None:
    from recsys.state.follower import Follower
    from recsys.state.snapshot import DirSnapshots

    live = _live(base_state)
    items = _item_ids(live, 5)
    mem = MemoryLog()
    mem.append_wait(encode(_events(["new-user"] * 3, items[:3]), "batch-1"))
    mem.append_wait(encode(_events(["new-user"] * 3, items[:3]), "batch-1"))  # a retried stream
    mem.append_wait(encode(_events(["u-other"], items[3:4], "impression")))
    follower = Follower(mem, live, snapshots=DirSnapshots(tmp_path))
    assert follower.catch_up() == 3
    assert follower.duplicates == 1 and live.events_applied == 4
    user = live.users.get("new-user")
    assert live.state.user_count[user] == 3
    follower.snapshot()

    fresh = _live(base_state)
    again = Follower(mem, fresh, snapshots=DirSnapshots(tmp_path))
    assert again.restore() and again.position == follower.position
    assert again.catch_up() == 0
    assert fresh.users.rows == live.users.rows and np.array_equal(fresh.users.active, live.users.active)
    for name, arr in live.state.arrays().items():
        assert np.array_equal(arr, fresh.state.arrays()[name]), name
    mem.append_wait(encode(_events(["new-user"] * 3, items[:3]), "batch-1"))  # key survives the snapshot
    assert again.catch_up() == 1 and again.duplicates == 1


def _snapshot_as_format(path: Path, fmt: int) -> None:
    """Rewrite a snapshot file's embedded feature state as an older writer left it."""
    import io

    from tests.test_ranker import as_older_state_format

    with np.load(path) as npz:
        blob = {k: npz[k] for k in npz.files}
    meta = json.loads(blob["state_json"].tobytes())
    with np.load(io.BytesIO(blob["state_npz"].tobytes())) as npz:
        arrays = {k: npz[k] for k in npz.files}
    as_older_state_format(meta, arrays, fmt)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    blob["state_npz"] = np.frombuffer(buf.getvalue(), np.uint8)
    blob["state_json"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    with open(path, "wb") as fh:
        np.savez(fh, **blob)


@pytest.mark.parametrize("fmt", [1, 2])
def test_a_snapshot_of_an_older_state_format_is_restored(base_state: Any, tmp_path: Path, fmt: int) -> None:
    """Formats 1 and 2 keep every map today's state has (2's transition map is ignored): a live
    snapshot written by either restores exactly, with nothing replayed."""
    from recsys.state.follower import Follower
    from recsys.state.snapshot import DirSnapshots

    live = _live(base_state)
    mem = MemoryLog()
    mem.append_wait(encode(_events(["new-user"] * 3, _item_ids(live, 3))))
    follower = Follower(mem, live, snapshots=DirSnapshots(tmp_path))
    follower.catch_up()
    follower.snapshot()
    (path,) = (tmp_path / "snapshots").glob("snap-*.npz")
    _snapshot_as_format(path, fmt)
    fresh = _live(base_state)
    again = Follower(mem, fresh, snapshots=DirSnapshots(tmp_path))
    assert again.restore() and again.position == follower.position and again.catch_up() == 0
    assert fresh.state.user_count[fresh.users.get("new-user")] == 3
    for name, arr in live.state.arrays().items():
        assert np.array_equal(arr, fresh.state.arrays()[name]), name


def test_follower_merges_sparse_deltas_outside_the_write_lock(base_state: Any) -> None:
    """Served lists grow user_item_impr's delta past its limit: the follower builds the merge while no
    writer holds the state (requests read on) and swaps it in; the state equals a plain fold's."""
    from recsys.state.follower import Follower

    live, plain = _live(base_state), _live(base_state)
    for state in (live.state, plain.state):
        state.user_item_impr.MIN_DELTA = 40
    prepared_under: list[bool] = []
    prepare = live.state.prepare_merges

    def watched() -> Any:
        prepared_under.append(live.lock._writer)
        return prepare()

    live.state.prepare_merges = watched  # type: ignore[method-assign]
    mem = MemoryLog()
    items = _item_ids(live, 30)
    for j in range(6):
        batch = _events([f"viewer-{j}-{k}" for k in range(30)], items, "impression", T0_US + j)
        mem.append_wait(encode(batch))
        plain.apply(batch)
    follower = Follower(mem, live)
    for _ in range(6):
        follower.step(0.0, 1)
    impr = live.state.user_item_impr
    assert prepared_under and not any(prepared_under) and not live.lock._writer
    assert len(impr._keys) > len(base_state[1].user_item_impr) and len(impr._dkeys) <= impr.delta_limit
    for name, arr in live.state.arrays().items():
        assert np.array_equal(arr, plain.state.arrays()[name]), name


def test_follower_thread_wakes_waiters_and_reports_lag(base_state: Any) -> None:
    import asyncio

    from recsys.state.follower import Follower

    live = _live(base_state)
    mem = MemoryLog()
    follower = Follower(mem, live)
    follower.start()
    try:
        position = mem.append_wait(encode(_events(["w"], _item_ids(live, 1))))

        async def wait() -> tuple[bool, bool]:
            return await follower.wait_for(position, 5.0), await follower.wait_for((position[0] + 5, 0), 0.05)

        assert asyncio.run(wait()) == (True, False)
        assert live.users.get("w") >= 0 and follower.refresh_lag() == 0
    finally:
        follower.stop()


def test_export_table_reads_back_as_events(tmp_path: Path) -> None:
    payloads = [encode(_events(["a", "b"], ["i1", "i2"]), "k"), encode(_events(["a", "b"], ["i1", "i2"]), "k"),
                encode(_events(["c"], ["i3"], "purchase"))]
    frame = to_frame(payloads)
    assert frame.height == 3 and frame["event_type"].to_list() == ["click", "click", "purchase"]
    assert frame.schema["timestamp"] == pl.Datetime("us", "UTC")


def test_a_log_that_stopped_answering_refuses_appends_beyond_the_backlog(monkeypatch: pytest.MonkeyPatch) -> None:
    import recsys.state.log as log_module

    monkeypatch.setattr(log_module, "MAX_PENDING", 5)
    gate = threading.Event()

    class Stuck(MemoryLog):
        def _commit(self, payloads: list[bytes]) -> list[Any]:
            gate.wait(10)
            return super()._commit(payloads)

    stuck = Stuck()
    first = stuck.append(b"0")  # taken by the committer, which hangs
    time.sleep(0.1)
    queued = [stuck.append(str(i).encode()) for i in range(5)]
    with pytest.raises(StateUnavailable, match="waiting to be stored"):
        stuck.append(b"refused")
    gate.set()
    assert [f.result(5) for f in [first, *queued]] == [(i, 0) for i in range(1, 7)]
    stuck.close()


def test_folding_near_the_user_bound_evicts_as_record_by_record_folding_does(base_state: Any) -> None:
    """Replicas may read the log in different chunks: near --max-users, where eviction depends on
    batch boundaries, the follower folds record by record, so every grouping evicts the same users."""
    from recsys.serving.engine import LiveState
    from recsys.state.follower import Follower

    first = _live(base_state)
    capacity = len(first.users) + 3
    mem = MemoryLog()
    items = _item_ids(first, 4)
    for k in range(6):  # two new users per record: evictions start at the second record
        mem.append_wait(encode(_events([f"n{k}a", f"n{k}b"], items[:2], t=T0_US + k * 1_000_000)))
    lives = []
    for limit in (1000, 1):  # one read of everything vs one record per read
        live = _live(base_state)
        live = LiveState(live.state, list(live.users.ids), live.catalogue, capacity)
        Follower(mem, live).catch_up(limit)
        lives.append(live)
    a, b = lives
    assert a.users.evicted == b.users.evicted > 0 and a.users.rows == b.users.rows
    for name, arr in a.state.arrays().items():
        assert np.array_equal(arr, b.state.arrays()[name]), name


# ------------------------------------------------------------------------------------------ served lists

BEFORE = Path(__file__).parent / "data" / "journal_before_served_lists"  # written by make.py with 46cf817


def _lists(t: int = T0_US) -> ServedLists:
    """Known users, new users, an unknown item inside a list, a list of unknown items only (its user
    must not be admitted), the same user twice, a list without a request id."""
    return ServedLists.from_lists([
        ("u1", t, "r-1", ["i3", "i5", "i7"]),
        ("new-b", t + 1, "r-2", ["i9", "cold-x", "i3"]),
        ("viewer-cold", t + 2, "r-3", ["cold-y"]),
        ("u1", t + 3, "r-4", ["i5", "i6"]),
        ("u2", t + 4, None, ["i11", "i12"]),
        ("new-c", t + 5, "r-5", []),
    ])


def _assert_same(a: Any, b: Any) -> None:
    assert a.users.rows == b.users.rows and np.array_equal(a.users.active, b.users.active)
    assert a.events_applied == b.events_applied
    assert (a.state.global_impr, a.state.as_of_us, a.state.n_users) == (b.state.global_impr, b.state.as_of_us, b.state.n_users)
    for name, arr in a.state.arrays().items():
        assert np.array_equal(arr, b.state.arrays()[name]), name


def test_served_lists_round_trip_and_mean_their_impression_events() -> None:
    lists = _lists()
    back, key = decode(encode(lists))
    assert isinstance(back, ServedLists) and key == ""
    assert (back.user_ids, back.request_ids, back.item_ids) == (lists.user_ids, lists.request_ids, lists.item_ids)
    assert np.array_equal(back.ts_us, lists.ts_us) and np.array_equal(back.counts, [3, 3, 1, 2, 2, 0])
    events = lists.events()
    assert events.user_ids[:4] == ["u1", "u1", "u1", "new-b"] and set(events.event_types) == {"impression"}
    assert events.request_ids[-2:] == [None, None] and np.isnan(events.values).all() and len(events) == len(lists) == 11
    assert np.array_equal(events.ts_us[2:4], [T0_US, T0_US + 1])
    assert len(encode(lists)) < len(encode(events)) / 2


def test_served_lists_round_trip_through_the_journal_and_redis(tmp_path: Path, redis_server: Any) -> None:
    from recsys.state.journal import Journal
    from recsys.state.redis_log import RedisLog

    lists = _lists()
    for log in (Journal(tmp_path), RedisLog(redis_server.url + "?stream=test:served")):
        log.append_wait(encode(lists))
        log.append_wait(encode(_lists(T0_US + 100)))
        records = log.read(START, 10)
        got = [decode(payload)[0] for _, payload in records]
        assert len(got) == 2 and all(isinstance(g, ServedLists) for g in got), log.describe()
        for g, t in zip(got, (lists.ts_us, lists.ts_us + 100), strict=True):
            assert (g.user_ids, g.request_ids, g.item_ids) == (lists.user_ids, lists.request_ids, lists.item_ids)
            assert np.array_equal(g.ts_us, t) and np.array_equal(g.counts, lists.counts)
        log.close()


@pytest.mark.parametrize("capacity", [None, 2], ids=["unbounded", "at-the-user-bound"])
def test_folding_served_lists_equals_folding_their_events_and_a_rebuild(base_state: Any, capacity: int | None) -> None:
    """The dedicated fold (LiveState.apply_served, through the follower) against the generic fold of
    the same impressions as event rows, record by record and in one read, interleaved with a click
    record, unbounded and near the user bound (eviction). The generic fold in one read is one
    FeatureState.apply of all events on the prepared state: a rebuild (tests/test_features.py checks
    that incremental folding equals it)."""
    from recsys.serving.engine import LiveState
    from recsys.state.follower import Follower

    clicks = EventsInput(["new-b", "u7"], ["i3", "i4"], ["click", "purchase"], np.array([T0_US - 5, T0_US + 7], np.int64),
                         ["r-2", None], np.array([np.nan, 3.0]))
    later = _lists(T0_US + 10)
    compact, generic = MemoryLog(), MemoryLog()
    for record in (_lists(), clicks, later):
        compact.append_wait(encode(record))
        generic.append_wait(encode(record.events() if isinstance(record, ServedLists) else record))
    folded = []
    for log, limit in ((compact, 1000), (compact, 1), (generic, 1000), (generic, 1)):
        live = _live(base_state)
        if capacity is not None:
            live = LiveState(live.state, list(live.users.ids), live.catalogue, len(live.users) + capacity)
        Follower(log, live).catch_up(limit)
        folded.append(live)
    for other in folded[1:]:
        _assert_same(folded[0], other)
    assert folded[0].events_applied == 9 + 2 + 9 and folded[0].users.get("viewer-cold") < 0
    assert folded[0].users.get("new-c") < 0 and folded[0].state.global_impr == folded[1].state.global_impr > 0


def test_a_journal_written_before_served_lists_records_replays_and_exports(base_state: Any, tmp_path: Path) -> None:
    """tests/data/journal_before_served_lists: a LogEvents record and served lists as impression rows,
    written by the code before this record kind; it replays to the state the same lists give as
    served-lists records, and exports the same table."""
    from recsys.state.follower import Follower
    from recsys.state.journal import Journal

    shutil.copytree(BEFORE, tmp_path / "old", ignore=shutil.ignore_patterns("*.py"))
    old = Journal(tmp_path / "old")
    new = MemoryLog()
    for position, payload in old.read(START, 10):
        record, key = decode(payload)
        assert isinstance(record, EventsInput), position  # the old code wrote event rows only
        if key:
            new.append_wait(encode(record, key))
        else:  # the same served lists as a served-lists record
            new.append_wait(encode(_as_lists(record)))
    replayed, folded = _live(base_state), _live(base_state)
    assert Follower(old, replayed).catch_up() == 3 and Follower(new, folded).catch_up() == 3
    _assert_same(replayed, folded)
    assert replayed.users.get("new-b") >= 0 and replayed.users.get("viewer-cold") < 0
    exported = to_frame(p for _, p in old.read(START, 10))
    assert exported.equals(to_frame(p for _, p in new.read(START, 10)))
    assert exported.height == 2 + 11 and exported["event_type"].to_list().count("impression") == 11
    old.close()


def _as_lists(events: EventsInput) -> ServedLists:
    """Impression rows of consecutive served lists -> the lists (a list = a run of one request id and time)."""
    lists: list[tuple[str, int, str | None, list[str]]] = []
    for k, item in enumerate(events.item_ids):
        head = (events.user_ids[k], int(events.ts_us[k]), events.request_ids[k])
        if not lists or lists[-1][:3] != head:
            lists.append((*head, []))
        lists[-1][3].append(item)
    return ServedLists.from_lists(lists)


def test_export_of_served_lists_is_their_impression_events() -> None:
    lists = _lists()
    frame = to_frame([encode(lists)])
    assert frame.equals(to_frame([encode(lists.events())]))
    assert frame.height == 11 and frame["request_id"].null_count() == 2 and frame["value"].null_count() == 11
    assert frame["user_id"].to_list()[:4] == ["u1", "u1", "u1", "new-b"]
    assert frame.schema["timestamp"] == pl.Datetime("us", "UTC")


def test_a_served_list_counts_as_one_event_toward_snapshots(base_state: Any, tmp_path: Path) -> None:
    """--snapshot-events bounds start-up replay: a served list replays in about one event row's time,
    so it counts one, not one per impression (else a busy server snapshots every few seconds)."""
    from recsys.state.follower import Follower
    from recsys.state.snapshot import DirSnapshots

    live = _live(base_state)
    items = _item_ids(live, 60)
    mem = MemoryLog()
    follower = Follower(mem, live, snapshots=DirSnapshots(tmp_path), snapshot_events=5, snapshot_s=3600)
    lists = ServedLists.from_lists([(f"v{k}", T0_US + k, f"r{k}", items) for k in range(3)])
    for expected in (0, 1):
        mem.append_wait(encode(lists))
        follower.step(0.0)
        follower._maybe_snapshot()
        assert len(DirSnapshots(tmp_path).blobs()) == expected and live.events_applied == 180 * (expected + 1)
