"""Bearer API keys: plain or `sha256:<hex>`, compared as digests in constant time."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable

from .errors import GatewayError

ENV_KEYS = "GATEWAY_API_KEYS"


def hash_key(key: str) -> str:
    """`sha256:<hex>` form of a key, for gateway.toml."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh random API key."""
    return "gw-" + secrets.token_urlsafe(24)


class KeyStore:
    """The accepted keys, held only as SHA-256 digests."""

    def __init__(self, keys: Iterable[str]) -> None:
        digests: list[bytes] = []
        for key in keys:
            key = key.strip()
            if not key:
                continue
            if key.startswith("sha256:"):
                digests.append(bytes.fromhex(key[7:]))
            else:
                digests.append(hashlib.sha256(key.encode()).digest())
        self._digests = digests

    def __bool__(self) -> bool:
        return bool(self._digests)

    @classmethod
    def from_config(cls, configured: Iterable[str]) -> KeyStore:
        """Keys from gateway.toml plus GATEWAY_API_KEYS."""
        env = os.environ.get(ENV_KEYS, "")
        return cls([*configured, *env.split(",")])

    def check(self, authorization: str | None) -> None:
        """Raise 401 unless the header carries an accepted bearer key."""
        if not authorization:
            raise GatewayError(
                401, "missing API key: send the header `Authorization: Bearer <key>`", code="missing_api_key"
            )
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise GatewayError(401, "malformed Authorization header: expected `Bearer <key>`", code="invalid_api_key")
        digest = hashlib.sha256(token.encode()).digest()
        # Compare against every key so timing does not reveal which one (or whether any) matched.
        ok = False
        for known in self._digests:
            ok |= hmac.compare_digest(digest, known)
        if not ok:
            raise GatewayError(401, "invalid API key", code="invalid_api_key")
