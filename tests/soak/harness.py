"""The chaos soak's harness: a distributed farm on loopback, steady load, a fault schedule, and
the checks at the end.

The farm: Redis master + replica + one sentinel (the farm's DALLE_FARM_REDIS_URL is the
redis+sentinel:// URL), moto's S3 server, two `dalle-farm api` processes and three
`dalle-farm worker --gpus cpu` processes on small random weights, and one API key.

The load: `clients` threads submit small jobs (grid_size 1, a few seeds), interactive and bulk
in turn, to both API processes in turn, one job every `submit_interval_s` in all. Each submit
has its own Idempotency-Key and a unique text, and FarmClient retries it on transport errors,
5xx and 429. A 2xx answer makes the job *accepted*. The default, one job every 4 s, is what
three CPU workers on a shared two-core machine finish as fast as it comes (at one every 1.5 s
a backlog grew and outlasted a 5-minute drain); raise it on a bigger machine.

The faults, one every `fault_interval_s` (round-robin over a seeded shuffle of the kinds):
`kill9` (a random worker's process group, replaced after a pause), `sigterm` (a worker that is
rendering a job, waited for, then replaced), `failover` (Sentinel promotes the replica),
`s3_down` (the S3 server stops for `s3_down_s`), `api_restart` (SIGTERM, then a new process on
the same port).

At the end the load stops, the faults end, three workers are live again, and `drain` waits
(at most DRAIN_S plus the visibility timeout) until no accepted job is queued or running;
then tests/soak/checks.py checks every invariant and computes the recoveries.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.http import FarmClient
from core.job import JobStatus
from core.services import FarmServices, build_services
from core.settings import Settings
from core.store import key_id_from_secret
from tests.farm_helpers import (
    AWS_ENV,
    AWS_ENV_REMOVED,
    FarmProcess,
    S3Server,
    http,
    subprocess_env,
    wait_for,
    worker_process,
)
from tests.servers import SentinelRedis, free_port
from tests.soak.checks import Accepted, Fault, SoakReport, check, drain

log = logging.getLogger("soak")

BUCKET = "soak-results"
FAULT_KINDS = ("kill9", "sigterm", "failover", "s3_down", "api_restart")
WORKER_START_S = 180
API_START_S = 60
# Jobs still queued or running this long after the load stops (plus the visibility timeout)
# count as stuck.
DRAIN_S = 300
# How long the master's writes pause so that its replica catches up before a failover.
FAILOVER_PAUSE_MS = 3000


@dataclass
class SoakConfig:
    duration_s: float
    models_root: Path
    work_dir: Path
    report_dir: Path
    submit_interval_s: float = 4.0
    clients: int = 2
    fault_interval_s: float | None = None  # default: duration / 6, at most 60 s
    s3_down_s: float = 20
    visibility_timeout_s: int = 20
    max_jobs: int = 2
    seed: int = 16

    def faults_every_s(self) -> float:
        return self.fault_interval_s or min(60.0, self.duration_s / 6)


@contextlib.contextmanager
def aws_environment() -> Iterator[None]:
    """This process's boto3 (the checks' S3Storage) sees the fake credentials only."""
    saved = dict(os.environ)
    for name in AWS_ENV_REMOVED:
        os.environ.pop(name, None)
    os.environ.update(AWS_ENV)
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


class SoakFarm:
    """The processes of the farm, and the faults done to them."""

    def __init__(self, config: SoakConfig) -> None:
        self.config = config
        self.log_dir = config.work_dir / "logs"
        self.redis = SentinelRedis(config.work_dir / "redis")
        self.s3 = S3Server()
        self.api_ports = [free_port(), free_port()]
        self.apis: list[FarmProcess] = []
        self.workers: dict[str, FarmProcess] = {}
        self._names = itertools.count()
        self.env: dict[str, str] = {}
        self.services: FarmServices | None = None
        self.secret = ""

    # -- start and stop -----------------------------------------------------------------------
    def start(self) -> None:
        self.redis.start()
        self.s3.start()
        farm_env = {
            "DALLE_FARM_REDIS_URL": self.redis.url,
            "DALLE_FARM_S3_ENDPOINT_URL": self.s3.url,
            "DALLE_FARM_S3_BUCKET": BUCKET,
            "DALLE_FARM_MODELS_ROOT": str(self.config.models_root),
            "DALLE_FARM_MODEL": "mini",
            "DALLE_FARM_VISIBILITY_TIMEOUT_S": str(self.config.visibility_timeout_s),
            "DALLE_FARM_MAX_JOBS": str(self.config.max_jobs),
        }
        self.services = build_services(Settings.from_env(farm_env))
        _, self.secret = self.services.store.create_key("soak")
        # One OpenMP thread per worker: three workers share two cores.
        self.env = subprocess_env({**farm_env, "OMP_NUM_THREADS": "1"})
        for _ in range(3):
            self.start_worker(wait=False)
        for port in self.api_ports:
            self.apis.append(self._start_api(port))
        for worker in self.workers.values():
            worker.wait_for_log("worker(s) ready", WORKER_START_S)

    def stop(self) -> None:
        for process in [*self.apis, *self.workers.values()]:
            process.kill_group()
        if self.services is not None:
            self.services.close()
        self.s3.stop()
        self.redis.stop()

    @property
    def store(self) -> Any:
        assert self.services is not None
        return self.services.store

    @property
    def owner(self) -> str:
        owner = key_id_from_secret(self.secret)
        assert owner is not None
        return owner

    def api_url(self, index: int) -> str:
        return f"http://127.0.0.1:{self.api_ports[index]}"

    def _start_api(self, port: int) -> FarmProcess:
        api = FarmProcess(
            ["api", "--port", str(port), "--workers", "1"],
            self.env,
            self.log_dir / f"api-{port}.log",
        ).start()
        url = f"http://127.0.0.1:{port}/healthz"

        def answers() -> bool:
            if api.process is not None and api.process.poll() is not None:
                raise AssertionError(f"the API on {port} exited:\n{api.log()[-3000:]}")
            with contextlib.suppress(OSError):
                return http("GET", url, timeout_s=5)[0] == 200
            return False

        wait_for(answers, API_START_S, f"the API on port {port}", 0.3)
        return api

    def start_worker(self, wait: bool = True) -> FarmProcess:
        node = f"soak{next(self._names)}"
        worker = worker_process(self.env, self.log_dir, node).start()
        self.workers[node] = worker
        if wait:
            worker.wait_for_log("worker(s) ready", WORKER_START_S)
        return worker

    def live_workers(self) -> dict[str, FarmProcess]:
        return {
            node: worker
            for node, worker in self.workers.items()
            if worker.process is not None and worker.process.poll() is None
        }

    # -- faults -------------------------------------------------------------------------------
    def kill9(self, rng: random.Random) -> str:
        node = rng.choice(sorted(self.live_workers()))
        self.workers[node].kill_group()
        time.sleep(3)
        replacement = self.start_worker(wait=False)
        return f"kill -9 of cpu@{node}; started {replacement.log_path.stem}"

    def sigterm(self, rng: random.Random) -> str:
        live = self.live_workers()

        def rendering() -> str | None:
            jobs, _ = self.store.list_jobs(self.owner, status=JobStatus.RUNNING, limit=50)
            nodes = [job.worker.split("@", 1)[1] for job in jobs if job.worker]
            busy = sorted(node for node in nodes if node in live)
            return rng.choice(busy) if busy else None

        try:
            node = wait_for(rendering, 60, "a worker rendering a job", 0.2)
        except AssertionError:
            node = rng.choice(sorted(live))
            note = " (none was rendering within 60 s)"
        else:
            note = " while rendering"
        status = self.workers[node].terminate(timeout_s=180)
        self.start_worker(wait=False)
        return f"SIGTERM to cpu@{node}{note}; exit status {status}"

    def failover(self, rng: random.Random) -> str:
        """Sentinel promotes the replica (SENTINEL FAILOVER), as when the master fails; the
        master's writes pause for up to FAILOVER_PAUSE_MS first while the replica catches up
        (SentinelRedis.failover)."""
        before = self.redis.master_port()
        synced = self.redis.failover(FAILOVER_PAUSE_MS)
        return (
            f"Redis master {before} -> {self.redis.master_port()}"
            f" (replica {'in sync' if synced else 'maybe behind'} when promoted)"
        )

    def s3_down(self, rng: random.Random) -> str:
        self.s3.stop()
        time.sleep(self.config.s3_down_s)
        self.s3.start()
        return f"S3 down for {self.config.s3_down_s:g} s"

    def api_restart(self, rng: random.Random) -> str:
        index = rng.randrange(len(self.apis))
        status = self.apis[index].terminate(timeout_s=60)
        self.apis[index] = self._start_api(self.api_ports[index])
        return f"API on port {self.api_ports[index]} restarted (exit status {status})"

    def fault(self, kind: str) -> Callable[[random.Random], str]:
        actions: dict[str, Callable[[random.Random], str]] = {
            "kill9": self.kill9,
            "sigterm": self.sigterm,
            "failover": self.failover,
            "s3_down": self.s3_down,
            "api_restart": self.api_restart,
        }
        return actions[kind]


class Load:
    """Client threads submitting jobs until stopped; records what the API accepted."""

    def __init__(self, farm: SoakFarm, config: SoakConfig) -> None:
        self.farm = farm
        self.config = config
        self.accepted: list[Accepted] = []
        self.gave_up: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(n,), name=f"soak-client-{n}", daemon=True)
            for n in range(config.clients)
        ]
        self.run_id = f"{int(time.time())}-{random.Random(config.seed).randrange(10**6)}"

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=600)

    def _run(self, client_no: int) -> None:
        clients = [
            FarmClient(
                self.farm.api_url(i), self.farm.secret, max_retries=12, max_backoff_s=5,
                timeout_s=20,
            )
            for i in range(len(self.farm.api_ports))
        ]  # fmt: skip
        period = self.config.submit_interval_s * self.config.clients
        self._stop.wait(client_no * self.config.submit_interval_s)
        for n in itertools.count():
            if self._stop.is_set():
                return
            began = time.monotonic()
            api = (client_no + n) % len(clients)
            priority = "bulk" if (client_no + n) % 2 else "interactive"
            text = f"soak {self.run_id} client {client_no} job {n}"
            key = f"soak-{self.run_id}-{client_no}-{n}"
            seed = (client_no + n) % 4 + 1
            try:
                job = clients[api].submit(
                    text, idempotency_key=key, seed=seed, grid_size=1, priority=priority
                )
            except Exception as error:
                log.warning("submit %s gave up: %s", key, error)
                with self._lock:
                    self.gave_up.append(f"{key}: {error}")
            else:
                with self._lock:
                    self.accepted.append(
                        Accepted(job.id, key, text, seed, priority, api, time.time())
                    )
            self._stop.wait(max(0.0, period - (time.monotonic() - began)))


class Faults:
    """The fault schedule on a thread of its own."""

    def __init__(self, farm: SoakFarm, config: SoakConfig) -> None:
        self.farm = farm
        self.config = config
        self.done: list[Fault] = []
        self.errors: list[str] = []
        self._rng = random.Random(config.seed)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-faults", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=900)

    def _run(self) -> None:
        kinds = list(FAULT_KINDS)
        self._rng.shuffle(kinds)
        every = self.config.faults_every_s()
        began = time.monotonic()
        for n in itertools.count():
            at = began + every * (n + 1)
            # The last fault ends well before the load does, so that recovery is seen.
            if at > began + self.config.duration_s - every / 2:
                return
            if self._stop.wait(max(0.0, at - time.monotonic())):
                return
            kind = kinds[n % len(kinds)]
            started = time.time()
            log.info("fault %s: starting", kind)
            done = True
            try:
                detail = self.farm.fault(kind)(self._rng)
            except Exception as error:
                detail, done = f"the fault itself failed: {error!r}", False
                self.errors.append(f"{kind}: {error!r}")
            self.done.append(Fault(kind, started, time.time(), detail, done))
            log.info("fault %s done after %.1f s: %s", kind, time.time() - started, detail)


def run_soak(config: SoakConfig) -> SoakReport:
    """Start the farm, run the load and the faults for config.duration_s, drain, check."""
    # moto's server runs in this process: its request log would bury the soak's own.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    with aws_environment():
        farm = SoakFarm(config)
        try:
            farm.start()
            load, faults = Load(farm, config), Faults(farm, config)
            log.info("farm up; load and faults for %.0f s", config.duration_s)
            load.start()
            faults.start()
            time.sleep(config.duration_s)
            load.stop()
            faults.stop()
            log.info("load stopped: %d accepted; draining", len(load.accepted))
            ensure_whole(farm)
            drain(farm, load.accepted, DRAIN_S + config.visibility_timeout_s)
            report = check(
                farm, load.accepted, load.gave_up, faults.done, faults.errors, config.duration_s
            )
        finally:
            farm.stop()
    path = report.write(config.report_dir)
    log.info("report: %s", path)
    return report


def ensure_whole(farm: SoakFarm) -> None:
    """Three live workers again (a fault may have left one down)."""
    while len(farm.live_workers()) < 3:
        farm.start_worker(wait=True)
