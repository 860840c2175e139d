"""`dalle-farm worker`: one Celery worker process per GPU, each pinned with CUDA_VISIBLE_DEVICES.

    dalle-farm worker                 # every GPU torch sees; one CPU worker if there is none
    dalle-farm worker --gpus 0,1      # GPUs 0 and 1
    dalle-farm worker --gpus cpu      # one CPU worker

Each child is `python -m celery -A worker.celery_app worker --pool threads` named
`gpu{i}@{node}` (`cpu@{node}`): it loads the model once and keeps it, and its threads (one per
job in flight, DALLE_FARM_MAX_JOBS) feed one batching engine, so its jobs decode together; the
child is ready once the model is loaded, and from then on announces in the store that it serves
DALLE_FARM_MODEL (the API refuses jobs for a model that no live worker serves) until it stops.
This process supervises them: SIGTERM or Ctrl-C asks each to finish its current job and exit
(a second one stops them at once, and their jobs go back to the queue); a child that dies is
started again; a child that exits before it is ready (a model that cannot be loaded, say)
stops everything with status 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from cli.main import CommandError

log = logging.getLogger(__name__)

# A child that died after it was ready is started again after this pause.
RESTART_PAUSE_S = 5.0
POLL_S = 0.2


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``worker`` sub-parser."""
    parser = subparsers.add_parser(
        "worker",
        help="run Celery workers, one per GPU, that render queued jobs",
        description="Run one Celery worker process per GPU (pinned with CUDA_VISIBLE_DEVICES), "
        "each with the model resident, taking jobs from Redis (DALLE_FARM_REDIS_URL).",
    )
    parser.add_argument(
        "--gpus",
        default="all",
        help="'all' (every GPU torch sees, or the CPU if none), a list such as '0,1', "
        "or 'cpu' (default: %(default)s)",
    )
    parser.add_argument(
        "--queues",
        default=None,
        help="comma-separated queues to take jobs from, read in this order (default: the "
        "interactive then the bulk queue of DALLE_FARM_MODEL, e.g. "
        "dalle-farm.mini,dalle-farm.mini.bulk)",
    )
    parser.add_argument(
        "--concurrency",
        "--max-jobs",
        dest="concurrency",
        type=int,
        default=None,
        help="jobs each worker decodes at once, in one batch (default: DALLE_FARM_MAX_JOBS, 8)",
    )
    parser.add_argument(
        "--node-name",
        default="%h",
        help="the part after '@' in worker names, gpu0@NODE (default: the host name)",
    )
    parser.add_argument(
        "--loglevel", default="INFO", help="Celery's log level (default: %(default)s)"
    )


def parse_gpus(
    value: str, count_gpus: Callable[[], int], visible: str | None = None
) -> list[str | None]:
    """What to pin each worker to (a CUDA_VISIBLE_DEVICES entry), or [None]: one CPU worker.

    `all` is every GPU this process may use: the entries of `visible` (this process's own
    CUDA_VISIBLE_DEVICES, if set) or 0 … count_gpus() - 1. Numbers name physical GPUs.
    """
    value = value.strip().lower()
    if value == "cpu":
        return [None]
    if value == "all":
        count = count_gpus()
        if count == 0:
            return [None]
        entries: list[str | None] = [
            entry.strip() for entry in (visible or "").split(",") if entry.strip()
        ]
        return entries[:count] if entries else [str(index) for index in range(count)]
    gpus: list[str | None] = []
    for part in value.split(","):
        part = part.strip()
        if not part.isdigit():
            raise CommandError(
                f"--gpus must be 'all', 'cpu' or GPU numbers like 0,1; got {value!r}"
            )
        if part in gpus:
            raise CommandError(f"--gpus names GPU {part} twice")
        gpus.append(part)
    return gpus


def count_cuda_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@dataclass
class Child:
    """One Celery worker process and how to start it again."""

    name: str
    argv: list[str]
    env: dict[str, str]
    ready_file: Path
    process: subprocess.Popen[bytes] | None = None
    ready: bool = False
    restart_at: float | None = None
    exit_codes: list[int] = field(default_factory=list)

    def start(self) -> None:
        self.ready_file.unlink(missing_ok=True)
        self.ready = False
        self.restart_at = None
        self.process = subprocess.Popen(self.argv, env=self.env)
        log.info("started %s (pid %d)", self.name, self.process.pid)

    def poll(self) -> int | None:
        """The exit status if the process has exited; marks it ready when it says so."""
        if self.process is None:
            return None
        code = self.process.poll()
        if code is None and not self.ready and self.ready_file.exists():
            self.ready = True
            log.info("%s is ready", self.name)
        return code

    def signal(self, signum: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)


