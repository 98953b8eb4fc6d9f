"""`gateway.toml`: msgspec Structs, decoded strictly so a typo fails at start with its key path."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import msgspec

DEFAULT_CONFIG = "gateway.toml"


class ConfigError(Exception):
    """The configuration is invalid; the message names the file and key path."""


class _Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


Positive = Annotated[int, msgspec.Meta(ge=1)]
Seconds = Annotated[float, msgspec.Meta(gt=0)]


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8000
    # OpenAI's own limits: 2048 inputs and 300k tokens per request.
    max_items_per_request: Positive = 2048
    max_tokens_per_request: Positive = 300_000
    # Checked before tokenizing, which would cost seconds for megabytes of text before any token limit could
    # refuse them; far beyond any input an 8k-token model accepts.
    max_input_chars: Positive = 100_000
    # Documents one rerank request may score against its query (Cohere's own limit is 1000).
    max_documents_per_request: Positive = 1000
    max_body_bytes: Positive = 8 * 1024 * 1024
    request_timeout_s: Seconds = 120.0
    # Deadlines for slow clients: the request line and headers, the body (408), a response the client has
    # stopped reading (the connection is dropped), and an idle keep-alive connection.
    header_timeout_s: Seconds = 10.0
    body_timeout_s: Seconds = 30.0
    send_timeout_s: Seconds = 30.0
    keep_alive_s: Seconds = 5.0
    max_header_bytes: Positive = 16 * 1024
    # Open connections beyond which requests are answered 503 at once (uvicorn's limit_concurrency); the
    # process's file descriptors bound it from above.
    max_connections: Positive | None = 4096
    # uvicorn's "trace" level logs whole requests, headers and API keys included: not offered.
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    # One line per request (request id, model, status, tokens, latency); never keys, never texts.
    access_log: bool = True
    # /metrics answers only with a valid key (any key), and /ready names models only to a key.
    metrics_require_key: bool = False
    # HTTP front processes on the one port ("auto": one per core). With more than one, a runtime process owns
    # the models, batches, cache and limits, and the fronts reach it over a local socket
    # (gateway/processes/supervisor.py).
    workers: Positive | Literal["auto"] = 1

    def worker_count(self) -> int:
        """`workers` as a number ("auto": the machine's cores)."""
        return (os.cpu_count() or 1) if self.workers == "auto" else self.workers


class KeyConfig(_Strict):
    """A key with limits: `[[auth.keys]]`."""

    key: str
    name: str | None = None
    # None: every model. Configured model names (aliases of a listed model work too).
    models: list[str] | None = None
    admin: bool = False
    requests_per_minute: Positive | None = None
    tokens_per_minute: Positive | None = None


class AuthConfig(_Strict):
    # Full-access keys, plain or "sha256:<hex>"; GATEWAY_API_KEYS (comma-separated) adds more.
    api_keys: list[str] = []
    keys: list[KeyConfig] = []


class BatchingConfig(_Strict):
    # None: the backend's own default.
    max_batch_size: Positive | None = None
    max_batch_tokens: Positive | None = None
    # How long a worker waits for more inputs when its batch is not full. 0 keeps a lone client's latency at
    # the runtime's own; under load batches fill anyway while the previous one computes.
    max_wait_ms: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    # When a batch is not full, a worker waits for the clients the last batch answered (they tend to send
    # again at once), up to this share of that batch's compute time: without it, N clients that each wait
    # for their answer split into two alternating batches of N/2 (bench/README.md, "return_wait"). A lone
    # client is never delayed, and the cost is bounded by this share of throughput. 0 turns it off; ignored
    # when max_wait_ms is set.
    return_wait: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.2
    # A request is admitted only if the work queued ahead of it, and its own, is predicted to finish within
    # this long (from the model's measured drain rate, its key's fair share of it, and the client's own
    # X-Request-Timeout-Ms if shorter); otherwise 429 at once, with Retry-After from the prediction.
    max_queue_wait_ms: Annotated[float, msgspec.Meta(gt=0)] = 2000.0
    # Background work (Batch API jobs, calibration) runs only while no client input waits, but a client request
    # that arrives while a background batch computes waits for it: such a batch is cut to about this much
    # compute at the measured drain rate: a lower p99 during a job, for less job throughput (bench/README.md,
    # "Bulk: the Batch API"). 0: no such cut (background_batch_size inputs within max_batch_tokens).
    background_batch_ms: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    # After client work (an input arrived, or a batch holding one ended), background batches wait this long:
    # a client that just got its answer sends its next request within moments, and a background batch started
    # meanwhile would hold that request for the batch's whole time (one client's p50 during a job: 8-11x idle
    # without it, 0.9-1.1x with it; bench/README.md, "Bulk: the Batch API"). Client requests that come closer
    # together than this hold a job back until they pause. 0: no wait.
    background_grace_ms: Annotated[float, msgspec.Meta(ge=0)] = 2.0
    # The most inputs in one background batch (Batch API jobs, in-process embed-file, calibration); still bound
    # by max_batch_tokens and background_batch_ms. No client waits on a background batch's latency, and larger
    # batches compute more texts per second (bench/README.md, "Bulk: embed-file"). None: twice max_batch_size.
    background_batch_size: Positive | None = None
    # Inputs (not requests) waiting per model: a bound on memory. A key with inputs queued is refused past
    # it; a key with none queued may still add one request, so a flood from one key cannot lock out others.
    max_queue: Positive = 4096


class CircuitConfig(_Strict):
    # Consecutive batches that failed with the backend unavailable or timed out open the circuit: the model
    # is skipped (its fallbacks serve, or 503 at once) for `open_s`, then one request probes it; its success
    # closes the circuit, its failure opens it again.
    failures: Positive = 3
    open_s: Seconds = 5.0


class ModelConfig(_Strict):
    backend: str
    # "embed" (texts in, vectors out: /v1/embeddings) or "rerank" (query/document pairs in, one relevance score
    # each: /v1/rerank, /rerank). None: "rerank" for a sentence-transformers CrossEncoder folder, else "embed".
    task: Literal["embed", "rerank"] | None = None
    # None for a backend that reads no local files (a remote server: its address is an option).
    path: str | None = None
    aliases: list[str] = []
    max_input_tokens: Positive | None = None
    matryoshka_dimensions: Annotated[list[Positive], msgspec.Meta(min_length=1)] | None = None
    trust_remote_code: bool = False
    # Named prompts prepended to each input (requests pick one with `prompt_name` or `input_type`), and the
    # one applied when a request names none. None: read both from the model folder's
    # config_sentence_transformers.json, as sentence-transformers does.
    prompts: dict[str, str] | None = None
    default_prompt_name: str | None = None
    # For requests that do not set `truncate`: false refuses an input over the token limit (400); true or
    # "end" cuts its end (keeps the start), "start" cuts its start.
    truncate: bool | Literal["end", "start"] = False
    # Texts (one per line) whose vectors give int8/uint8 their per-dimension ranges; None: the bundled corpus.
    calibration_corpus: str | None = None
    # When that corpus is embedded: "load" (in the background once the model is ready, so no int8/uint8
    # request waits for it) or "first_use" (by the first request that asks for int8/uint8; no CPU spent at
    # start by a model that never serves them, which matters for a large one).
    calibrate: Literal["first_use", "load"] = "first_use"
    # false: this model's inputs are never cached (with `[cache] store` set).
    cache: bool = True
    batching: BatchingConfig = msgspec.field(default_factory=BatchingConfig)
    # Models that serve this one's requests when it fails (in order; not followed further). Each must declare
    # the same embedding_space: an operator-chosen id meaning "interchangeable vectors" (the same weights on
    # another runtime or host), so that failover never mixes vector spaces.
    fallbacks: list[str] = []
    embedding_space: str | None = None
    circuit: CircuitConfig = msgspec.field(default_factory=CircuitConfig)
    # Validated by the backend's own Options Struct once plugins are known.
    options: dict[str, Any] = {}
    # Present: the model runs on Ray Serve replicas (plugins/gateway_ray), validated by that placement's
    # Options Struct; absent: in this process.
    ray: dict[str, Any] | None = None
    # With `[server] workers` > 1: "shared" (one copy, in the runtime process, batching for every front) or
    # "per-worker" (each front worker loads its own copy and computes this model's requests itself, its
    # threads split so that the copies together use the cores once: for small models, where the hop to the
    # runtime costs more than the model). With one worker, one copy either way.
    copies: Literal["shared", "per-worker"] = "shared"


class CacheConfig(_Strict):
    # "memory": in this process, bounded by `max_bytes`; "redis": shared through `[redis]`; "off".
    store: Literal["memory", "redis", "off"] = "memory"
    # The in-process store's bound: 64 MiB hold about 40,000 vectors of 384 floats.
    max_bytes: Positive = 64 * 1024 * 1024
    # How long Redis keeps an entry.
    ttl_s: Positive = 7 * 24 * 3600


class RedisConfig(_Strict):
    url: str
    # Every call to Redis gives up after this long, plus the event loop's own lag (the request then goes on
    # without it; three slow replies in a row, or one refused connection, and Redis counts as down).
    timeout_ms: Annotated[float, msgspec.Meta(gt=0)] = 100.0
    # While down, calls are skipped for this long (doubling while it keeps failing, up to 4x).
    retry_after_s: Seconds = 1.0
    # What every key this gateway writes starts with (several gateways may share one Redis).
    prefix: str = "gateway"
    # Per-key requests/tokens per minute counted in Redis, across every process that shares it.
    rate_limits: bool = True


class BatchesConfig(_Strict):
    """OpenAI's Batch API (`/v1/files`, `/v1/batches`): files and jobs kept on disk, computed at low priority."""

    enabled: bool = True
    # The job database (SQLite) and the files beside it; a relative path is taken from the config file's folder
    # (or the working directory when there is no file), as model paths are.
    data_dir: str = ".gateway-data/batches"
    # Bounds on one uploaded file (OpenAI's own: 200 MB and 50,000 requests).
    max_file_bytes: Positive = 200 * 1024 * 1024
    max_lines: Positive = 50_000
    # Lines computed together and recorded as done in one step: the unit of progress, cancel and resume.
    chunk_lines: Positive = 256
    # A quota of job tokens per key and minute, apart from the key's own; None: jobs are charged to the key's
    # tokens/minute as its requests are (a job waits for quota, it never fails for lack of it).
    job_tokens_per_minute: Positive | None = None
    # How long a job may take (`completion_window` "24h", OpenAI's only one): past it the job ends "expired".
    # Tests shorten it; a shorter window is a promise the server may not keep under load.
    completion_window_s: Positive = 24 * 3600


class GatewayConfig(_Strict):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    cache: CacheConfig = msgspec.field(default_factory=CacheConfig)
    batches: BatchesConfig = msgspec.field(default_factory=BatchesConfig)
    redis: RedisConfig | None = None
    models: dict[str, ModelConfig] = {}


def resolve_model_path(raw: str, base_dir: Path) -> Path:
    """`pkg:NAME/sub/dir` -> a folder inside an installed package; relative paths -> beside the config."""
    if raw.startswith("pkg:"):
        package, _, sub = raw[4:].partition("/")
        # Found, not imported: reading a config must not run a package's import-time code (or pay for it).
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        if not locations:
            raise ConfigError(f"package {package!r} named in path {raw!r} is not installed")
        root = Path(locations[0])
        return root / sub if sub else root
    path = Path(os.path.expanduser(raw))
    return path if path.is_absolute() else (base_dir / path)


def key_digest(key: str) -> bytes:
    """The sha256 digest a key is held and compared as (`sha256:<hex>` keys are their digest already)."""
    key = key.strip()
    if key.startswith("sha256:"):
        return bytes.fromhex(key[7:])
    return hashlib.sha256(key.encode()).digest()


def key_problem(key: str) -> str | None:
    """What is wrong with an API key as written in config or env, or None."""
    if key.startswith("sha256:"):
        digest = key[7:]
        if len(digest) != 64 or any(c not in "0123456789abcdefABCDEF" for c in digest):
            return "a sha256: key needs 64 hex digits"
    elif len(key) < 8:
        return "too short (8 characters at least)"
    return None


def _check_keys(config: GatewayConfig, where: str) -> None:
    seen: dict[bytes, str] = {}

    def once(raw: str, at: str) -> None:
        # The same key twice would get whichever entry matched first: full access, say, for a key also
        # listed with limits. Refused, whichever form (plain or sha256:) each place wrote it in.
        digest = key_digest(raw)
        if digest in seen:
            raise ConfigError(f"{where}: `{at}`: the same key as `{seen[digest]}`; a key may be listed once")
        seen[digest] = at

    for i, raw in enumerate(config.auth.api_keys):
        problem = key_problem(raw)
        if problem:
            raise ConfigError(f"{where}: `$.auth.api_keys[{i}]`: {problem}")
        once(raw, f"$.auth.api_keys[{i}]")
    for i, entry in enumerate(config.auth.keys):
        key = f"$.auth.keys[{i}]"
        problem = key_problem(entry.key)
        if problem:
            raise ConfigError(f"{where}: `{key}.key`: {problem}")
        once(entry.key, f"{key}.key")
        for model in entry.models or []:
            if model not in config.models:
                raise ConfigError(f"{where}: `{key}.models`: no model named {model!r}")


def _check_fallbacks(config: GatewayConfig, where: str) -> None:
    for name, model in config.models.items():
        for i, other in enumerate(model.fallbacks):
            at = f"`$.models.{name}.fallbacks[{i}]`"
            target = config.models.get(other)
            if target is None:
                raise ConfigError(f"{where}: {at}: no model named {other!r} (fallbacks name configured models)")
            if other == name or other in model.fallbacks[:i]:
                what = "the model itself" if other == name else "listed twice"
                raise ConfigError(f"{where}: {at}: {other!r} is {what}")
            if model.embedding_space is None:
                raise ConfigError(
                    f"{where}: `$.models.{name}.embedding_space`: required with fallbacks (the id of the vector "
                    "space its fallbacks must share)"
                )
            if target.embedding_space != model.embedding_space:
                raise ConfigError(
                    f"{where}: {at}: model {other!r} is in embedding space {target.embedding_space!r}, not "
                    f"{model.embedding_space!r}; a fallback must produce interchangeable vectors"
                )


def _check_prompts(config: GatewayConfig, where: str) -> None:
    for name, model in config.models.items():
        at = f"$.models.{name}"
        for prompt in model.prompts or {}:
            if not prompt:
                raise ConfigError(f"{where}: `{at}.prompts`: a prompt name must not be empty")
        default = model.default_prompt_name
        if default is not None and model.prompts is not None and default not in model.prompts:
            known = ", ".join(repr(p) for p in sorted(model.prompts)) or "none"
            raise ConfigError(
                f"{where}: `{at}.default_prompt_name`: {default!r} is not one of the model's prompts ({known})"
            )


def _check_copies(config: GatewayConfig, where: str) -> None:
    for name, model in config.models.items():
        at = f"$.models.{name}"
        if model.copies == "per-worker" and model.ray is not None:
            raise ConfigError(
                f'{where}: `{at}.copies`: "per-worker" cannot go with `[{at[2:]}.ray]`: Ray Serve replicas are '
                "already one set of copies shared by every front worker (drop one of the two)"
            )
        for i, other in enumerate(model.fallbacks):
            target = config.models.get(other)
            if target is not None and target.copies != model.copies:
                # A front computes a per-worker model's requests, the runtime process a shared one's: a request
                # cannot move between the two halfway through its failover.
                raise ConfigError(
                    f"{where}: `{at}.fallbacks[{i}]`: model {other!r} has copies = {target.copies!r}, and "
                    f"{name!r} has {model.copies!r}; a model and its fallbacks must have the same `copies`"
                )


def _check_tasks(config: GatewayConfig, where: str) -> None:
    for name, model in config.models.items():
        if model.task == "rerank":
            check_reranker(name, model, where)


def check_reranker(name: str, model: ModelConfig, where: str) -> None:
    """ConfigError naming the key when a rerank model sets what only an embedding model can use."""
    # Scores have no dimensions to cut, and failover between rerankers is not built: refused rather than ignored.
    for key, value in (("matryoshka_dimensions", model.matryoshka_dimensions), ("fallbacks", model.fallbacks)):
        if value:
            raise ConfigError(f'{where}: `$.models.{name}.{key}`: a model with task = "rerank" takes no {key}')


def _check_names(config: GatewayConfig, where: str) -> None:
    seen: dict[str, str] = {}
    for name, model in config.models.items():
        for label in (name, *model.aliases):
            if label in seen:
                raise ConfigError(
                    f"{where}: name {label!r} at `$.models.{name}` is already used by model {seen[label]!r}"
                )
            seen[label] = name


T = TypeVar("T")


def convert_at(obj: Any, type_: type[T], path: str, where: str) -> T:
    """msgspec.convert with errors that name `where` and the full key path."""
    try:
        return msgspec.convert(obj, type_)
    except msgspec.ValidationError as exc:
        msg = str(exc)
        msg = msg.replace("`$", f"`{path}", 1) if "`$" in msg else f"{msg} - at `{path}`"
        raise ConfigError(f"{where}: {msg}") from None


def parse_config(data: bytes | str, where: str = "<config>", base_dir: Path | None = None) -> GatewayConfig:
    """Decode TOML text into a GatewayConfig; ConfigError names `where` and the key path.

    Model paths come back resolved (absolute), relative ones against `base_dir` (default: cwd).
    """
    try:
        raw = msgspec.toml.decode(data)
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    # Models are converted one by one: msgspec names a dict value `$.models[...]`, we want the model's name.
    models = raw.pop("models", {})
    _check_workers(raw, where)
    config = convert_at(raw, GatewayConfig, "$", where)
    if not isinstance(models, dict):
        raise ConfigError(f"{where}: `$.models` must be a table of models")
    config.models = {name: convert_at(m, ModelConfig, f"$.models.{name}", where) for name, m in models.items()}
    _check_names(config, where)
    _check_fallbacks(config, where)
    _check_keys(config, where)
    _check_prompts(config, where)
    _check_copies(config, where)
    _check_tasks(config, where)
    if config.cache.store == "redis" and config.redis is None:
        raise ConfigError(f'{where}: `$.cache.store`: "redis" needs a `[redis]` table with its `url`')
    base = base_dir or Path.cwd()
    config.batches.data_dir = str(resolve_model_path(config.batches.data_dir, base))
    for name, model in config.models.items():
        if model.path is None:
            continue
        try:
            model.path = str(resolve_model_path(model.path, base))
        except ConfigError as exc:
            raise ConfigError(f"{where}: `$.models.{name}.path`: {exc}") from None
        if model.calibration_corpus is not None:
            model.calibration_corpus = str(resolve_model_path(model.calibration_corpus, base))
    return config


def _check_workers(raw: dict[str, Any], where: str) -> None:
    # msgspec would say "Expected `int | str`"; the setting's two forms are clearer.
    server = raw.get("server")
    workers = server.get("workers", 1) if isinstance(server, dict) else 1
    if workers != "auto" and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ConfigError(f'{where}: `$.server.workers` must be a whole number >= 1 or "auto", got {workers!r}')


def load_config(path: str | os.PathLike[str]) -> GatewayConfig:
    """Read and validate a config file (structure only: no model is loaded)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config: {exc.strerror}") from None
    return parse_config(data, str(p), p.resolve().parent)
