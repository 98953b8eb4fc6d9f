"""Hook specifications: the whole plugin interface of the gateway."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from gateway.plugin import Backend, Converter
    from gateway.runtime.placement import Placement

PROJECT = "embedding_gateway"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_backends(register: Callable[[type[Backend]], None]) -> None:
    """Register Backend classes; each is keyed by its `name` (the `backend =` value in gateway.toml)."""


@hookspec
def register_converters(register: Callable[[Converter], None]) -> None:
    """Register Converter instances for `gateway convert --to NAME`."""


@hookspec
def register_placements(register: Callable[[type[Placement]], None]) -> None:
    """Register Placement classes (where a model's batches run); each is keyed by its `name`, the table in
    `[models.X]` that asks for it."""
