"""OpenAI's Batch API for embeddings: `/v1/files` (purpose "batch") and `/v1/batches`, in OpenAI's shapes.

These routes only write and read files and rows (gateway/embedding/batch_store.py); the jobs are computed by the
runner where the models are (gateway/embedding/batch_runner.py). A key sees and touches only its own files and
batches (another's answer 404, as if they did not exist); an admin key sees all of them.
"""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import IO, Annotated, Any, Literal

import msgspec
from litestar import Litestar, Request, delete, get, post
from litestar._multipart import parse_multipart_form
from litestar.datastructures import UploadFile
from litestar.exceptions import ClientException
from litestar.openapi.spec import OpenAPIFormat, OpenAPIMediaType, OpenAPIType, RequestBody, Schema
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter
from litestar.response import File

from gateway.api.routes import require_key
from gateway.base.errors import GatewayError, error_responses
from gateway.embedding.batch_runner import ENDPOINT, count_lines, scan_lines
from gateway.embedding.batch_store import BatchObject, BatchStore, FileObject
from gateway.embedding.state import Gateway
from gateway.shared.keys import ApiKey

# What a multipart body may add to the file it carries (boundaries, the purpose field, headers).
_MULTIPART_SLACK = 64 * 1024
_CHUNK = 1 << 20
_DONE = ("completed", "failed", "expired", "cancelled")


class BatchCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Body of POST /v1/batches (OpenAI's)."""

    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None
    # Sent by newer clients; output files here are kept until deleted.
    output_expires_after: dict[str, Any] | None = None


class FileDeleted(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class FileList(msgspec.Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class BatchList(msgspec.Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[BatchObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


def _key(request: Request[Any, Any, Any]) -> ApiKey:
    return request.scope["state"]["api_key"]  # type: ignore[no-any-return]


def _seen_by(key: ApiKey) -> str | None:
    """Whose files and batches `key` sees: its own, or all (None) for an admin key."""
    return None if key.admin else key.name


async def _store(request: Request[Any, Any, Any], create: bool = False) -> BatchStore | None:
    gw: Gateway = request.app.state.gateway
    if gw.batches is None:
        raise GatewayError(404, "the Batch API is turned off on this server (`[batches] enabled = false`)")
    return await asyncio.to_thread(gw.batches.get, create)


async def _file(request: Request[Any, Any, Any], file_id: str) -> tuple[BatchStore, FileObject]:
    store = await _store(request)
    found = await store.call(store.get_file, file_id, _seen_by(_key(request))) if store is not None else None
    if store is None or found is None:
        raise GatewayError(404, f"no such file: {file_id!r}", param="file_id", code="file_not_found")
    return store, found


async def _batch(request: Request[Any, Any, Any], batch_id: str) -> tuple[BatchStore, BatchObject]:
    store = await _store(request)
    found = await store.call(store.get_batch, batch_id, _seen_by(_key(request))) if store is not None else None
    if store is None or found is None:
        raise GatewayError(404, f"no such batch: {batch_id!r}", param="batch_id", code="batch_not_found")
    return store, found


async def _limited(stream: AsyncGenerator[bytes, None], limit: int) -> AsyncGenerator[bytes, None]:
    """The body, refused once it passes `limit` bytes (before it fills the disk)."""
    seen = 0
    async for chunk in stream:
        seen += len(chunk)
        if seen > limit:
            raise GatewayError(413, f"upload is over the limit of {limit} bytes", code="file_too_large")
        yield chunk


def _save(source: IO[bytes], target: Path, limit: int) -> int:
    """Copy the uploaded file to `target`; its size (400 past `limit`)."""
    with open(target, "wb") as out:
        shutil.copyfileobj(source, out, _CHUNK)
        size = out.tell()
    if size > limit:
        target.unlink()
        raise GatewayError(
            400, f"file has {size} bytes; the limit is {limit} (`[batches] max_file_bytes`)", code="file_too_large"
        )
    return size


@post(
    "/v1/files",
    guards=[require_key],
    status_code=200,
    request_max_body_size=None,
    responses=error_responses(400, 401, 413),
)
async def upload_file(request: Request[Any, Any, Any]) -> FileObject:
    """Upload a JSONL file of embeddings requests (`purpose` "batch"), multipart as OpenAI's clients send it."""
    gw: Gateway = request.app.state.gateway
    limits = gw.config.batches
    content_type, options = request.content_type
    if content_type != "multipart/form-data" or not options.get("boundary"):
        raise GatewayError(
            400, "upload a file as multipart/form-data with fields `file` and `purpose`", code="invalid_upload"
        )
    try:
        form = await parse_multipart_form(
            _limited(request.stream(), limits.max_file_bytes + _MULTIPART_SLACK), options["boundary"].encode(), 8
        )
    except ClientException as exc:
        raise GatewayError(
            400,
            f"unreadable multipart body ({exc.detail}): send the fields `file` and `purpose`",
            code="invalid_upload",
        ) from None
    purpose, upload = form.get("purpose"), form.get("file")
    if not isinstance(upload, UploadFile):
        raise GatewayError(400, "the upload has no `file` part", param="file", code="missing_file")
    if purpose != "batch":
        raise GatewayError(
            400,
            f'`purpose` {purpose!r} is not supported: this server takes "batch" files',
            param="purpose",
            code="invalid_purpose",
        )
    store = await _store(request, create=True)
    assert store is not None
    staged = store.root / "work" / f"upload-{uuid.uuid4().hex}"
    try:
        await asyncio.to_thread(_save, upload.file, staged, limits.max_file_bytes)
        lines = await asyncio.to_thread(count_lines, staged, limits.max_lines)
        if lines > limits.max_lines:
            raise GatewayError(
                400,
                f"file has more than {limits.max_lines} requests (`[batches] max_lines`)",
                param="file",
                code="too_many_lines",
            )
        return await store.call(store.add_file, _key(request).name, "batch", upload.filename or "upload.jsonl", staged)
    finally:
        await upload.close()
        staged.unlink(missing_ok=True)


@get("/v1/files", guards=[require_key], responses=error_responses(401))
async def list_files(
    request: Request[Any, Any, Any],
    purpose: FromQuery[str | None] = None,
    limit: Annotated[int, QueryParameter(ge=1, le=10_000)] = 10_000,
    after: FromQuery[str | None] = None,
) -> FileList:
    """The key's files, newest first."""
    store = await _store(request)
    files = await store.call(store.list_files, _seen_by(_key(request)), purpose) if store is not None else []
    if after is not None:
        ids = [f.id for f in files]
        files = files[ids.index(after) + 1 :] if after in ids else []
    page = files[:limit]
    return FileList(
        data=page,
        first_id=page[0].id if page else None,
        last_id=page[-1].id if page else None,
        has_more=len(files) > limit,
    )


@get("/v1/files/{file_id:str}", guards=[require_key], responses=error_responses(401, 404))
async def get_file(request: Request[Any, Any, Any], file_id: FromPath[str]) -> FileObject:
    """One file's description."""
    return (await _file(request, file_id))[1]


@get("/v1/files/{file_id:str}/content", guards=[require_key], responses=error_responses(401, 404))
async def file_content(request: Request[Any, Any, Any], file_id: FromPath[str]) -> File:
    """A file's bytes (a batch's output or error lines, or an uploaded input)."""
    store, found = await _file(request, file_id)
    return File(path=store.file_path(found.id), filename=found.filename, media_type="application/octet-stream")


@delete("/v1/files/{file_id:str}", guards=[require_key], status_code=200, responses=error_responses(401, 404))
async def delete_file(request: Request[Any, Any, Any], file_id: FromPath[str]) -> FileDeleted:
    """Delete a file (a job already running keeps reading its input: the file is gone from the list only after)."""
    store, found = await _file(request, file_id)
    await store.call(store.delete_file, found.id)
    return FileDeleted(id=found.id)


def _check_create(data: JSONBody[BatchCreate]) -> None:
    if data.endpoint != ENDPOINT:
        raise GatewayError(
            400,
            f"`endpoint` {data.endpoint!r} is not supported: this server runs batches of {ENDPOINT!r}",
            param="endpoint",
            code="invalid_endpoint",
        )
    if data.completion_window != "24h":
        raise GatewayError(
            400,
            f'`completion_window` must be "24h", got {data.completion_window!r}',
            param="completion_window",
            code="invalid_value",
        )
    metadata = data.metadata or {}
    if len(metadata) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in metadata.items()):
        raise GatewayError(
            400,
            "`metadata` holds at most 16 pairs, keys of 64 characters and values of 512",
            param="metadata",
            code="invalid_value",
        )


@post("/v1/batches", guards=[require_key], status_code=200, responses=error_responses(400, 401, 404))
async def create_batch(request: Request[Any, Any, Any], data: JSONBody[BatchCreate]) -> BatchObject:
    """Start a job over an uploaded file of `/v1/embeddings` requests."""
    _check_create(data)
    gw: Gateway = request.app.state.gateway
    key = _key(request)
    store = await _store(request)
    found = await store.call(store.get_file, data.input_file_id, _seen_by(key)) if store is not None else None
    if store is None or found is None:
        # 404 as for the file's own routes: a file that does not exist and another key's look the same.
        raise GatewayError(404, f"no such file: {data.input_file_id!r}", param="input_file_id", code="file_not_found")
    if found.purpose != "batch":
        raise GatewayError(
            400,
            f'file {found.id!r} has purpose {found.purpose!r}; a batch reads a "batch" file',
            param="input_file_id",
            code="invalid_file",
        )
    total, duplicates = await asyncio.to_thread(scan_lines, store.file_path(found.id), gw.config.batches.max_lines)
    if not total:
        raise GatewayError(
            400,
            f"file {found.id!r} holds no requests: a JSONL file has one request per line",
            param="input_file_id",
            code="empty_file",
        )
    window_s = gw.config.batches.completion_window_s
    batch = await store.call(
        store.create_batch, key.name, found.id, data.endpoint, data.completion_window, data.metadata, total, window_s
    )
    if duplicates:
        # OpenAI's validation: a file that reuses a custom_id fails as a whole, each reuse named with its line.
        await store.call(store.fail, batch.id, duplicates)
        return (await _batch(request, batch.id))[1]
    if gw.poke_batches is not None:
        gw.poke_batches()
    return batch


@get("/v1/batches", guards=[require_key], responses=error_responses(401))
async def list_batches(
    request: Request[Any, Any, Any],
    limit: Annotated[int, QueryParameter(ge=1, le=100)] = 20,
    after: FromQuery[str | None] = None,
) -> BatchList:
    """The key's batches, newest first (`after`: the last id of the previous page)."""
    store = await _store(request)
    if store is None:
        return BatchList(data=[])
    page, more = await store.call(store.list_batches, _seen_by(_key(request)), limit, after)
    return BatchList(
        data=page, first_id=page[0].id if page else None, last_id=page[-1].id if page else None, has_more=more
    )


@get("/v1/batches/{batch_id:str}", guards=[require_key], responses=error_responses(401, 404))
async def get_batch(request: Request[Any, Any, Any], batch_id: FromPath[str]) -> BatchObject:
    """One batch: its status, counts and, once done, its output and error files."""
    return (await _batch(request, batch_id))[1]


@post(
    "/v1/batches/{batch_id:str}/cancel", guards=[require_key], status_code=200, responses=error_responses(400, 401, 404)
)
async def cancel_batch(request: Request[Any, Any, Any], batch_id: FromPath[str]) -> BatchObject:
    """Stop a job after the chunk it is computing; what it computed is in its output file."""
    store, found = await _batch(request, batch_id)
    if found.status in _DONE:
        raise GatewayError(
            400, f"batch {batch_id!r} is already {found.status}: nothing to cancel", param="batch_id", code="batch_done"
        )
    await store.call(store.cancel, found.id)
    gw: Gateway = request.app.state.gateway
    if gw.poke_batches is not None:
        gw.poke_batches()
    return (await _batch(request, batch_id))[1]


def document(app: Litestar) -> None:
    """What the schema cannot learn from the handlers: the upload's multipart body (read as a stream, within
    `max_file_bytes`, not through a signature) and the values POST /v1/batches takes."""
    schema = app.openapi_schema
    upload = schema.paths["/v1/files"].post if schema.paths else None
    if upload is not None:
        form = Schema(
            type=OpenAPIType.OBJECT,
            required=["file", "purpose"],
            additional_properties=False,
            properties={
                "file": Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.BINARY),
                "purpose": Schema(type=OpenAPIType.STRING, enum=["batch"]),
            },
        )
        upload.request_body = RequestBody(required=True, content={"multipart/form-data": OpenAPIMediaType(schema=form)})
    create = (schema.components.schemas or {}).get("BatchCreate")
    if create is not None and create.properties is not None:
        create.additional_properties = False  # unknown fields are refused (forbid_unknown_fields)
        create.properties["endpoint"] = Schema(type=OpenAPIType.STRING, enum=[ENDPOINT])
        create.properties["completion_window"] = Schema(type=OpenAPIType.STRING, enum=["24h"])
        create.properties["metadata"] = Schema(
            one_of=[
                Schema(
                    type=OpenAPIType.OBJECT,
                    max_properties=16,
                    property_names=Schema(type=OpenAPIType.STRING, max_length=64),
                    additional_properties=Schema(type=OpenAPIType.STRING, max_length=512),
                ),
                Schema(type=OpenAPIType.NULL),
            ]
        )


ROUTES = [
    upload_file,
    list_files,
    get_file,
    file_content,
    delete_file,
    create_batch,
    list_batches,
    get_batch,
    cancel_batch,
]
