"""The Batch API's job database: one of another layout is refused with a message naming it, never guessed at."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from gateway.base.errors import GatewayError
from gateway.embedding.batch_store import DB_NAME, SCHEMA_VERSION, BatchStore


def test_a_new_database_is_stamped_and_opens_again(tmp_path: Path) -> None:
    BatchStore(tmp_path).close()
    db = sqlite3.connect(tmp_path / DB_NAME)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()
    store = BatchStore(tmp_path)
    assert store.active_jobs() == []
    store.close()


def test_a_database_of_another_layout_is_refused(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / DB_NAME)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(GatewayError) as err:
        BatchStore(tmp_path)
    assert err.value.status == 503 and f"layout {SCHEMA_VERSION + 1}" in str(err.value)
