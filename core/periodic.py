"""Periodic: one round of housekeeping every `interval_s` on a daemon thread, until stopped.

The first round runs at once. Workers run the farm's housekeeping this way
(core/lanes.BulkPromoter, core/queue_audit.QueueAudit). A subclass gives `run_once`, which must
not raise: a round that fails is logged and the next round tries again.
"""

from __future__ import annotations

import threading


class Periodic:
    def __init__(self, name: str, interval_s: float) -> None:
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def run_once(self) -> object:
        raise NotImplementedError

    def start(self) -> Periodic:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        self.run_once()
        while not self._stop.wait(self.interval_s):
            self.run_once()
