"""`gateway serve` with `[server] workers` > 1: the supervisor of one runtime process and N front workers.

Layout: this process binds the port and supervises; the runtime process (gateway/processes/runtime_process.py) loads
the models once (but those with `copies = "per-worker"`, of which each front loads its own) and owns
everything the fronts share; N front workers (gateway/processes/front.py), started by uvicorn's
own multi-process supervisor (`uvicorn.supervisors.Multiprocess`, which restarts a dead worker), accept on
the one listening socket and reach the runtime over a Unix socket in a private (0700) temporary folder.
The generated API key goes down as its digest, in the environment: it is printed once, by `gateway serve`.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Any

from prometheus_client import multiprocess
from uvicorn.supervisors import Multiprocess

from gateway.api.server import uvicorn_config
from gateway.base.config import GatewayConfig
from gateway.runtime.link import CONFIG_ENV, FALLBACK_KEY_ENV, SOCKET_ENV, WORKERS_ENV, generation_path

log = logging.getLogger("gateway")


class RuntimeProcess:
    """The runtime process: started, watched and restarted by the supervisor."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "gateway.processes.runtime_process"], env=self.env)
        log.info("started the runtime process [%d]", self.process.pid)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout_s: float) -> None:
        """SIGTERM, and its drain up to `timeout_s`; then SIGKILL."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.error("the runtime process did not stop within %gs; killing it", timeout_s)
                self.process.kill()
                self.process.wait()


class Supervisor(Multiprocess):
    """uvicorn's worker supervisor, also keeping the runtime process alive."""

    def __init__(self, config: Any, sockets: list[Any], runtime: RuntimeProcess) -> None:
        super().__init__(config, sockets)
        self.runtime = runtime

    def handle_hup(self) -> None:
        # uvicorn would restart its workers; here SIGHUP means what it means with one process: reload the
        # config. The runtime reloads, and the fronts take its new config (gateway/processes/front.py).
        if self.runtime.process is not None and self.runtime.alive():
            log.info("SIGHUP: the runtime process reloads the config")
            self.runtime.process.send_signal(signal.SIGHUP)

    def keep_subprocess_alive(self) -> None:
        if not self.should_exit.is_set() and not self.runtime.alive():
            code = self.runtime.process.returncode if self.runtime.process is not None else None
            log.error("the runtime process died (exit status %s); restarting it", code)
            if self.runtime.process is not None:
                _forget_metrics(self.runtime.process.pid)
            self.runtime.start()
        before = {process.pid for process in self.processes}
        super().keep_subprocess_alive()
        # uvicorn replaced these (dead or hung, then killed).
        for pid in before - {process.pid for process in self.processes}:
            if pid is not None:
                _forget_metrics(pid)


def _forget_metrics(pid: int) -> None:
    """Drop a dead process' live gauges (requests in progress, cache bytes) from /metrics: prometheus_client
    sums the files of every process that wrote one, dead or not. Its counters stay, as totals should."""
    multiprocess.mark_process_dead(pid)


def serve(config: GatewayConfig, config_path: str, key_digest: bytes | None, **overrides: Any) -> int:
    """Run the supervisor until SIGTERM/SIGINT; `key_digest`: the generated key's, when no key is configured;
    `overrides`: host and port from the command line."""
    workers = config.server.worker_count()
    folder = tempfile.mkdtemp(prefix="gateway-")  # mode 0700: only this user reaches the socket
    socket_path = os.path.join(folder, "runtime.sock")
    with open(generation_path(socket_path), "wb") as fh:
        fh.write(bytes(8))
    metrics = os.path.join(folder, "metrics")
    os.mkdir(metrics)
    env = {
        **os.environ,
        SOCKET_ENV: socket_path,
        CONFIG_ENV: os.path.abspath(config_path),
        WORKERS_ENV: str(workers),
        # Every process writes its metrics there; a front's /metrics sums them (prometheus_client's
        # multiprocess mode, read when the process imports it: set before any is started).
        "PROMETHEUS_MULTIPROC_DIR": metrics,
    }
    if key_digest is not None:
        env[FALLBACK_KEY_ENV] = key_digest.hex()
    else:
        env.pop(FALLBACK_KEY_ENV, None)
    # uvicorn's workers are spawned from this process' environment.
    os.environ.update(env)
    runtime = RuntimeProcess(env)
    uv = uvicorn_config(
        "gateway.processes.front:create_front",
        config.server,
        factory=True,
        workers=workers,
        http="gateway.processes.front:FrontProtocol",
        **overrides,
    )
    sock = uv.bind_socket()
    try:
        runtime.start()
        log.info("serving with %d front workers and one runtime process", workers)
        Supervisor(uv, [sock], runtime).run()
    finally:
        sock.close()
        # The fronts have stopped (and drained); the runtime finishes what they had asked of it.
        runtime.stop(config.server.request_timeout_s + 5)
        shutil.rmtree(folder, ignore_errors=True)
        # A second signal during the drain would otherwise hit the default handler mid-cleanup.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    return 0
