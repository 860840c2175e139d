"""Schemathesis against both farm modes, with real processes on small random weights:

- embedded: `dalle-farm serve` (API and embedded worker, SQLite, local files, no key on loopback);
- distributed: `dalle-farm api` with redis-server, moto's S3 server and a `dalle-farm worker`,
  and a key from `dalle-farm keys create`.

Each runs the schemathesis CLI against GET /openapi.json with every check, every phase including
the stateful one (chains of calls along the document's links), a fixed seed and a bounded number
of examples, and passes only with no failure and no error. tests/schemathesis.toml holds the
settings and the few exceptions, each with its reason; tests/schemathesis_hooks.py holds our own
check that keeps those exceptions exact. The farm serves only "mini", and DALLE_FARM_MAX_GRID_SIZE
is 2 (the document says so), which bounds what a schema-valid job costs to render.

CI form (the default: 100 examples per operation; about 1.5 minutes for both modes on a
2-core runner):

    .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_schemathesis.py

Long form (10 times the examples and stateful scenarios; about 7 minutes for both modes):

    DALLE_FARM_SCHEMATHESIS_EXAMPLES=1000 .venv/bin/python -m pytest -q -p no:cacheprovider \
        tests/test_schemathesis.py

A failure shows schemathesis' own summary: each failing check with a curl reproduction. The
full output and a JSON report are kept in the test's tmp_path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.farm_helpers import (
    REPO_ROOT,
    FarmProcess,
    S3Server,
    http,
    subprocess_env,
    wait_for,
    worker_process,
)
from tests.schemathesis_hooks import SERVED_MODELS_ENV, documented_rejections
from tests.servers import RedisServer, free_port

EXAMPLES_ENV = "DALLE_FARM_SCHEMATHESIS_EXAMPLES"
CI_EXAMPLES = 100
CONFIG = REPO_ROOT / "tests" / "schemathesis.toml"
HOOKS = REPO_ROOT / "tests" / "schemathesis_hooks.py"
SERVED_MODEL = "mini"
# Every job schemathesis submits is rendered: grid_size 2 at most keeps each one small.
MAX_GRID_SIZE = "2"
# Generous bounds that only a hung part reaches.
START_S = 120
RENDER_S = 180
RUN_S = 3600


def examples() -> int:
    raw = os.environ.get(EXAMPLES_ENV, str(CI_EXAMPLES))
    try:
        count = int(raw)
    except ValueError:
        raise pytest.UsageError(f"{EXAMPLES_ENV} must be a whole number, got {raw!r}") from None
    if count < 1:
        raise pytest.UsageError(f"{EXAMPLES_ENV} must be at least 1, got {count}")
    return count


@dataclass
class RunningFarm:
    base: str
    headers: dict[str, str]
    processes: list[FarmProcess] = field(default_factory=list)

    def logs(self) -> str:
        return "\n".join(
            f"--- {process.args[0]} ({process.log_path}) ---\n{process.log()[-3000:]}"
            for process in self.processes
        )

    def check_alive(self) -> None:
        for process in self.processes:
            if process.process is not None and process.process.poll() is not None:
                raise AssertionError(
                    f"{process.args[0]} exited with {process.process.returncode}\n{self.logs()}"
                )


def farm_env(small_models_root: Path, extra: Mapping[str, str]) -> dict[str, str]:
    return subprocess_env(
        {
            "DALLE_FARM_MODELS_ROOT": str(small_models_root),
            "DALLE_FARM_MODEL": SERVED_MODEL,
            "DALLE_FARM_MAX_GRID_SIZE": MAX_GRID_SIZE,
            # One decoder thread: the worker renders schemathesis' jobs while the API answers
            # on the same 2 cores, and spinning OpenMP threads would starve it.
            "OMP_NUM_THREADS": "1",
            **extra,
        }
    )


def render_one(farm: RunningFarm) -> Any:
    """Submit a job until the farm takes it, and wait until it succeeded: the worker is live,
    and the run starts with a finished job (with files) that listing and links can reach."""

    last_answer = ["none yet"]

    def submitted() -> str | None:
        farm.check_alive()
        try:
            status, _, content = http(
                "POST",
                f"{farm.base}/v1/jobs",
                {"text": "a lighthouse at dawn", "seed": 7, "grid_size": 1},
                farm.headers,
                timeout_s=30,
            )
        except OSError as error:
            last_answer[0] = str(error)  # not listening yet
            return None
        last_answer[0] = f"{status} {content[:500]!r}"
        # 503 (a backend not ready) or 422 (no live worker serves the model yet): try again.
        if status in (422, 503):
            return None
        assert status == 202, f"the first job was refused: {last_answer[0]}"
        job_id: str = json.loads(content)["id"]
        return job_id

    def succeeded(job_id: str) -> Any:
        farm.check_alive()
        status, _, content = http("GET", f"{farm.base}/v1/jobs/{job_id}", headers=farm.headers)
        assert status == 200, content[:500]
        job = json.loads(content)
        assert job["status"] in ("queued", "running", "succeeded"), job
        return job if job["status"] == "succeeded" else None

    try:
        job_id = wait_for(submitted, START_S, "the farm to take a job", 0.5)
        return wait_for(lambda: succeeded(job_id), RENDER_S, f"job {job_id} to succeed", 0.2)
    except AssertionError as error:
        raise AssertionError(f"{error}\nlast answer: {last_answer[0]}\n{farm.logs()}") from None


def fetch_document(farm: RunningFarm) -> Any:
    status, _, content = http("GET", f"{farm.base}/openapi.json", headers=farm.headers)
    assert status == 200, content[:500]
    return json.loads(content)


def declared_links(document: Any) -> int:
    """How many links the document's responses declare (the stateful phase follows them)."""
    count = 0
    for path_item in (document.get("paths") or {}).values():
        for operation in path_item.values():
            if not isinstance(operation, dict):
                continue
            for response in (operation.get("responses") or {}).values():
                if isinstance(response, dict):
                    count += len(response.get("links") or {})
    return count


