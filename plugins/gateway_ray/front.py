"""The gateway's stand-in for a model on Ray Serve: starts its replicas, counts tokens here, sends each batch
whole to a replica, and retries a batch once when its replica was lost."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import msgspec
import numpy as np

from gateway import Backend, BackendError, ModelInfo
from gateway.plugin import BackendTimeout, BackendUnavailable, Embedded

from . import deployment
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
        self._lost, self._failed = _failures(ray)
        opts = self._ray
        self._app = deployment.app_name(self.model)
        started = time.perf_counter()
        handle = deployment.start(serve, self._app, opts, self._replica_args())
        deployment.wait_running(serve, self._app, opts.start_timeout_s, self._stop)
        # Requests and results straight to and from the replica over gRPC, not through Ray's object store: less
        # than half the front's CPU per call (bench/README.md, "Ray: the front's CPU per batch"). Not through
        # Ray Client (ray://), whose server relays every call itself.
        self._handle = handle if deployment.through_ray_client() else handle.options(_by_reference=False)
        described = handle.describe.remote().result(timeout_s=opts.batch_timeout_s)
        if described.get("info") is None:
            raise BackendError(f"in a Ray replica: {described.get('error')}")
        info = msgspec.convert(described["info"], ModelInfo)
        self._local_tokenizer = self._check_front_tokenizer()
        POLLER.add(self)
        self._polled = True
        self._log_deployed(time.perf_counter() - started)
        return msgspec.structs.replace(
            info,
            # The batcher keeps as many batches in flight as there may be replicas, one each.
            concurrent_batches=opts.most,
            local_tokenizer=info.local_tokenizer and self._local_tokenizer,
        )

    def _replica_args(self) -> tuple[Any, ...]:
        """What each replica builds its backend from: the class's registered name and import path, the model,
        its path and options (as plain data, to travel to the replica), trust_remote_code, and its task."""
        cls = self._cls
        return (
            cls.name,
            f"{cls.__module__}:{cls.__qualname__}",
            self.model,
            self.path,
            msgspec.to_builtins(self.options),
            self.trust_remote_code,
            self.task,
        )

    def _log_deployed(self, took_s: float) -> None:
        opts = self._ray
        log.info(
            "model %r on Ray Serve (%s): %s replicas x %g CPU, application %r, tokens counted %s, in %.1fs",
            self.model,
            opts.address,
            f"{opts.min_replicas or 1}-{opts.max_replicas}" if opts.max_replicas else opts.replicas or 1,
            opts.num_cpus,
            self._app,
            "here" if self._local_tokenizer else "by a replica",
            took_s,
        )

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

    def tokenize_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[list[int]]:
        # A replica's: a backend's tokenizer loaded without weights (`load_tokenizer`) counts texts, not pairs.
        return self._call("tokenize_pairs", list(pairs))

    def score(self, pairs: Sequence[tuple[str, str]], token_ids: Sequence[Sequence[int]]) -> np.ndarray | Embedded:
        # The core refuses a rerank model whose configured backend cannot score before this stand-in is built.
        return self._call("score", list(pairs), [list(ids) for ids in token_ids])

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


def _failures(ray: Any) -> tuple[tuple[type[BaseException], ...], type[BaseException]]:
    """What a lost replica (its process killed, its node gone) raises on the call it was running, and what a
    backend's own exception in a replica arrives as."""
    from ray.serve.exceptions import ReplicaUnavailableError

    lost = (
        ray.exceptions.RayActorError,
        ray.exceptions.WorkerCrashedError,
        ray.exceptions.NodeDiedError,
        ReplicaUnavailableError,
    )
    return lost, ray.exceptions.RayTaskError
