"""JSON request bodies into wire Structs, and every failure explained in the gateway's own words.

The happy path is one typed msgspec decode. Only when it fails is the body looked at again, to say what is
wrong: syntax errors are located with the standard library's parser and the bytes themselves, and a body
that does not fit its Struct is checked against the Struct's type tree (`msgspec.inspect`). No message
comes from a library's error text, so the answers stay the same whichever msgspec is installed (0.23
reworded invalid UTF-8, for one).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any, TypeVar

import msgspec
from msgspec import inspect as mi

from gateway.base.errors import GatewayError

T = TypeVar("T", bound=msgspec.Struct)


class BodyDecoder:
    """Decodes request bodies into `type_`; raises GatewayError (400) with a message of our own."""

    def __init__(self, type_: type[T]) -> None:
        self.type = type_
        # Strict: each field takes the JSON type /schema states, nothing else ("256" for a number, 0 for a
        # boolean and 8.0 for an integer are refused), so the schema tells clients exactly what is accepted.
        self._decoder = msgspec.json.Decoder(type_)
        self._info = mi.type_info(type_)

    def decode(self, body: bytes) -> Any:
        """The Struct for `body`, or GatewayError naming what is wrong and where."""
        try:
            return self._decoder.decode(body)
        except (msgspec.DecodeError, UnicodeDecodeError):  # ValidationError is a DecodeError too
            raise self.explain(body) from None

    def explain(self, body: bytes) -> GatewayError:
        """Why `body` does not decode (called only after the typed decode failed)."""
        problem = syntax_problem(body)
        if problem is not None:
            return problem
        value = json.loads(body)
        found = next(_mismatches(value, self._info, ()), None)
        if found is None:  # msgspec refused something these checks accept: say so without guessing where
            return GatewayError(400, "invalid request: the body does not fit the request schema", code="invalid_value")
        return _invalid(*found)


def syntax_problem(body: bytes) -> GatewayError | None:
    """The error for a body that is not JSON at all (empty, not UTF-8, broken syntax), else None."""
    if not body.strip():
        return GatewayError(400, "request body is empty: expected a JSON object", code="invalid_json")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return GatewayError(400, f"request body is not valid UTF-8: {exc.reason}", code="invalid_json")
    start = len(text) - len(text.lstrip())
    try:
        value, end = _JSON.raw_decode(text, start)
    except json.JSONDecodeError as exc:
        if exc.pos >= len(text.rstrip()):
            return _not_json("it ends early")
        return _not_json(f"unexpected character at {_where(text, exc.pos)}")
    except ValueError:  # NaN or Infinity: JavaScript, not JSON
        return _not_json("NaN and Infinity are not JSON numbers")
    except RecursionError:
        return _not_json("it is nested too deeply")
    rest = text[end:]
    if rest.strip():
        extra = end + len(rest) - len(rest.lstrip())
        return _not_json(f"trailing characters after the JSON value at {_where(text, extra)}")
    if any(_has_lone_surrogate(s) for s in _strings(value)):
        # The standard parser keeps "\ud800" as a lone surrogate; no UTF-8 text can hold one.
        return _not_json("it holds an unpaired UTF-16 surrogate escape")
    return None


def _where(text: str, pos: int) -> str:
    line = text.count("\n", 0, pos) + 1
    return f"line {line}, column {pos - text.rfind(chr(10), 0, pos)}"


def _not_json(why: str) -> GatewayError:
    return GatewayError(400, f"request body is not valid JSON: {why}", code="invalid_json")


def _refuse_constant(name: str) -> Any:
    raise ValueError(name)


_JSON = json.JSONDecoder(parse_constant=_refuse_constant)


def _strings(value: Any) -> Iterator[str]:
    # Keys too: a surrogate in a key is just as undecodable.
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _strings(item)


def _has_lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


# -- fitting a decoded value to a Struct's type tree ---------------------------------------------------------

Path = tuple[str | int, ...]


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        # msgspec reads an integer beyond 64 bits as a float, and names it so.
        return "int" if -(2**63) <= value < 2**64 else "float"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, list):
        return "array"
    return "object"


def _name(t: mi.Type) -> str:
    if isinstance(t, mi.Metadata):
        return _name(t.type)
    if isinstance(t, mi.LiteralType):
        return _json_type(t.values[0])
    return {
        mi.StrType: "str",
        mi.IntType: "int",
        mi.FloatType: "float",
        mi.BoolType: "bool",
        mi.NoneType: "null",
        mi.ListType: "array",
        mi.DictType: "object",
        mi.StructType: "object",
    }.get(type(t), "any")


def _accepts(t: mi.Type, value: Any) -> bool:
    """Whether `value`'s JSON type is one `t` takes (constraints aside), as strict msgspec reads it."""
    kind = _json_type(value)
    if isinstance(t, mi.FloatType):
        return kind in ("int", "float")
    return kind == _name(t) or isinstance(t, mi.AnyType)


