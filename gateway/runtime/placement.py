"""The default placement: a model's batches run in this process, on its batcher's worker threads."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gateway.plugin import Backend, Placement, hookimpl

#: The placement of a model whose config names none.
DEFAULT = "in-process"


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
