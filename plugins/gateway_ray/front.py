"""The gateway's stand-in for a model on Ray Serve: starts its replicas, counts tokens here, sends each batch
whole to a replica, and retries a batch once when its replica was lost."""

from __future__ import annotations

import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import msgspec
import numpy as np

from gateway import Backend, BackendError, ModelInfo
from gateway.plugin import BackendTimeout, BackendUnavailable, Embedded

from .replica import Replica
from .session import SERVE_LOCK, SESSION, import_ray

if TYPE_CHECKING:
    from .options import RayOptions

log = logging.getLogger("gateway.ray")

# Texts the front's tokenizer must count exactly as a replica's before it is trusted (cases, accents, CJK,
# emoji, extra spaces: where tokenizer settings differ).
_PROBES = (
    "Hello World",
    "The QUICK brown fox, naïve café — Straße 12,50 €.",
    "東京は日本の首都です。",
    "emoji 🙂🚀 ∑∫√  spaced  out ",
)
# How often the replica counts for /ready and /metrics are refreshed.
_STATUS_EVERY_S = 1.0


class RayBackend(Backend):
    """Serves `backend_cls` from Ray Serve replicas (one batch at a time each)."""

    name: ClassVar[str] = "ray"

    def __init__(
        self,
        backend_cls: type[Backend],
        *,
        model: str,
        path: str,
        options: Any,
        trust_remote_code: bool,
        ray: RayOptions,
    ) -> None:
        super().__init__(model=model, path=path, options=options, trust_remote_code=trust_remote_code)
        self._cls = backend_cls
        self._ray = ray
        # The same backend, for its tokenizer only (load_tokenizer loads no weights).
        self._front = backend_cls(model=model, path=path, options=options, trust_remote_code=trust_remote_code)
        self._local_tokenizer = False
        self._handle: Any = None
        self._app: str | None = None
        self._joined = False
        self._status = (0, ray.replicas or ray.min_replicas or 0)
        self._stop = threading.Event()
        self._polled = False
        self._lost: tuple[type[BaseException], ...] = ()
        self._failed: type[BaseException] = Exception

    # -- lifecycle -------------------------------------------------------------------------------------------

    def load(self) -> ModelInfo:
        """Start the replicas (Ray first, if this is the first model on it) and return their ModelInfo."""
        opts = self._ray
        SESSION.acquire(opts.address, opts.connect_timeout_s)
        self._joined = True
        try:
            return self._deploy()
        except BaseException:
            self.close()
            raise

    def _deploy(self) -> ModelInfo:
        ray, serve = import_ray()
        from ray.serve.exceptions import ReplicaUnavailableError

        # What a lost replica (its process killed, its node gone) raises on the call it was running.
        self._lost = (
            ray.exceptions.RayActorError,
            ray.exceptions.WorkerCrashedError,
            ray.exceptions.NodeDiedError,
            ReplicaUnavailableError,
        )
        self._failed = ray.exceptions.RayTaskError
        opts = self._ray
        scaling: dict[str, Any]
        if opts.max_replicas is not None:
            scaling = {
                "autoscaling_config": {
                    "min_replicas": opts.min_replicas if opts.min_replicas is not None else 1,
                    "max_replicas": opts.max_replicas,
                    "target_ongoing_requests": opts.target_ongoing_batches,
                }
            }
        else:
            scaling = {"num_replicas": opts.replicas or 1}
        # Unique: a reload starts the new version beside the old one, and several gateways may share a cluster.
        self._app = f"gateway-{re.sub(r'[^A-Za-z0-9_-]', '_', self.model)}-{secrets.token_hex(3)}"
        started = time.perf_counter()
        try:
            handle = _retry_pickle_race(lambda: self._start(serve, scaling))
        except Exception as exc:
            raise BackendError(f"Ray Serve could not start the replicas: {_first_line(exc)}") from exc
        self._wait_running(serve, opts.start_timeout_s)
        # Requests and results straight to and from the replica over gRPC, not through Ray's object store: less
        # than half the front's CPU per call (bench/README.md, "Ray: the front's CPU per batch"). Not through
        # Ray Client (ray://), whose server relays every call itself.
        self._handle = handle if _through_ray_client() else handle.options(_by_reference=False)
        described = handle.describe.remote().result(timeout_s=opts.batch_timeout_s)
        if described.get("info") is None:
            raise BackendError(f"in a Ray replica: {described.get('error')}")
        info = msgspec.convert(described["info"], ModelInfo)
        self._local_tokenizer = self._check_front_tokenizer()
        POLLER.add(self)
        self._polled = True
        log.info(
            "model %r on Ray Serve (%s): %s replicas x %g CPU, application %r, tokens counted %s, in %.1fs",
            self.model,
            opts.address,
            f"{opts.min_replicas or 1}-{opts.max_replicas}" if opts.max_replicas else opts.replicas or 1,
            opts.num_cpus,
            self._app,
            "here" if self._local_tokenizer else "by a replica",
            time.perf_counter() - started,
        )
        return msgspec.structs.replace(
            info,
            # The batcher keeps as many batches in flight as there may be replicas, one each.
            concurrent_batches=opts.most,
            local_tokenizer=info.local_tokenizer and self._local_tokenizer,
        )

    def _start(self, serve: Any, scaling: dict[str, Any]) -> Any:
        """Deploy the replicas (not waiting for them); the application's handle."""
        opts, cls = self._ray, self._cls
        with SERVE_LOCK:
            deployment = serve.deployment(
                Replica,
                name="replica",
                # One batch at a time per replica: Serve's router then spreads batches over idle replicas.
                max_ongoing_requests=1,
                ray_actor_options={"num_cpus": opts.num_cpus, "num_gpus": opts.num_gpus},
                **scaling,
            )
            app = deployment.bind(
                cls.name,
                f"{cls.__module__}:{cls.__qualname__}",
                self.model,
                self.path,
                msgspec.to_builtins(self.options),
                self.trust_remote_code,
            )
            # Not serve.run: it waits for the replicas forever (a cluster that cannot place them), from a
            # call that cannot be stopped; the wait is ours, bounded, and ends when the model is closed.
            (handle,) = serve.run_many(
                [serve.RunTarget(app, name=self._app, route_prefix=None)],
                wait_for_ingress_deployment_creation=False,
                wait_for_applications_running=False,
            )
        return handle

    def _wait_running(self, serve: Any, timeout: float) -> None:
        """Until every replica runs (BackendError with Ray Serve's reason if the deployment fails or `timeout`
        passes first, or if the model is closed meanwhile)."""
        deadline = time.monotonic() + timeout
        while True:
            with SERVE_LOCK:
                app = serve.status().applications.get(self._app or "")
            status = app.status if app is not None else None
            if status == "RUNNING":
                return
            if status == "DEPLOY_FAILED":
                raise BackendError(f"Ray Serve could not start the replicas: {self._deploy_message(serve)}")
            if time.monotonic() > deadline:
                raise BackendError(f"the replicas were not running after {timeout:g}s: {self._deploy_message(serve)}")
            if self._stop.wait(0.2):
                raise BackendError("closed while its replicas were starting")

    def _deploy_message(self, serve: Any) -> str:
        """What Ray Serve says about this model's deployment (say, the resources it waits for)."""
        try:
            with SERVE_LOCK:
                app = serve.status().applications.get(self._app or "")
            message = app.deployments["replica"].message if app is not None else ""
        except Exception as exc:
            message = f"status unavailable ({exc})"
        return message or "Ray Serve gave no reason"

    def _check_front_tokenizer(self) -> bool:
        """Load the backend's tokenizer here, trusted only if it counts the probes as a replica does."""
        try:
            if not self._front.load_tokenizer():
                return False
            mine = self._front.tokenize(list(_PROBES))
        except Exception as exc:
            log.warning("model %r: its tokenizer does not load here (%s); replicas tokenize", self.model, exc)
            return False
        theirs = self._call("tokenize", list(_PROBES))
        if [list(ids) for ids in mine] != theirs:
            log.warning("model %r: the tokenizer here disagrees with the replicas'; replicas tokenize", self.model)
            return False
        return True

    def close(self) -> None:
        """Delete this model's replicas; the last model on Ray disconnects (and stops a Ray started here)."""
        self._stop.set()
        if self._polled:
            POLLER.remove(self)
            self._polled = False
        if self._app is not None:
            try:
                from ray import serve

                # Not waited for: Ray Serve stops the replicas in the background (or with the Ray they run in).
                with SERVE_LOCK:
                    serve.delete(self._app, _blocking=False)
            except Exception:
                log.exception("model %r: deleting Ray Serve application %r", self.model, self._app)
            self._app = self._handle = None
        if self._joined:
            self._joined = False
            SESSION.release()
        self._front.close()

    # -- serving ---------------------------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        if self._local_tokenizer:
            return self._front.tokenize(texts)
        return self._call("tokenize", list(texts))

    def embed(self, texts: Sequence[str], token_ids: Sequence[Sequence[int]]) -> np.ndarray | Embedded:
        return self._call("embed", list(texts), [list(ids) for ids in token_ids])

    def fingerprint(self) -> bytes:
        # The replicas serve the same files: the cache shares entries with the in-process model.
        return self._front.fingerprint()

    def _call(self, method: str, *args: Any) -> Any:
        """`method` on one replica; once more (on another, or on its restarted self) if that replica was lost.

        Failures are the core's typed ones, so that the circuit counts them and the model's fallbacks take over:
        no answer within `batch_timeout_s` is a BackendTimeout (the call is cancelled, freeing its replica), and
        a replica lost again on the retry a BackendUnavailable: the batch is not sent a third time (nor each of its
        requests alone), since it may be what kills the replicas."""
        timeout = self._ray.batch_timeout_s
        for attempt in (1, 2):
            response = getattr(self._handle, method).remote(*args)
            try:
                return response.result(timeout_s=timeout)
            except TimeoutError:
                try:
                    response.cancel()
                except Exception as exc:  # the call ended meanwhile, or Ray is going: nothing left to free
                    log.debug("model %r: cancelling a timed-out %s: %s", self.model, method, exc)
                log.error("model %r: a replica did not answer %s within %gs; cancelled", self.model, method, timeout)
                raise BackendTimeout(f"model {self.model!r}: its replica did not answer within {timeout:g}s") from None
            except self._lost as exc:
                if attempt == 2:
                    log.error("model %r: a replica was lost again during %s (%s)", self.model, method, exc)
                    raise BackendUnavailable(
                        f"model {self.model!r}: its replicas were lost twice running this batch"
                    ) from None
                log.warning("model %r: a replica was lost during %s (%s); retrying once", self.model, method, exc)
            except self._failed as exc:
                # The backend raised in the replica: its own exception, typed failures (InputRejected...) and
                # message intact, without the remote traceback that Ray's wrapper prints.
                cause = getattr(exc, "cause", None)
                if isinstance(cause, Exception):
                    raise cause from None
                raise
        raise AssertionError("unreachable")

    def replicas(self) -> tuple[int, int]:
        return self._status

    def _update(self, applications: dict[str, Any]) -> None:
        """This model's replica counts from a serve.status()'s applications (the poller's)."""
        app = applications.get(self._app or "")
        states = app.deployments["replica"].replica_states if app is not None else {}
        live = sum(n for state, n in states.items() if state != "STOPPING")
        wanted = self._ray.replicas
        self._status = (states.get("RUNNING", 0), wanted if wanted is not None else live)


