"""The `gateway` command: serve | embed | check | models | check-config | convert | hash-key | redis-server."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar, get_args

from gateway.base.config import DEFAULT_CONFIG, ConfigError, GatewayConfig, key_digest, load_config, resolve_model_path
from gateway.base.schemas import InputType, ModelRuntimeList
from gateway.runtime.plugins import PluginError, load_plugins
from gateway.runtime.registry import ModelState, Registry, build_specs, check_paths
from gateway.shared.keys import KeyStore, hash_key, new_key

if TYPE_CHECKING:
    from gateway.embedding.bulk import Options, Plan, Summary
    from gateway.embedding.check import CheckReport
    from gateway.embedding.state import Gateway

T = TypeVar("T")

# Never reach for a model hub at run time; a user who wants downloads sets these to 0 explicitly.
_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _load(args: argparse.Namespace) -> tuple[GatewayConfig, Registry]:
    config = load_config(args.config)
    plugins = args.plugins
    specs = build_specs(config, plugins.backends(), args.config, plugins.broken, plugins.placements())
    return config, Registry(specs)


def _gateway(args: argparse.Namespace) -> Gateway:
    from gateway.embedding.state import Gateway

    plugins = args.plugins
    return Gateway(
        load_config(args.config),
        plugins.backends(),
        broken=plugins.broken,
        placements=plugins.placements(),
        keys=KeyStore(),
        config_path=args.config,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.api.app import create_app
    from gateway.api.server import uvicorn_config

    config = load_config(args.config)
    keys = KeyStore.from_config(config.auth)
    generated = not keys
    if generated:
        # Like a notebook server's token: usable out of the box, still not open to anyone on the network.
        key = new_key()
        keys = KeyStore([key])
        if args.key_file:
            _write_secret(Path(args.key_file), key + "\n")
            print(f"No API key configured; this run's key is in {args.key_file}", file=sys.stderr, flush=True)
        else:
            print(f"No API key configured; this run accepts: Authorization: Bearer {key}", file=sys.stderr, flush=True)
    overrides: dict[str, object] = {"host": args.host} if args.host else {}
    if args.port is not None:
        overrides["port"] = args.port
    if config.server.worker_count() > 1:
        from gateway.processes import supervisor as workers

        digest = key_digest(key) if generated else None
        return workers.serve(config, args.config, digest, **overrides)
    app = create_app(config, plugins=args.plugins, fallback_keys=keys if generated else None, config_path=args.config)
    uvicorn.Server(uvicorn_config(app, config.server, **overrides)).run()
    return 0


def _write_secret(path: Path, text: str) -> None:
    """`text` in a new file at `path`, owner-only from its first byte, put in place by a rename.

    A fresh private file and a rename (never an open of `path` itself): a symlink planted at `path` is
    replaced, not followed, and a reader who opened an earlier file there keeps that file's old contents.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # O_CREAT|O_EXCL, mode 0600
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def cmd_embed(args: argparse.Namespace) -> int:
    import msgspec

    from gateway.base.schemas import EmbeddingRequest
    from gateway.embedding import service

    gw = _gateway(args)
    model = gw.registry.resolve(args.model)
    model.load()
    if model.state != ModelState.READY:
        return _fail(f"model {model.name!r}: {model.error}")
    body = EmbeddingRequest(model=args.model, input=list(args.text), dimensions=args.dimensions)
    try:
        response = asyncio.run(service.embed(gw, body))
    finally:
        model.close()
    sys.stdout.write(msgspec.json.encode(response).decode() + "\n")
    return 0


def cmd_embed_file(args: argparse.Namespace) -> int:
    from gateway.embedding import bulk

    try:
        plan = _plan(args)
        options = bulk.Options(args.model, args.dimensions, args.prompt_name, args.input_type, _truncate(args.truncate))
        summary = asyncio.run(_embed_file(args, plan, options))
    except bulk.BulkError as exc:
        return _fail(str(exc))
    print(
        f"embed-file: {summary.written} texts written to {plan.out} in {summary.seconds:.1f}s "
        f"({summary.written / max(summary.seconds, 1e-9):.0f} texts/s); {summary.skipped} already there; "
        f"{summary.tokens} tokens",
        file=sys.stderr,
    )
    return 0


