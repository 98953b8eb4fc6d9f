"""What a request's texts become before the model sees them: a prompt in front, and token ids cut to fit.

Both work on what every backend already gives (its text input and its `tokenize`), so the same model on
any backend gets the same prompt and is cut at the same token.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from gateway.base.errors import GatewayError

# Cohere/Voyage `input_type` values -> prompt names to look for, in order. A model with none of them gets no
# prompt: it is then a symmetric model, for which the input type changes nothing.
INPUT_TYPES: dict[str, tuple[str, ...]] = {
    "query": ("query", "search_query"),
    "search_query": ("search_query", "query"),
    "document": ("document", "passage", "search_document", "corpus"),
    "search_document": ("search_document", "document", "passage", "corpus"),
    "passage": ("passage", "document", "search_document", "corpus"),
    "classification": ("classification",),
    "clustering": ("clustering",),
}

Side = Literal["end", "start"]


def choose_prompt(
    model: str,
    prompts: Mapping[str, str],
    default: str | None,
    prompt_name: str | None,
    input_type: str | None,
) -> str | None:
    """The name of the prompt to apply (None: no prompt); 400 for an unknown name or both fields given."""
    if prompt_name is not None and input_type is not None:
        raise GatewayError(
            400,
            "give `prompt_name` or `input_type`, not both",
            param="prompt_name",
            code="invalid_value",
        )
    if prompt_name is not None:
        if prompt_name not in prompts:
            known = ", ".join(repr(n) for n in sorted(prompts)) or "none"
            raise GatewayError(
                400,
                f"`prompt_name` {prompt_name!r} is not a prompt of model {model!r}; its prompts: {known}",
                param="prompt_name",
                code="invalid_prompt_name",
            )
        return prompt_name
    if input_type is not None:
        return next((name for name in INPUT_TYPES[input_type] if name in prompts), None)
    return default


def truncation(value: bool | str | None, default: bool | str) -> Side | None:
    """The side to cut from ("end" keeps the start), or None to refuse over-long inputs."""
    chosen = default if value is None else value
    if chosen is True or chosen == "end":
        return "end"
    if chosen == "start":
        return "start"
    return None


@dataclass(frozen=True, slots=True)
class Frame:
    """How a backend's ids frame a text: special tokens added before (`head`) and after (`tail`) it."""

    head: int
    tail: int

    @classmethod
    def of(cls, tokenize: Callable[[Sequence[str]], list[list[int]]]) -> Frame:
        """Found from two texts with different first and last tokens: what they share at either end is the
        framing (a tokenizer that merges a leading space into its first token still agrees)."""
        a, b = tokenize(["I saw it", "Elephants crossing roads"])
        head = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        tail = next((i for i, (x, y) in enumerate(zip(a[::-1], b[::-1], strict=False)) if x != y), 0)
        return cls(head=head, tail=min(tail, len(a) - head))


# Texts a prompt is tokenized in front of, to see its tokens as they are inside an input: their first
# characters differ (so do their first tokens, in any tokenizer).
_PROBES = ("I saw it", "Elephants crossing roads", "42 is a number", "(x) marks it")


def prompt_length(tokenize: Callable[[Sequence[str]], list[list[int]]], prompt: str, frame: Frame) -> int:
    """The tokens `prompt` takes in front of a text, as the tokenizer sees it there: the ids that open every
    `prompt + probe` after the framing head. Not the prompt tokenized alone: a SentencePiece tokenizer makes
    a trailing space a token of its own at the end of a text (`"query: "` is 3 ids alone) that inside one
    becomes part of the next word (2 ids before it)."""
    if not prompt:
        return 0
    ids = tokenize([prompt + probe for probe in _PROBES])
    shared = min(len(one) for one in ids)
    for i in range(shared):
        if any(one[i] != ids[0][i] for one in ids[1:]):
            shared = i
            break
    return max(0, shared - frame.head)


def cut(ids: Sequence[int], limit: int, side: Side, frame: Frame, keep: int = 0) -> list[int]:
    """`ids` cut to `limit` tokens on `side`, keeping the framing special tokens and, when cutting the start,
    the first `keep` tokens of the text (its prompt). The caller checks `limit` leaves room for them."""
    if len(ids) <= limit:
        return list(ids)
    tail = list(ids[len(ids) - frame.tail :]) if frame.tail else []
    if side == "end":
        return [*ids[: limit - frame.tail], *tail]
    front = frame.head + keep
    body_end = len(ids) - frame.tail
    room = limit - front - frame.tail
    return [*ids[:front], *ids[body_end - room : body_end], *tail]


def check_text(where: str, text: str, max_chars: int) -> None:
    """400 naming `where` (the field, as the client sent it) for an empty input or one over `max_chars`."""
    if not text:
        raise GatewayError(400, f"`{where}` is an empty string", param=where, code="empty_input")
    if len(text) > max_chars:
        raise GatewayError(
            400,
            f"`{where}` has {len(text)} characters; the limit is {max_chars} characters per input",
            param=where,
            code="input_too_long",
        )