class _StatusPoller:
    """Refreshes the replica counts of every model on Ray in this process from one serve.status() per period.

    A serve.status() costs this process about 8 ms of CPU (a controller call and the whole status built in
    Python): one per model per second was most of what Ray cost the front when idle, and grew with the models
    placed (bench/README.md, "Ray: the front's CPU per batch")."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: set[RayBackend] = set()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def add(self, backend: RayBackend) -> None:
        with self._lock:
            self._models.add(backend)
            if self._thread is None:
                self._stop = threading.Event()
                self._thread = threading.Thread(target=self._run, args=(self._stop,), name="ray-status", daemon=True)
                self._thread.start()

    def remove(self, backend: RayBackend) -> None:
        """Forget `backend`; the last one stops the thread (returns once it has, so that no status call outlives
        the Ray session)."""
        with self._lock:
            self._models.discard(backend)
            thread = self._thread if not self._models else None
            if thread is not None:
                self._stop.set()
                self._thread = None
        if thread is not None:
            thread.join()

    def _run(self, stop: threading.Event) -> None:
        import ray
        from ray import serve

        while True:
            with self._lock:
                models = list(self._models)
            # Quickly until every model's replicas first run (/ready waits on them), then once a period.
            if stop.wait(_STATUS_EVERY_S if all(m._status[0] for m in models) else 0.1):
                return
            if not ray.is_initialized():
                continue  # serve.status() would start a new Ray
            try:
                with SERVE_LOCK:
                    applications = serve.status().applications
            except Exception as exc:  # the controller restarting; the last figures stand
                log.debug("Ray Serve status unavailable: %s", exc)
                continue
            for model in models:
                try:
                    model._update(applications)
                except Exception as exc:
                    log.debug("model %r: replica counts: %s", model.model, exc)


#: This process's one status poller, shared by its models on Ray.
POLLER = _StatusPoller()


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


def _through_ray_client() -> bool:
    """Whether this process reaches its cluster through Ray Client (a `ray://` address)."""
    from ray.util.client import ray as client

    return bool(client.is_connected())