def _plan(args: argparse.Namespace) -> Plan:
    from gateway.embedding import bulk, bulk_io

    source, out = Path(args.input), Path(args.out)
    return bulk.Plan(
        source=source,
        input_format=bulk_io.input_format(source, args.input_format),
        text_field=args.text_field,
        id_field=args.id_field,
        out=out,
        output_format=bulk_io.output_format(out, args.output_format),
        window=args.window,
        request_size=args.request_size,
        request_chars=args.request_chars,
        concurrency=args.concurrency,
        resume=args.resume,
        overwrite=args.overwrite,
    )


def _truncate(value: str | None) -> bool | str | None:
    return {None: None, "true": True, "false": False}.get(value, value)  # type: ignore[arg-type]


async def _embed_file(args: argparse.Namespace, plan: Plan, options: Options) -> Summary:
    """The run in-process (only `--model` loaded, after the input is checked) or, with --url, against a running
    gateway."""
    from gateway.embedding import bulk, bulk_http

    if args.url:
        if not args.key:
            raise bulk.BulkError("--url needs --key (an API key of that server, or GATEWAY_API_KEY)")
        started = bulk.start(plan, options)
        async with bulk_http.client(args.url, args.key, args.concurrency or bulk_http.CONCURRENCY) as http:
            return await bulk.run(started, bulk_http.over_http(http, options), bulk.Progress)
    gw = _gateway(args)
    model = gw.registry.resolve(args.model)
    started = bulk.start(plan, options)
    await asyncio.to_thread(model.load)
    if model.state != ModelState.READY:
        raise bulk.BulkError(f"model {model.name!r}: {model.error}")
    try:
        return await bulk.run(started, bulk.in_process(gw, options), bulk.Progress)
    finally:
        model.close()


def cmd_check(args: argparse.Namespace) -> int:
    from gateway.embedding import check

    if args.url:
        if not args.key:
            return _fail("--url needs --key (an admin API key of that server)")
        report = _remote_check(args.url, args.key, args.models, args.against)
    else:
        gw = _gateway(args)
        plan = check.plan(gw, args.models, args.against)
        loaded = list({id(m): m for pair in plan for m in pair if m is not None}.values())
        try:
            for model in loaded:
                model.load()
                if model.state != ModelState.READY:
                    return _fail(f"model {model.name!r}: {model.error}")
            report = asyncio.run(check.run(gw, args.models, args.against))
        finally:
            for model in loaded:
                model.close()
    print(check.table(report))
    failed = [r.model for r in report.rows if not r.passed]
    if failed:
        print(f"check failed: {', '.join(failed)}", file=sys.stderr)
    return 0 if report.passed else 1


def _remote_check(url: str, key: str, models: list[str] | None, against: str | None) -> CheckReport:
    """GET /admin/check on a running gateway; a GatewayError with the server's own message on a refusal."""
    import urllib.parse

    from gateway.embedding.check import CheckReport

    query = urllib.parse.urlencode([("models", m) for m in models or []] + ([("against", against)] if against else []))
    return _remote_get(url, "/admin/check" + (f"?{query}" if query else ""), key, CheckReport)


