"""`dalle-farm serve`: the embedded farm, the API and one worker on this machine.

    dalle-farm serve                      # http://127.0.0.1:8000, no API key needed
    dalle-farm serve --host 0.0.0.0       # reachable from other machines: keys required

No Redis server and no S3: jobs, keys and the queue live in <DALLE_FARM_DATA_DIR>/farm.db and
the images under <DALLE_FARM_DATA_DIR>/files, served by the API behind the same auth. The
worker (`python -m worker.embedded`, a child process) runs the same job code as the
distributed farm, and queued jobs survive a restart.

SIGTERM or Ctrl-C stops both: the API finishes its requests, the worker hands its job back.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from cli.api import (
    add_server_arguments,
    check_services,
    create_api_app,
    is_loopback,
    load_settings,
    serve_api,
)
from cli.main import CommandError

log = logging.getLogger(__name__)

# Every job made without a key belongs to this owner (loopback only).
LOCAL_OWNER = "local"
# How long the worker gets to hand its job back before it is killed.
WORKER_STOP_TIMEOUT_S = 30.0
RESTART_PAUSE_S = 5.0


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``serve`` sub-parser."""
    parser = subparsers.add_parser(
        "serve",
        help="run the embedded farm: the API and a worker, no Redis or S3 needed",
        description="Run the REST API and one worker on this machine, with jobs in a SQLite "
        "file and images as files under DALLE_FARM_DATA_DIR. Bound to loopback (the "
        "default), requests need no API key.",
    )
    add_server_arguments(parser)


class WorkerSupervisor:
    """The embedded worker child: started, restarted if it dies, stopped on exit."""

    def __init__(self, ready_file: Path) -> None:
        self.ready_file = ready_file
        self.process: subprocess.Popen[bytes] | None = None
        self.ready = False
        self.failed = False
        self.stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="worker-watch", daemon=True)

    def start(self) -> None:
        self._spawn()
        self._thread.start()

    def _spawn(self) -> None:
        from worker.embedded import READY_FILE_ENV

        self.ready_file.unlink(missing_ok=True)
        self.ready = False
        env = {**os.environ, READY_FILE_ENV: str(self.ready_file)}
        self.process = subprocess.Popen([sys.executable, "-m", "worker.embedded"], env=env)
        log.info("started the worker (pid %d)", self.process.pid)

    def _watch(self) -> None:
        while not self.stopping.wait(0.2):
            assert self.process is not None
            if not self.ready and self.ready_file.exists():
                self.ready = True
                log.info("the worker is ready")
            if self.process.poll() is None:
                continue
            if self.stopping.is_set():
                return
            if not self.ready:
                log.error("the worker exited before it was ready; stopping")
                self.failed = True
                os.kill(os.getpid(), signal.SIGTERM)  # stops the API server
                return
            log.error("the worker exited; starting it again in %.0f s", RESTART_PAUSE_S)
            if self.stopping.wait(RESTART_PAUSE_S):
                return
            self._spawn()

    def stop(self) -> None:
        """Ask the worker to hand back its job and exit; kill it if it takes too long."""
        self.stopping.set()
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + WORKER_STOP_TIMEOUT_S
        while process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if process.poll() is None:
            log.warning("the worker did not stop in %.0f s; killing it", WORKER_STOP_TIMEOUT_S)
            process.kill()
            process.wait()


def run(args: argparse.Namespace) -> int:
    """Run the API and the worker until SIGTERM or Ctrl-C; return the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s dalle-farm serve: %(message)s")
    settings = load_settings()
    if not settings.is_embedded:
        raise CommandError(
            "dalle-farm serve is the embedded farm, but DALLE_FARM_REDIS_URL is set; "
            "unset it, or run `dalle-farm api` and `dalle-farm worker` for the distributed farm"
        )
    anonymous_owner = LOCAL_OWNER if is_loopback(args.host) else None
    if anonymous_owner is None:
        log.warning(
            "listening on %s, beyond this machine: every request needs an API key "
            "(create one with `dalle-farm keys create NAME`)",
            args.host,
        )
    check_services(settings)

    folder = Path(tempfile.mkdtemp(prefix="dalle-farm-serve-"))
    worker = WorkerSupervisor(folder / "worker.ready")
    try:
        worker.start()
        # One server process: the worker and the SQLite store belong to this one.
        status = serve_api(lambda: create_api_app(settings, anonymous_owner), args, settings)
    finally:
        worker.stop()
        shutil.rmtree(folder, ignore_errors=True)
    if worker.failed:
        raise CommandError("the worker could not start; see its log above")
    return status
