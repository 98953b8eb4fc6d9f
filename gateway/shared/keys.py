"""Bearer API keys: plain or `sha256:<hex>`, held as digests and compared in constant time; per-key
model access and rate limits."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import math
import os
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway.base.config import AuthConfig, ConfigError, KeyConfig, key_digest, key_problem
from gateway.base.errors import GatewayError
from gateway.shared.windows import SlidingWindow

if TYPE_CHECKING:
    from gateway.shared.redis_state import RedisLink, SharedWindow

ENV_KEYS = "GATEWAY_API_KEYS"
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def hash_key(key: str) -> str:
    """`sha256:<hex>` form of a key, for gateway.toml."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh random API key."""
    return "gw-" + secrets.token_urlsafe(24)


@dataclass(eq=False)
class ApiKey:
    """One accepted key and what it may do."""

    name: str
    digest: bytes
    models: frozenset[str] | None = None
    admin: bool = True
    # This process's windows, or windows shared through Redis by every gateway process.
    requests: SlidingWindow | SharedWindow | None = None
    tokens: SlidingWindow | SharedWindow | None = None

    def may_use(self, model: str) -> bool:
        """Whether this key may call `model` (its configured name, not an alias)."""
        return self.models is None or model in self.models

    async def _limit(
        self, window: SlidingWindow | SharedWindow | None, amount: float, what: str, take: bool = True
    ) -> None:
        if window is None:
            return
        if isinstance(window, SlidingWindow):
            wait = window.take(amount) if take else window.wait_for(amount)
        else:
            wait = await (window.take(amount) if take else window.wait_for(amount))
        if wait:
            raise GatewayError(
                429,
                f"rate limit exceeded for key {self.name!r}: {window.limit} {what} per minute; "
                f"retry in {math.ceil(wait)}s",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(math.ceil(wait))},
            )

    async def charge_request(self) -> None:
        """Count one request against the key's requests/minute (429 when over)."""
        await self._limit(self.requests, 1, "requests")

    async def charge_tokens(self, tokens: int) -> None:
        """Count `tokens` against the key's tokens/minute (429 when over)."""
        await self._limit(self.tokens, tokens, "tokens")

    async def check_token_quota(self) -> None:
        """429 now if the key's tokens/minute are used up, before any work is spent on the request."""
        await self._limit(self.tokens, 1, "tokens", take=False)

    async def refund_tokens(self, tokens: int) -> None:
        """Give back tokens charged for work that was not done (refused, failed, or never taken by a batch)."""
        if isinstance(self.tokens, SlidingWindow):
            self.tokens.give_back(tokens)
        elif self.tokens is not None:
            await self.tokens.give_back(tokens)


def _limits(key: ApiKey) -> tuple[int | None, int | None]:
    return (
        key.requests.limit if key.requests else None,
        key.tokens.limit if key.tokens else None,
    )


