"""`gateway embed-file`: a file of texts to a file of vectors, through the same pipeline as `/v1/embeddings`.

The input is read in windows (4096 records by default). Each window is sorted by length and cut into requests,
so the model's batches are large and hold texts of like length (little padding); a few requests are in flight
at once so the batcher always has the next batch queued. In-process the requests are a Batch API job's
(`background`: the batcher's low-priority lane, never refused by admission nor timed out), so they are large
(a whole window, up to `[server] max_items_per_request`); over HTTP they are small, so that admission takes
them. Vectors go back into input order and the window is written out whole before the next is written, so what
a killed run leaves is a prefix that `--resume` keeps.
In-process, requests go through `service.request_vectors` (the function behind `/v1/embeddings`); with `--url`
they are POSTed to a running gateway's `/v1/embeddings` (base64 float32, bit for bit the same vectors).
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO

import numpy as np

from gateway.base.errors import GatewayError
from gateway.base.schemas import EmbeddingRequest, InputType
from gateway.embedding import service
from gateway.embedding.bulk_io import BulkError, NumpySink, ParquetSink, Record, count, pyarrow_modules, records
from gateway.embedding.state import Gateway

# A request's vectors and each input's token count (None where the HTTP API gives only the request's total).
Embed = Callable[[list[str]], Awaitable[tuple[np.ndarray, list[int | None]]]]

_INPUT_AT = re.compile(r"input\[(\d+)\]")


@dataclass(frozen=True, slots=True)
class Embedder:
    """Where requests go (`embed`), and how that place wants the work cut when the plan leaves it unset: texts and
    characters per request, requests in flight."""

    embed: Embed
    request_size: int
    request_chars: int
    concurrency: int


@dataclass(frozen=True, slots=True)
class Options:
    """The request options every line is embedded with: the same fields, and meaning, as the API body's."""

    model: str
    dimensions: int | None = None
    prompt_name: str | None = None
    input_type: InputType | None = None
    truncate: bool | Literal["end", "start"] | None = None

    def body(self, texts: list[str]) -> EmbeddingRequest:
        """The request for `texts`, as `/v1/embeddings` would decode it."""
        return EmbeddingRequest(
            model=self.model,
            input=texts,
            dimensions=self.dimensions,
            prompt_name=self.prompt_name,
            input_type=self.input_type,
            truncate=self.truncate,
        )

    def wire(self, texts: list[str]) -> dict[str, Any]:
        """The JSON body for `texts` (base64: float32 exactly as computed)."""
        body: dict[str, Any] = {"model": self.model, "input": texts, "encoding_format": "base64"}
        for name in ("dimensions", "prompt_name", "input_type", "truncate"):
            if getattr(self, name) is not None:
                body[name] = getattr(self, name)
        return body


@dataclass(slots=True)
class Plan:
    """What to read, where to write, and how to cut the work."""

    source: Path
    input_format: Any
    text_field: str
    id_field: str
    out: Path
    output_format: Any
    window: int = 4096
    # None: the embedder's own (Embedder): small requests over HTTP, whole windows in-process.
    request_size: int | None = None
    request_chars: int | None = None
    concurrency: int | None = None
    resume: bool = False
    overwrite: bool = False

    def sink(self, total: int) -> ParquetSink | NumpySink:
        """The output writer for `total` records."""
        return ParquetSink(self.out) if self.output_format == "parquet" else NumpySink(self.out, total)

    def manifest(self, options: Options) -> dict[str, Any]:
        """What a resumed run must share with the run it continues (else its rows would not match)."""
        return {
            "input": str(self.source.resolve()),
            "text_field": self.text_field,
            "id_field": self.id_field,
            "options": {k: getattr(options, k) for k in Options.__slots__},
        }


@dataclass(slots=True)
class Summary:
    """What a run did."""

    total: int
    skipped: int
    written: int = 0
    tokens: int = 0
    seconds: float = 0.0


@dataclass(slots=True)
class Progress:
    """A tqdm bar when `stream` is a terminal (and tqdm is installed), else a plain line every `every_s` seconds."""

    total: int
    done: int = 0
    stream: TextIO = field(default_factory=lambda: sys.stderr)
    every_s: float = 5.0
    _bar: Any = None
    _started: float = field(default_factory=time.monotonic)
    _said: float = 0.0
    _resumed_at: int = 0

    def __post_init__(self) -> None:
        self._resumed_at = self.done
        if self.stream.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self._bar = tqdm(total=self.total, initial=self.done, unit="text", file=self.stream, smoothing=0.1)

    def add(self, n: int, final: bool = False) -> None:
        """`n` more records written."""
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if final or now - self._said >= self.every_s:
            self._said = now
            self.stream.write(self.line(now) + "\n")
            self.stream.flush()

    def line(self, now: float) -> str:
        """`done/total (pct) rate texts/s ETA`."""
        rate = (self.done - self._resumed_at) / max(now - self._started, 1e-9)
        left = (self.total - self.done) / rate if rate else float("inf")
        eta = time.strftime("%H:%M:%S", time.gmtime(left)) if left != float("inf") else "?"
        pct = 100 * self.done / max(self.total, 1)
        return f"embed-file: {self.done}/{self.total} ({pct:.1f}%) {rate:.0f} texts/s ETA {eta}"

    def close(self) -> None:
        """The bar closed."""
        if self._bar is not None:
            self._bar.close()


