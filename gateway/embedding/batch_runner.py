"""The Batch API's jobs, computed: chunk by chunk, each line through the `/v1/embeddings` pipeline at low priority.

It runs where the models' batchers are (the single process, or the runtime process with `[server] workers` > 1;
fronts only write files and rows, and this runner finds new jobs by polling the database). Each line's body goes
through `service.request_vectors` exactly as a client's request does (prompts, `dimensions`, output types,
truncation, fallbacks, the cache, every backend and placement), with `background=True`: the batcher computes it
only while no client input waits, admission never refuses it and `request_timeout_s` does not bound it. The lines
of a chunk are sent together, and the batcher merges background requests into full batches. A chunk's output and
error lines are appended and fsynced, then one transaction records the chunk done: a restart trims what a chunk
wrote without being recorded, and goes on from the next chunk (nothing computed twice, nothing lost). Cancel and
shutdown take effect between chunks. A line that fails (malformed, unknown model, too long, a backend error) gets
an error line with the status and message the API would answer, and the job goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import msgspec
import numpy as np

from gateway.base.config import BatchesConfig
from gateway.base.errors import GatewayError, error_body
from gateway.base.observability import new_id
from gateway.base.schemas import EmbeddingRequest
from gateway.embedding import service
from gateway.embedding.batch_store import BatchError, BatchObject, BatchStore, Progress, StoreHandle
from gateway.embedding.state import Gateway
from gateway.shared.keys import ApiKey
from gateway.shared.windows import SlidingWindow

log = logging.getLogger("gateway.batches")

ENDPOINT = "/v1/embeddings"
# A job waiting for its key's token quota looks again after at most this long.
_QUOTA_RECHECK_S = 5.0
# A job whose turn fails inside the runner (its files cannot be written, say) is tried again this many times,
# after 1, 2, 4... times this long, then fails.
_RETRIES = 4
_BACKOFF_S = 2.0


@dataclass(slots=True)
class Done:
    """One line's vectors, as `request_vectors` gave them."""

    custom_id: str
    body: EmbeddingRequest
    vectors: np.ndarray
    tokens: int
    output: service.Output


@dataclass(slots=True)
class Failed:
    """One line's failure: the status and error the API would answer."""

    custom_id: str | None
    status: int
    code: str
    message: str
    param: str | None = None


