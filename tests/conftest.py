"""Session-scoped fixtures: a small synthetic log, its prepared dataset, a tiny random BERT."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def synthetic_log():
    from recsys.data.synthetic import generate

    return generate(n_users=300, n_items=200, n_events=40_000, days=30, seed=7)


@pytest.fixture(scope="session")
def prepared_dir(synthetic_log, tmp_path_factory) -> Path:
    from recsys.data.prepare import PrepareConfig, prepare_tables
    from recsys.data.schema import StrengthRule

    out = tmp_path_factory.mktemp("prepared") / "data"
    events = synthetic_log.events.with_columns(StrengthRule().expr())
    prepare_tables(events, synthetic_log.items, synthetic_log.users, out, PrepareConfig(max_history=10))
    return out


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    from tests.tiny_models import build_tiny_bert

    return build_tiny_bert(tmp_path_factory.mktemp("tiny_bert") / "model")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real redis-server (AOF on, fsync per write) on a free port for the session."""
    import shutil

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (make test installs it: apt-get install -y redis-server)")
    pytest.importorskip("redis")
    from tests.redis_server import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()
