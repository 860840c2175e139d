"""Webhooks end to end on the embedded `dalle-farm serve` (a real subprocess, small random
weights, a loopback receiver allowed by DALLE_FARM_WEBHOOK_ALLOW), and the `keys` commands that
show and rotate webhook secrets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from core.store_sqlite import SqliteJobStore
from core.webhooks import verify
from tests.embedded_serve import JOB_TIMEOUT_S, Serve
from tests.farm_helpers import REPO_ROOT, http, subprocess_env, wait_for
from tests.test_webhooks_dispatch import HANG, Receiver, receiver

__all__ = ["receiver"]


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def env(tmp_path: Path, small_models_root: Path) -> dict[str, str]:
    return subprocess_env(
        {
            "DALLE_FARM_DATA_DIR": str(tmp_path / "data"),
            "DALLE_FARM_MODELS_ROOT": str(small_models_root),
            "DALLE_FARM_WEBHOOK_ALLOW": "127.0.0.1/32",
            "DALLE_FARM_WEBHOOK_TIMEOUT_S": "120",
            "DALLE_FARM_WEBHOOK_BACKOFF_S": "1",
        }
    )


def test_keys_create_shows_the_webhook_secret_and_old_keys_get_one(env: dict[str, str]) -> None:
    created = cli(env, "keys", "create", "hooks")
    assert created.returncode == 0, created.stderr
    lines = created.stdout.strip().splitlines()
    assert lines[-1].startswith("dfk_")  # the API key stays the last line
    (webhook_line,) = [line for line in lines if "webhook signing secret" in line]
    secret = webhook_line.rsplit(" ", 1)[-1]
    assert secret.startswith("whsec_")
    shown = cli(env, "keys", "webhook-secret", "hooks")
    assert shown.returncode == 0 and shown.stdout.strip() == secret
    rotated = cli(env, "keys", "rotate-webhook-secret", "hooks")
    assert rotated.returncode == 0 and rotated.stdout.strip() not in ("", secret)
    assert cli(env, "keys", "webhook-secret", "hooks").stdout.strip() == rotated.stdout.strip()
    missing = cli(env, "keys", "webhook-secret", "nobody")
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert "no active key with id or name 'nobody'" in missing.stderr


def test_serve_delivers_signed_webhooks_and_a_hanging_receiver_slows_no_job(
    env: dict[str, str], receiver: Receiver, tmp_path: Path
) -> None:
    receiver.answers["/hang"] = [HANG]
    receiver.answers["/flaky"] = [500]
    serve = Serve(env, tmp_path / "serve.log").start()
    try:
        # Refused at submit, with the reason on the field.
        for url, reason in [
            ("http://169.254.169.254/latest/meta-data", "cloud metadata"),
            ("http://127.0.0.2:8080/x", "loopback"),  # outside the allow-list's 127.0.0.1/32
            ("http://[::ffff:10.0.0.1]/x", "private"),
        ]:
            status, headers, content = http(
                "POST", f"{serve.base}/v1/jobs", {"text": "a fox", "webhook_url": url}
            )
            problem = json.loads(content)
            assert status == 422 and headers["Content-Type"] == "application/problem+json"
            assert problem["type"].endswith("webhook-refused"), problem
            ((error),) = problem["errors"]
            assert error["field"] == "webhook_url" and reason in error["message"], problem
            assert "DALLE_FARM_WEBHOOK_ALLOW" in problem["detail"]

        hanging = serve.submit({"text": "first", "seed": 1, "webhook_url": f"{receiver.url}/hang"})
        assert hanging["params"]["webhook_url"] == f"{receiver.url}/hang"
        serve.wait_status(hanging["id"], "succeeded")
        wait_for(lambda: receiver.requests("/hang"), JOB_TIMEOUT_S, "the hanging delivery")
        # While that receiver hangs, other jobs render, finish and are delivered.
        flaky = serve.submit({"text": "second", "seed": 2, "webhook_url": f"{receiver.url}/flaky"})
        plain = serve.submit({"text": "third", "seed": 3})
        done = serve.wait_status(flaky["id"], "succeeded")
        serve.wait_status(plain["id"], "succeeded")
        wait_for(lambda: len(receiver.requests("/flaky")) == 2, JOB_TIMEOUT_S, "the retry")
        assert len(receiver.requests("/hang")) == 1  # and it still hangs

        secret = cli(env, "keys", "webhook-secret", "local").stdout.strip()
        for _, headers, body in receiver.requests("/flaky"):
            assert verify(secret, body, headers["X-Dalle-Farm-Signature"])
            delivered = json.loads(body)
            assert delivered == done  # the job's JSON, as GET /v1/jobs/{id} answers it
        ids = {headers["X-Dalle-Farm-Delivery"] for _, headers, _ in receiver.requests("/flaky")}
        assert len(ids) == 1
        database = Path(env["DALLE_FARM_DATA_DIR"]) / "farm.db"
        with SqliteJobStore(database) as store:

            def delivered_flaky() -> bool:
                delivery = store.webhook_delivery(flaky["id"])
                return delivery is not None and delivery.state == "delivered"

            wait_for(delivered_flaky, JOB_TIMEOUT_S, "the retried delivery to be recorded")
            still = store.webhook_delivery(hanging["id"])
            assert still is not None and still.state == "pending" and still.claim
            assert store.webhook_delivery(plain["id"]) is None
        receiver.release.set()
        assert serve.process.terminate() == 0
    finally:
        serve.process.kill_group()
