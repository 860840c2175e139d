"""A bulk run's output folder: its state, the writers of the two formats, and the manifest.

    DIR/
      00000.tar  00000.parquet  …   webdataset: {key}.png, {key}.txt, {key}.json per image, and
                                    the shard's metadata as parquet (or, with the files format,
      {key}.png {key}.txt {key}.json  one triple per image in DIR itself)
      manifest.parquet              every image of the dataset: prompt, seed, settings, job id,
                                    storage key, sha256, timings, and where it is
      .bulk/                        the run's state (below); delete it only with the dataset

Nothing is ever half-written under a final name: every file is written to a temporary name
(`.tmp-…`) and renamed when complete, and leftovers of a killed run are deleted when the next
one starts. The state that makes a run resumable is in .bulk/:

- ``dataset.json``: the dataset id (a hash of the plan) and format; a run with other input or
  settings is refused rather than mixed in.
- ``jobs/{key}.json``: a job that finished and whose images are downloaded (written after
  them), and ``jobs/{key}.failed-{n}.json``: its attempt n failed on the server.
- ``staged/{key}/{tile}.png``: downloaded images not yet in the dataset. A webdataset shard is
  written when enough images are staged, and at the end of a run; a staged job leaves staging
  only once the shard that holds it, or its files, are in place, so a killed run loses nothing
  and a resumed run writes each image exactly once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import shutil
import tarfile
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

FORMATS = ("webdataset", "files")
STATE_DIR = ".bulk"
TMP_PREFIX = ".tmp-"
MANIFEST = "manifest.parquet"

SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("row", pa.int64()),
        ("line", pa.int64()),
        ("sample", pa.int64()),
        ("tile", pa.int64()),
        ("prompt", pa.string()),
        ("seed", pa.int64()),
        ("grid_size", pa.int64()),
        ("is_seamless", pa.bool_()),
        ("temperature", pa.float64()),
        ("top_k", pa.int64()),
        ("supercondition_factor", pa.float64()),
        ("model", pa.string()),
        ("job_id", pa.string()),
        ("idempotency_key", pa.string()),
        ("storage_key", pa.string()),
        ("sha256", pa.string()),
        ("created_at", pa.string()),
        ("started_at", pa.string()),
        ("finished_at", pa.string()),
        ("downloaded_at", pa.string()),
        ("render_s", pa.float64()),
        ("shard", pa.int64()),
        ("path", pa.string()),
    ]
)


class OutputError(Exception):
    """The output folder cannot be used for this run; the message says why and what to do."""


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A file to write `path` whole or not at all: it has a temporary name until the block
    ends without an error, then it is flushed and renamed."""
    temporary = path.with_name(f"{TMP_PREFIX}{os.getpid()}-{path.name}")
    try:
        with temporary.open("wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_write(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all."""
    with atomic_file(path) as file:
        file.write(data)


def json_bytes(value: Any) -> bytes:
    return (json.dumps(value, ensure_ascii=False, sort_keys=True, indent=1) + "\n").encode()


class OutputDir:
    """The output folder of a run, held with an exclusive lock while open."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.state = root / STATE_DIR
        self.jobs = self.state / "jobs"
        self.staged = self.state / "staged"
        self._lock: io.BufferedWriter | None = None

    def open(self, dataset: str, fmt: str) -> None:
        """Create or resume the folder for `dataset`: lock it, check that it holds this dataset,
        and delete what a killed run left half-written."""
        try:
            self.jobs.mkdir(parents=True, exist_ok=True)
            self.staged.mkdir(exist_ok=True)
            lock = (self.state / "lock").open("wb")
        except OSError as error:
            raise OutputError(f"cannot write to {self.root}: {error.strerror or error}") from None
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            lock.close()
            if error.errno in (errno.EAGAIN, errno.EACCES):
                raise OutputError(f"another bulk run is writing to {self.root}") from None
            raise
        self._lock = lock
        info_path = self.state / "dataset.json"
        if info_path.exists():
            info = json.loads(info_path.read_text())
            if info.get("dataset") != dataset:
                self.close()
                raise OutputError(
                    f"{self.root} holds a dataset made from other prompts or settings; give "
                    "another --out, or run the command that made it"
                )
            if info.get("format") != fmt:
                self.close()
                raise OutputError(
                    f"{self.root} holds a {info.get('format')} dataset; run again with "
                    f"--format {info.get('format')}"
                )
        else:
            info = {"dataset": dataset, "format": fmt, "created_at": utc_now()}
            atomic_write(info_path, json_bytes(info))
        for leftover in self._temporary_files():
            leftover.unlink(missing_ok=True)
        # A shard's parquet is written before its tar: one without a tar is from a killed run.
        for path in self.root.glob("[0-9]" * 5 + ".parquet"):
            if not path.with_suffix(".tar").exists():
                path.unlink()

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _temporary_files(self) -> Iterator[Path]:
        yield from self.root.glob(f"{TMP_PREFIX}*")
        yield from self.state.glob(f"{TMP_PREFIX}*")
        yield from self.jobs.glob(f"{TMP_PREFIX}*")
        yield from self.staged.glob(f"*/{TMP_PREFIX}*")

    def done_records(self) -> dict[str, dict[str, Any]]:
        """The finished and downloaded jobs, by key."""
        records = {}
        for path in self.jobs.glob("*.json"):
            if ".failed-" not in path.name:
                record = json.loads(path.read_text())
                records[record["key"]] = record
        return records

    def failures(self) -> dict[str, list[dict[str, Any]]]:
        """The attempts of each job that failed on the server, by key, first attempt first."""
        found: dict[str, list[tuple[int, dict[str, Any]]]] = {}
        for path in self.jobs.glob("*.failed-*.json"):
            key, _, attempt = path.name.removesuffix(".json").partition(".failed-")
            found.setdefault(key, []).append((int(attempt), json.loads(path.read_text())))
        return {key: [details for _, details in sorted(tries)] for key, tries in found.items()}

    def record_failure(self, key: str, attempt: int, details: dict[str, Any]) -> None:
        atomic_write(self.jobs / f"{key}.failed-{attempt}.json", json_bytes(details))

    def stage(self, record: dict[str, Any], images: list[bytes]) -> None:
        """Keep a finished job's images, then its record (the mark that it is done)."""
        folder = self.staged / record["key"]
        folder.mkdir(exist_ok=True)
        for tile, data in enumerate(images):
            atomic_write(folder / f"{tile:02d}.png", data)
        atomic_write(self.jobs / f"{record['key']}.json", json_bytes(record))

    def staged_image(self, key: str, tile: int) -> bytes:
        return (self.staged / key / f"{tile:02d}.png").read_bytes()

    def unstage(self, key: str) -> None:
        shutil.rmtree(self.staged / key, ignore_errors=True)


def image_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """A finished job's images as metadata rows (each image's .json, and its manifest row)."""
    params = record["params"]
    started, finished = record.get("started_at"), record.get("finished_at")
    render_s = None
    if started and finished:
        with contextlib.suppress(ValueError):
            render_s = _seconds(finished) - _seconds(started)
    rows = []
    for image in record["images"]:
        row = {name: params.get(name) for name in SCHEMA.names if name in params}
        row.update(
            key=image["key"],
            row=record["row"],
            line=record["line"],
            sample=record["sample"],
            tile=image["tile"],
            prompt=params["text"],
            job_id=record["job_id"],
            idempotency_key=record["idempotency_key"],
            storage_key=image["storage_key"],
            sha256=image["sha256"],
            created_at=record.get("created_at"),
            started_at=started,
            finished_at=finished,
            downloaded_at=record.get("downloaded_at"),
            render_s=render_s,
        )
        rows.append(row)
    return rows


def write_table(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write `rows` as parquet under SCHEMA, whole or not at all."""
    table = pa.Table.from_pylist(
        [{name: row.get(name) for name in SCHEMA.names} for row in rows], schema=SCHEMA
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write(path, sink.getvalue().to_pybytes())


class DatasetWriter:
    """Moves staged jobs into the dataset, in one of FORMATS. Runs in one thread."""

    def __init__(self, output: OutputDir, fmt: str, shard_size: int = 1000) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
        self.output = output
        self.format = fmt
        self.shard_size = shard_size
        self._pending: dict[str, dict[str, Any]] = {}
        self._shards = sorted(int(path.stem) for path in output.root.glob("[0-9]" * 5 + ".tar"))

    def resume(self, records: dict[str, dict[str, Any]]) -> None:
        """Take up the jobs a previous run finished: drop from staging those already in the
        dataset, and queue the rest to be written."""
        emitted = self._emitted_keys()
        for key, record in sorted(records.items()):
            if key in emitted:
                self.output.unstage(key)
            else:
                self.add(record)

    def add(self, record: dict[str, Any]) -> None:
        """A job's images are staged: write them (files), or write a shard once one is full."""
        if self.format == "files":
            self._write_files(record)
            return
        self._pending[record["key"]] = record
        if sum(len(pending["images"]) for pending in self._pending.values()) >= self.shard_size:
            self._write_shard()

    def finish(self) -> None:
        """The run is over: write what is still pending (a last, smaller shard)."""
        if self._pending:
            self._write_shard()

    def write_manifest(self) -> Path:
        """manifest.parquet: every image now in the dataset."""
        rows: list[dict[str, Any]] = []
        if self.format == "files":
            for _, record in sorted(self.output.done_records().items()):
                if self._files_written(record):
                    rows.extend(
                        _located(row, None, f"{row['key']}.png") for row in image_rows(record)
                    )
        else:
            for shard in self._shards:
                table = pq.read_table(self.output.root / f"{shard:05d}.parquet", schema=SCHEMA)
                rows.extend(table.to_pylist())
        path = self.output.root / MANIFEST
        write_table(path, rows)
        return path

    # -- webdataset shards --------------------------------------------------------------------

    def _emitted_keys(self) -> set[str]:
        if self.format == "files":
            return {
                key
                for key, record in self.output.done_records().items()
                if self._files_written(record)
            }
        keys: set[str] = set()
        for shard in self._shards:
            table = pq.read_table(self.output.root / f"{shard:05d}.parquet", columns=["key"])
            keys.update(key.rsplit("_", 1)[0] for key in table.column("key").to_pylist())
        return keys

    def _write_shard(self) -> None:
        shard = (self._shards[-1] + 1) if self._shards else 0
        name = f"{shard:05d}"
        records = [self._pending[key] for key in sorted(self._pending)]
        rows = [
            _located(row, shard, f"{name}.tar") for record in records for row in image_rows(record)
        ]
        # The parquet first, the tar last: a shard exists when its tar does.
        write_table(self.output.root / f"{name}.parquet", rows)
        with (
            atomic_file(self.output.root / f"{name}.tar") as file,
            tarfile.open(fileobj=file, mode="w", format=tarfile.PAX_FORMAT) as tar,
        ):
            for row in rows:
                png = self.output.staged_image(row["key"].rsplit("_", 1)[0], row["tile"])
                _check_sha256(png, row["sha256"], row["key"])
                for suffix, data in _sample_files(row, png):
                    _add_member(tar, f"{row['key']}.{suffix}", data)
        self._shards.append(shard)
        for record in records:
            self.output.unstage(record["key"])
        self._pending.clear()

    # -- plain files ---------------------------------------------------------------------------

    def _files_written(self, record: dict[str, Any]) -> bool:
        return all(
            (self.output.root / f"{image['key']}.json").exists() for image in record["images"]
        )

    def _write_files(self, record: dict[str, Any]) -> None:
        for row, image in zip(image_rows(record), record["images"], strict=True):
            row = _located(row, None, f"{row['key']}.png")
            png = self.output.staged_image(record["key"], image["tile"])
            _check_sha256(png, image["sha256"], row["key"])
            # The .json last: an image is in the dataset when its .json is.
            for suffix, data in _sample_files(row, png):
                atomic_write(self.output.root / f"{row['key']}.{suffix}", data)
        self.output.unstage(record["key"])


def _located(row: dict[str, Any], shard: int | None, path: str) -> dict[str, Any]:
    return {**row, "shard": shard, "path": path}


def _sample_files(row: dict[str, Any], png: bytes) -> list[tuple[str, bytes]]:
    """An image's files, its metadata last: png, txt (the caption), json."""
    return [("png", png), ("txt", row["prompt"].encode()), ("json", json_bytes(row))]


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(time.time())
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _check_sha256(data: bytes, expected: str, key: str) -> None:
    if hashlib.sha256(data).hexdigest() != expected:
        raise OutputError(
            f"the staged image of {key} does not match its sha256; delete "
            f"{STATE_DIR}/jobs/{key.rsplit('_', 1)[0]}.json and run again to download it again"
        )


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _seconds(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()
