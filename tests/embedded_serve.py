"""`dalle-farm serve` (the embedded farm: SQLite, local files, one worker) as a subprocess of a
test, on a free loopback port, and the calls a user would make to it with curl.

Not in tests/servers.py: this builds on tests/farm_helpers.py, which imports tests/servers.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.farm_helpers import FarmProcess, http, http_json, wait_for
from tests.servers import free_port

JOB_TIMEOUT_S = 90


class Serve:
    """One `dalle-farm serve` process; `start()` returns once its worker is ready and the API
    answers. Requests carry `headers` (set an Authorization header where a key is needed)."""

    def __init__(self, env: dict[str, str], log: Path, host: str = "127.0.0.1") -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.process = FarmProcess(["serve", "--host", host, "--port", str(self.port)], env, log)
        self.headers: dict[str, str] = {}

    def start(self) -> Serve:
        self.process.start()
        self.process.wait_for_log("the worker is ready", 90)
        wait_for(lambda: self._healthy(), 30, "the API to answer")
        return self

    def _healthy(self) -> bool:
        try:
            return http("GET", f"{self.base}/healthz", timeout_s=5)[0] == 200
        except OSError:
            return False

    def submit(self, body: dict[str, Any]) -> Any:
        status, headers, content = http("POST", f"{self.base}/v1/jobs", body, self.headers)
        assert status == 202, content[:500]
        assert headers["Location"].endswith(json.loads(content)["id"])
        return json.loads(content)

    def job(self, job_id: str) -> Any:
        return http_json("GET", f"{self.base}/v1/jobs/{job_id}", headers=self.headers)

    def wait_status(self, job_id: str, status: str) -> Any:
        def reached() -> Any:
            job = self.job(job_id)
            assert job["status"] in ("queued", "running", status), job
            return job if job["status"] == status else None

        try:
            return wait_for(reached, JOB_TIMEOUT_S, f"job {job_id} to be {status}", 0.1)
        except AssertionError as error:
            raise AssertionError(f"{error}\n{self.process.log()[-4000:]}") from None

    def fetch(self, url: str) -> bytes:
        status, _, content = http("GET", self.base + url, headers=self.headers)
        assert status == 200, (url, status, content[:300])
        return content
