"""Real parts for the farm's end-to-end tests: moto's S3 server that a test can stop and start
again, `dalle-farm` subprocesses (worker, api, serve) with their logs, and polling helpers."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from tests.servers import RedisServer, free_port

if TYPE_CHECKING:  # imported when a server starts: the GPU benchmarks run without moto
    import pytest
    from flask.testing import FlaskClient
    from moto.server import ThreadedMotoServer

    from core.services import FarmServices
    from core.settings import Settings

REPO_ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")

# Fake credentials, and nothing from the machine's own AWS configuration.
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "test",
    "AWS_SECRET_ACCESS_KEY": "test",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": "/nonexistent/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
}
AWS_ENV_REMOVED = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


def use_test_aws_credentials(patch: pytest.MonkeyPatch) -> None:
    """This process's S3 clients get the fake credentials (AWS_ENV), none of the machine's."""
    for name in AWS_ENV_REMOVED:
        patch.delenv(name, raising=False)
    for name, value in AWS_ENV.items():
        patch.setenv(name, value)


def wait_for(
    condition: Callable[[], T | None], timeout_s: float, what: str, interval_s: float = 0.1
) -> T:
    """Poll `condition` until it returns something truthy; fail saying `what` did not happen."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


class S3Server:
    """moto's S3 server on a fixed loopback port, which a test may stop (connections are then
    refused) and start again; buckets and objects live on in this process meanwhile."""

    def __init__(self) -> None:
        self.port = free_port()
        self._server: ThreadedMotoServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        server.start()
        self._server = server

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.stop()
        # ThreadedMotoServer.stop leaves the socket listening: clients would hang, not fail.
        inner = self._server._server
        if inner is not None:
            inner.server_close()
        self._server = None


@dataclass
class Backends:
    """Redis and S3 on loopback, and `env`: the farm's DALLE_FARM_* settings for them."""

    redis_server: RedisServer
    s3: S3Server
    env: dict[str, str]

    @property
    def settings(self) -> Settings:
        from core.settings import Settings

        return Settings.from_env(self.env)


@contextlib.contextmanager
def loopback_backends(
    root: Path, models_root: Path, bucket: str, *, appendonly: bool = True, **settings: str
) -> Iterator[Backends]:
    """A redis-server and moto's S3 server of the test's own on loopback, for a farm on the
    model files in `models_root` that stores results in `bucket`; `settings` are more of the
    farm's (MAX_JOBS="4" for DALLE_FARM_MAX_JOBS). This process uses the test credentials, and
    no proxy for loopback, meanwhile."""
    import pytest

    with pytest.MonkeyPatch.context() as patch:
        use_test_aws_credentials(patch)
        for name in ("NO_PROXY", "no_proxy"):  # HTTP clients here go straight to loopback
            patch.setenv(name, "127.0.0.1,localhost")
        redis_server = RedisServer(root / "redis", appendonly=appendonly)
        redis_server.start()
        s3 = S3Server()
        try:
            s3.start()
            env = {
                "DALLE_FARM_REDIS_URL": redis_server.url,
                "DALLE_FARM_S3_ENDPOINT_URL": s3.url,
                "DALLE_FARM_S3_BUCKET": bucket,
                "DALLE_FARM_MODELS_ROOT": str(models_root),
                **{f"DALLE_FARM_{name}": value for name, value in settings.items()},
            }
            yield Backends(redis_server, s3, env)
        finally:
            s3.stop()
            redis_server.kill()


def in_process_api(settings: Settings) -> tuple[FarmServices, FlaskClient, str]:
    """The farm's services for `settings`, Flask's test client of the API on them, and the
    secret of a new API key "tests"."""
    from api.app import create_app
    from core.services import build_services

    services = build_services(settings)
    app = create_app(settings, store=services.store, storage=services.storage, queue=services.queue)
    _, secret = services.store.create_key("tests")
    return services, app.test_client(), secret


def subprocess_env(extra: Mapping[str, str]) -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("DALLE_FARM_") and name not in AWS_ENV_REMOVED
    }
    env.update(AWS_ENV)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class FarmProcess:
    """A `python -m cli …` subprocess in its own process group, its output in a log file."""

    def __init__(self, args: list[str], env: Mapping[str, str], log_path: Path) -> None:
        self.args = args
        self.env = dict(env)
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> FarmProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "cli", *self.args],
                cwd=REPO_ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, text: str, timeout_s: float) -> None:
        def seen() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(
                    f"{self.args[0]} exited with {self.process.returncode}:\n{self.log()[-4000:]}"
                )
            return text in self.log()

        try:
            wait_for(seen, timeout_s, f"{text!r} in the log of {self.args[0]}", 0.2)
        except AssertionError as error:
            raise AssertionError(f"{error}\n--- log ---\n{self.log()[-4000:]}") from None

    def terminate(self, timeout_s: float = 60) -> int:
        """SIGTERM, as an operator or Docker would, and wait for the exit status."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill_group()
            raise AssertionError(
                f"{self.args[0]} did not stop on SIGTERM:\n{self.log()[-4000:]}"
            ) from None

    def kill_group(self) -> None:
        """kill -9 of the whole process tree (its process group), as a crash would."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def descendants(self) -> list[int]:
        """Every living process under this one (from /proc), parents before children."""
        parents: dict[int, int] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rpartition(")")[2].split()
            if fields[0] != "Z":
                parents[int(entry.name)] = int(fields[1])
        found: list[int] = []
        frontier = [self.pid]
        while frontier:
            children = sorted(pid for pid, parent in parents.items() if parent in frontier)
            found.extend(children)
            frontier = children
        return found


def worker_process(
    env: Mapping[str, str], log_dir: Path, node: str, extra_args: tuple[str, ...] = ()
) -> FarmProcess:
    """A `dalle-farm worker --gpus cpu` named cpu@{node} (not started)."""
    return FarmProcess(
        ["worker", "--gpus", "cpu", "--node-name", node, "--loglevel", "INFO", *extra_args],
        env,
        log_dir / f"worker-{node}.log",
    )


def http(
    method: str,
    url: str,
    body: object | None = None,
    headers: Mapping[str, str] | None = None,
    timeout_s: float = 30,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request without proxies; returns (status, headers, body) for any status."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if data is not None:
        request.add_header("Content-Type", "application/json")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout_s) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def http_json(method: str, url: str, body: object | None = None, **kwargs: Any) -> Any:
    status, _, content = http(method, url, body, **kwargs)
    assert 200 <= status < 300, f"{method} {url}: {status} {content[:500]!r}"
    return json.loads(content)
