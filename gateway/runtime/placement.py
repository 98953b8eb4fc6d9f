"""Where a model's batches run: a Placement turns the configured Backend class into the Backend the core
serves. The default runs it in this process; a plugin (say gateway_ray) may run it on replicas elsewhere.

A model picks a placement by a table named after it in gateway.toml (`[models.X.ray]`); without one it runs
in-process. The placement's Options Struct validates that table when the config is read.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import msgspec

from gateway.hookspecs import hookimpl
from gateway.plugin import Backend, NoOptions

#: The placement of a model whose config names none.
DEFAULT = "in-process"


class Placement(ABC):
    """One way to run a model's batches; built per model load with that model's validated options."""

    #: The table in `[models.X]` that asks for this placement (`ray` -> `[models.X.ray]`).
    name: ClassVar[str]
    #: Struct that validates that table.
    Options: ClassVar[type[msgspec.Struct]] = NoOptions

    def __init__(self, options: Any) -> None:
        self.options = options

    @abstractmethod
    def place(
        self, backend_cls: type[Backend], *, model: str, path: str, options: Any, trust_remote_code: bool
    ) -> Backend:
        """A Backend for the core to load and serve: the backend itself, or a stand-in that runs it elsewhere
        (its `load` starts the replicas and returns their ModelInfo)."""


class InProcess(Placement):
    """Batches run here, on the batcher's worker threads (the default)."""

    name = DEFAULT

    def place(
        self, backend_cls: type[Backend], *, model: str, path: str, options: Any, trust_remote_code: bool
    ) -> Backend:
        return backend_cls(model=model, path=path, options=options, trust_remote_code=trust_remote_code)


@hookimpl
def register_placements(register: Callable[[type[Placement]], None]) -> None:
    """The in-process placement, registered like any plugin's."""
    register(InProcess)
