"""The batching engine: one thread decodes every job in flight; each job's own thread waits.

    job threads (Celery's thread pool, or the embedded worker's)      engine thread
    ─────────────────────────────────────────────────────────────      ─────────────
    render(params) → submit ──────────────── pending ─────────────→  admit: encode the prompt,
                                                                      join the BatchDecoder
    wait: on_step(step, 256)  ←─── progress after every step ──────   step(): one token for
          on_checkpoint(step, tokens) ←─ every CHECKPOINT_EVERY ───            every job
          on_preview(frame, png)  (detokenized in the job's thread)
    done: detokenize, PNGs    ←─── final tokens ───────────────────   the job leaves the batch
    on_step raises (cancel, lease lost, shutdown) → cancel ───────→   dropped before next step

Only the engine thread touches the BatchDecoder, so it needs no lock. Everything slow that is
not a decoder step (the VQGAN, PNG encoding, uploads, store writes) happens in the job threads,
while the engine thread keeps decoding the others.

A job is admitted while its rows fit under `max_rows`; otherwise it waits in arrival order. A job
that could never fit (more rows than max_rows on its own), or whose settings the sampler cannot
compute, fails at once with a ValueError.

A job's failure is its own: settings refused at admission, a failure in its sampling or NaN
logits (model.batch.JobFailed, from the step's result), an error handing out its tokens, or an
exception in its callbacks (raised in its own thread) drop that job only; the others keep
decoding, with the tokens they would have had without it. Only a failure of a step's shared
work fails every job in that step, each with the error; the engine thread then carries on.

The tokens are batch-invariant (see model/batch.py): a job's images depend on its params, its
seed and the weights only, not on the jobs it shared steps with or on a resume from a
checkpoint. This is the farm's sampler; it is not min-dalle's (MinDalle keeps that one).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from model.batch import BatchDecoder, BatchFull
from model.config import IMAGE_TOKEN_COUNT
from model.generate import SamplingSettings, check_guided_settings
from model.min_dalle import MinDalle

log = logging.getLogger(__name__)

# A job's tokens are handed out for a checkpoint (and a progressive preview) every this many.
CHECKPOINT_EVERY = 32

# (step, tokens so far as grid_size² lists of ints)
CheckpointCallback = Callable[[int, list[list[int]]], None]


@dataclass(eq=False)
class _Ticket:
    """One job's mailbox between its thread and the engine thread (guarded by `changed`)."""

    job_id: str
    text: str
    seed: int
    grid_size: int
    settings: SamplingSettings
    resume: Tensor | None
    wants_snapshots: bool
    changed: threading.Condition = field(default_factory=threading.Condition)
    step: int = 0
    snapshot_at: int = 0  # the step of the last snapshot handed out (or the resume point)
    snapshots: list[tuple[int, Tensor]] = field(default_factory=list)
    tokens: Tensor | None = None
    error: BaseException | None = None

    @property
    def rows(self) -> int:
        return 2 * self.grid_size**2

    def publish(
        self,
        step: int,
        snapshot: Tensor | None = None,
        tokens: Tensor | None = None,
        error: BaseException | None = None,
    ) -> None:
        with self.changed:
            self.step = step
            if snapshot is not None:
                self.snapshots.append((step, snapshot))
            self.tokens = tokens if tokens is not None else self.tokens
            self.error = error if error is not None else self.error
            self.changed.notify()


