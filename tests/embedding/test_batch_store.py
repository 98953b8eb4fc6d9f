"""The Batch API's job database: one written before columns were added still opens and its jobs go on."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from gateway.embedding.batch_store import BatchStore

# The batches table as the Batch API first shipped it (no expired_at, no tokens).
_FIRST = """
CREATE TABLE batches (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, input_file_id TEXT NOT NULL, endpoint TEXT NOT NULL,
    completion_window TEXT NOT NULL, metadata TEXT, status TEXT NOT NULL, created_at INTEGER NOT NULL,
    in_progress_at INTEGER, finalizing_at INTEGER, completed_at INTEGER, failed_at INTEGER,
    cancelling_at INTEGER, cancelled_at INTEGER, expires_at INTEGER, output_file_id TEXT, error_file_id TEXT,
    errors TEXT, total INTEGER NOT NULL DEFAULT 0, completed INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0, next_chunk INTEGER NOT NULL DEFAULT 0,
    out_bytes INTEGER NOT NULL DEFAULT 0, err_bytes INTEGER NOT NULL DEFAULT 0
);
INSERT INTO batches (id, owner, input_file_id, endpoint, completion_window, status, created_at, expires_at,
    total, completed, next_chunk)
    VALUES ('batch_old', 'k', 'file-x', '/v1/embeddings', '24h', 'in_progress', 1, 86401, 8, 4, 1);
"""


def test_a_database_of_the_first_release_gets_the_new_columns(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "batches.sqlite3")
    db.executescript(_FIRST)
    db.close()
    store = BatchStore(tmp_path)
    ((owner, job),) = store.active_jobs()
    assert owner == "k" and job.id == "batch_old" and job.request_counts.completed == 4
    assert job.expired_at is None and job.usage is not None and job.usage.input_tokens == 0
    status, progress = store.progress("batch_old")
    assert status == "in_progress" and (progress.next_chunk, progress.tokens) == (1, 0)
    store.close()
    BatchStore(tmp_path).close()  # opened again: the columns are there, nothing to add
