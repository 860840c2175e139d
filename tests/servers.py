"""Real servers for tests, on loopback and free ports: redis-server, a file server that can
break its responses off, and the API's own HTTP server on a thread (moto's S3 server and the
farm's processes are in tests/farm_helpers.py)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING

import redis

from api.server import ServerConfig, listen, serve_app

if TYPE_CHECKING:
    from flask import Flask


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """A redis-server process of the test's own, which a test may kill and restart.

    Data lives in `directory`; with appendonly=True, the AOF survives a restart.
    """

    def __init__(
        self,
        directory: Path,
        appendonly: bool = True,
        port: int | None = None,
        extra: tuple[str, ...] = (),
    ):
        if shutil.which("redis-server") is None:
            raise RuntimeError(
                "redis-server is not installed; on Debian/Ubuntu: sudo apt-get install redis-server"
            )
        self.directory = directory
        self.appendonly = appendonly
        self.port = port or free_port()
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--dir", str(self.directory),
                "--appendonly", "yes" if self.appendonly else "no",
                "--appendfsync", "always",
                "--save", "",
                "--maxmemory-policy", "noeviction",
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        client = redis.Redis.from_url(self.url)
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.ConnectionError as err:
                    if time.monotonic() > deadline or self.process.poll() is not None:
                        raise RuntimeError(f"redis-server did not start on {self.port}") from err
                    time.sleep(0.05)
        finally:
            client.close()

    def kill(self) -> None:
        """Stop at once, as a crash would (SIGKILL)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def restart(self) -> None:
        self.kill()
        self.start()


@contextmanager
def running_redis(directory: Path, appendonly: bool = True) -> Iterator[RedisServer]:
    server = RedisServer(directory, appendonly=appendonly)
    server.start()
    try:
        yield server
    finally:
        server.kill()


SENTINEL_SERVICE = "farm"