class KeyStore:
    """The accepted keys."""

    def __init__(
        self,
        keys: Iterable[str] = (),
        entries: Iterable[KeyConfig] = (),
        previous: KeyStore | None = None,
        shared: RedisLink | None = None,
    ) -> None:
        """`previous`: the store this one replaces; a key with unchanged limits keeps its windows (what they
        hold), so a reload does not hand every client a fresh quota. `shared`: Redis, where the limits are then
        counted for every gateway process that shares it."""
        self._keys: list[ApiKey] = []
        for i, key in enumerate(k for k in keys if k.strip()):
            self._keys.append(ApiKey(name=f"key-{i + 1}", digest=key_digest(key)))
        for i, entry in enumerate(entries):
            digest = key_digest(entry.key)
            self._keys.append(
                ApiKey(
                    name=entry.name or f"keys[{i}]",
                    digest=digest,
                    models=frozenset(entry.models) if entry.models is not None else None,
                    admin=entry.admin,
                    requests=_window(entry.requests_per_minute, "requests", digest, shared),
                    tokens=_window(entry.tokens_per_minute, "tokens", digest, shared),
                )
            )

        if previous is not None:
            before = {(k.digest, _limits(k)): k for k in previous._keys}
            for key in self._keys:
                old = before.get((key.digest, _limits(key)))
                if old is not None:
                    key.requests, key.tokens = old.requests, old.tokens

    def __bool__(self) -> bool:
        return bool(self._keys)

    def find(self, digest: bytes) -> ApiKey | None:
        """The key with this digest (the runtime process finds a front's caller by it)."""
        return next((key for key in self._keys if key.digest == digest), None)

    def named(self, name: str) -> ApiKey | None:
        """The key called `name` (a Batch API job runs on behalf of the key that created it, found by its name)."""
        return next((key for key in self._keys if key.name == name), None)

    def counted_by(self, window: Callable[[ApiKey, int, str], Any]) -> KeyStore:
        """The same keys, each requests/minute and tokens/minute limit counted by `window(key, limit, what)`
        (what: "requests" or "tokens"; a front worker's view: the runtime process counts for every front)."""
        out = KeyStore()
        for key in self._keys:
            requests = window(key, key.requests.limit, "requests") if key.requests is not None else None
            tokens = window(key, key.tokens.limit, "tokens") if key.tokens is not None else None
            out._keys.append(dataclasses.replace(key, requests=requests, tokens=tokens))
        return out

    @classmethod
    def from_config(
        cls, auth: AuthConfig, previous: KeyStore | None = None, shared: RedisLink | None = None
    ) -> KeyStore:
        """Keys from gateway.toml plus GATEWAY_API_KEYS (comma-separated, full access)."""
        env = [k for k in os.environ.get(ENV_KEYS, "").split(",") if k.strip()]
        configured = {key_digest(k) for k in auth.api_keys} | {key_digest(e.key) for e in auth.keys}
        for i, key in enumerate(env):
            problem = key_problem(key.strip())
            if problem:
                raise ConfigError(f"{ENV_KEYS}: key {i + 1}: {problem}")
            if key_digest(key) in configured:
                raise ConfigError(f"{ENV_KEYS}: key {i + 1} is also in the config file; a key may be listed once")
        return cls([*auth.api_keys, *env], auth.keys, previous, shared)

    def check(self, authorization: str | None) -> ApiKey:
        """The key the header carries; 401 unless it is accepted."""
        if not authorization:
            raise GatewayError(
                401,
                "missing API key: send the header `Authorization: Bearer <key>`",
                code="missing_api_key",
                headers=_CHALLENGE,
            )
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise GatewayError(
                401,
                "malformed Authorization header: expected `Bearer <key>`",
                code="invalid_api_key",
                headers=_CHALLENGE,
            )
        digest = hashlib.sha256(token.encode()).digest()
        # Compare against every key so timing does not reveal which one (or whether any) matched.
        found: ApiKey | None = None
        for key in self._keys:
            if hmac.compare_digest(digest, key.digest) and found is None:
                found = key
        if found is None:
            raise GatewayError(401, "invalid API key", code="invalid_api_key", headers=_CHALLENGE)
        return found


def _window(
    per_minute: int | None, what: str, digest: bytes, shared: RedisLink | None
) -> SlidingWindow | SharedWindow | None:
    if not per_minute:
        return None
    local = SlidingWindow(per_minute)
    if shared is None:
        return local
    from gateway.shared.redis_state import SharedWindow

    # Named by a digest of the key's digest and the limit: no key in Redis, and a changed limit starts afresh.
    name = hashlib.sha256(b"limit\0" + digest).hexdigest()[:24] + f":{what}:{per_minute}"
    return SharedWindow(shared, name.encode(), per_minute, local)


async def authorize(keys: KeyStore, authorization: str | None, state: dict[str, Any], charge: bool = True) -> ApiKey:
    """The key the Authorization header carries, charged one request unless `charge` is false (401 or 429
    otherwise); it is also put on the request's `state` as "api_key"."""
    key = keys.check(authorization)
    state["api_key"] = key
    if charge and key.requests is not None:
        await key.charge_request()
    return key
