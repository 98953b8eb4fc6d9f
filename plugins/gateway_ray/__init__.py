"""Ray Serve placement: a model's batches run on Ray Serve replicas, on this machine or a Ray cluster.

`[models.X.ray]` in gateway.toml asks for it. Any backend works unchanged: each replica builds the same Backend
class, found by its registered name, with the same path and options. Ray is imported only when such a model
loads, so a gateway without the `ray` extra starts normally and names the extra only for that model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gateway import Backend, hookimpl
from gateway.plugin import Placement

from .options import RayOptions


class RayPlacement(Placement):
    """Batches run on Ray Serve replicas; tokens are counted here, in front."""

    name = "ray"
    Options = RayOptions

    def place(
        self, backend_cls: type[Backend], *, model: str, path: str, options: Any, trust_remote_code: bool
    ) -> Backend:
        from .front import RayBackend

        return RayBackend(
            backend_cls, model=model, path=path, options=options, trust_remote_code=trust_remote_code, ray=self.options
        )


@hookimpl
def register_placements(register: Callable[[type[Placement]], None]) -> None:
    """The Ray Serve placement (`[models.X.ray]`)."""
    register(RayPlacement)