class BatchEngine:
    """Decodes the jobs of many threads together. `close()` stops the engine thread."""

    def __init__(self, model: MinDalle, max_rows: int) -> None:
        self.model = model
        self.decoder = BatchDecoder(model, max_rows=max_rows)
        if self.decoder.device.type == "cuda":
            # The GPU's kernels keep a job's tokens independent of its neighbours only where
            # this device and driver compute them as tested; verify before serving (else the
            # decoder falls back to its safe operations, and says why in the log).
            self.decoder.self_check()
        self.max_rows = max_rows
        self._lock = threading.Condition()
        self._pending: deque[_Ticket] = deque()
        self._canceled: set[str] = set()
        self._closed = False
        self._running: dict[str, _Ticket] = {}  # engine thread only
        self._thread = threading.Thread(target=self._loop, name="batch-engine", daemon=True)
        self._thread.start()

    # -- job threads ---------------------------------------------------------------------

    def decode(
        self,
        job_id: str,
        text: str,
        seed: int,
        grid_size: int,
        settings: SamplingSettings,
        *,
        resume: list[list[int]] | None = None,
        on_step: Callable[[int, int], None] | None = None,
        on_snapshot: Callable[[int, Tensor], None] | None = None,
    ) -> Tensor:
        """Decode one job among the others; return its (grid_size², 256) tokens.

        `resume` holds the first tokens of an earlier run of this job (a checkpoint). `on_step`
        runs in this thread after steps (several steps may pass between two calls);
        `on_snapshot(step, tokens)` gets the tokens every CHECKPOINT_EVERY steps before the last.
        An exception either raises drops the job from the batch and propagates.
        """
        if grid_size < 1:
            raise ValueError(f"grid_size must be a positive integer, got {grid_size}")
        check_guided_settings(settings)  # refused here, in the job's thread, before it queues
        if 2 * grid_size**2 > self.max_rows:
            raise ValueError(
                f"a {grid_size}×{grid_size} grid needs {2 * grid_size**2} decoder rows, more "
                f"than this worker's batch holds ({self.max_rows}; see DALLE_FARM_BATCH_ROWS)"
            )
        ticket = _Ticket(
            job_id,
            text,
            seed,
            grid_size,
            settings,
            resume=None if resume is None else torch.tensor(resume, dtype=torch.long),
            wants_snapshots=on_snapshot is not None,
            snapshot_at=len(resume[0]) if resume else 0,
        )
        with self._lock:
            if self._closed:
                raise RuntimeError("the batch engine is closed")
            self._pending.append(ticket)
            self._lock.notify()
        try:
            reported = 0
            while True:
                with ticket.changed:
                    while (
                        ticket.step == reported
                        and not ticket.snapshots
                        and ticket.tokens is None
                        and ticket.error is None
                    ):
                        ticket.changed.wait()
                    step, snapshots, tokens, error = (
                        ticket.step,
                        ticket.snapshots,
                        ticket.tokens,
                        ticket.error,
                    )
                    ticket.snapshots = []
                if error is not None:
                    raise error
                for snapshot_step, snapshot in snapshots:
                    assert on_snapshot is not None
                    on_snapshot(snapshot_step, snapshot)
                if step != reported and on_step is not None:
                    on_step(step, IMAGE_TOKEN_COUNT)
                reported = step
                if tokens is not None:
                    return tokens
        except BaseException:
            self._cancel(ticket)
            raise

    def _cancel(self, ticket: _Ticket) -> None:
        with self._lock:
            if ticket in self._pending:
                self._pending.remove(ticket)
            else:
                self._canceled.add(ticket.job_id)
            self._lock.notify()

    def close(self) -> None:
        """Stop the engine thread; jobs still in flight fail with RuntimeError."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join()

    # -- the engine thread ---------------------------------------------------------------

    def _loop(self) -> None:
        reason: BaseException = RuntimeError("the batch engine was closed")
        try:
            while True:
                with self._lock:
                    while not (self._pending or self._running or self._canceled or self._closed):
                        self._lock.wait()
                    if self._closed:
                        break
                    canceled, self._canceled = self._canceled, set()
                for job_id in canceled:
                    self.decoder.cancel(job_id)
                    self._running.pop(job_id, None)
                self._admit()
                if self._running:
                    self._step()
        except BaseException as error:  # a bug: fail every job rather than leave them waiting
            log.exception("the batch engine stopped")
            reason = error
        with self._lock:
            self._closed = True
            waiting = [*self._running.values(), *self._pending]
            self._pending.clear()
        for ticket in waiting:
            ticket.publish(ticket.step, error=reason)

    def _admit(self) -> None:
        """Move waiting jobs into the batch, in arrival order, while their rows fit."""
        while True:
            with self._lock:
                if not self._pending or self.decoder.rows + self._pending[0].rows > self.max_rows:
                    return
                ticket = self._pending.popleft()
            try:
                self.decoder.add(
                    ticket.job_id,
                    ticket.text,
                    ticket.seed,
                    ticket.grid_size,
                    ticket.settings,
                    tokens=ticket.resume,
                )
            except BatchFull:  # cannot happen (checked above), but never lose a job
                with self._lock:
                    self._pending.appendleft(ticket)
                return
            except Exception as error:  # a prompt the model refuses, a bad checkpoint, OOM
                ticket.publish(0, error=error)
                continue
            self._running[ticket.job_id] = ticket
            if ticket.resume is not None:
                log.info("job %s resumes at token %d", ticket.job_id, ticket.resume.shape[1])

    def _step(self) -> None:
        try:
            result = self.decoder.step()
        except Exception as error:  # the shared work (e.g. out of memory): no job can go on
            log.exception("a decoder step failed; failing its %d jobs", len(self._running))
            for job_id, ticket in self._running.items():
                self.decoder.cancel(job_id)
                ticket.publish(ticket.step, error=error)
            self._running.clear()
            return
        for job_id, ticket in list(self._running.items()):
            if job_id in result.failed:
                del self._running[job_id]
                ticket.publish(ticket.step, error=result.failed[job_id])
            elif job_id in result.finished:
                del self._running[job_id]
                ticket.publish(IMAGE_TOKEN_COUNT, tokens=result.finished[job_id])
            else:
                try:
                    self._report(ticket)
                except Exception as error:  # this job's tokens could not be handed out
                    log.exception("job %s: could not report its progress", job_id)
                    self.decoder.cancel(job_id)
                    del self._running[job_id]
                    ticket.publish(ticket.step, error=error)

    def _report(self, ticket: _Ticket) -> None:
        # While a resumed job replays its checkpoint, its progress stays at the checkpoint.
        step = self.decoder.progress(ticket.job_id)
        snapshot = None
        is_new = step % CHECKPOINT_EVERY == 0 and step > ticket.snapshot_at
        if ticket.wants_snapshots and is_new:
            ticket.snapshot_at = step
            snapshot = self.decoder.tokens(ticket.job_id)
        ticket.publish(step, snapshot=snapshot)
