"""What names a model's vectors: a digest of its files (Backend.fingerprint's default) and its identity (backend,
options, input limit and that digest), which the cache keys entries by."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import msgspec


def identity(backend: str, options: object, fingerprint: bytes, max_input_tokens: int) -> bytes:
    """A model's cache identity: its backend, options, input limit and its files' digest (Backend.fingerprint)."""
    parts = [backend.encode(), msgspec.json.encode(options), str(max_input_tokens).encode(), fingerprint]
    return hashlib.sha256(b"\0".join(parts)).digest()[:16]


# Digests by (path, size, mtime): a reload of an unchanged file does not read it again.
_DIGESTS: dict[tuple[str, int, int], bytes] = {}
# Files that change without the model changing (bytecode written when a package folder is imported).
_SKIP_SUFFIXES = (".pyc", ".pyo")


def weights_digest(path: str) -> bytes:
    """sha256 over the files at `path` (one file, or every file under a folder with its relative name)."""
    root = Path(path)
    if root.is_file():
        return _file_digest(root)
    outer = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        for name in sorted(filenames):
            if name.startswith(".") or name.endswith(_SKIP_SUFFIXES):
                continue
            file = Path(dirpath) / name
            outer.update(str(file.relative_to(root)).encode() + b"\0" + _file_digest(file))
    return outer.digest()


def _file_digest(file: Path) -> bytes:
    stat = file.stat()
    key = (str(file.resolve()), stat.st_size, stat.st_mtime_ns)
    found = _DIGESTS.get(key)
    if found is None:
        with file.open("rb") as f:
            found = _DIGESTS[key] = hashlib.file_digest(f, "sha256").digest()
    return found
