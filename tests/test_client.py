"""client.FarmClient against real servers: a `dalle-farm serve` subprocess on small random
weights (keys required), the fault proxy of tests/fault_proxy.py in front of it for 429, 503
and lost answers, and bare sockets that never answer or refuse. Pure helpers (Retry-After
parsing, backoff, problem parsing) are tested directly."""

from __future__ import annotations

import contextlib
import io
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path

import pytest
from PIL import Image

from client import (
    BadRequest,
    Conflict,
    FarmClient,
    JobFailed,
    NotFound,
    RateLimited,
    RequestTimeout,
    ServerError,
    TransportError,
    Unauthorized,
    WaitTimeout,
)
from client.answers import is_retryable, parse_retry_after
from client.errors import Problem, api_error
from tests.farm_helpers import REPO_ROOT, FarmProcess, http, subprocess_env, wait_for
from tests.fault_proxy import Fault, FaultProxy
from tests.servers import free_port

JOB_TIMEOUT_S = 120


class Sleeps:
    """A client's sleep that records each delay; it sleeps for real unless told not to."""

    def __init__(self, real: bool = True) -> None:
        self.delays: list[float] = []
        self.real = real

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        if self.real:
            threading.Event().wait(seconds)


@pytest.fixture(scope="module")
def no_proxy() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NO_PROXY", "127.0.0.1,localhost")
        patch.setenv("no_proxy", "127.0.0.1,localhost")
        patch.delenv("DALLE_FARM_SERVER", raising=False)
        patch.delenv("DALLE_FARM_API_KEY", raising=False)
        yield


