"""A worker's presence in the store: a thread that announces the models it serves with its
heartbeat, sweeps jobs that no worker serves (core/unserved.py), and leaves when stopped.

    presence = WorkerPresence(store, "gpu0@node-a", ["mega"], unserved_timeout_s=300)
    presence.start()   # once the model is loaded and the worker takes jobs
    ...
    presence.stop()    # on shutdown: the worker no longer serves its models, at once

A worker killed without stop() drops out when its last heartbeat expires (WORKER_ALIVE_S).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable

from core.store import JobStore
from core.unserved import UnservedJobSweeper

log = logging.getLogger(__name__)

# Seconds between a worker's heartbeats: well within WORKER_ALIVE_S, so one late beat is no gap.
WORKER_HEARTBEAT_S = 10.0


class WorkerPresence:
    """Announces `worker` serving `models` every `interval_s` on a daemon thread."""

    def __init__(
        self,
        store: JobStore,
        worker: str,
        models: Iterable[str],
        *,
        unserved_timeout_s: float,
        interval_s: float = WORKER_HEARTBEAT_S,
    ) -> None:
        self.store = store
        self.worker = worker
        self.models = tuple(models)
        self.interval_s = interval_s
        self.sweeper = UnservedJobSweeper(store, unserved_timeout_s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-presence", daemon=True)

    def start(self) -> WorkerPresence:
        """Announce the worker now (so that the API accepts its model's jobs once this
        returns), then keep announcing on the thread."""
        self._beat()
        self._thread.start()
        return self

    def _beat(self) -> None:
        try:
            self.store.worker_heartbeat(self.worker, models=self.models)
        except Exception as error:  # a blip: the next beat tries again
            log.warning("worker heartbeat failed: %s", error)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop announcing and remove the worker from the store (waits for the thread)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        # Wake for whichever is due first: the next heartbeat or the next sweep.
        tick_s = min(self.interval_s, self.sweeper.interval_s)
        next_beat = time.monotonic() + self.interval_s  # start() beat once already
        try:
            while True:
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + self.interval_s
                    self._beat()
                try:
                    self.sweeper.maybe()
                except Exception:  # a bug must not stop the heartbeat
                    log.exception("the sweep for jobs that no worker serves failed")
                if self._stop.wait(tick_s):
                    return
        finally:
            try:
                self.store.worker_gone(self.worker)
                log.info("worker %s no longer serves %s", self.worker, ", ".join(self.models))
            except Exception as error:  # its heartbeat expires on its own
                log.warning("could not remove worker %s from the store: %s", self.worker, error)
