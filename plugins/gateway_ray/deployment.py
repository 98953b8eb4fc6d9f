"""One model's Ray Serve application: deployed with its scaling, waited for until every replica runs, and what
Ray Serve says when they do not; a module of its own because it holds every serve.* call a model's load makes."""

from __future__ import annotations

import logging
import re
import secrets
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gateway import BackendError

from .replica import Replica
from .session import SERVE_LOCK

if TYPE_CHECKING:
    from .options import RayOptions

log = logging.getLogger("gateway.ray")


def app_name(model: str) -> str:
    """A new application name for `model`."""
    # Unique: a reload starts the new version beside the old one, and several gateways may share a cluster.
    return f"gateway-{re.sub(r'[^A-Za-z0-9_-]', '_', model)}-{secrets.token_hex(3)}"


def scaling(opts: RayOptions) -> dict[str, Any]:
    """The deployment's replica count: fixed, or Ray Serve's autoscaling between the options' bounds."""
    if opts.max_replicas is not None:
        return {
            "autoscaling_config": {
                "min_replicas": opts.min_replicas if opts.min_replicas is not None else 1,
                "max_replicas": opts.max_replicas,
                "target_ongoing_requests": opts.target_ongoing_batches,
            }
        }
    return {"num_replicas": opts.replicas or 1}


def start(serve: Any, app: str, opts: RayOptions, replica_args: tuple[Any, ...]) -> Any:
    """Deploy the replicas, each built from `replica_args` (not waiting for them); the application's handle,
    or BackendError with Ray Serve's reason."""
    try:
        return _retry_pickle_race(lambda: _deploy_app(serve, app, opts, scaling(opts), replica_args))
    except Exception as exc:
        raise BackendError(f"Ray Serve could not start the replicas: {_first_line(exc)}") from exc


def _deploy_app(serve: Any, app: str, opts: RayOptions, scale: dict[str, Any], replica_args: tuple[Any, ...]) -> Any:
    with SERVE_LOCK:
        deployment = serve.deployment(
            Replica,
            name="replica",
            # One batch at a time per replica: Serve's router then spreads batches over idle replicas.
            max_ongoing_requests=1,
            ray_actor_options={"num_cpus": opts.num_cpus, "num_gpus": opts.num_gpus},
            **scale,
        )
        bound = deployment.bind(*replica_args)
        # Not serve.run: it waits for the replicas forever (a cluster that cannot place them), from a
        # call that cannot be stopped; the wait is ours, bounded, and ends when the model is closed.
        (handle,) = serve.run_many(
            [serve.RunTarget(bound, name=app, route_prefix=None)],
            wait_for_ingress_deployment_creation=False,
            wait_for_applications_running=False,
        )
    return handle


def wait_running(serve: Any, app: str, timeout: float, stop: threading.Event) -> None:
    """Until every replica runs (BackendError with Ray Serve's reason if the deployment fails or `timeout`
    passes first, or if `stop` is set meanwhile: the model was closed)."""
    deadline = time.monotonic() + timeout
    while True:
        with SERVE_LOCK:
            found = serve.status().applications.get(app)
        status = found.status if found is not None else None
        if status == "RUNNING":
            return
        if status == "DEPLOY_FAILED":
            raise BackendError(f"Ray Serve could not start the replicas: {_deploy_message(serve, app)}")
        if time.monotonic() > deadline:
            raise BackendError(f"the replicas were not running after {timeout:g}s: {_deploy_message(serve, app)}")
        if stop.wait(0.2):
            raise BackendError("closed while its replicas were starting")


def _deploy_message(serve: Any, app: str) -> str:
    """What Ray Serve says about this model's deployment (say, the resources it waits for)."""
    try:
        with SERVE_LOCK:
            found = serve.status().applications.get(app)
        message = found.deployments["replica"].message if found is not None else ""
    except Exception as exc:
        message = f"status unavailable ({exc})"
    return message or "Ray Serve gave no reason"


def _retry_pickle_race(start: Callable[[], Any], attempts: int = 3) -> Any:
    """`start()`, again when Ray Serve's own threads raced it: its router threads build deployment configs too,
    each registering and unregistering a module for pickling by value, process-wide (not under SERVE_LOCK)."""
    for attempt in range(attempts):
        try:
            return start()
        except ValueError as exc:
            if "pickle by value" not in str(exc) or attempt == attempts - 1:
                raise
            log.warning("Ray Serve raced itself building a deployment (%s); once more", exc)
    raise AssertionError("unreachable")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def through_ray_client() -> bool:
    """Whether this process reaches its cluster through Ray Client (a `ray://` address)."""
    from ray.util.client import ray as client

    return bool(client.is_connected())
