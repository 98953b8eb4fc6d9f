"""The Batch API's files and jobs: one SQLite database (the standard library's, WAL) and the files beside it.

Every method is synchronous and may wait on the disk or on another process's write lock: callers on an event loop
call them through `BatchStore.call` (a worker thread). Fronts and the runtime process (`[server] workers` > 1)
each open the same database; SQLite's own locking orders their writes. A job's progress is one row: the next
chunk to compute and how many bytes of its output and error files hold completed chunks, so that a restart
drops a chunk written but not recorded and goes on from the next one (BatchRunner).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import msgspec

from gateway.base.errors import GatewayError

T = TypeVar("T")

BatchStatus = Literal[
    "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
]
#: Statuses of a job the runner still has work for.
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
COMPLETION_WINDOW_S = 24 * 3600
#: The column stamped when a job ends in each final status.
_ENDED_AT = {"completed": "completed_at", "cancelled": "cancelled_at", "failed": "failed_at", "expired": "expired_at"}
#: The layout of the tables below; a database of another layout is refused, not guessed at.
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, purpose TEXT NOT NULL, filename TEXT NOT NULL,
    bytes INTEGER NOT NULL, created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, input_file_id TEXT NOT NULL, endpoint TEXT NOT NULL,
    completion_window TEXT NOT NULL, metadata TEXT, status TEXT NOT NULL, created_at INTEGER NOT NULL,
    in_progress_at INTEGER, finalizing_at INTEGER, completed_at INTEGER, failed_at INTEGER,
    cancelling_at INTEGER, cancelled_at INTEGER, expires_at INTEGER, output_file_id TEXT, error_file_id TEXT,
    errors TEXT, total INTEGER NOT NULL DEFAULT 0, completed INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0, next_chunk INTEGER NOT NULL DEFAULT 0,
    out_bytes INTEGER NOT NULL DEFAULT 0, err_bytes INTEGER NOT NULL DEFAULT 0, expired_at INTEGER,
    tokens INTEGER NOT NULL DEFAULT 0
);
"""


class FileObject(msgspec.Struct, kw_only=True):
    """OpenAI's file object."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"] = "processed"
    expires_at: int | None = None
    status_details: str | None = None


class RequestCounts(msgspec.Struct, kw_only=True):
    total: int
    completed: int
    failed: int


class BatchError(msgspec.Struct, kw_only=True):
    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(msgspec.Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[BatchError]


class InputTokensDetails(msgspec.Struct, kw_only=True):
    # The embedding cache's hits are charged as computed tokens, so none counts as "cached" in OpenAI's sense.
    cached_tokens: int = 0


class OutputTokensDetails(msgspec.Struct, kw_only=True):
    reasoning_tokens: int = 0


class BatchUsage(msgspec.Struct, kw_only=True):
    """OpenAI's batch usage: an embeddings job's input tokens (of its completed lines); it outputs none."""

    input_tokens: int
    input_tokens_details: InputTokensDetails = msgspec.field(default_factory=InputTokensDetails)
    output_tokens: int = 0
    output_tokens_details: OutputTokensDetails = msgspec.field(default_factory=OutputTokensDetails)
    total_tokens: int


class BatchObject(msgspec.Struct, kw_only=True):
    """OpenAI's batch object."""

    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts
    metadata: dict[str, str] | None = None
    usage: BatchUsage | None = None


@dataclass(frozen=True, slots=True)
class Progress:
    """Where a job stands: the next chunk to compute, counts so far, and the bytes its files hold for them."""

    next_chunk: int
    completed: int
    failed: int
    out_bytes: int
    err_bytes: int
    tokens: int = 0


_BATCH_COLUMNS = (
    "id, owner, input_file_id, endpoint, completion_window, metadata, status, created_at, in_progress_at, "
    "finalizing_at, completed_at, failed_at, cancelling_at, cancelled_at, expires_at, output_file_id, "
    "error_file_id, errors, total, completed, failed, expired_at, tokens"
)


def new_id(prefix: str) -> str:
    """An id in OpenAI's style (`file-…`, `batch_…`)."""
    return prefix + secrets.token_hex(12)


def _batch(row: tuple[Any, ...]) -> tuple[str, BatchObject]:
    """(owner, the batch object) from a row of `_BATCH_COLUMNS`."""
    (bid, owner, file_id, endpoint, window, metadata, status, created, started, finalizing, completed, failed_at,
     cancelling, cancelled, expires, out_id, err_id, errors, total, done, failed, expired_at, tokens) = row  # fmt: skip
    return owner, BatchObject(
        id=bid,
        endpoint=endpoint,
        errors=msgspec.json.decode(errors, type=BatchErrors) if errors else None,
        input_file_id=file_id,
        completion_window=window,
        status=status,
        output_file_id=out_id,
        error_file_id=err_id,
        created_at=created,
        in_progress_at=started,
        expires_at=expires,
        finalizing_at=finalizing,
        completed_at=completed,
        failed_at=failed_at,
        cancelling_at=cancelling,
        cancelled_at=cancelled,
        expired_at=expired_at,
        request_counts=RequestCounts(total=total, completed=done, failed=failed),
        metadata=msgspec.json.decode(metadata) if metadata else None,
        usage=BatchUsage(input_tokens=tokens, total_tokens=tokens),
    )