# A mismatch: where, and what is wrong there (a message in msgspec's long-standing wording, which clients
# of this API have always seen).
Mismatch = tuple[Path, str]


def _mismatches(value: Any, t: mi.Type, path: Path) -> Iterator[Mismatch]:
    if isinstance(t, mi.Metadata):
        yield from _mismatches(value, t.type, path)
        return
    if isinstance(t, mi.UnionType):
        fitting = [u for u in t.types if _accepts(u, value)]
        if not fitting:
            names = sorted(dict.fromkeys(_name(u) for u in t.types), key=lambda n: n == "null")
            yield path, f"Expected `{' | '.join(names)}`, got `{_json_type(value)}`"
            return
        yield from _mismatches(value, fitting[0], path)
        return
    if not _accepts(t, value):
        yield path, f"Expected `{_name(t)}`, got `{_json_type(value)}`"
        return
    if isinstance(t, mi.StructType):
        yield from _struct_mismatches(value, t, path)
    elif isinstance(t, mi.ListType):
        yield from _length(value, t, "array", path)
        for i, item in enumerate(value):
            yield from _mismatches(item, t.item_type, (*path, i))
    elif isinstance(t, mi.StrType):
        yield from _length(value, t, "str", path)
    elif isinstance(t, mi.IntType | mi.FloatType):
        yield from _bounds(float(value) if isinstance(value, str) else value, t, _name(t), path)
    elif isinstance(t, mi.LiteralType) and value not in t.values:
        yield path, f"Invalid enum value {value!r}"


def _struct_mismatches(value: dict[str, Any], t: mi.StructType, path: Path) -> Iterator[Mismatch]:
    fields = {f.encode_name: f for f in t.fields}
    for key, item in value.items():
        field = fields.get(key)
        if field is None:
            if t.forbid_unknown_fields:
                yield path, f"Object contains unknown field `{key}`"
            continue
        yield from _mismatches(item, field.type, (*path, key))
    for field in t.fields:
        if field.required and field.encode_name not in value:
            yield path, f"Object missing required field `{field.encode_name}`"


def _length(value: Any, t: Any, name: str, path: Path) -> Iterator[Mismatch]:
    if t.min_length is not None and len(value) < t.min_length:
        yield path, f"Expected `{name}` of length >= {t.min_length}"
    if t.max_length is not None and len(value) > t.max_length:
        yield path, f"Expected `{name}` of length <= {t.max_length}"


def _bounds(value: float, t: Any, name: str, path: Path) -> Iterator[Mismatch]:
    for bound, op, ok in (
        (t.ge, ">=", lambda v, b: v >= b),
        (t.gt, ">", lambda v, b: v > b),
        (t.le, "<=", lambda v, b: v <= b),
        (t.lt, "<", lambda v, b: v < b),
    ):
        if bound is not None and not ok(value, bound):
            yield path, f"Expected `{name}` {op} {bound}"


# -- the client's view ---------------------------------------------------------------------------------------

# Constraint messages, said the way a client reads them.
_PLAIN = {
    "Expected `str` of length >= 1": "`{param}` is an empty string",
    "Expected `array` of length >= 1": "`{param}` must not be an empty list",
    "Expected `int` >= 1": "`{param}` must be a positive integer",
}


def _param(path: Path) -> str | None:
    if not path:
        return None
    out = str(path[0])
    for part in path[1:]:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _invalid(path: Path, message: str) -> GatewayError:
    if not path and message.startswith("Expected `object`"):
        message = f"invalid request: request body must be a JSON object: {message}"
        return GatewayError(400, message, code="invalid_value")
    field = _FIELD.search(message) if not path else None
    param = field.group(1) if field else _param(path)
    if param and param.startswith("input[") and message in ("Expected `str`, got `array`", "Expected `str`, got `int`"):
        return GatewayError(
            400,
            f"`{param}` is not a string: `input` must be a string or a list of strings; token-id arrays are not "
            "accepted (LangChain's OpenAIEmbeddings sends them unless check_embedding_ctx_length=False)",
            param=param,
            code="invalid_value",
        )
    plain = _PLAIN.get(message)
    if param and plain:
        return GatewayError(400, plain.format(param=param), param=param, code="invalid_value")
    if param and f"`{param}`" not in message:
        message = f"{message} - at `{param}`"
    return GatewayError(400, f"invalid request: {message}", param=param, code="invalid_value")


_FIELD = re.compile(r"field `([^`]+)`")