class BatchRunner:
    """Computes the store's jobs chunk by chunk, taking turns (owners in turn, then each owner's jobs in turn, so
    that a small job is not held behind a big one), until `stop`."""

    def __init__(self, gw: Gateway, handle: StoreHandle, config: BatchesConfig, poll_s: float = 0.5) -> None:
        self.gw = gw
        self.handle = handle
        # Opened once its database exists (the first upload creates it, here or in a front).
        self.store: BatchStore | None = None
        self.chunk_lines = config.chunk_lines
        self.job_tokens_per_minute = config.job_tokens_per_minute
        self.poll_s = poll_s
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        # Each key's job quota, when one is configured apart from the key's own.
        self._job_windows: dict[str, SlidingWindow] = {}
        # The jobs being computed (their input read so far), and whose turn it is: the turn each owner and each
        # job last had (the lowest goes next).
        self._open: dict[str, _Open] = {}
        self._turn = 0
        self._turns: dict[str, int] = {}
        # Jobs whose last turn failed inside the runner: (failures in a row, when to try again).
        self._failures: dict[str, tuple[int, float]] = {}

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    def poke(self) -> None:
        """A job was created or cancelled in this process: look now rather than at the next poll."""
        self._wake.set()

    async def stop(self, timeout_s: float) -> None:
        """Stop after the chunk being computed (cancelled if it takes longer than `timeout_s`: it was not
        recorded, so a restart computes it again)."""
        self._stopping = True
        self._wake.set()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
        except TimeoutError:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        try:
            while not self._stopping:
                try:
                    if self.store is None:
                        self.store = await asyncio.to_thread(self.handle.get, False)
                    if self.store is not None and await self._step(self.store):
                        continue
                except Exception:
                    log.exception("batch runner: a step failed; trying again shortly")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_s)
                self._wake.clear()
        finally:
            for state in self._open.values():
                state.reader.close()
            self._open.clear()

    async def _step(self, store: BatchStore) -> bool:
        """One turn: the next job's next chunk (or its end). False when no job has work now."""
        jobs = await store.call(store.active_jobs)
        active = {job.id for _, job in jobs}
        for gone in set(self._open) - active:
            self._close(gone)
        for ended in [k for k in self._turns if not k.startswith("owner:") and k not in active]:
            del self._turns[ended]
        picked = self._pick(jobs)
        if picked is None:
            return False
        owner, job = picked
        try:
            await self._take_turn(store, owner, job)
        except Exception as exc:
            await self._failed(store, job, exc)
            return True
        self._failures.pop(job.id, None)
        return True

    def _pick(self, jobs: list[tuple[str, BatchObject]]) -> tuple[str, BatchObject] | None:
        """The job whose turn it is: of the owner served longest ago, that owner's job served longest ago (the
        oldest first among equals); jobs waiting to retry sit out."""
        now = time.monotonic()
        ready = [(o, j) for o, j in jobs if self._failures.get(j.id, (0, 0.0))[1] <= now]
        if not ready:
            return None
        owner, job = min(ready, key=lambda oj: (self._turns.get("owner:" + oj[0], 0), self._turns.get(oj[1].id, 0)))
        self._turn += 1
        self._turns["owner:" + owner] = self._turns[job.id] = self._turn
        return owner, job

    async def _take_turn(self, store: BatchStore, owner: str, job: BatchObject) -> None:
        """`job`'s next chunk computed and recorded, or its end written (completed, cancelled or expired)."""
        if job.status in ("validating", "in_progress") and job.expires_at is not None and time.time() >= job.expires_at:
            await self._expire(store, job)
            return
        state = self._open.get(job.id) or await self._open_job(store, owner, job)
        if state is None:
            return
        status = job.status
        if status in ("validating", "in_progress"):
            lines = await asyncio.to_thread(state.reader.take, self.chunk_lines)
            if lines:
                results = await self._chunk(owner, state.done.next_chunk * self.chunk_lines, lines)
                if results is not None:  # None: stopping while the chunk waited for quota; a restart redoes it
                    done = await asyncio.to_thread(_append, state.out, state.err, results, state.done)
                    await store.call(store.record_chunk, job.id, done)
                    state.done = done
                return
            await store.call(store.finalizing, job.id)
            status = "finalizing"
        self._close(job.id)
        final = "completed" if status == "finalizing" else "cancelled"
        await asyncio.to_thread(self._finish, job.id, final, state.done)

    async def _open_job(self, store: BatchStore, owner: str, job: BatchObject) -> _Open | None:
        """`job` made ready to go on from its last recorded chunk (what was written past it dropped); None when
        its input file is gone (the job failed)."""
        source = store.file_path(job.input_file_id)
        if not source.exists():
            gone = BatchError(code="file_not_found", message=f"input file {job.input_file_id!r} is gone")
            await store.call(store.fail, job.id, [gone])
            return None
        await store.call(store.start, job.id)
        status, done = await store.call(store.progress, job.id)
        out, err = store.work_paths(job.id)
        # A job found finalizing or cancelling may have moved its work files already (stopped mid-finish).
        moved = status in ("finalizing", "cancelling")
        await asyncio.to_thread(_trim, out, done.out_bytes, moved)
        await asyncio.to_thread(_trim, err, done.err_bytes, moved)
        reader = await asyncio.to_thread(_Lines, source, done.next_chunk * self.chunk_lines)
        self._open[job.id] = state = _Open(reader, done, out, err)
        return state

    def _close(self, batch_id: str) -> None:
        state = self._open.pop(batch_id, None)
        if state is not None:
            state.reader.close()

    async def _failed(self, store: BatchStore, job: BatchObject, exc: Exception) -> None:
        """A turn failed inside the runner (not a line's failure): the job is tried again from its last recorded
        chunk after a backoff, and after `_RETRIES` failures in a row it fails, naming the cause."""
        self._close(job.id)
        failures = self._failures.get(job.id, (0, 0.0))[0] + 1
        cause = f"{type(exc).__name__}: {exc}"
        if failures > _RETRIES:
            log.error("batch %s failed after %d tries: %s", job.id, failures, cause)
            self._failures.pop(job.id, None)
            message = f"the job failed {failures} times in a row inside the server; last: {cause}"
            await store.call(store.fail, job.id, [BatchError(code="internal_error", message=message)])
            return
        delay = _BACKOFF_S * 2 ** (failures - 1)
        log.warning("batch %s: %s; trying again in %.1f s", job.id, cause, delay, exc_info=exc)
        self._failures[job.id] = (failures, time.monotonic() + delay)

    async def _expire(self, store: BatchStore, job: BatchObject) -> None:
        """Past its `expires_at`: the job's unfinished lines go to its error file (`batch_expired`), what it
        computed stays in its output file, and it ends "expired"."""
        self._close(job.id)
        _, done = await store.call(store.progress, job.id)
        out, err = store.work_paths(job.id)
        await asyncio.to_thread(_trim, out, done.out_bytes, False)
        await asyncio.to_thread(_trim, err, done.err_bytes, False)
        source = store.file_path(job.input_file_id)
        done = await asyncio.to_thread(_expire_lines, source, err, done, self.chunk_lines)
        await store.call(store.record_chunk, job.id, done)
        await asyncio.to_thread(self._finish, job.id, "expired", done)

    async def _chunk(self, owner: str, first: int, lines: list[bytes]) -> list[Done | Failed] | None:
        """The results of a chunk's lines (numbered from `first`), computed together; None if the runner stopped
        while a line waited for its key's quota (the chunk's other lines are cancelled)."""
        stopped = False
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self._line(owner, first + i, raw)) for i, raw in enumerate(lines)]
        except* _Stopping:
            stopped = True
        return None if stopped else [t.result() for t in tasks]

    def _finish(self, batch_id: str, status: Any, done: Progress) -> None:
        """The work files become the job's output and error files (ids derived from the job's, so that a restart
        halfway through does the same again), and the job its final status."""
        store = self.store
        assert store is not None
        outputs: dict[str, tuple[str, Path]] = {}
        works = store.work_paths(batch_id)
        for kind, work, count in zip(("output", "error"), works, (done.completed, done.failed), strict=True):
            if not count:
                work.unlink(missing_ok=True)
                continue
            file_id = "file-" + hashlib.sha256(f"{batch_id}:{kind}".encode()).hexdigest()[:24]
            target = store.file_path(file_id)
            if work.exists():
                os.replace(work, target)
                _sync_dir(target.parent)
            outputs[kind] = (file_id, target)
        store.finish(batch_id, status, outputs)
        log.info("batch %s %s: %d lines done, %d failed", batch_id, status, done.completed, done.failed)

    async def _line(self, owner: str, n: int, raw: bytes) -> Done | Failed:
        """Line `n` (from 0) of a job: its vectors, or its failure."""
        parsed = _parse(n, raw)
        if isinstance(parsed, Failed):
            return parsed
        custom_id, body = parsed
        model = self.gw.registry.find(body.model)
        if model is not None and model.elsewhere:
            return Failed(
                custom_id,
                400,
                "model_not_in_runtime",
                f'model {model.name!r} has copies = "per-worker": each front computes it, and batch jobs run at '
                'the runtime process; use a model with copies = "shared" for batch jobs',
                "model",
            )
        key = self._key(owner)
        if key is None:
            return Failed(custom_id, 401, "invalid_api_key", f"the key {owner!r} that created this batch is gone")
        while True:
            try:
                vectors, tokens, output = await service.request_vectors(self.gw, body, key, {}, None, background=True)
            except GatewayError as exc:
                if exc.status == 429 and exc.code == "rate_limit_exceeded":
                    # Out of token quota: a job waits for it, it does not fail for it (nor holds up a shutdown).
                    await asyncio.sleep(min(float(exc.headers.get("Retry-After", 1)), _QUOTA_RECHECK_S))
                    if self._stopping:
                        raise _Stopping from None
                    continue
                return Failed(custom_id, exc.status, exc.code or "error", exc.message, exc.param)
            except Exception as exc:
                log.exception("batch line %d failed", n)
                return Failed(custom_id, 500, "internal_error", f"{type(exc).__name__}: {exc}")
            return Done(custom_id, body, vectors, tokens, output)

    def _key(self, owner: str) -> ApiKey | None:
        """The job's owner's key, charged for the job's tokens (in a quota of its own when one is configured)."""
        key = self.gw.keys.named(owner)
        if key is None or self.job_tokens_per_minute is None:
            return key
        window = self._job_windows.setdefault(owner, SlidingWindow(self.job_tokens_per_minute))
        return dataclasses.replace(key, requests=None, tokens=window)


