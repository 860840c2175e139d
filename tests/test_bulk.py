"""`dalle-farm bulk` end to end on a real farm: redis-server, moto's S3 server, a `dalle-farm
api` (waitress) and a `dalle-farm worker` subprocess on small random weights; the bulk command
runs as a subprocess, as a user would run it. Input parsing is tested directly.

Each test uses an API key of its own, so that the jobs it lists are the ones it created.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import webdataset

from client import FarmClient
from client.bulk import idempotency_key
from client.rows import InputError, dataset_id, derived_seed, plan_jobs, read_rows
from core.services import build_store
from core.settings import Settings
from tests.farm_helpers import (
    REPO_ROOT,
    FarmProcess,
    http,
    loopback_backends,
    subprocess_env,
    wait_for,
    worker_process,
)
from tests.fault_proxy import Fault, FaultProxy
from tests.servers import free_port

BULK_TIMEOUT_S = 600
START_TIMEOUT_S = 120


@dataclass
class Farm:
    url: str
    env: dict[str, str]
    settings: Settings

    def new_key(self, name: str) -> str:
        store = build_store(self.settings)
        try:
            return store.create_key(name)[1]
        finally:
            store.close()

    def jobs(self, key: str) -> list[dict[str, object]]:
        with FarmClient(self.url, key) as client:
            return [job.raw for job in client.list()]


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory, small_models_root: Path) -> Iterator[Farm]:
    root = tmp_path_factory.mktemp("bulk-farm")
    with loopback_backends(root, small_models_root, "bulk-results") as backends:
        env = subprocess_env(backends.env)
        port = free_port()
        api = FarmProcess(
            ["api", "--port", str(port), "--workers", "2", "--threads", "8"], env, root / "api.log"
        )
        worker = worker_process(env, root, "bulk")
        try:
            api.start()
            worker.start()
            url = f"http://127.0.0.1:{port}"
            wait_for(lambda: _answers(url), START_TIMEOUT_S, "the API to answer", 0.2)
            worker.wait_for_log("worker(s) ready", START_TIMEOUT_S)
            yield Farm(url, env, backends.settings)
        finally:
            worker.kill_group()
            api.kill_group()


def _answers(url: str) -> bool:
    try:
        return http("GET", f"{url}/healthz", timeout_s=5)[0] == 200
    except OSError:
        return False


def bulk_command(prompts: Path, out: Path, *options: str) -> list[str]:
    return [sys.executable, "-m", "cli", "bulk", str(prompts), "--out", str(out), *options]


def run_bulk(
    farm: Farm, key: str, prompts: Path, out: Path, *options: str, server: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**farm.env, "DALLE_FARM_SERVER": server or farm.url, "DALLE_FARM_API_KEY": key}
    return subprocess.run(
        bulk_command(prompts, out, *options),
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=BULK_TIMEOUT_S,
    )


def write_prompts(path: Path, count: int) -> list[str]:
    prompts = [
        f"prompt {i}: a small {['cat', 'boat', 'tree', 'house'][i % 4]}" for i in range(count)
    ]
    path.write_text("".join(f"{prompt}\n" for prompt in prompts))
    return prompts


def shard_samples(out: Path) -> dict[str, dict[str, bytes]]:
    """Every sample of every shard, read with tarfile: key → {suffix: bytes}. Fails on a
    truncated tar, a shard without its parquet, or a key seen twice."""
    samples: dict[str, dict[str, bytes]] = {}
    for path in sorted(out.glob("[0-9]" * 5 + ".tar")):
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(path) as tar:
            for member in tar:
                data = tar.extractfile(member)
                assert data is not None
                key, _, suffix = member.name.partition(".")
                members.setdefault(key, {})[suffix] = data.read()
        table = pq.read_table(path.with_suffix(".parquet")).to_pylist()
        assert sorted(row["key"] for row in table) == sorted(members)
        for key, files in members.items():
            assert set(files) == {"png", "txt", "json"}, (path, key)
            assert key not in samples, f"{key} is in two shards"
            samples[key] = files
    return samples


def read_webdataset(shards: list[str]) -> list[dict[str, Any]]:
    """The samples, read by the webdataset package."""
    # webdataset (1.0.2) never closes the files it opens: their ResourceWarnings are its own.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        samples = list(webdataset.WebDataset(shards, shardshuffle=False))
        gc.collect()
    return samples


def leftovers(out: Path) -> list[Path]:
    """Temporary files, and shard parquets without their tar."""
    found = [path for path in out.rglob("*") if path.name.startswith(".tmp-")]
    found += [p for p in out.glob("[0-9]" * 5 + ".parquet") if not p.with_suffix(".tar").exists()]
    return found


def assert_no_duplicate_jobs(jobs: list[dict[str, object]], expected: int) -> None:
    params = [json.dumps(job["params"], sort_keys=True) for job in jobs]
    assert len(jobs) == expected, f"{len(jobs)} jobs on the server, expected {expected}"
    assert not [body for body, count in Counter(params).items() if count > 1]


# -- input ------------------------------------------------------------------------------------


def test_input_files_give_the_same_plan_every_time(tmp_path: Path) -> None:
    txt = tmp_path / "p.txt"
    txt.write_text("a cat\n\n  a dog  \r\n")
    rows = read_rows(txt)
    assert [(row.index, row.line, row.prompt) for row in rows] == [(0, 1, "a cat"), (1, 3, "a dog")]
    jobs = plan_jobs(rows, {"grid_size": 2}, 3)
    assert [job.key for job in jobs][:4] == ["000000_000", "000000_001", "000000_002", "000001_000"]
    assert jobs[1].params["seed"] == derived_seed(0, 1, "a cat")
    assert len({job.params["seed"] for job in jobs}) == 6
    assert all(job.params["grid_size"] == 2 for job in jobs)
    assert dataset_id(plan_jobs(read_rows(txt), {"grid_size": 2}, 3)) == dataset_id(jobs)
    assert dataset_id(plan_jobs(rows, {"grid_size": 1}, 3)) != dataset_id(jobs)

    csv_file = tmp_path / "p.csv"
    csv_file.write_text(
        'prompt,seed,grid_size,is_seamless\n"a, quoted\nprompt",7,,yes\nplain,,3,\n'
    )
    first, second = plan_jobs(read_rows(csv_file), {"grid_size": 2}, 2)[::2]
    assert (first.line, first.prompt, first.params["seed"]) == (2, "a, quoted\nprompt", 7)
    assert (first.params["grid_size"], first.params["is_seamless"]) == (2, True)
    assert (second.line, second.params["grid_size"]) == (4, 3)
    assert plan_jobs(read_rows(csv_file), {}, 2)[1].params["seed"] == 8  # the seed after 7

    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "x", "temperature": 0.5, "model": "mega"}\n\n{"text": "y"}\n')
    x, y = plan_jobs(read_rows(jsonl), {}, 1)
    assert (x.params["temperature"], x.params["model"], y.line) == (0.5, "mega", 3)


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("bad.jsonl", '{"prompt": "ok"}\n{"prompt": "broken"\n', "line 2: not valid JSON"),
        ("bad.jsonl", '{"prompt": "ok"}\n\n{"prompt": "x", "gridsize": 2}\n', "line 3: unknown"),
        ("bad.csv", "prompt,seed\nfine,1\nbad,one\n", "line 3: seed must be an integer"),
        ("bad.csv", "prompt,top_k\nfine,1\nbad,0\n", "line 3: top_k must be an integer"),
        ("bad.csv", "seed\n1\n", "line 1: name exactly one prompt column"),
        ("bad.txt", "fine\n" + "x" * 1001 + "\n", "line 2: text must be at most 1000"),
        ("bad.txt", "fine\nnot \xff utf-8\n", "line 2: not UTF-8"),
    ],
)
def test_malformed_input_names_the_line(
    tmp_path: Path, name: str, content: str, expected: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content.encode("latin-1" if "\xff" in content else "utf-8"))
    with pytest.raises(InputError, match=expected):
        read_rows(path)


def test_a_malformed_file_is_reported_and_nothing_is_submitted(farm: Farm, tmp_path: Path) -> None:
    key = farm.new_key("bulk-malformed")
    prompts = tmp_path / "prompts.csv"
    prompts.write_text('prompt,seed\n"a cat",1\n"a dog",2\n"a bird",two\n"a cow",4\n')
    out = tmp_path / "out"
    done = run_bulk(farm, key, prompts, out)
    assert done.returncode == 1, done.stderr
    assert "line 4: seed must be an integer, got 'two'" in done.stderr
    assert "nothing was submitted" in done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists()

    prompts.write_text('prompt,seed\n"a cat",1\n"a dog",2\n')
    dry = run_bulk(farm, key, prompts, out, "--seeds-per-prompt", "3", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "2 rows → 6 jobs, 6 images" in dry.stdout and "nothing submitted" in dry.stdout
    assert not out.exists()
    assert farm.jobs(key) == []


# -- runs -------------------------------------------------------------------------------------


def test_50_prompts_become_a_webdataset_with_a_matching_manifest(
    farm: Farm, tmp_path: Path
) -> None:
    key = farm.new_key("bulk-50")
    prompts = write_prompts(tmp_path / "prompts.txt", 50)
    out = tmp_path / "dataset"
    # As many jobs in flight as the worker decodes in one batch (DALLE_FARM_MAX_JOBS, 8).
    options = ("--grid-size", "1", "--shard-size", "16", "--concurrency", "8")
    started = time.monotonic()
    done = run_bulk(farm, key, tmp_path / "prompts.txt", out, *options)
    print(f"50-prompt bulk run: {time.monotonic() - started:.1f} s")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "done: 50 of 50 jobs" in done.stdout

    shards = sorted(str(path) for path in out.glob("*.tar"))
    assert [Path(shard).name for shard in shards] == [f"{n:05d}.tar" for n in range(4)]
    samples = read_webdataset(shards)
    assert len(samples) == 50
    by_key = {sample["__key__"]: sample for sample in samples}
    assert sorted(by_key) == [f"{row:06d}_000_00" for row in range(50)]
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert sorted(row["key"] for row in manifest) == sorted(by_key)
    for row in manifest:
        sample = by_key[row["key"]]
        assert hashlib.sha256(sample["png"]).hexdigest() == row["sha256"]
        assert sample["png"].startswith(b"\x89PNG")
        assert sample["txt"].decode() == row["prompt"] == prompts[row["row"]]
        assert json.loads(sample["json"])["sha256"] == row["sha256"]
        assert row["storage_key"] == f"jobs/{row['job_id']}/0.png"
        assert row["grid_size"] == 1 and row["seed"] >= 1 and row["render_s"] > 0
        assert row["path"] == f"{row['shard']:05d}.tar"
    assert leftovers(out) == []
    assert_no_duplicate_jobs(farm.jobs(key), 50)
    assert {job["params"]["priority"] for job in farm.jobs(key)} == {"bulk"}  # type: ignore[index]

    # The lane is not part of the plan: a run in another lane resumes the same dataset.
    again = run_bulk(
        farm, key, tmp_path / "prompts.txt", out, *options, "--priority", "interactive"
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(str(path) for path in out.glob("*.tar")) == shards
    assert len(farm.jobs(key)) == 50


def test_a_killed_then_interrupted_run_resumes_without_duplicates(
    farm: Farm, tmp_path: Path
) -> None:
    key = farm.new_key("bulk-resume")
    prompts = tmp_path / "prompts.txt"
    write_prompts(prompts, 9)
    out = tmp_path / "dataset"
    options = ("--seeds-per-prompt", "2", "--shard-size", "4", "--concurrency", "3")
    env = {**farm.env, "DALLE_FARM_SERVER": farm.url}
    command = [*bulk_command(prompts, out, *options), "--key", key]

    def start() -> subprocess.Popen[str]:
        return subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    def finished_jobs() -> int:
        return len(list((out / ".bulk" / "jobs").glob("*_???.json")))

    # 1: killed outright (kill -9) once some jobs are done and others in flight.
    first = start()
    wait_for(lambda: finished_jobs() >= 5 or first.poll() is not None, BULK_TIMEOUT_S, "5 jobs")
    os.killpg(first.pid, signal.SIGKILL)
    first.communicate()
    assert first.returncode == -signal.SIGKILL, f"it ended before the kill: {first.stderr}"
    shard_samples(out)  # every shard under its final name is whole

    # 2: Ctrl-C: it stops cleanly, with nothing half-written.
    second = start()
    before = finished_jobs()
    wait_for(
        lambda: finished_jobs() > before + 1 or second.poll() is not None, BULK_TIMEOUT_S, "jobs"
    )
    second.send_signal(signal.SIGINT)
    _, stderr = second.communicate(timeout=120)
    assert second.returncode == 130, stderr[-3000:]
    assert "run the same command again to resume" in stderr
    assert leftovers(out) == []
    shard_samples(out)

    # 3: to the end.
    third = subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=BULK_TIMEOUT_S
    )
    assert third.returncode == 0, third.stderr[-3000:]
    samples = shard_samples(out)
    assert sorted(samples) == [f"{row:06d}_{k:03d}_00" for row in range(9) for k in range(2)]
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert len(manifest) == 18
    for row in manifest:
        assert hashlib.sha256(samples[row["key"]]["png"]).hexdigest() == row["sha256"]
    assert leftovers(out) == []
    assert_no_duplicate_jobs(farm.jobs(key), 18)


def test_429_and_503_are_retried_and_failures_are_listed(farm: Farm, tmp_path: Path) -> None:
    key = farm.new_key("bulk-faults")
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"faulty network {i}", "seed": 100 + i} for i in range(5)]
    # Valid for the client (grid sizes up to 16), refused by this farm (8 at most): a failure.
    rows.append({"prompt": "too big for this farm", "grid_size": 12})
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "files"
    with FaultProxy(farm.url) as proxy:
        proxy.inject(
            "POST",
            "/v1/jobs",
            Fault(429, retry_after="1"),
            Fault(503, retry_after="1", forward=True),  # created, but the answer is lost
            Fault(429, retry_after="1"),
        )
        proxy.inject("GET", "/v1/jobs/", *[Fault(503, retry_after="1")] * 3, Fault(502))
        done = run_bulk(farm, key, prompts, out, "--format", "files", server=proxy.url)
        assert proxy.pending_faults() == 0
        seen = list(proxy.seen)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "failed: line 6" in done.stderr and "grid_size" in done.stderr
    assert "1 jobs failed; 5 of 6 jobs are in" in done.stderr

    # Retry-After was honoured: each rejected POST came again, with its key, a second later.
    for fault in (s for s in seen if s.injected and s.method == "POST"):
        retry = next(
            s for s in seen if s.at > fault.at and s.idempotency_key == fault.idempotency_key
        )
        assert retry.at - fault.at >= 1.0
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert sorted(row["seed"] for row in manifest) == [100, 101, 102, 103, 104]
    for row in manifest:
        png = (out / row["path"]).read_bytes()
        assert hashlib.sha256(png).hexdigest() == row["sha256"]
        assert (out / f"{row['key']}.txt").read_text() == row["prompt"]
        assert json.loads((out / f"{row['key']}.json").read_text())["job_id"] == row["job_id"]
    assert leftovers(out) == []
    assert_no_duplicate_jobs(farm.jobs(key), 5)


def test_a_job_that_failed_on_the_farm_is_retried_up_to_the_limit(
    farm: Farm, tmp_path: Path
) -> None:
    key = farm.new_key("bulk-retry")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("canceled the first time\n")
    out = tmp_path / "dataset"
    options = ("--grid-size", "2", "--format", "files")
    # The job of attempt 0, submitted and canceled before the bulk run, as another client
    # sharing the key could have: to the run, attempt 0 failed on the farm.
    (planned,) = plan_jobs(read_rows(prompts), {"grid_size": 2}, 1)
    first_key = idempotency_key(dataset_id([planned]), planned, 0)
    with FarmClient(farm.url, key) as client:
        canceled = client.submit(idempotency_key=first_key, **planned.params)
        client.cancel(canceled.id)
        assert client.wait(canceled.id, raise_on_failure=False).status == "canceled"

    limited = run_bulk(farm, key, prompts, out, *options, "--max-attempts", "1")
    assert limited.returncode == 1, limited.stderr[-3000:]
    assert f"failed: line 1 (row 0, sample 0, seed {planned.params['seed']})" in limited.stderr
    assert f"job {canceled.id} canceled" in limited.stderr
    assert len(farm.jobs(key)) == 1  # the limit was reached: nothing new was submitted

    retried = run_bulk(farm, key, prompts, out, *options, "--max-attempts", "2")
    assert retried.returncode == 0, retried.stderr[-3000:]
    (row, *_) = manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert len(manifest) == 4 and row["job_id"] != canceled.id
    assert row["idempotency_key"] == idempotency_key(dataset_id([planned]), planned, 1)
    assert len(farm.jobs(key)) == 2