def child_for(
    device: str | None,
    *,
    position: int,
    queues: str,
    concurrency: int,
    node: str,
    loglevel: str,
    ready_dir: Path,
) -> Child:
    node = node.replace("%h", socket.gethostname())
    if device is None:
        name = f"cpu@{node}"
    else:  # a GPU UUID (GPU-…, MIG-…) would make a long name: number those by position
        name = f"gpu{device if device.isdigit() else position}@{node}"
    argv = [
        sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
        "--pool", "threads",
        "--concurrency", str(concurrency),
        "--hostname", name,
        "--queues", queues,
        "--loglevel", loglevel,
        # Mingle and gossip exchange state between workers at start and all along; the farm
        # needs neither, and they slow startup.
        "--without-mingle", "--without-gossip",
    ]  # fmt: skip
    env = dict(os.environ)
    if device is not None:
        # The child sees its GPU as cuda:0.
        env["CUDA_VISIBLE_DEVICES"] = device
        env["DALLE_FARM_DEVICE"] = "cuda"
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["DALLE_FARM_DEVICE"] = "cpu"
    from worker.celery_app import READY_FILE_ENV

    ready_file = ready_dir / f"{name.replace('@', '_')}.ready"
    env[READY_FILE_ENV] = str(ready_file)
    return Child(name=name, argv=argv, env=env, ready_file=ready_file)


def supervise(children: list[Child]) -> int:
    """Run the children until a signal stops them; the exit status of the whole."""
    stop = threading.Event()
    signals_seen: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        signals_seen.append(signum)
        if len(signals_seen) == 1:
            log.info("%s: asking the workers to finish their jobs and stop", _name(signum))
            for child in children:
                child.signal(signal.SIGTERM)
        else:
            log.info("%s: stopping the workers now; their jobs go back to the queue",
                     _name(signum))  # fmt: skip
            for child in children:
                child.signal(signal.SIGQUIT)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    failed = False
    announced = False
    try:
        for child in children:
            child.start()
        while True:
            running = 0
            for child in children:
                code = child.poll()
                if code is None:
                    running += 1
                    continue
                if child.process is None or stop.is_set():
                    continue
                if not child.ready:
                    log.error("%s exited with status %d before it was ready", child.name, code)
                    failed = True
                    on_signal(signal.SIGTERM, None)
                    break
                if child.restart_at is None:
                    log.error("%s exited with status %d; restarting it in %.0f s",
                              child.name, code, RESTART_PAUSE_S)  # fmt: skip
                    child.restart_at = time.monotonic() + RESTART_PAUSE_S
                elif time.monotonic() >= child.restart_at:
                    child.start()
                    running += 1
            if stop.is_set() and running == 0:
                break
            if not announced and all(child.ready for child in children):
                announced = True
                log.info("%d worker(s) ready: %s", len(children),
                         ", ".join(child.name for child in children))  # fmt: skip
            time.sleep(POLL_S)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for child in children:
            if child.process is not None and child.process.poll() is None:
                child.process.kill()
                child.process.wait()
    return 1 if failed else 0


def _name(signum: int) -> str:
    return signal.Signals(signum).name


def run(args: argparse.Namespace) -> int:
    """Start the workers and supervise them until stopped; return the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s dalle-farm worker: %(message)s")
    from cli.api import load_settings

    settings = load_settings()
    if settings.is_embedded:
        raise CommandError(
            "dalle-farm worker needs DALLE_FARM_REDIS_URL (the farm's Redis); "
            "on a single machine, `dalle-farm serve` runs the API and a worker together"
        )
    concurrency = settings.max_jobs if args.concurrency is None else args.concurrency
    if concurrency < 1:
        raise CommandError(f"--concurrency must be at least 1, got {concurrency}")
    devices = parse_gpus(args.gpus, count_cuda_gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))
    from core.queue_celery import lane_queues

    # Interactive first: the worker reads them in this order (core/lanes.py).
    queues = args.queues or ",".join(lane_queues(settings))
    with tempfile.TemporaryDirectory(prefix="dalle-farm-worker-") as ready_dir:
        children = [
            child_for(
                device,
                position=position,
                queues=queues,
                concurrency=concurrency,
                node=args.node_name,
                loglevel=args.loglevel,
                ready_dir=Path(ready_dir),
            )
            for position, device in enumerate(devices)
        ]
        status = supervise(children)
    if status != 0:
        raise CommandError("a worker failed to start; see its log above")
    return 0
