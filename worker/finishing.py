"""How a worker finishes a job: its PNG encodes and its uploads, off the decoder's thread.

A job's thread (one of Celery's, or of the embedded worker's) finishes its own job and waits:
its message is acknowledged only once its objects are stored. The decoder runs on the engine
thread (worker/batching.py) and goes on with the other jobs meanwhile. What this module adds:

- **PNG encodes** run on one pool per process (`png_pool`, DALLE_FARM_PNG_THREADS threads, the
  CPUs by default). Pillow 13 releases the GIL while zlib compresses, so the threads encode in
  parallel: 60 encodes of a 256×256 tile took 0.50 s on one thread and 0.30 s on two, on a
  2-core VM (two processes: 0.27 s). An encode never hangs, so jobs may share the pool: another
  job's encodes wait for at most one round of them.
- **Uploads** run on threads of the job's own (`upload_all`, at most DALLE_FARM_UPLOAD_THREADS
  per job). An upload can stall (S3Storage gives up after its timeouts and retries), and a
  stall must never cross jobs: a shared upload pool would let one job's hung uploads hold the
  threads another job needs.

Bounds, so that finished images waiting for a thread apply back-pressure instead of piling up:
each item holds one image (its pixels, or its PNG bytes).

- `bound`: items submitted to a pool and not finished, all jobs together. `submit` blocks at the
  bound until one of them finishes; the job thread that blocks holds its pixels, and no more
  are made, since the job threads are the worker's job slots (DALLE_FARM_MAX_JOBS).
- `share`: items one `run_all` call (one job) has submitted and not finished; its next item is
  submitted only when one of its own has finished.
- Nothing of a job runs after its `run_all` returned or raised: on the first error no more of
  its items start, and `run_all` waits for those already running before raising that error.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, TypeVar

from core.settings import Settings

T = TypeVar("T")
R = TypeVar("R")

# Items that may wait per thread, beyond the one each thread runs.
BOUND_PER_THREAD = 2


class BoundedPool:
    """A thread pool whose unfinished items are bounded, in all and per `run_all` call."""

    def __init__(
        self, name: str, threads: int, *, bound: int | None = None, share: int | None = None
    ) -> None:
        if threads < 1:
            raise ValueError(f"a pool needs at least one thread, got {threads}")
        self.name = name
        self.threads = threads
        self.bound = bound if bound is not None else threads * BOUND_PER_THREAD
        self.share = min(share if share is not None else threads, self.bound)
        if self.share < 1:
            raise ValueError(f"bound and share must be at least 1, got {bound} and {share}")
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix=name)
        self._slots = threading.Semaphore(self.bound)
        self._lock = threading.Lock()
        self._waiting = 0

    @property
    def waiting(self) -> int:
        """Submitters blocked at the bound right now."""
        with self._lock:
            return self._waiting

    def submit(self, work: Callable[..., R], /, *args: Any) -> Future[R]:
        """Run `work(*args)` on the pool; blocks while `bound` items are unfinished."""
        if not self._slots.acquire(blocking=False):
            with self._lock:
                self._waiting += 1
            try:
                self._slots.acquire()
            finally:
                with self._lock:
                    self._waiting -= 1
        try:
            future = self._executor.submit(work, *args)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())
        return future

    def close(self) -> None:
        """Stop the threads once their items are done."""
        self._executor.shutdown(wait=True)

    def __enter__(self) -> BoundedPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def run_all(self, work: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """`work(item)` for each item, at most `share` at once; the results in item order.

        On the first error no more items start; once those running have finished, the error of
        the first failed item (in item order) is raised.
        """
        own = threading.Semaphore(self.share)
        failed = threading.Event()
        futures: list[Future[R]] = []

        def finished(future: Future[R]) -> None:
            if future.exception() is not None:
                failed.set()
            own.release()

        try:
            for item in items:
                own.acquire()
                if failed.is_set():
                    break
                future = self.submit(work, item)
                future.add_done_callback(finished)
                futures.append(future)
        finally:
            wait(futures)
        for future in futures:
            error = future.exception()
            if error is not None:
                raise error
        return [future.result() for future in futures]


# Per process id, as worker/celery_app.py's resources: a forked process builds its own threads.
_pools: dict[tuple[int, str, int], BoundedPool] = {}
_pools_lock = threading.Lock()


def png_pool(settings: Settings) -> BoundedPool:
    """The process's PNG encoders (DALLE_FARM_PNG_THREADS); a job may use every thread."""
    threads = settings.png_threads
    key = (os.getpid(), "png", threads)
    with _pools_lock:
        pool = _pools.get(key)
        if pool is None:
            pool = _pools[key] = BoundedPool("png", threads)
        return pool


def upload_all(put: Callable[[T], None], objects: list[T], threads: int) -> None:
    """`put(obj)` for each object on up to `threads` threads of this call's own (one job's).

    Returns once all are stored; on the first failure no more start, and the error is raised
    once none of them is still being uploaded.
    """
    with BoundedPool("upload", max(1, min(threads, len(objects)))) as uploads:
        uploads.run_all(put, objects)
