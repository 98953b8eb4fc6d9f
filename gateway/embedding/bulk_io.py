"""`gateway embed-file`'s files: records read from JSONL, CSV or Parquet, vectors written to Parquet or NumPy,
each written so that a killed run leaves a prefix that `--resume` can read back and continue.

Parquet output goes to part files under `OUT.partial/` (one per chunk, each complete when renamed into place)
and is joined into `OUT` at the end. NumPy output is `OUT` itself (float32 [n, dim], rows in input order)
beside `OUT.ids.jsonl` (one `{"id", "tokens"}` line per row, appended after the chunk's rows are flushed):
the sidecar's complete lines are the rows done.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

InputFormat = Literal["jsonl", "csv", "parquet"]
OutputFormat = Literal["parquet", "npy"]

_INPUTS: dict[str, InputFormat] = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet"}
_OUTPUTS: dict[str, OutputFormat] = {".parquet": "parquet", ".npy": "npy"}


class BulkError(Exception):
    """A bad input, output or option: the message is the one line the command prints (exit status 2)."""


@dataclass(frozen=True, slots=True)
class Record:
    """One text to embed: where it is in the input (a line of JSONL or CSV, a row of Parquet), its id, its text."""

    line: int
    id: str
    text: str


def input_format(path: Path, given: str | None) -> InputFormat:
    """The input's format: `given`, else from the file name's extension."""
    if given is not None:
        return given  # type: ignore[return-value]
    found = _INPUTS.get(path.suffix.lower())
    if found is None:
        raise BulkError(f"{path}: cannot tell the input format from {path.suffix!r}; give --input-format")
    return found


def output_format(path: Path, given: str | None) -> OutputFormat:
    """The output's format: `given`, else from the file name's extension."""
    if given is not None:
        return given  # type: ignore[return-value]
    found = _OUTPUTS.get(path.suffix.lower())
    if found is None:
        raise BulkError(f"{path}: cannot tell the output format from {path.suffix!r}; use .parquet or .npy")
    return found


def pyarrow_modules() -> tuple[Any, Any]:
    """(pyarrow, pyarrow.parquet), imported only when a Parquet file is read or written."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise BulkError(
            "Parquet needs pyarrow: pip install 'embedding-gateway[bulk]' (or use JSONL/CSV in, .npy out)"
        ) from None
    return pa, pq


def records(path: Path, fmt: InputFormat, text_field: str, id_field: str) -> Iterator[Record]:
    """The input's records in order; BulkError naming the line for a missing field, an empty or non-text text,
    or a line that does not parse."""
    try:
        if fmt == "jsonl":
            yield from _jsonl(path, text_field, id_field)
        elif fmt == "csv":
            yield from _csv(path, text_field, id_field)
        else:
            yield from _parquet(path, text_field, id_field)
    except OSError as exc:
        raise BulkError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise BulkError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _record(path: Path, where: str, line: int, row: Any, text_field: str, id_field: str) -> Record:
    if not isinstance(row, dict):
        raise BulkError(f"{path} {where} {line}: expected an object with a {text_field!r} field")
    if text_field not in row or row[text_field] is None:
        raise BulkError(f"{path} {where} {line}: no field {text_field!r} (choose another with --text-field)")
    text = row[text_field]
    if not isinstance(text, str):
        raise BulkError(f"{path} {where} {line}: field {text_field!r} is {type(text).__name__}, not text")
    if not text.strip():
        raise BulkError(f"{path} {where} {line}: empty text in field {text_field!r}")
    given = row.get(id_field)
    return Record(line, str(line) if given is None or given == "" else str(given), text)


def _jsonl(path: Path, text_field: str, id_field: str) -> Iterator[Record]:
    with path.open(encoding="utf-8") as fh:
        for n, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except ValueError as exc:
                raise BulkError(f"{path} line {n}: not JSON ({exc.msg})") from None
            yield _record(path, "line", n, row, text_field, id_field)


def _csv(path: Path, text_field: str, id_field: str) -> Iterator[Record]:
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or text_field not in reader.fieldnames:
            raise BulkError(
                f"{path} line 1: the header has no column {text_field!r} "
                f"(columns: {', '.join(reader.fieldnames or [])})"
            )
        for row in reader:
            yield _record(path, "line", reader.line_num, row, text_field, id_field)


def _parquet(path: Path, text_field: str, id_field: str) -> Iterator[Record]:
    _, pq = pyarrow_modules()
    try:
        file = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow's own error types vary by what is wrong with the file
        raise BulkError(f"{path}: not a readable Parquet file ({exc})") from None
    names = file.schema_arrow.names
    if text_field not in names:
        raise BulkError(f"{path}: no column {text_field!r} (columns: {', '.join(names)})")
    columns = [text_field] + ([id_field] if id_field in names else [])
    n = 0
    for batch in file.iter_batches(columns=columns, batch_size=4096):
        for row in batch.to_pylist():
            n += 1
            yield _record(path, "row", n, row, text_field, id_field)