@pytest.fixture(scope="module")
def farm(
    tmp_path_factory: pytest.TempPathFactory, small_models_root: Path, no_proxy: None
) -> Iterator[tuple[str, str]]:
    """A `dalle-farm serve` that needs a key: (its URL, a key's secret)."""
    root = tmp_path_factory.mktemp("client-farm")
    env = subprocess_env(
        {
            "DALLE_FARM_DATA_DIR": str(root / "data"),
            "DALLE_FARM_MODELS_ROOT": str(small_models_root),
        }
    )
    created = subprocess.run(
        [sys.executable, "-m", "cli", "keys", "create", "client-tests"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    secret = created.stdout.strip().splitlines()[-1]
    port = free_port()
    serve = FarmProcess(
        ["serve", "--host", "0.0.0.0", "--port", str(port)], env, root / "serve.log"
    ).start()
    base = f"http://127.0.0.1:{port}"
    try:
        serve.wait_for_log("the worker is ready", 120)
        wait_for(lambda: _answers(base), 30, "the API to answer")
        yield base, secret
        assert serve.terminate() == 0
    finally:
        serve.kill_group()


def _answers(base: str) -> bool:
    try:
        return http("GET", f"{base}/healthz", timeout_s=5)[0] == 200
    except OSError:
        return False


def test_submit_wait_download_list(farm: tuple[str, str], tmp_path: Path) -> None:
    base, secret = farm
    with FarmClient(base, secret) as client:
        job = client.submit("a red bicycle", seed=11, grid_size=2)
        assert job.status in ("queued", "running") and job.params["seed"] == 11
        done = client.wait(job.id, timeout_s=JOB_TIMEOUT_S)
        assert done.status == "succeeded" and done.is_finished
        assert done.grid is not None and len(done.images) == 4
        # embedded mode: relative /v1/files/ URLs, fetched with the key
        assert done.images[0].url.startswith("/v1/files/")
        grid = Image.open(io.BytesIO(client.download(done.grid)))
        assert grid.size == (512, 512)
        tile = client.download(done.images[3], tmp_path / "tile.png")
        assert (tmp_path / "tile.png").read_bytes() == tile
        assert Image.open(io.BytesIO(tile)).size == (256, 256)
        assert client.get(job.id).id == job.id
        assert job.id in [listed.id for listed in client.list(status="succeeded")]
        jobs, _ = client.list_page(limit=1)
        assert len(jobs) == 1


def test_typed_errors_carry_the_problem_detail(farm: tuple[str, str]) -> None:
    base, secret = farm
    with FarmClient(base, secret) as client:
        with pytest.raises(BadRequest) as invalid:
            client.submit("too big", grid_size=99)
        assert invalid.value.status == 422
        assert invalid.value.problem.type.endswith("/invalid-params")
        assert [error["field"] for error in invalid.value.problem.errors] == ["grid_size"]
        assert "grid_size" in str(invalid.value)
        with pytest.raises(NotFound) as missing:
            client.get("0" * 32)
        assert "there is no job" in missing.value.problem.detail
        with pytest.raises(Conflict) as reused:
            client.submit("one body", seed=1, idempotency_key="reused-key")
            client.submit("another body", seed=1, idempotency_key="reused-key")
        assert reused.value.problem.type.endswith("/idempotency-conflict")
    with FarmClient(base, "not-a-key") as stranger, pytest.raises(Unauthorized) as refused:
        stranger.get("0" * 32)
    assert "unknown or has been revoked" in refused.value.problem.detail


def test_wait_times_out_then_a_canceled_job_fails_the_wait(farm: tuple[str, str]) -> None:
    base, secret = farm
    with FarmClient(base, secret) as client:
        # 64 images take far longer than the half second the wait allows.
        job = client.submit("a long render", grid_size=8)
        with pytest.raises(WaitTimeout) as late:
            client.wait(job.id, timeout_s=0.5)
        assert late.value.job.id == job.id and not late.value.job.is_finished
        client.cancel(job.id)
        with pytest.raises(JobFailed) as failed:
            client.wait(job.id, timeout_s=JOB_TIMEOUT_S)
        assert failed.value.job.status == "canceled"
        assert client.cancel(job.id).status == "canceled"  # again: 200, same job
        assert client.wait(job.id, raise_on_failure=False).status == "canceled"


def test_a_lost_answer_to_submit_is_retried_without_a_second_job(farm: tuple[str, str]) -> None:
    base, secret = farm
    with FaultProxy(base) as proxy, FarmClient(proxy.url, secret, sleep=Sleeps()) as client:
        before = sum(1 for _ in client.list())
        # The server creates the job, but the client gets a 503 instead of its answer.
        proxy.inject("POST", "/v1/jobs", Fault(503, retry_after="0", forward=True))
        job = client.submit("asked twice, made once", seed=5)
        assert sum(1 for _ in client.list()) == before + 1
        posts = [seen for seen in proxy.seen if seen.method == "POST"]
        assert [seen.status for seen in posts] == [503, 200]  # the retry was replayed
        assert posts[0].idempotency_key == posts[1].idempotency_key is not None
        with contextlib.suppress(Conflict):  # free the worker, unless the job has finished
            client.cancel(job.id)


def test_429_and_5xx_are_retried_honouring_retry_after(farm: tuple[str, str]) -> None:
    base, secret = farm
    sleeps = Sleeps()
    with (
        FaultProxy(base) as proxy,
        FarmClient(proxy.url, secret, sleep=sleeps, backoff_s=0.2, max_backoff_s=0.2) as client,
    ):
        job = client.submit("retried reads", seed=3)
        proxy.inject(
            "GET",
            f"/v1/jobs/{job.id}",
            Fault(429, retry_after="1"),
            Fault(503, retry_after="2"),
            Fault(502),
            Fault(500),
        )
        assert client.get(job.id).id == job.id
        assert sleeps.delays[:2] == [1.0, 2.0]
        assert all(0.1 <= delay <= 0.2 for delay in sleeps.delays[2:])
        assert len(sleeps.delays) == 4 and proxy.pending_faults() == 0
        with contextlib.suppress(Conflict):  # free the worker, unless the job has finished
            client.cancel(job.id)


def test_retries_end_in_typed_errors(farm: tuple[str, str]) -> None:
    base, secret = farm
    with FaultProxy(base) as proxy:
        sleeps = Sleeps(real=False)
        client = FarmClient(proxy.url, secret, max_retries=2, sleep=sleeps)
        proxy.inject("GET", "/v1/jobs", *[Fault(503, retry_after="7")] * 3)
        with pytest.raises(ServerError) as unavailable:
            client.list_page()
        assert unavailable.value.problem.detail == "the fault proxy answered 503"
        assert sleeps.delays == [7.0, 7.0]
        proxy.inject("GET", "/v1/jobs", *[Fault(429)] * 3)
        with pytest.raises(RateLimited):
            client.list_page()
        # A 4xx other than 429 is not retried.
        before = len(proxy.seen)
        with pytest.raises(NotFound):
            client.get("f" * 32)
        assert len(proxy.seen) == before + 1
        client.close()


def test_timeouts_and_refused_connections(no_proxy: None) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        sleeps = Sleeps(real=False)
        client = FarmClient(url, timeout_s=0.3, max_retries=1, sleep=sleeps)
        with pytest.raises(RequestTimeout) as late:
            client.get("0" * 32)
        assert "no answer within 0.3 s" in str(late.value)
        assert len(sleeps.delays) == 1  # one retry, then the error
        client.close()
    closed = FarmClient(f"http://127.0.0.1:{free_port()}", max_retries=0)
    with pytest.raises(TransportError) as refused:
        closed.list_page()
    assert not isinstance(refused.value, RequestTimeout)


def test_retry_after_backoff_and_problem_parsing() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    later = datetime.now(timezone.utc) + timedelta(seconds=30)
    assert 25 <= (parse_retry_after(format_datetime(later, usegmt=True)) or 0) <= 30
    client = FarmClient("http://127.0.0.1:1", backoff_s=1, max_backoff_s=8, max_retry_after_s=60)
    assert client.retry_delay(0, 600.0) == 60.0
    for attempt, ceiling in ((0, 1), (2, 4), (10, 8)):
        assert ceiling / 2 <= client.retry_delay(attempt, None) <= ceiling
    assert [
        status for status in (400, 404, 408, 409, 422, 429, 500, 503) if is_retryable(status)
    ] == [
        408,
        429,
        500,
        503,
    ]
    html = Problem.from_response(502, "Bad Gateway", "text/html", b"<h1>bad gateway</h1>")
    assert (html.title, html.detail) == ("Bad Gateway", "<h1>bad gateway</h1>")
    assert isinstance(api_error("GET", "/x", html), ServerError)
    with pytest.raises(ValueError):
        FarmClient("ftp://farm")