def run_schemathesis(farm: RunningFarm, out: Path) -> None:
    """Run the CLI against the farm; fail with its summary unless every check passed."""
    report = out / "schemathesis-report.json"
    command = [
        sys.executable, "-m", "schemathesis.cli",
        "--config-file", str(CONFIG),
        "run", f"{farm.base}/openapi.json",
        "--max-examples", str(examples()),
        "--no-color",
        "--report", "json",
        "--report-json-path", str(report),
    ]  # fmt: skip
    for name, value in farm.headers.items():
        command += ["--header", f"{name}: {value}"]
    env = subprocess_env({"SCHEMATHESIS_HOOKS": str(HOOKS), SERVED_MODELS_ENV: SERVED_MODEL})
    log = out / "schemathesis.txt"
    with log.open("wb") as output:
        # The cwd is the test's folder: the CLI writes nothing into the checkout.
        finished = subprocess.run(
            command, cwd=out, env=env, stdout=output, stderr=subprocess.STDOUT, timeout=RUN_S
        )
    text = log.read_text(errors="replace")

    problems = []
    summary = _summary(text)
    if finished.returncode != 0 or not report.exists():
        problems.append(f"schemathesis exited with {finished.returncode}:\n{summary}")
    else:
        result = json.loads(report.read_text())
        if result["failures"] or result["errors"]:
            problems.append(f"schemathesis found failures:\n{summary}")
        stateful = result["phases"]["stateful"]
        if stateful["status"] == "skip":
            problems.append(f"the stateful phase did not run: {stateful['skip_reason']}")
        if result["operations"]["tested"] == 0:
            problems.append("schemathesis tested no operation")
    if declared_links(fetch_document(farm)) == 0:
        problems.append(
            "the OpenAPI document declares no links: the stateful phase followed only links "
            "schemathesis inferred, not the API's own (responses[...].links)"
        )
    farm.check_alive()
    assert not problems, "\n\n".join(problems) + f"\n\nfull output: {log}\nreport: {report}"


def _summary(text: str) -> str:
    """The CLI's failures and summary, or the end of its output when it stopped early."""
    start = text.find("=== FAILURES ===")
    if start < 0:
        start = text.find("=== ERRORS ===")
    if start < 0:
        start = max(0, len(text) - 6000)
    summary = text[start:]
    return summary if len(summary) <= 20000 else summary[:10000] + "\n…\n" + summary[-10000:]


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as exits:
        yield exits