def in_process(gw: Gateway, options: Options) -> Embedder:
    """Requests through `service.request_vectors`, as `/v1/embeddings` runs them (no key: no quota applies), as a
    Batch API job's: in the batcher's background lane, so a request as large as the server takes (a window's
    texts) is neither refused by admission nor bound by `request_timeout_s`, and the model's queue always holds
    the next batch. Four in flight: the next window is tokenized while this one computes."""
    server = gw.config.server

    async def embed(texts: list[str]) -> tuple[np.ndarray, list[int | None]]:
        notes: dict[str, Any] = {}
        try:
            vectors, _, _ = await service.request_vectors(gw, options.body(texts), None, notes, None, background=True)
        except GatewayError as exc:
            if exc.code != "too_many_tokens" or len(texts) < 2:
                raise
            # Characters only bound a request's tokens roughly: one over `max_tokens_per_request` goes in halves.
            half = len(texts) // 2
            first = await _part(embed, texts[:half], 0)
            second = await _part(embed, texts[half:], half)
            return np.concatenate([first[0], second[0]]), first[1] + second[1]
        return vectors, list(notes["token_counts"])

    # Characters per request: a quarter of the token bound, which even three tokens a character (byte-level BPE
    # on CJK text) stays under; the halving above is for what is stranger still.
    return Embedder(embed, server.max_items_per_request, max(1, server.max_tokens_per_request // 4), 4)


async def _part(embed: Embed, texts: list[str], at: int) -> tuple[np.ndarray, list[int | None]]:
    """`embed(texts)` for the part of a request that starts at input `at`: an error naming an input names its
    place in the whole request."""
    try:
        return await embed(texts)
    except GatewayError as exc:
        message = _INPUT_AT.sub(lambda m: f"input[{int(m.group(1)) + at}]", exc.message)
        if len(texts) == 1:
            message = message.replace("`input`", f"`input[{at}]`", 1)
        raise GatewayError(exc.status, message, param=exc.param, code=exc.code) from None


@dataclass(slots=True)
class Started:
    """A run checked and ready: its input counted (every record checked), its output prepared."""

    plan: Plan
    total: int
    sink: ParquetSink | NumpySink
    done: list[str]


def start(plan: Plan, options: Options) -> Started:
    """Check the input whole and prepare the output (resumed, refused or replaced), before any model loads."""
    if min(plan.window, plan.request_size or 1, plan.request_chars or 1, plan.concurrency or 1) < 1:
        raise BulkError("--window, --request-size, --request-chars and --concurrency must be at least 1")
    if plan.output_format == "parquet":
        pyarrow_modules()  # a missing extra is named now, not after the first window is computed
    total = count(plan.source, plan.input_format, plan.text_field, plan.id_field)
    if total == 0:
        raise BulkError(f"{plan.source}: no records to embed")
    sink = plan.sink(total)
    return Started(plan, total, sink, _prepare_output(plan, options, sink))


async def run(started: Started, embed: Embedder, progress: Callable[[int, int], Progress]) -> Summary:
    """Embed the records after the ones already written with `embed`, and complete the output."""
    plan, sink = started.plan, started.sink
    summary = Summary(total=started.total, skipped=len(started.done))
    bar = progress(started.total, len(started.done))
    began = time.monotonic()
    try:
        await _embed_windows(plan, embed, sink, _after(plan, started.done), summary, bar)
        sink.finish()
        _manifest_path(plan.out).unlink(missing_ok=True)
    finally:
        bar.close()
    summary.seconds = time.monotonic() - began
    return summary


def _manifest_path(out: Path) -> Path:
    return out.with_name(out.name + ".run.json")


def _prepare_output(plan: Plan, options: Options, sink: ParquetSink | NumpySink) -> list[str]:
    """The ids an earlier run wrote (with --resume), after checking it ran with the same input and options; an
    earlier output is otherwise refused, or removed with --overwrite."""
    manifest = _manifest_path(plan.out)
    wanted = plan.manifest(options)
    if sink.exists() or manifest.exists():
        if plan.overwrite:
            sink.remove()
            manifest.unlink(missing_ok=True)
        elif not plan.resume:
            raise BulkError(f"{plan.out} exists: continue it with --resume, or replace it with --overwrite")
        elif manifest.exists():
            had = json.loads(manifest.read_text())
            if had != wanted:
                raise BulkError(
                    f"{plan.out} was started with other input or options ({manifest}: {had}); use --overwrite"
                )
    done = sink.done() if plan.resume else []
    manifest.write_text(json.dumps(wanted))
    return done


def _after(plan: Plan, done: list[str]) -> Iterator[Record]:
    """The input's records after the `done` prefix, checking that the prefix's ids are the input's."""
    it = records(plan.source, plan.input_format, plan.text_field, plan.id_field)
    for k, written in enumerate(done):
        rec = next(it, None)
        if rec is None or rec.id != written:
            got = "nothing" if rec is None else repr(rec.id)
            raise BulkError(
                f"{plan.out}: row {k + 1} holds id {written!r} but the input has {got} there; it was written "
                "from another input (use --overwrite)"
            )
    return it


def _windows(it: Iterator[Record], size: int) -> Iterator[list[Record]]:
    window: list[Record] = []
    for rec in it:
        window.append(rec)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


async def _embed_windows(
    plan: Plan, embed: Embedder, sink: ParquetSink | NumpySink, it: Iterator[Record], summary: Summary, bar: Progress
) -> None:
    """The windows in order, the next one's requests queued while the one before finishes (the limit on requests
    in flight paces them), each written whole once its vectors are all in."""
    gate = asyncio.Semaphore(plan.concurrency or embed.concurrency)
    pending: deque[tuple[list[Record], asyncio.Task[tuple[np.ndarray, list[int | None]]]]] = deque()
    try:
        for window in _windows(it, plan.window):
            pending.append((window, asyncio.create_task(_window(plan, embed, window, gate))))
            if len(pending) > 1:
                await _write_first(sink, pending, summary, bar)
        while pending:
            await _write_first(sink, pending, summary, bar)
    finally:
        # A failed window stops the run: the windows after it are cancelled and waited for.
        await _cancel([task for _, task in pending])


async def _cancel(tasks: list[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _write_first(
    sink: ParquetSink | NumpySink,
    pending: deque[tuple[list[Record], asyncio.Task[tuple[np.ndarray, list[int | None]]]]],
    summary: Summary,
    bar: Progress,
) -> None:
    """The oldest window's rows written once its vectors are in."""
    window, task = pending[0]
    vectors, tokens = await task
    pending.popleft()
    # Off the loop: the requests of the windows behind this one go on being answered while it is written.
    await asyncio.to_thread(sink.write, [r.id for r in window], vectors, tokens)
    summary.written += len(window)
    summary.tokens += sum(t for t in tokens if t is not None)
    bar.add(len(window), final=not pending)


async def _window(
    plan: Plan, embed: Embedder, window: list[Record], gate: asyncio.Semaphore
) -> tuple[np.ndarray, list[int | None]]:
    """One window's vectors and token counts in input order, computed longest texts first in requests of like
    length (`plan.request_size` texts each, or the embedder's)."""
    order = sorted(range(len(window)), key=lambda i: len(window[i].text), reverse=True)
    most, chars = plan.request_size or embed.request_size, plan.request_chars or embed.request_chars
    groups = _groups(order, [len(r.text) for r in window], most, chars)

    async def one(group: list[int]) -> tuple[np.ndarray, list[int | None]]:
        async with gate:
            try:
                return await embed.embed([window[i].text for i in group])
            except GatewayError as exc:
                raise _named(plan, exc, [window[i] for i in group]) from None

    tasks = [asyncio.create_task(one(g)) for g in groups]
    try:
        results = await asyncio.gather(*tasks)
    except BaseException:
        await _cancel(tasks)
        raise
    dim = results[0][0].shape[1]
    vectors = np.empty((len(window), dim), dtype=np.float32)
    tokens: list[int | None] = [None] * len(window)
    for group, (got, counts) in zip(groups, results, strict=True):
        vectors[group] = got
        for i, n in zip(group, counts, strict=True):
            tokens[i] = n
    return vectors, tokens


def _groups(order: list[int], sizes: list[int], most: int, chars: int) -> list[list[int]]:
    """`order` cut into requests of at most `most` texts and about `chars` characters (at least one text each).
    Over HTTP a request is a fraction of a second of the model's work, so the next one queued behind it is
    admitted (the model refuses work predicted to wait past its queue limit) and the model never runs dry."""
    groups: list[list[int]] = [[]]
    held = 0
    for i in order:
        if groups[-1] and (len(groups[-1]) == most or held + sizes[i] > chars):
            groups.append([])
            held = 0
        groups[-1].append(i)
        held += sizes[i]
    return groups


def _named(plan: Plan, exc: GatewayError, sent: list[Record]) -> BulkError:
    """The request's error as one line naming the input line (or row) it is about, when it names an input."""
    where = "row" if plan.input_format == "parquet" else "line"
    found = _INPUT_AT.search(exc.message)
    if found is not None and int(found.group(1)) < len(sent):
        rec = sent[int(found.group(1))]
        message = _INPUT_AT.sub("text", exc.message).replace("`text`", "the text")
        return BulkError(f"{plan.source} {where} {rec.line} (id {rec.id!r}): {message}")
    if len(sent) == 1:
        return BulkError(f"{plan.source} {where} {sent[0].line} (id {sent[0].id!r}): {exc.message}")
    return BulkError(f"{plan.source}: {exc.message}")