@dataclass(slots=True)
class _Open:
    """A job being computed: its input, read up to its next chunk; its progress; its work files."""

    reader: _Lines
    done: Progress
    out: Path
    err: Path


class _Stopping(Exception):
    """The runner stops while a line waits for quota: its chunk is abandoned, unrecorded."""


def _parse(n: int, raw: bytes) -> tuple[str, EmbeddingRequest] | Failed:
    """A line's custom_id and body, or why it is not a request this job can run."""
    try:
        line = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        return Failed(None, 400, "invalid_json", f"line {n + 1} is not valid JSON: {exc}")
    if not isinstance(line, dict):
        return Failed(None, 400, "invalid_request", f"line {n + 1} must be a JSON object")
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return Failed(None, 400, "missing_custom_id", f"line {n + 1} has no `custom_id` string")
    if line.get("method") != "POST":
        return Failed(custom_id, 400, "invalid_method", f'line {n + 1}: `method` must be "POST"', "method")
    if line.get("url") != ENDPOINT:
        message = f"line {n + 1}: `url` {line.get('url')!r} is not this batch's endpoint {ENDPOINT!r}"
        return Failed(custom_id, 400, "invalid_url", message, "url")
    try:
        body = msgspec.convert(line.get("body"), EmbeddingRequest)
    except msgspec.ValidationError as exc:
        return Failed(custom_id, 400, "invalid_request", f"line {n + 1}: {str(exc).replace('$', 'body')}", "body")
    return custom_id, body


