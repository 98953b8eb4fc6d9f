"""`gateway check` and `GET /admin/check`: do two models that should give the same vectors still agree?

Each checked model and its reference (the first model configured in the same `embedding_space`, or the one
named) embed the bundled texts (gateway/data/adversarial.txt, many scripts) as raw model output: no prompt, no
cache, so a swapped model file is what is measured. The result: whether their token ids are equal, the min
and mean cosine between their vectors, and each one's Spearman on the bundled scored pairs
(gateway/data/sts_pairs.tsv). The thresholds are docs/operations.md's.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

import msgspec
import numpy as np

from gateway.base.errors import GatewayError
from gateway.embedding.state import Gateway
from gateway.runtime.hf import adversarial_texts
from gateway.runtime.registry import ServedModel

# Min cosine to the reference: full precision (fp32, f16) against an 8-bit copy (int8, uint8, q8_0).
MIN_COSINE = 0.99
MIN_COSINE_8BIT = 0.95
# How far a model's Spearman on the pairs may fall below its reference's.
MAX_SPEARMAN_DROP = 0.02
MAX_SPEARMAN_DROP_8BIT = 0.05
# A model's name or path that names an 8-bit type: `gateway convert` writes such names (minilm-q8_0.gguf,
# minilm-onnx-int8).
_EIGHT_BIT = re.compile(r"int8|uint8|q8|qint|quant", re.IGNORECASE)


class CheckRow(msgspec.Struct, kw_only=True):
    """One model against its reference."""

    model: str
    reference: str | None
    texts: int = 0
    tokens_equal: bool | None = None
    min_cosine: float | None = None
    mean_cosine: float | None = None
    spearman: float | None = None
    reference_spearman: float | None = None
    min_cosine_required: float | None = None
    passed: bool = True
    problems: list[str] = []


class CheckArgs(msgspec.Struct, frozen=True):
    """A front's `/admin/check` for the runtime process: which models, against which reference."""

    models: list[str] | None = None
    against: str | None = None


class CheckReport(msgspec.Struct, kw_only=True):
    """Every checked model; `passed` when each row did."""

    passed: bool
    rows: list[CheckRow]


@cache
def sts_pairs() -> tuple[tuple[float, str, str], ...]:
    """gateway/data/sts_pairs.tsv: (score, sentence 1, sentence 2)."""
    raw = resources.files("gateway").joinpath("data/sts_pairs.tsv").read_text(encoding="utf-8")
    rows = [line.split("\t") for line in raw.splitlines() if line.strip() and not line.startswith("#")]
    return tuple((float(score), a, b) for score, a, b in rows)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    return float(np.corrcoef(_ranks(x), _ranks(y))[0, 1])


def _ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values), dtype=float)
    for value in np.unique(values):
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def is_eight_bit(model: ServedModel) -> bool:
    """True for a model held to the 8-bit floor (its name or path names an 8-bit type)."""
    return bool(_EIGHT_BIT.search(model.name) or _EIGHT_BIT.search(model.spec.config.path or ""))


def plan(gw: Gateway, names: list[str] | None, against: str | None) -> list[tuple[ServedModel, ServedModel | None]]:
    """Each model to check with its reference: 404 for a name not configured."""
    registry = gw.registry
    models = [_embedding(registry.resolve(n)) for n in names] if names else list(registry.models.values())
    models = [m for m in models if m.spec.task == "embed"]
    reference = _embedding(registry.resolve(against)) if against else None
    out: list[tuple[ServedModel, ServedModel | None]] = []
    for model in models:
        ref = reference if reference is not None else _space_reference(gw, model)
        out.append((model, ref if ref is not model else None))
    return out


def _embedding(model: ServedModel) -> ServedModel:
    if model.spec.task != "embed":
        raise GatewayError(400, f"model {model.name!r} is a {model.spec.task} model, not an embedding model")
    return model


def _space_reference(gw: Gateway, model: ServedModel) -> ServedModel | None:
    space = model.spec.config.embedding_space
    if space is None:
        return None
    return next(m for m in gw.registry.models.values() if m.spec.config.embedding_space == space)


async def run(gw: Gateway, names: list[str] | None = None, against: str | None = None) -> CheckReport:
    """The check of `names` (default: every embedding model) against their references."""
    pairs = plan(gw, names, against)
    timeout = gw.config.server.request_timeout_s
    for model in {id(m): m for pair in pairs for m in pair if m is not None}.values():
        await model.ready(timeout)
    rows = [await _row(model, ref) for model, ref in pairs]
    return CheckReport(passed=all(r.passed for r in rows), rows=rows)


async def _row(model: ServedModel, ref: ServedModel | None) -> CheckRow:
    row = CheckRow(model=model.name, reference=ref.name if ref else None)
    row.spearman = await _pairs_spearman(model)
    if ref is None:
        return row
    row.reference_spearman = await _pairs_spearman(ref)
    eight_bit = is_eight_bit(model) or is_eight_bit(ref)
    row.min_cosine_required = MIN_COSINE_8BIT if eight_bit else MIN_COSINE
    limit = min(model.max_input_tokens, ref.max_input_tokens)
    ids = await model.tokenize(list(adversarial_texts()))
    keep = [i for i, t in enumerate(ids) if len(t) <= limit]
    texts = [adversarial_texts()[i] for i in keep]
    ref_ids = await ref.tokenize(texts)
    row.texts = len(texts)
    row.tokens_equal = [ids[i] for i in keep] == ref_ids
    cosines = _cosines(await model.embed(texts, [ids[i] for i in keep]), await ref.embed(texts, ref_ids))
    row.min_cosine, row.mean_cosine = float(cosines.min()), float(cosines.mean())
    if not row.tokens_equal:
        row.problems.append("token ids differ from the reference's")
    if row.min_cosine < row.min_cosine_required:
        row.problems.append(f"min cosine {row.min_cosine:.4f} < {row.min_cosine_required}")
    drop = MAX_SPEARMAN_DROP_8BIT if eight_bit else MAX_SPEARMAN_DROP
    if row.spearman < row.reference_spearman - drop:
        row.problems.append(f"Spearman {row.spearman:.4f} more than {drop} below the reference's")
    row.passed = not row.problems
    return row


async def _pairs_spearman(model: ServedModel) -> float:
    scores, first, second = zip(*sts_pairs(), strict=True)
    texts = [*first, *second]
    ids = await model.tokenize(texts)
    if any(len(t) > model.max_input_tokens for t in ids):
        raise GatewayError(400, f"model {model.name!r} cannot take the bundled pairs", code="check_failed")
    vectors = await model.embed(texts, ids)
    n = len(scores)
    return spearman(_cosines(vectors[:n], vectors[n:]), np.array(scores))


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.sum(a * b, axis=1)  # type: ignore[no-any-return]


def table(report: CheckReport) -> str:
    """The report as the table `gateway check` prints."""
    head = ("model", "reference", "texts", "tokens equal", "min cos", "mean cos", "Spearman", "ref Spearman", "result")
    lines = [head]
    references = {r.reference for r in report.rows}
    for r in report.rows:
        alone = "reference" if r.model in references else "no reference"
        lines.append(
            (
                r.model,
                r.reference or "-",
                str(r.texts) if r.reference else "-",
                "-" if r.tokens_equal is None else ("yes" if r.tokens_equal else "no"),
                _num(r.min_cosine, 5),
                _num(r.mean_cosine, 5),
                _num(r.spearman, 4),
                _num(r.reference_spearman, 4),
                ("ok" if r.reference else alone) if r.passed else "FAIL: " + "; ".join(r.problems),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines)


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
