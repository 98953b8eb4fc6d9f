"""Padding-free batches for encoder models: several inputs share one row of the batch, each attending only
to itself (a block-diagonal attention mask) with positions restarting at 0 for each input.

Padding a batch of mixed lengths to its longest input wastes most of the compute on short-text traffic
(bench/README.md, "Packing"). Packed rows carry almost no padding, so a batch of whatever arrived runs
about as fast as a sorted one, and the vectors are the same: attention never crosses an input's boundary,
and every other layer works per token.

Written by hand: the runtimes we wrap pack only on GPU (flash-attention's varlen kernels), and
sentence-transformers and onnxruntime's CPU path always pad.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gateway.runtime.hf import POOLING_MODES, Pooling


@dataclass(frozen=True, slots=True)
class PackedBatch:
    """Model inputs for a packed batch, and where each input landed."""

    #: [rows, row_length] token ids, padded with `pad_id` after the last input of a row.
    input_ids: np.ndarray
    #: [rows, row_length] positions, restarting at 0 for each input (0 on padding).
    position_ids: np.ndarray
    #: [rows, row_length] which input of the row a token belongs to: 1, 2, ... and 0 on padding.
    segments: np.ndarray
    #: [inputs, 3] (row, start, length) of each input, in the caller's order.
    spans: np.ndarray


def pack(token_ids: Sequence[Sequence[int]], row_tokens: int, pad_id: int = 0) -> PackedBatch:
    """Pack inputs into rows of at most `max(row_tokens, longest input)` tokens (first fit, longest first).

    Short rows keep attention cheap: each token attends over its whole row (masked), so a row of 64
    tokens costs little beyond the matrix products every token needs anyway.
    """
    n = len(token_ids)
    if n == 0:
        raise ValueError("nothing to pack")
    lengths = [len(ids) for ids in token_ids]
    if min(lengths) == 0:
        raise ValueError("cannot pack an empty input")
    order = sorted(range(n), key=lambda i: -lengths[i])
    capacity = max(row_tokens, lengths[order[0]])
    fill: list[int] = []
    row_of = [0] * n
    start_of = [0] * n
    for i in order:
        size = lengths[i]
        r = next((k for k, used in enumerate(fill) if used + size <= capacity), len(fill))
        if r == len(fill):
            fill.append(0)
        row_of[i], start_of[i] = r, fill[r]
        fill[r] += size
    shape = (len(fill), max(fill))
    input_ids = np.full(shape, pad_id, dtype=np.int64)
    position_ids = np.zeros(shape, dtype=np.int64)
    segments = np.zeros(shape, dtype=np.int64)
    seen = [0] * len(fill)
    for i in range(n):
        r, s, size = row_of[i], start_of[i], lengths[i]
        seen[r] += 1
        input_ids[r, s : s + size] = token_ids[i]
        position_ids[r, s : s + size] = np.arange(size)
        segments[r, s : s + size] = seen[r]
    spans = np.array([row_of, start_of, lengths], dtype=np.int64).T
    return PackedBatch(input_ids, position_ids, segments, spans)


def pool(hidden: np.ndarray, spans: np.ndarray, mode: Pooling, skip: Sequence[int] | None = None) -> np.ndarray:
    """One vector per span of `hidden` [rows, L, dim], float32 [inputs, dim], as sentence-transformers pools;
    `skip[k]` leading tokens of input k are left out (a prompt under `include_prompt: false`)."""
    if mode not in POOLING_MODES:
        raise ValueError(f"pooling mode {mode!r} is not one of {', '.join(POOLING_MODES)}")
    out = np.empty((len(spans), hidden.shape[-1]), dtype=np.float32)
    for k, (r, s, size) in enumerate(spans.tolist()):
        left_out = min(skip[k], size) if skip else 0
        if left_out == size:  # nothing left to pool: sentence-transformers' masked sums give zeros
            out[k] = 0.0
            continue
        tokens = hidden[r, s + left_out : s + size]
        if mode == "mean":
            out[k] = tokens.mean(axis=0)
        elif mode == "cls":
            out[k] = tokens[0]
        elif mode == "max":
            out[k] = tokens.max(axis=0)
        else:
            out[k] = tokens[-1]
    return out
