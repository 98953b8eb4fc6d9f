"""The process's one connection to Ray: opened by the first model placed on Ray, closed with the last.

A Ray started here ("local") lives on a thread of its own: Ray ties the processes it starts to the thread that
called `ray.init` (they die with it), and the gateway loads models on threads that end. That thread also shuts
Ray down, so nothing Ray started outlives the gateway.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from concurrent.futures import Future
from typing import Any

from gateway import BackendError

log = logging.getLogger("gateway.ray")

# Ray Serve's client calls are not safe side by side: building a deployment's config registers and unregisters
# a module for pickling by value, process-wide, and a status call beside it failed with "not registered". Every
# serve.* call of this plugin (not the handles' calls) holds this lock.
SERVE_LOCK = threading.Lock()

EXTRA_HINT = "install the `ray` extra: pip install 'embedding-gateway[ray]'"


def import_ray() -> tuple[Any, Any]:
    """`ray` and `ray.serve`; BackendError naming the extra when they are not installed."""
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise BackendError(
            f"this model asks for Ray ([models.X.ray]) but ray cannot be imported ({exc}); {EXTRA_HINT}"
        ) from None
    return ray, serve


def _endpoint(address: str) -> tuple[str, int] | None:
    """The host and port a cluster address names (None for "auto" with no RAY_ADDRESS)."""
    if address == "auto":
        address = os.environ.get("RAY_ADDRESS", "")
        if not address or address == "auto":
            return None
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise BackendError(f"Ray address {address!r} is not HOST:PORT, ray://HOST:PORT, auto or local")
    return host, int(port)


class RaySession:
    """Reference-counted: `acquire` per model using Ray, `release` when it closes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self.address: str | None = None
        # True when this process started Ray (it then shuts Ray down); False when Ray was joined or was
        # already connected by the application embedding the gateway.
        self._owned = False
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def acquire(self, address: str, connect_timeout_s: float) -> None:
        """Connect (or start) Ray for one more model; BackendError with the reason when it cannot."""
        ray, serve = import_ray()
        with self._lock:
            if self._users and address != self.address:
                raise BackendError(
                    f"this gateway is connected to Ray at {self.address!r}; a gateway joins one Ray cluster, "
                    f"and this model asks for {address!r}"
                )
            if not self._users:
                self._connect(ray, address, connect_timeout_s)
                try:
                    # Batches reach replicas through handles: no Serve HTTP proxy is started.
                    with SERVE_LOCK:
                        serve.start(proxy_location="Disabled", logging_config={"log_level": "WARNING"})
                except Exception as exc:
                    self._disconnect()
                    raise BackendError(f"cannot start Ray Serve at {address!r}: {exc}") from exc
                self.address = address
            self._users += 1

    def release(self) -> None:
        """One model less; the last one disconnects (and shuts down a Ray this process started)."""
        with self._lock:
            self._users -= 1
            if self._users == 0:
                self._disconnect()
                self.address = None

    def _connect(self, ray: Any, address: str, timeout: float) -> None:
        if ray.is_initialized():
            # The embedding application (or a test harness) connected Ray itself: use it, leave it running.
            log.info("using the Ray this process is already connected to")
            self._owned = False
            return
        kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
        if address == "local":
            # Ray starts its workers at niceness 15; replicas are the model's compute and must not yield to
            # everything else on the machine (the gateway's own front included).
            kwargs.update(include_dashboard=False, _system_config={"worker_niceness": 0})
        else:
            endpoint = _endpoint(address)
            if endpoint is not None:
                # ray.init retries an unreachable address for minutes; a plain connect says at once.
                try:
                    socket.create_connection(endpoint, timeout=min(timeout, 10.0)).close()
                except OSError as exc:
                    raise BackendError(f"cannot reach Ray at {address!r}: {exc.strerror or exc}") from None
            kwargs["address"] = address
        started: Future[None] = Future()
        self._stop.clear()
        thread = threading.Thread(target=self._run, args=(ray, kwargs, started), name="ray-session", daemon=True)
        thread.start()
        try:
            started.result(timeout=timeout if address != "local" else None)
        except TimeoutError:
            self._stop.set()  # the thread shuts Ray down if it connects after all
            raise BackendError(f"Ray at {address!r} did not answer within {timeout:g}s") from None
        except Exception as exc:
            what = "cannot start a local Ray" if address == "local" else f"cannot connect to Ray at {address!r}"
            raise BackendError(f"{what}: {type(exc).__name__}: {exc}") from exc
        self._thread, self._owned = thread, True

    def _run(self, ray: Any, kwargs: dict[str, Any], started: Future[None]) -> None:
        try:
            ray.init(**kwargs)
        except BaseException as exc:
            started.set_exception(exc)
            return
        started.set_result(None)
        self._stop.wait()
        # A Ray started here ends with all its processes, replicas included; a joined one is only disconnected.
        ray.shutdown()

    def _disconnect(self) -> None:
        if not self._owned or self._thread is None:
            return
        self._stop.set()
        self._thread.join(60)
        if self._thread.is_alive():
            log.error("Ray did not shut down within 60s")
        self._thread, self._owned = None, False


#: This process's session (Ray allows one connection per process).
SESSION = RaySession()