def _remote_get(url: str, path: str, key: str, kind: type[T]) -> T:
    """GET `path` on the gateway at `url` with an API key, decoded as `kind`; a GatewayError with the server's
    own message on a refusal, or naming why it could not be reached."""
    import json
    import urllib.error
    import urllib.request

    import msgspec

    from gateway.base.errors import GatewayError

    request = urllib.request.Request(f"{url.rstrip('/')}{path}", headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return msgspec.json.decode(response.read(), type=kind)
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = exc.reason
        raise GatewayError(exc.code, f"{url} answered {exc.code}: {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise GatewayError(503, f"cannot reach {url}: {reason}") from None


def cmd_models(args: argparse.Namespace) -> int:
    if args.url:
        if not args.key:
            return _fail("--url needs --key (an admin API key of that server)")
        return _print_runtimes(_remote_get(args.url, "/admin/models", args.key, ModelRuntimeList))
    _, registry = _load(args)
    rows = [("model", "backend", "aliases", "max tokens", "dimensions", "path")]
    for name, m in registry.models.items():
        cfg = m.spec.config
        rows.append(
            (
                name,
                cfg.backend,
                ",".join(cfg.aliases) or "-",
                str(cfg.max_input_tokens or "model's own"),
                ",".join(map(str, cfg.matryoshka_dimensions or [])) or "full only",
                cfg.path or "-",
            )
        )
    _print_table(rows)
    return 0


def _print_runtimes(listed: ModelRuntimeList) -> int:
    """`gateway models --url`: what GET /admin/models says of each model (the console's models panel)."""
    rows = [("model", "state", "task", "backend", "placement", "replicas", "dim", "max tokens", "circuit", "queue")]
    for m in listed.data:
        card = m.card
        rows.append(
            (
                m.id,
                card.state if card.error is None else f"{card.state}: {card.error}",
                card.task,
                card.backend,
                m.placement,
                "-" if m.replicas is None else f"{m.replicas_ready}/{m.replicas}",
                str(card.dimension or "-"),
                str(card.max_input_tokens or "-"),
                m.circuit,
                str(m.queue_depth),
            )
        )
    _print_table(rows)
    return 0


def _print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def cmd_check_config(args: argparse.Namespace) -> int:
    config, registry = _load(args)
    problems = check_paths({n: m.spec for n, m in registry.models.items()})
    if problems:
        for p in problems:
            print(f"error: {args.config}: {p}", file=sys.stderr)
        return 2
    print(f"{args.config}: OK ({len(config.models)} models: {', '.join(config.models) or 'none'})")
    return 0


def cmd_redis_server(args: argparse.Namespace) -> int:
    import tempfile

    from gateway.shared import local_redis

    config = load_config(args.config)
    if args.port is not None:
        port = args.port
    elif config.redis is not None:
        port = local_redis.local_port(config.redis.url)
    else:
        raise ConfigError(f"{args.config} has no `[redis]` table: give --port, or add `[redis] url`")
    workdir = Path(tempfile.gettempdir()) / f"gateway-redis-{port}"
    workdir.mkdir(exist_ok=True)
    argv = local_redis.command(port, workdir)
    print(f"starting {argv[0]} on redis://127.0.0.1:{port} (nothing kept on disk; Ctrl-C stops it)", flush=True)
    # The server takes this process' place: its signals and exit status are the command's.
    os.execv(argv[0], argv)
    return 0  # pragma: no cover - execv does not return


def cmd_hash_key(args: argparse.Namespace) -> int:
    key = args.key or new_key()
    print(f"key:    {key}\nconfig: {hash_key(key)}")
    return 0


def build_parser(converters: dict[str, object] | None = None) -> argparse.ArgumentParser:
    """The argparse tree; converters add their own options to `convert`."""
    parser = argparse.ArgumentParser(prog="gateway", description="Embedding gateway: one HTTP API for embeddings.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serving(sub)
    _add_tools(sub, converters or {})
    return parser


def _with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument(
        "--config",
        default=os.environ.get("GATEWAY_CONFIG", DEFAULT_CONFIG),
        help="path to gateway.toml (default: %(default)s)",
    )
    return p


def _add_serving(sub: argparse._SubParsersAction) -> None:
    """The commands that run a configured gateway: serve, embed, models, redis-server."""
    p = _with_config(sub.add_parser("serve", help="start the HTTP server"))
    p.add_argument("--host", help="bind address (default: [server].host)")
    p.add_argument("--port", type=int, help="port (default: [server].port)")
    p.add_argument(
        "--key-file",
        help="when no key is configured, write the generated key to this file (mode 600) instead of printing it",
    )
    p.set_defaults(func=cmd_serve)

    p = _with_config(sub.add_parser("embed", help="embed texts in-process and print the JSON response"))
    p.add_argument("text", nargs="+", help="texts to embed")
    p.add_argument("--model", required=True, help="model name or alias")
    p.add_argument("--dimensions", type=int, help="Matryoshka dimensions")
    p.set_defaults(func=cmd_embed)

    _add_embed_file(sub)

    p = _with_config(
        sub.add_parser("check", help="check that models agree with their references (in-process, or --url)")
    )
    p.add_argument("--models", nargs="+", metavar="M", help="models to check (default: every embedding model)")
    p.add_argument("--against", metavar="MODEL", help="the reference (default: the first of each embedding_space)")
    p.add_argument("--url", help="check on a running gateway instead (GET /admin/check)")
    p.add_argument("--key", default=os.environ.get("GATEWAY_API_KEY"), help="its admin API key (with --url)")
    p.set_defaults(func=cmd_check)

    p = _with_config(sub.add_parser("models", help="list configured models (or, with --url, a running server's)"))
    p.add_argument("--url", help="list a running gateway's models instead (GET /admin/models)")
    p.add_argument("--key", default=os.environ.get("GATEWAY_API_KEY"), help="its admin API key (with --url)")
    p.set_defaults(func=cmd_models)

    p = _with_config(
        sub.add_parser(
            "redis-server",
            help="run the local Redis-protocol server installed with the gateway (Valkey) on [redis]'s port",
        )
    )
    p.add_argument("--port", type=int, help="port (default: the one in [redis] url)")
    p.set_defaults(func=cmd_redis_server)


def _add_embed_file(sub: argparse._SubParsersAction) -> None:
    p = _with_config(
        sub.add_parser("embed-file", help="embed a JSONL, CSV or Parquet file of texts into Parquet or NumPy")
    )
    p.add_argument("input", help="the texts: .jsonl, .csv (a header row) or .parquet")
    p.add_argument("--model", required=True, help="model name or alias")
    p.add_argument("--out", required=True, help="the vectors: .parquet (id, vector, tokens) or .npy (+ OUT.ids.jsonl)")
    p.add_argument("--input-format", choices=["jsonl", "csv", "parquet"], help="default: from INPUT's extension")
    p.add_argument("--output-format", choices=["parquet", "npy"], help="default: from OUT's extension")
    p.add_argument("--text-field", default="text", help="the field (column) holding the text (default: %(default)s)")
    p.add_argument(
        "--id-field", default="id", help="the field holding the id; absent: its line number (default: %(default)s)"
    )
    p.add_argument("--dimensions", type=int, help="Matryoshka dimensions, as the API's `dimensions`")
    p.add_argument("--prompt-name", help="one of the model's named prompts, as the API's `prompt_name`")
    p.add_argument("--input-type", choices=list(get_args(InputType)), help="as the API's `input_type`")
    p.add_argument("--truncate", choices=["true", "false", "end", "start"], help="as the API's `truncate`")
    p.add_argument("--resume", action="store_true", help="continue a broken run from what OUT already holds")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.add_argument("--url", help="send the texts to this running gateway's /v1/embeddings instead of in-process")
    p.add_argument("--key", default=os.environ.get("GATEWAY_API_KEY"), help="its API key (with --url)")
    # Unset, each is the default of where the requests go (bulk.in_process, bulk_http.over_http).
    p.add_argument("--concurrency", type=int, help="requests in flight (default: 4 in-process, 2 with --url)")
    p.add_argument(
        "--request-size",
        type=int,
        help="texts per request, at most (default: [server] max_items_per_request in-process, 256 with --url)",
    )
    p.add_argument(
        "--request-chars",
        type=int,
        help="characters per request, about (default: a quarter of [server] "
        "max_tokens_per_request in-process, 8192 with --url)",
    )
    p.add_argument("--window", type=int, default=4096, help="texts sorted by length together (default: %(default)s)")
    p.set_defaults(func=cmd_embed_file)


def _add_tools(sub: argparse._SubParsersAction, converters: dict[str, object]) -> None:
    """The commands that need no running gateway: check-config, hash-key, convert."""
    p = sub.add_parser("check-config", help="validate a config without loading any model")
    p.add_argument("config", nargs="?", default=os.environ.get("GATEWAY_CONFIG", DEFAULT_CONFIG))
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("hash-key", help="print a new (or the given) API key and its sha256 form for gateway.toml")
    p.add_argument("key", nargs="?")
    p.set_defaults(func=cmd_hash_key)

    p = sub.add_parser("convert", help="convert a model for another backend (" + ", ".join(converters) + ")")
    p.add_argument("src", help="model folder, or pkg:PACKAGE/sub/path")
    p.add_argument("--to", required=True, choices=sorted(converters), help="target format")
    p.add_argument("--out", required=True, help="output path")
    for conv in converters.values():
        conv.add_arguments(p)  # type: ignore[attr-defined]
    p.set_defaults(func=None, converters=converters)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `gateway` command."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name, value in _OFFLINE.items():
        os.environ.setdefault(name, value)
    from gateway.plugin import BackendError

    try:
        # One plugin manager for the whole command: entry points are imported once.
        plugins = load_plugins()
        converters = plugins.converters()
        args = build_parser(converters).parse_args(argv)
        args.plugins = plugins
        if args.command == "convert":
            src = str(resolve_model_path(args.src, Path.cwd()))
            args.converters[args.to].convert(src, args.out, args)
            return 0
        return int(args.func(args))
    except (ConfigError, PluginError, BackendError) as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from gateway.base.errors import GatewayError

        if isinstance(exc, GatewayError):
            return _fail(exc.message)
        raise


if __name__ == "__main__":
    sys.exit(main())