class SentinelRedis:
    """A Redis master, its replica and one sentinel watching them (quorum 1), each a process of
    its own on loopback: `url` is the farm's redis+sentinel:// URL for them, and `failover()`
    makes the replica the master, as Sentinel does when the master fails."""

    def __init__(self, directory: Path) -> None:
        # A replica's first full sync starts at once (not after Redis' default 5 s wait for
        # more replicas), so that it soon confirms writes.
        quick_sync = ("--repl-diskless-sync-delay", "0")
        self.nodes = [RedisServer(directory / "a", extra=quick_sync)]
        self.nodes.append(
            RedisServer(
                directory / "b",
                extra=(*quick_sync, "--replicaof", "127.0.0.1", str(self.nodes[0].port)),
            )
        )
        self.directory = directory
        self.sentinel_port = free_port()
        self.sentinel: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel_port}/{SENTINEL_SERVICE}"

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        config = self.directory / "sentinel.conf"
        master = self.nodes[0].port
        config.write_text(
            f"port {self.sentinel_port}\nbind 127.0.0.1\ndir {self.directory}\n"
            f"sentinel monitor {SENTINEL_SERVICE} 127.0.0.1 {master} 1\n"
            f"sentinel down-after-milliseconds {SENTINEL_SERVICE} 1000\n"
            f"sentinel failover-timeout {SENTINEL_SERVICE} 5000\n"
            f"logfile {self.directory / 'sentinel.log'}\n"
        )
        self.sentinel = subprocess.Popen(
            ["redis-server", str(config), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._wait(lambda: self.master_port() == master and self._replicas_synced(), "start")

    def master_port(self) -> int | None:
        """The master's port as the sentinel names it now."""
        try:
            with redis.Redis(port=self.sentinel_port, socket_timeout=2) as client:
                found = client.sentinel_get_master_addr_by_name(SENTINEL_SERVICE)
        except redis.RedisError:
            return None
        return int(found[1]) if found else None

    def _replicas_synced(self) -> bool:
        port = self.master_port()
        if port is None:
            return False
        with redis.Redis(port=port, socket_timeout=2) as master:
            info = master.info("replication")
        replica = info.get("slave0")
        return (
            isinstance(replica, dict)
            and replica.get("state") == "online"
            and replica.get("offset") >= info["master_repl_offset"]
        )

    def failover(self, pause_ms: int = 3000) -> bool:
        """Promote the replica (SENTINEL FAILOVER) and wait until the sentinel names it, it
        takes writes and the old master is its replica. First the master's writes pause for up
        to `pause_ms` (CLIENT PAUSE WRITE: clients block, nothing fails) while the replica
        catches up; whether it did is returned (under constant writes it may stay a little
        behind, and those last writes are then lost, as in a real failover)."""
        before = self.master_port()
        assert before is not None, "the sentinel names no master"

        def role(port: int) -> str:
            with redis.Redis(port=port, socket_timeout=2) as client:
                return str(client.info("replication")["role"])

        def switched() -> bool:
            # The sentinel names the new master, it takes writes, and the old one is its
            # replica (until then a client may still write to the old one).
            port = self.master_port()
            return port not in (None, before) and role(port) == "master" and role(before) == "slave"

        # Once in a long soak a failover the sentinel accepted never happened: it is asked
        # again once, and a second failure shows the sentinel's log.
        for attempt in (1, 2):
            synced = self._pause_and_fail_over(before, pause_ms)
            try:
                self._wait(switched, "the failover", timeout_s=30)
                return synced
            except RuntimeError as error:
                if self.master_port() != before:  # under way: give it more time
                    try:
                        self._wait(switched, "the failover", timeout_s=30)
                        return synced
                    except RuntimeError:
                        pass
                if attempt == 2 or self.master_port() != before:
                    tail = self.log_tail()
                    raise RuntimeError(f"{error}; the sentinel's log ends:\n{tail}") from None
        raise AssertionError("unreachable")

    def _pause_and_fail_over(self, master_port: int, pause_ms: int) -> bool:
        # Sentinel promotes only a replica it has lately seen up and in sync (else NOGOODSLAVE).
        self._wait(self._sentinel_has_a_good_replica, "the sentinel to see a good replica")
        with redis.Redis(port=master_port, socket_timeout=5) as master:
            self._wait(
                lambda: master.info("replication").get("slave0", {}).get("state") == "online",
                "the replica to be online",
            )
            master.execute_command("CLIENT", "PAUSE", pause_ms, "WRITE")
            deadline = time.monotonic() + pause_ms / 1000
            while not (synced := self._replicas_synced()) and time.monotonic() < deadline:
                time.sleep(0.05)
        with redis.Redis(port=self.sentinel_port, socket_timeout=5) as client:
            client.execute_command("SENTINEL", "FAILOVER", SENTINEL_SERVICE)
        return synced

    def log_tail(self, lines: int = 30) -> str:
        path = self.directory / "sentinel.log"
        return "\n".join(path.read_text().splitlines()[-lines:]) if path.exists() else "(none)"

    def _sentinel_has_a_good_replica(self) -> bool:
        with redis.Redis(port=self.sentinel_port, socket_timeout=2, decode_responses=True) as c:
            replicas = c.sentinel_slaves(SENTINEL_SERVICE)
        return any(
            not replica.get("is_sdown")
            and not replica.get("is_disconnected")
            and replica.get("master-link-status") == "ok"
            # Sentinel asks replicas for INFO every 10 s, and wants an answer under 30 s old.
            and int(replica.get("info-refresh", 10**9)) < 20000
            for replica in replicas
        )

    def _wait(self, condition: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                raise RuntimeError(f"Redis with Sentinel: timed out waiting for {what}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.sentinel is not None:
            self.sentinel.kill()
            self.sentinel.wait()
            self.sentinel = None
        for node in self.nodes:
            node.kill()


@contextmanager
def sentinel_redis(directory: Path) -> Iterator[SentinelRedis]:
    setup = SentinelRedis(directory)
    try:
        setup.start()
        yield setup
    finally:
        setup.stop()


@contextmanager
def http_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """Serve `handler` on a free loopback port until the block ends; yield the base URL."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    # A short poll interval keeps shutdown() quick.
    thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@contextmanager
def api_server(app: Flask, config: ServerConfig | None = None) -> Iterator[str]:
    """Serve `app` with the API's HTTP server (api/server.py; `config`, by default 4 threads) on
    a free loopback port, on a thread of this process, until the block ends; yield its origin.
    Checks that the server stopped (within 30 s)."""
    sockets = listen("127.0.0.1", 0)
    stop = threading.Event()
    config = config or ServerConfig(threads=4)
    thread = threading.Thread(target=serve_app, args=(app, sockets, config, stop), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sockets[0].getsockname()[1]}"
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive(), "the server did not stop"


@dataclass
class FileServer:
    """What `file_server` serves, and what it saw. Tests change it while the server runs."""

    files: dict[str, bytes | Path] = field(default_factory=dict)  # URL path → content
    # Body bytes to send before closing the connection: one entry per coming GET of any path
    # (`breaks`), or for the next GET of one path (`path_breaks`).
    breaks: list[int] = field(default_factory=list)
    path_breaks: dict[str, int] = field(default_factory=dict)
    honour_ranges: bool = True
    log: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)
    url: str = ""  # the base URL, without a trailing slash
    lock: threading.Lock = field(default_factory=threading.Lock)

    def file_url(self, name: str) -> str:
        return f"{self.url}/{name}"


def _file_handler(state: FileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            name = self.path.lstrip("/")
            range_header = self.headers.get("Range")
            with state.lock:
                state.log.append((name, range_header))
                cut = state.path_breaks.pop(name, None)
                if cut is None and state.breaks:
                    cut = state.breaks.pop(0)
            content = state.files.get(name)
            if content is None:
                self._send(404, b"not found", {}, cut)
                return
            data = content.read_bytes() if isinstance(content, Path) else content
            if range_header and state.honour_ranges:
                start = int(range_header.removeprefix("bytes=").rstrip("-"))
                if start >= len(data):
                    self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"}, cut)
                    return
                headers = {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
                self._send(206, data[start:], headers, cut)
            else:
                self._send(200, data, {}, cut)

        def _send(self, status: int, body: bytes, headers: dict[str, str], cut: int | None) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            # The announced length is always the full body, so a cut is a short read.
            self.send_header("Content-Length", str(len(body)))
            if cut is not None:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(body if cut is None else body[:cut])

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


@contextmanager
def file_server() -> Iterator[FileServer]:
    """Serve files over HTTP with Range support until the block ends."""
    state = FileServer()
    with http_server(_file_handler(state)) as url:
        state.url = url
        yield state