def test_embedded_farm_passes_schemathesis(
    small_models_root: Path, tmp_path: Path, stack: ExitStack
) -> None:
    port = free_port()
    env = farm_env(small_models_root, {"DALLE_FARM_DATA_DIR": str(tmp_path / "data")})
    serve = FarmProcess(["serve", "--port", str(port)], env, tmp_path / "serve.log")
    stack.callback(serve.kill_group)
    serve.start()
    # On loopback no key is needed: the document says so, and schemathesis sends none.
    farm = RunningFarm(f"http://127.0.0.1:{port}", {}, [serve])
    render_one(farm)
    run_schemathesis(farm, tmp_path)


def test_distributed_farm_passes_schemathesis(
    small_models_root: Path, tmp_path: Path, stack: ExitStack
) -> None:
    redis_server = RedisServer(tmp_path / "redis", appendonly=False)
    stack.callback(redis_server.kill)
    redis_server.start()
    s3 = S3Server()
    stack.callback(s3.stop)
    s3.start()
    env = farm_env(
        small_models_root,
        {
            "DALLE_FARM_REDIS_URL": redis_server.url,
            "DALLE_FARM_S3_ENDPOINT_URL": s3.url,
            "DALLE_FARM_S3_BUCKET": "schemathesis",
        },
    )
    created = subprocess.run(
        [sys.executable, "-m", "cli", "keys", "create", "schemathesis"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=START_S,
    )
    assert created.returncode == 0, created.stdout + created.stderr
    secret = created.stdout.strip().splitlines()[-1]

    port = free_port()
    api = FarmProcess(["api", "--port", str(port)], env, tmp_path / "api.log")
    worker = worker_process(env, tmp_path, "schemathesis")
    for process in (api, worker):
        stack.callback(process.kill_group)
        process.start()
    farm = RunningFarm(
        f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {secret}"}, [api, worker]
    )
    render_one(farm)
    run_schemathesis(farm, tmp_path)


# The exceptions' own logic, on hand-made cases: a run against a farm meets each answer only when
# the generator happens to draw it, and must fail on a 422 or 400 outside the documented reasons.


def fake_case(method: str, *, body: Any = None, query: Any = None, positive: bool = True) -> Any:
    mode = SimpleNamespace(is_positive=positive)
    return SimpleNamespace(
        operation=SimpleNamespace(method=method, path="/v1/jobs"),
        body=body,
        query=query,
        meta=SimpleNamespace(generation=SimpleNamespace(mode=mode), phase=None),
        _meta=None,
    )


def fake_response(status: int, body: Any) -> Any:
    return SimpleNamespace(status_code=status, content=json.dumps(body).encode())


def problem(*fields: str) -> dict[str, Any]:
    return {"errors": [{"field": name, "message": "…"} for name in fields]}


def test_a_422_is_accepted_only_for_a_model_no_worker_serves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(SERVED_MODELS_ENV, "mini")
    unserved = fake_case("POST", body={"text": "a fox", "model": "mega"})
    assert documented_rejections(None, fake_response(422, problem("model")), unserved) is None
    with pytest.raises(AssertionError, match="asked for: 'mini'"):
        served = fake_case("POST", body={"text": "a fox", "model": "mini"})
        documented_rejections(None, fake_response(422, problem("model")), served)
    with pytest.raises(AssertionError, match="errors on: \\['model', 'grid_size'\\]"):
        documented_rejections(None, fake_response(422, problem("model", "grid_size")), unserved)
    # Invalid data is negative_data_rejection's business.
    negative = fake_case("POST", body={"text": "a fox", "model": "mini"}, positive=False)
    assert documented_rejections(None, fake_response(422, problem("text")), negative) is None


def test_a_400_is_accepted_only_for_a_cursor_the_api_never_gave_out() -> None:
    forged = fake_case("GET", query={"cursor": "forged-by-schemathesis"})
    assert documented_rejections(None, fake_response(400, problem("cursor")), forged) is None
    with pytest.raises(AssertionError, match="errors on: \\['limit'\\]"):
        documented_rejections(None, fake_response(400, problem("limit")), forged)
    page = {"jobs": [], "next_cursor": "issued-by-the-api"}
    documented_rejections(None, fake_response(200, page), fake_case("GET", query={}))
    issued = fake_case("GET", query={"cursor": "issued-by-the-api"})
    with pytest.raises(AssertionError, match="given out by the API: True"):
        documented_rejections(None, fake_response(400, problem("cursor")), issued)