class BatchStore:
    """Files and jobs under `data_dir`: `batches.sqlite3`, `files/<id>.jsonl`, `work/<batch>.{out,err}`."""

    def __init__(self, data_dir: str | Path) -> None:
        self.root = Path(data_dir)
        (self.root / "files").mkdir(parents=True, exist_ok=True)
        (self.root / "work").mkdir(parents=True, exist_ok=True)
        # One connection, used from worker threads one at a time.
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.root / DB_NAME, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.execute("PRAGMA synchronous=FULL")
        self._check_version()

    def _check_version(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        elif version != SCHEMA_VERSION:
            raise GatewayError(
                503,
                f"{self.root / DB_NAME} holds Batch API jobs in layout {version}, this gateway reads layout "
                f"{SCHEMA_VERSION}: finish them with the gateway that wrote them, or set [batches] data_dir",
                code="batch_store_unavailable",
            )

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` (a method of this store) on a worker thread: SQLite and the disk never hold the loop."""
        return await asyncio.to_thread(fn, *args)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _run(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _transaction(self, steps: list[tuple[str, tuple[Any, ...]]]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for sql, args in steps:
                    self._db.execute(sql, args)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def file_path(self, file_id: str) -> Path:
        return self.root / "files" / f"{file_id}.jsonl"

    def work_paths(self, batch_id: str) -> tuple[Path, Path]:
        """Where a job's output and error lines accumulate until it ends."""
        return self.root / "work" / f"{batch_id}.out", self.root / "work" / f"{batch_id}.err"

    def add_file(self, owner: str, purpose: str, filename: str, source: Path) -> FileObject:
        """Keep the uploaded file at `source` (moved, made durable) as a new file of `owner`."""
        file_id = new_id("file-")
        target = self.file_path(file_id)
        _sync(source)
        os.replace(source, target)
        size = target.stat().st_size
        created = int(time.time())
        self._run(
            "INSERT INTO files (id, owner, purpose, filename, bytes, created_at) VALUES (?, ?, ?, ?, ?, ?)",
            (file_id, owner, purpose, filename, size, created),
        )
        return FileObject(id=file_id, bytes=size, created_at=created, filename=filename, purpose=purpose)

    def get_file(self, file_id: str, owner: str | None) -> FileObject | None:
        """The file, if it exists and `owner` may see it (None: an admin key, who sees every file)."""
        rows = self._run("SELECT id, owner, purpose, filename, bytes, created_at FROM files WHERE id = ?", (file_id,))
        if not rows or (owner is not None and rows[0][1] != owner):
            return None
        fid, _, purpose, filename, size, created = rows[0]
        return FileObject(id=fid, bytes=size, created_at=created, filename=filename, purpose=purpose)

    def list_files(self, owner: str | None, purpose: str | None) -> list[FileObject]:
        rows = self._run("SELECT id, owner, purpose FROM files ORDER BY rowid DESC")
        wanted = [r[0] for r in rows if (owner is None or r[1] == owner) and (purpose is None or r[2] == purpose)]
        return [f for f in (self.get_file(i, None) for i in wanted) if f is not None]

    def delete_file(self, file_id: str) -> None:
        self._run("DELETE FROM files WHERE id = ?", (file_id,))
        self.file_path(file_id).unlink(missing_ok=True)

    def create_batch(
        self,
        owner: str,
        file_id: str,
        endpoint: str,
        window: str,
        metadata: dict[str, str] | None,
        total: int,
        window_s: int = COMPLETION_WINDOW_S,
    ) -> BatchObject:
        """A new job, due within `window_s` seconds (its `expires_at`)."""
        batch_id = new_id("batch_")
        now = int(time.time())
        self._run(
            "INSERT INTO batches (id, owner, input_file_id, endpoint, completion_window, metadata, status, "
            "created_at, expires_at, total) VALUES (?, ?, ?, ?, ?, ?, 'validating', ?, ?, ?)",
            (batch_id, owner, file_id, endpoint, window, _json(metadata), now, now + window_s, total),
        )
        found = self.get_batch(batch_id, None)
        assert found is not None
        return found

    def get_batch(self, batch_id: str, owner: str | None) -> BatchObject | None:
        """The batch, if it exists and `owner` may see it (None: an admin key)."""
        rows = self._run(f"SELECT {_BATCH_COLUMNS} FROM batches WHERE id = ?", (batch_id,))
        if not rows:
            return None
        who, batch = _batch(rows[0])
        return batch if owner is None or who == owner else None

    def owner_of(self, batch_id: str) -> str:
        return str(self._run("SELECT owner FROM batches WHERE id = ?", (batch_id,))[0][0])

    def list_batches(self, owner: str | None, limit: int, after: str | None) -> tuple[list[BatchObject], bool]:
        """Newest first, those after the batch `after` (OpenAI's cursor), at most `limit`; and whether more follow."""
        sql, args = f"SELECT {_BATCH_COLUMNS} FROM batches", []
        where = []
        if owner is not None:
            where.append("owner = ?")
            args.append(owner)
        if after is not None:
            where.append("rowid < (SELECT rowid FROM batches WHERE id = ?)")
            args.append(after)
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = self._run(sql + " ORDER BY rowid DESC LIMIT ?", (*args, limit + 1))
        return [_batch(r)[1] for r in rows[:limit]], len(rows) > limit

    def cancel(self, batch_id: str) -> None:
        """Ask the runner to stop the job after its current chunk (it writes what it has, then "cancelled")."""
        self._run(
            "UPDATE batches SET status = 'cancelling', cancelling_at = ? WHERE id = ? AND status IN "
            "('validating', 'in_progress')",
            (int(time.time()), batch_id),
        )

    def active_jobs(self) -> list[tuple[str, BatchObject]]:
        """(owner, job) of every job with work left (or its end to write), oldest first."""
        marks = ", ".join("?" * len(ACTIVE))
        rows = self._run(f"SELECT {_BATCH_COLUMNS} FROM batches WHERE status IN ({marks}) ORDER BY rowid", ACTIVE)
        return [_batch(row) for row in rows]

    def progress(self, batch_id: str) -> tuple[BatchStatus, Progress]:
        rows = self._run(
            "SELECT status, next_chunk, completed, failed, out_bytes, err_bytes, tokens FROM batches WHERE id = ?",
            (batch_id,),
        )
        status, *rest = rows[0]
        return status, Progress(*rest)

    def start(self, batch_id: str) -> None:
        self._run(
            "UPDATE batches SET status = 'in_progress', in_progress_at = ? WHERE id = ? AND status = 'validating'",
            (int(time.time()), batch_id),
        )

    def record_chunk(self, batch_id: str, done: Progress) -> None:
        """A chunk's lines are on disk (fsynced): the job's progress, in one transaction."""
        self._transaction(
            [
                (
                    "UPDATE batches SET next_chunk = ?, completed = ?, failed = ?, out_bytes = ?, err_bytes = ?, "
                    "tokens = ? WHERE id = ?",
                    (
                        done.next_chunk,
                        done.completed,
                        done.failed,
                        done.out_bytes,
                        done.err_bytes,
                        done.tokens,
                        batch_id,
                    ),
                )
            ]
        )

    def finish(self, batch_id: str, status: BatchStatus, outputs: dict[str, tuple[str, Path]]) -> None:
        """The job's end: its output and error files (kind "output"/"error" -> (file id, path)) become files
        of its owner, and its status `status` ("completed", "cancelled", "failed", "expired"), in one transaction."""
        owner = self.owner_of(batch_id)
        now = int(time.time())
        steps: list[tuple[str, tuple[Any, ...]]] = []
        for kind, (file_id, path) in outputs.items():
            steps.append(
                (
                    "INSERT OR IGNORE INTO files (id, owner, purpose, filename, bytes, created_at) "
                    "VALUES (?, ?, 'batch_output', ?, ?, ?)",
                    (file_id, owner, f"{batch_id}_{kind}.jsonl", path.stat().st_size, now),
                )
            )
        out = outputs.get("output", (None, None))[0]
        err = outputs.get("error", (None, None))[0]
        when = _ENDED_AT[status]
        steps.append(
            (
                f"UPDATE batches SET status = ?, {when} = ?, output_file_id = ?, error_file_id = ?, "
                "finalizing_at = COALESCE(finalizing_at, ?) WHERE id = ?",
                (status, now, out, err, now, batch_id),
            )
        )
        self._transaction(steps)

    def fail(self, batch_id: str, errors: list[BatchError]) -> None:
        """The job cannot run (its input file is gone, its input is invalid, it kept failing): "failed", with
        the reasons in `errors`."""
        encoded = msgspec.json.encode(BatchErrors(data=errors)).decode()
        self._run(
            "UPDATE batches SET status = 'failed', failed_at = ?, errors = ? WHERE id = ?",
            (int(time.time()), encoded, batch_id),
        )

    def finalizing(self, batch_id: str) -> None:
        self._run(
            "UPDATE batches SET status = 'finalizing', finalizing_at = ? WHERE id = ? AND status = 'in_progress'",
            (int(time.time()), batch_id),
        )


def _json(value: Any) -> str | None:
    return msgspec.json.encode(value).decode() if value is not None else None


def _sync(path: Path) -> None:
    """`path`'s bytes on disk (fsync), before its name is trusted."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


DB_NAME = "batches.sqlite3"


class StoreHandle:
    """The store of a data folder, opened on first use: a server whose clients never use the Batch API writes
    nothing to disk."""

    def __init__(self, data_dir: str | Path) -> None:
        self.data_dir = Path(data_dir)
        self._store: BatchStore | None = None
        self._lock = threading.Lock()

    def get(self, create: bool) -> BatchStore | None:
        """The store (blocking: call it off the loop); None while there is none and `create` is false."""
        with self._lock:
            if self._store is None and (create or (self.data_dir / DB_NAME).exists()):
                self._store = BatchStore(self.data_dir)
            return self._store

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None
