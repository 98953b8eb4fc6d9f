"""The embedding cache: one entry per input, keyed by everything that determines its vector.

An entry is the full float32 vector as the model returned it and the input's token count (so a hit skips
tokenizing too and `usage` stays what an uncached request reports); `dimensions` and the output type are
applied after the lookup, so one entry serves them all. Keys hash the model's identity (its backend, its
options, its input limit and a digest of its weight files, not its configured name), the truncation side,
and the prompt and the text apart (a cut that keeps the prompt's tokens makes `prompt + text` and the same
string sent without a prompt different inputs): two names of one model share entries, a changed weight file
never meets an old entry, and no text or API key appears in a key.

Stores: `MemoryStore` (in-process, LRU bounded by bytes) and `RedisStore` (shared/redis_state.py), shared by
every gateway process. Written by hand: the cache libraries on PyPI key by function arguments and store one
value per call, where this needs per-input entries with partial hits and bytes-bounded eviction.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import struct
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from gateway.base.observability import record_cache

log = logging.getLogger("gateway.cache")

# Entry layout: token count (uint32, little-endian; the top bit set when the input was cut), then the vector's
# float32 values (little-endian).
_COUNT = struct.Struct("<I")
_CUT = 1 << 31
# Key layout version: bump when the entry or key layout changes, and old entries are never read.
_VERSION = b"v2"


@dataclass(frozen=True, slots=True)
class Entry:
    """One input's vector, its token count (as embedded), and whether it was cut to fit."""

    vector: np.ndarray
    tokens: int
    cut: bool = False

    def pack(self) -> bytes:
        count = self.tokens | (_CUT if self.cut else 0)
        return _COUNT.pack(count) + self.vector.astype("<f4", copy=False).tobytes()

    @classmethod
    def unpack(cls, raw: bytes, dimension: int | None = None) -> Entry:
        """The entry `raw` holds; ValueError when it is not one (cut short, of another width than `dimension`,
        or holding non-finite values): a store is shared, and what it returns is checked, not trusted."""
        size = len(raw) - _COUNT.size
        if size <= 0 or size % 4:
            raise ValueError(f"malformed entry of {len(raw)} bytes")
        if dimension is not None and size // 4 != dimension:
            raise ValueError(f"entry of width {size // 4}, the model's is {dimension}")
        (count,) = _COUNT.unpack_from(raw)
        vector = np.frombuffer(raw, dtype="<f4", offset=_COUNT.size)
        if not np.isfinite(vector).all():
            raise ValueError("entry holds NaN or infinite values")
        return cls(vector, count & ~_CUT, bool(count & _CUT))


class Store(Protocol):
    """Where entries live. Errors are the store's to absorb: a failing store answers misses."""

    name: str

    async def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]: ...

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        """Store entries; may return before they are written (a write that fails is only a later miss)."""

    async def clear(self, prefix: bytes) -> int:
        """Remove the entries whose key starts with `prefix` (b"": all); how many were removed."""

    async def close(self) -> None: ...


class MemoryStore:
    """In-process LRU bounded by the bytes of its entries (keys included)."""

    name = "memory"

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[bytes, bytes] = OrderedDict()

    async def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        out: list[bytes | None] = []
        for key in keys:
            raw = self._entries.get(key)
            if raw is not None:
                self._entries.move_to_end(key)
            out.append(raw)
        return out

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        evicted = 0
        for key, raw in items:
            size = len(key) + len(raw)
            if size > self.max_bytes:
                continue
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= len(key) + len(old)
            self._entries[key] = raw
            self.bytes += size
            while self.bytes > self.max_bytes:
                k, v = self._entries.popitem(last=False)
                self.bytes -= len(k) + len(v)
                evicted += 1
        record_cache(self.name, evictions=evicted, size=self.bytes)

    async def clear(self, prefix: bytes) -> int:
        doomed = [k for k in self._entries if k.startswith(prefix)]
        for k in doomed:
            self.bytes -= len(k) + len(self._entries.pop(k))
        record_cache(self.name, size=self.bytes)
        return len(doomed)

    async def close(self) -> None:
        self._entries.clear()
        self.bytes = 0


def input_key(model_identity: bytes, side: str | None, prompt: str, text: str) -> bytes:
    """The key of one input: the model's identity (its input limit included), the truncation side, and a
    digest of the prompt and the text apart (the prompt's length first, so no split of one string into
    prompt and text meets another)."""
    raw_prompt = prompt.encode("utf-8", "surrogatepass")
    digest = hashlib.sha256(
        struct.pack("<Q", len(raw_prompt)) + raw_prompt + text.encode("utf-8", "surrogatepass")
    ).digest()
    return _VERSION + model_identity + (side or "-").encode()[:1] + digest


def model_prefix(model_identity: bytes) -> bytes:
    """What every key of one model starts with (to clear it)."""
    return _VERSION + model_identity


@dataclass
class Cache:
    """The cache in front of the models: lookups, writes, and inputs being computed right now (so identical
    inputs in flight at the same time, in one request or across requests, are computed once)."""

    store: Store
    inflight: dict[bytes, asyncio.Future[Entry]] = field(default_factory=dict)

    async def lookup(self, model: str, keys: Sequence[bytes], dimension: int | None = None) -> list[Entry | None]:
        """The entries of `keys` (None: a miss). An entry that does not unpack, or is not `dimension` wide, is a
        miss too, counted as "invalid" (the input is computed again and its entry rewritten), never an error."""
        raws = await self.store.get_many(keys)
        found: list[Entry | None] = []
        invalid = 0
        for raw in raws:
            entry = None
            if raw is not None:
                try:
                    entry = Entry.unpack(raw, dimension)
                except ValueError as exc:
                    invalid += 1
                    log.warning("model %r: a %s cache entry is ignored: %s", model, self.store.name, exc)
            found.append(entry)
        hits = sum(e is not None for e in found)
        record_cache(self.store.name, model=model, hits=hits, misses=len(keys) - hits - invalid, invalid=invalid)
        return found

    def put(self, keys: Sequence[bytes], entries: Sequence[Entry]) -> None:
        self.store.put_many([(k, e.pack()) for k, e in zip(keys, entries, strict=True)])

    async def clear(self, model_identity: bytes | None) -> int:
        return await self.store.clear(model_prefix(model_identity) if model_identity is not None else _VERSION)

    async def close(self) -> None:
        await self.store.close()