def count(path: Path, fmt: InputFormat, text_field: str, id_field: str) -> int:
    """How many records the input holds, every one checked (so a bad line stops the run before any model loads)."""
    return sum(1 for _ in records(path, fmt, text_field, id_field))


class ParquetSink:
    """Chunks as part files under `OUT.partial/`, joined into `OUT` by `finish`."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.parts = out.with_name(out.name + ".partial")

    def exists(self) -> bool:
        """Whether anything of an earlier run is there."""
        return self.out.exists() or self.parts.exists()

    def remove(self) -> None:
        """Drop an earlier run's output (--overwrite)."""
        shutil.rmtree(self.parts, ignore_errors=True)
        self.out.unlink(missing_ok=True)

    def done(self) -> list[str]:
        """Ids of the rows already written, in order (the complete part files; a torn temporary is ignored)."""
        if self.out.exists() and not self.parts.exists():
            return self._ids(self.out)
        ids: list[str] = []
        for part in sorted(self.parts.glob("part-*.parquet")):
            ids.extend(self._ids(part))
        return ids

    @staticmethod
    def _ids(path: Path) -> list[str]:
        _, pq = pyarrow_modules()
        return pq.read_table(path, columns=["id"]).column("id").to_pylist()  # type: ignore[no-any-return]

    def write(self, ids: list[str], vectors: np.ndarray, tokens: list[int | None]) -> None:
        """One chunk as the next part file, renamed into place once whole."""
        pa, pq = pyarrow_modules()
        self.parts.mkdir(parents=True, exist_ok=True)
        index = len(list(self.parts.glob("part-*.parquet")))
        flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
        table = pa.table(
            {
                "id": pa.array(ids, pa.string()),
                "vector": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]),
                "tokens": pa.array(tokens, pa.int32()),
            }
        )
        tmp = self.parts / f".part-{index:06d}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, self.parts / f"part-{index:06d}.parquet")

    def finish(self) -> None:
        """The part files joined into `OUT` (a row group each), put in place by a rename."""
        if not self.parts.exists():
            return
        _, pq = pyarrow_modules()
        parts = sorted(self.parts.glob("part-*.parquet"))
        tmp = self.out.with_name(f".{self.out.name}.tmp")
        writer = None
        for part in parts:
            table = pq.read_table(part)
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table)
        if writer is not None:
            writer.close()
            os.replace(tmp, self.out)
        shutil.rmtree(self.parts)


class NumpySink:
    """Rows written in place into `OUT` (a .npy of float32 [n, dim]), with `OUT.ids.jsonl` counting those done."""

    def __init__(self, out: Path, total: int) -> None:
        self.out = out
        self.total = total
        self.sidecar = out.with_name(out.name + ".ids.jsonl")
        self._rows: np.memmap | None = None
        self._at = 0

    def exists(self) -> bool:
        """Whether anything of an earlier run is there."""
        return self.out.exists() or self.sidecar.exists()

    def remove(self) -> None:
        """Drop an earlier run's output (--overwrite)."""
        self.out.unlink(missing_ok=True)
        self.sidecar.unlink(missing_ok=True)

    def done(self) -> list[str]:
        """Ids of the rows already written: the sidecar's complete lines (a torn last line is cut off)."""
        if not self.sidecar.exists():
            return []
        data = self.sidecar.read_bytes()
        whole = data[: data.rfind(b"\n") + 1]
        if len(whole) != len(data):
            with self.sidecar.open("r+b") as fh:
                fh.truncate(len(whole))
        return [json.loads(line)["id"] for line in whole.splitlines()]

    def write(self, ids: list[str], vectors: np.ndarray, tokens: list[int | None]) -> None:
        """One chunk's rows into the array, flushed, then their ids appended to the sidecar."""
        if self._rows is None:
            self._open(vectors.shape[1])
        assert self._rows is not None
        if self._rows.shape[1] != vectors.shape[1]:
            raise BulkError(
                f"{self.out} holds vectors of {self._rows.shape[1]} dimensions; these have {vectors.shape[1]}"
            )
        self._rows[self._at : self._at + len(ids)] = vectors
        self._rows.flush()
        with self.sidecar.open("a", encoding="utf-8") as fh:
            fh.writelines(json.dumps({"id": i, "tokens": t}) + "\n" for i, t in zip(ids, tokens, strict=True))
            fh.flush()
            os.fsync(fh.fileno())
        self._at += len(ids)

    def _open(self, dim: int) -> None:
        self._at = len(self.done())
        if self.out.exists():
            self._rows = np.load(self.out, mmap_mode="r+")
            if self._rows.shape[0] != self.total:
                raise BulkError(f"{self.out} has {self._rows.shape[0]} rows; the input has {self.total} records")
        else:
            self._rows = np.lib.format.open_memmap(self.out, mode="w+", dtype=np.float32, shape=(self.total, dim))

    def finish(self) -> None:
        """Nothing left to join: the array was written in place."""
        if self._rows is not None:
            self._rows.flush()
            self._rows = None