class _Lines:
    """The non-blank lines of a job's input file, read in order from line `skip` (a resumed job's next chunk)."""

    def __init__(self, path: Path, skip: int) -> None:
        self._file: BinaryIO = open(path, "rb")  # noqa: SIM115 (closed by `close`, after the job)
        self.take(skip)

    def take(self, n: int) -> list[bytes]:
        lines: list[bytes] = []
        while len(lines) < n:
            line = self._file.readline()
            if not line:
                break
            if line.strip():
                lines.append(line)
        return lines

    def close(self) -> None:
        self._file.close()


def count_lines(path: Path, limit: int) -> int:
    """The requests in a JSONL file (its non-blank lines), counting stops past `limit`."""
    n = 0
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                n += 1
                if n > limit:
                    break
    return n


#: Of a file reusing custom_ids, at most this many reuses are named in the batch's `errors`.
_MAX_DUPLICATES = 100


def scan_lines(path: Path, limit: int) -> tuple[int, list[BatchError]]:
    """The requests in a JSONL file (as `count_lines`) and each line whose `custom_id` an earlier line has
    (OpenAI's `duplicate_custom_id`; at most `_MAX_DUPLICATES`). A line that is not JSON is left to the job."""
    n = 0
    seen: set[str] = set()
    duplicates: list[BatchError] = []
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            n += 1
            if n > limit:
                break
            try:
                custom_id = msgspec.json.decode(line, type=_CustomId).custom_id
            except msgspec.DecodeError:
                continue
            if not isinstance(custom_id, str):
                continue
            if custom_id in seen and len(duplicates) < _MAX_DUPLICATES:
                message = (
                    f"The custom_id {custom_id!r} on line {number} is a duplicate of an earlier request's: "
                    "the custom_id of each request in a batch must be unique."
                )
                duplicates.append(
                    BatchError(code="duplicate_custom_id", message=message, param="custom_id", line=number)
                )
            seen.add(custom_id)
    return n, duplicates


