"""`[models.X.ray]`: the Ray placement's options, validated when the config is read."""

from __future__ import annotations

from typing import Annotated

import msgspec

Positive = Annotated[int, msgspec.Meta(ge=1)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]


class RayOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """`[models.X.ray]`: how many replicas, where, and with what resources."""

    # "local": start a Ray of our own on this machine (shut down with the gateway); "auto" (RAY_ADDRESS, or the
    # Ray started on this machine by `ray start`), "HOST:PORT" (a cluster's GCS) or "ray://HOST:10001" (Ray
    # Client): join a running cluster, whose other applications are left alone.
    address: str = "local"
    # A fixed number of replicas, or autoscaling between min_replicas and max_replicas (not both).
    replicas: Positive | None = None
    min_replicas: Annotated[int, msgspec.Meta(ge=0)] | None = None
    max_replicas: Positive | None = None
    # Autoscaling's target: batches in flight or queued per replica.
    target_ongoing_batches: PositiveFloat = 1.0
    # Per replica (Ray's ray_actor_options).
    num_cpus: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    num_gpus: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    # A batch a replica has not answered by then fails (its requests get a 500 and the log the reason).
    batch_timeout_s: PositiveFloat = 120.0
    # How long to wait for a cluster's address to answer, and for every replica to run (placed, model loaded),
    # before the model is marked failed with Ray Serve's reason.
    connect_timeout_s: PositiveFloat = 30.0
    start_timeout_s: PositiveFloat = 600.0

    def __post_init__(self) -> None:
        autoscaling = self.min_replicas is not None or self.max_replicas is not None
        if self.replicas is not None and autoscaling:
            raise ValueError("set `replicas`, or `min_replicas` and `max_replicas` for autoscaling, not both")
        if autoscaling and self.max_replicas is None:
            raise ValueError("`min_replicas` needs `max_replicas`")
        if self.min_replicas is not None and self.max_replicas is not None and self.min_replicas > self.max_replicas:
            raise ValueError(f"`min_replicas` {self.min_replicas} is above `max_replicas` {self.max_replicas}")

    @property
    def most(self) -> int:
        """The most replicas this model may have (the batches the front keeps in flight)."""
        return self.max_replicas or self.replicas or 1