def _trim(path: Path, size: int, may_be_moved: bool) -> None:
    """Drop what a chunk wrote past the last recorded one (the server stopped between its write and its record).
    A work file missing or shorter than recorded lost recorded lines: an error, unless `may_be_moved` (a finish
    in progress moved it to its output file)."""
    if not path.exists():
        if may_be_moved:
            return
        if size:
            raise FileNotFoundError(f"work file {path} holding {size} recorded bytes is gone")
        path.touch()
    have = path.stat().st_size
    if have < size:
        raise ValueError(f"work file {path} holds {have} bytes, fewer than the {size} recorded")
    if have > size:
        with open(path, "r+b") as f:
            f.truncate(size)
            os.fsync(f.fileno())


def _sync_dir(folder: Path) -> None:
    """A rename in `folder` on disk, before the database says the renamed file exists."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_EXPIRED = "This request could not be executed before the completion window expired."


def _expire_lines(source: Path, err: Path, done: Progress, chunk_lines: int) -> Progress:
    """The lines of `source` past the job's progress, as `batch_expired` error lines appended to `err`
    (durably); the job's progress after them (every line accounted for)."""
    reader = _Lines(source, done.next_chunk * chunk_lines)
    try:
        lines = reader.take(2**62)
    finally:
        reader.close()
    data = b"".join(_expired_line(raw) for raw in lines)
    if data:
        with open(err, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return dataclasses.replace(
        done,
        next_chunk=done.next_chunk + -(-len(lines) // chunk_lines),
        failed=done.failed + len(lines),
        err_bytes=done.err_bytes + len(data),
    )


def _expired_line(raw: bytes) -> bytes:
    """OpenAI's error line for a request the job did not reach before it expired."""
    try:
        custom_id = msgspec.json.decode(raw, type=_CustomId).custom_id
    except msgspec.DecodeError:
        custom_id = None
    line = {
        "id": "batch_req_" + new_id(),
        "custom_id": custom_id if isinstance(custom_id, str) else None,
        "response": None,
        "error": {"code": "batch_expired", "message": _EXPIRED},
    }
    return msgspec.json.encode(line) + b"\n"


class _CustomId(msgspec.Struct):
    custom_id: Any = None


def _append(out: Path, err: Path, results: list[Done | Failed], done: Progress) -> Progress:
    """A chunk's lines appended to the output and error files, durably; the job's progress after it."""
    good = b"".join(_output_line(r) for r in results if isinstance(r, Done))
    bad = b"".join(_error_line(r) for r in results if isinstance(r, Failed))
    for path, data in ((out, good), (err, bad)):
        if data:
            with open(path, "ab") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
    failed = sum(isinstance(r, Failed) for r in results)
    return Progress(
        next_chunk=done.next_chunk + 1,
        completed=done.completed + len(results) - failed,
        failed=done.failed + failed,
        out_bytes=done.out_bytes + len(good),
        err_bytes=done.err_bytes + len(bad),
        tokens=done.tokens + sum(r.tokens for r in results if isinstance(r, Done)),
    )


def _output_line(r: Done) -> bytes:
    body = service.response(r.vectors, r.body, r.tokens, r.output)
    line = {
        "id": "batch_req_" + new_id(),
        "custom_id": r.custom_id,
        "response": {"status_code": 200, "request_id": "req_" + new_id(), "body": body},
        "error": None,
    }
    return msgspec.json.encode(line) + b"\n"


def _error_line(r: Failed) -> bytes:
    line = {
        "id": "batch_req_" + new_id(),
        "custom_id": r.custom_id,
        "response": {
            "status_code": r.status,
            "request_id": "req_" + new_id(),
            "body": error_body(r.status, r.message, r.param, r.code),
        },
        "error": {"code": r.code, "message": r.message},
    }
    return msgspec.json.encode(line) + b"\n"


def start_runner(gw: Gateway) -> BatchRunner | None:
    """The job runner of the process that owns the models (on the running loop), or None with batches off."""
    if gw.batches is None:
        return None
    runner = BatchRunner(gw, gw.batches, gw.config.batches)
    gw.poke_batches = runner.poke
    runner.start()
    return runner


async def stop_runner(gw: Gateway, runner: BatchRunner | None) -> None:
    """Stop `runner` between chunks (before the models close), and close the store."""
    if runner is not None:
        await runner.stop(gw.config.server.request_timeout_s)
    if gw.batches is not None:
        await asyncio.to_thread(gw.batches.close)
