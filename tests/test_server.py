"""The HTTP server in front of the API (api/server.py, api/protocol.py), tested on the wire.

Every test talks to a real server on a loopback port with raw bytes over a socket: the API app
on the embedded store, served by `serve_app` on a thread of this process, and `dalle-farm api`
(several processes) and `dalle-farm serve` as subprocesses. Timeouts here only fail a test that
hangs; nothing asserts how long anything took.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from api.server import ServerConfig, listen, serve_app
from cli.api import create_api_app
from core.settings import Settings, SettingsError
from tests.farm_helpers import FarmProcess, http, subprocess_env, wait_for
from tests.servers import free_port

CLIENT_TIMEOUT_S = 10
THREADS = 2
REQUEST_TIMEOUT_S = 2
LIMIT = 64 * 1024
PROBLEM = "application/problem+json"


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def problem(self) -> dict[str, Any]:
        assert self.headers.get("content-type") == PROBLEM, (self.status, self.headers, self.body)
        problem: dict[str, Any] = json.loads(self.body)
        assert problem["status"] == self.status
        assert problem["type"] and problem["title"] and problem["detail"], problem
        return problem


def read_answer(sock: socket.socket) -> Answer:
    """One HTTP answer from `sock` (Content-Length framed, as all of ours are)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed before an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (x.partition(":") for x in lines)}
    length = int(headers["content-length"])
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "the connection closed inside the answer's body"
        body += chunk
    return Answer(int(status_line.split()[1]), headers, body[:length])


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closed the connection (EOF or reset) before CLIENT_TIMEOUT_S."""
    sock.settimeout(CLIENT_TIMEOUT_S)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


def chunked(body: bytes, size: int) -> bytes:
    pieces = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"


def job_body(text: str, padding: int) -> bytes:
    """A valid job whose JSON ends only after `padding` spaces: a body cut anywhere is invalid."""
    return b'{"text": ' + json.dumps(text).encode() + b', "seed": 7' + b" " * padding + b"}"


class Server:
    def __init__(self, port: int) -> None:
        self.port = port

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=CLIENT_TIMEOUT_S)

    def send(self, raw: bytes) -> Answer:
        with closing(self.connect()) as sock:
            sock.sendall(raw)
            return read_answer(sock)

    def post_job(self, body: bytes, framing: str = "chunked", chunk_size: int = 1024) -> Answer:
        head = b"POST /v1/jobs HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        if framing == "chunked":
            return self.send(
                head + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(body, chunk_size)
            )
        return self.send(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)

    def get(self, path: str) -> Answer:
        return self.send(b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % path.encode())


@contextmanager
def run_in_thread(app: Flask, config: ServerConfig) -> Iterator[Server]:
    sockets = listen("127.0.0.1", 0)
    stop = threading.Event()
    thread = threading.Thread(target=serve_app, args=(app, sockets, config, stop), daemon=True)
    port = sockets[0].getsockname()[1]
    thread.start()
    try:
        yield Server(port)
    finally:
        stop.set()
        thread.join(30)
        assert not thread.is_alive(), "the server did not stop"


@pytest.fixture(scope="module")
def api_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flask]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("server-data"))
    app = create_api_app(settings, anonymous_owner="local")
    # A stand-in worker: the API takes jobs only for a model some live worker serves.
    app.extensions["dalle_farm"].store.worker_heartbeat("tests", models=["mini"], ttl_s=3600)
    yield app
    app.extensions["dalle_farm"].store.close()


@pytest.fixture(scope="module")
def server(api_app: Flask) -> Iterator[Server]:
    config = ServerConfig(threads=THREADS, request_timeout_s=REQUEST_TIMEOUT_S)
    with run_in_thread(api_app, config) as running:
        yield running


# -- the body limit, whatever the framing ---------------------------------------------------


def test_a_chunked_body_under_the_limit_arrives_whole(server: Server) -> None:
    text = "a fox " * 150 + "at the very end"
    body = job_body(text, LIMIT - len(job_body(text, 0)))
    assert len(body) == LIMIT
    answer = server.post_job(body, chunk_size=1000)
    assert answer.status == 202, answer.body[:500]
    assert json.loads(answer.body)["params"]["text"] == text
    job_id = json.loads(answer.body)["id"]
    assert json.loads(server.get(f"/v1/jobs/{job_id}").body)["params"]["text"] == text


@pytest.mark.parametrize("chunk_size", [1000, 100_000])
def test_a_chunked_body_over_the_limit_is_413(server: Server, chunk_size: int) -> None:
    answer = server.post_job(job_body("a fox", LIMIT), chunk_size=chunk_size)
    assert answer.status == 413
    assert "64 KiB" in answer.problem()["detail"]


def test_a_content_length_over_the_limit_is_413_before_the_body(server: Server) -> None:
    with closing(server.connect()) as sock:
        sock.sendall(
            b"POST /v1/jobs HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (LIMIT + 1)
        )
        answer = read_answer(sock)
    assert answer.status == 413
    assert "64 KiB" in answer.problem()["detail"]


def test_a_content_length_body_at_the_limit_is_read_whole(server: Server) -> None:
    body = job_body("exactly at the limit", 0)
    body = body[:-1] + b" " * (LIMIT - len(body)) + b"}"
    assert len(body) == LIMIT
    answer = server.post_job(body, framing="content-length")
    assert answer.status == 202, answer.body[:500]


def test_a_content_length_shorter_than_the_body(server: Server) -> None:
    body = job_body("a fox", 0)
    with closing(server.connect()) as sock:
        sock.sendall(
            b"POST /v1/jobs HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Content-Length: 10\r\n\r\n" + body
        )
        first = read_answer(sock)
        # The rest of the body is read as the start of the next request, which never ends.
        second = read_answer(sock)
    assert first.status == 400 and "not valid JSON" in first.problem()["detail"]
    assert second.status == 408
    second.problem()


def test_a_content_length_longer_than_the_body_times_out_with_408(server: Server) -> None:
    with closing(server.connect()) as sock:
        sock.sendall(
            b"POST /v1/jobs HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b'Content-Length: 1000\r\n\r\n{"text": "a fox"}'
        )
        answer = read_answer(sock)
        assert answer.status == 408
        assert "Content-Length" in answer.problem()["detail"]
        assert closed_by_server(sock)


# -- slow clients ---------------------------------------------------------------------------


def test_slow_clients_hold_no_thread_and_are_closed_after_the_timeout(server: Server) -> None:
    slow = [server.connect() for _ in range(3 * THREADS)]
    try:
        for index, sock in enumerate(slow):
            # Half send their headers slowly, half their body.
            if index % 2:
                sock.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{")
            else:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Slow: ")
        assert server.get("/healthz").status == 200
        answer = server.post_job(job_body("while others are slow", 10), framing="content-length")
        assert answer.status == 202, answer.body[:500]
        for sock in slow:
            assert closed_by_server(sock), "a slow connection was never closed"
    finally:
        for sock in slow:
            sock.close()


def test_a_client_trickling_bytes_is_cut_off_by_the_request_deadline(server: Server) -> None:
    """A byte every 0.2 s keeps the connection from ever being idle: only a deadline for the
    whole request ends it."""
    with closing(server.connect()) as sock:
        sock.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: t\r\nContent-Length: 10000\r\n\r\n")
        sock.settimeout(0.2)
        received = b""
        for _ in range(int(CLIENT_TIMEOUT_S / 0.2)):
            try:
                sock.sendall(b" ")
                received += sock.recv(65536)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
            if received.endswith(b"}\n"):
                break
        assert received.startswith(b"HTTP/1.1 408 "), received[:200]
        assert PROBLEM.encode() in received


def test_an_idle_keep_alive_connection_is_closed(api_app: Flask) -> None:
    config = ServerConfig(threads=THREADS, idle_timeout_s=1)
    with run_in_thread(api_app, config) as server, closing(server.connect()) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_answer(sock).status == 200
        assert closed_by_server(sock)


# -- malformed requests: 4xx problems, never waitress's text/plain page ---------------------

MALFORMED = {
    "request line too long": (b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n\r\n", 414, "URL"),
    "headers too long": (
        b"GET /healthz HTTP/1.1\r\n" + b"X-Big: b\r\n" * 2000 + b"\r\n",
        431,
        "headers",
    ),
    "control byte in a header": (b"GET /healthz HTTP/1.1\r\nX-Bad: a\x00b\r\n\r\n", 400, "control"),
    "space in a header name": (b"GET /healthz HTTP/1.1\r\nBad Name: x\r\n\r\n", 400, "token"),
    "bare LF in a header": (b"GET /healthz HTTP/1.1\r\nX-A: a\nb\r\n\r\n", 400, "CR LF"),
    "folded first header": (b"GET /healthz HTTP/1.1\r\n X-A: a\r\n\r\n", 400, "one line"),
    "garbage request line": (b"HELLO\r\n\r\n", 400, "request line"),
    "lower-case method": (b"get /healthz HTTP/1.1\r\n\r\n", 400, "upper-case"),
    "no HTTP version": (b"GET /healthz\r\nHost: t\r\n\r\n", 400, "HTTP/1.1"),
    "HTTP/2.0": (b"GET /healthz HTTP/2.0\r\n\r\n", 400, "HTTP/1.1"),
    "bad Content-Length": (b"POST /v1/jobs HTTP/1.1\r\nContent-Length: -5\r\n\r\n", 400, "digits"),
    "two Content-Lengths": (
        b"POST /v1/jobs HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        400,
        "digits",
    ),
    "Content-Length and chunked": (
        b"POST /v1/jobs HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\n{}\r\n0\r\n\r\n",
        400,
        "only one",
    ),
    "unknown Transfer-Encoding": (
        b"POST /v1/jobs HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
        400,
        "Transfer-Encoding",
    ),
    "chunked in HTTP/1.0": (
        b"POST /v1/jobs HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        400,
        "HTTP/1.1",
    ),
    "chunk size not hex": (
        b"POST /v1/jobs HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
        400,
        "hexadecimal",
    ),
    "chunk longer than its size": (
        b"POST /v1/jobs HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}}\r\n0\r\n\r\n",
        400,
        "hexadecimal",
    ),
}


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
def test_a_malformed_request_gets_a_4xx_problem(server: Server, case: str) -> None:
    raw, status, hint = MALFORMED[case]
    answer = server.send(raw)
    assert answer.status == status, answer.body
    assert hint in answer.problem()["detail"]


def test_the_server_answers_after_malformed_requests(server: Server) -> None:
    for raw, _, _ in MALFORMED.values():
        with suppress(AssertionError):
            server.send(raw)
    assert server.get("/healthz").status == 200


# -- stopping -------------------------------------------------------------------------------


def test_a_request_in_progress_finishes_when_the_server_stops() -> None:
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = LIMIT
    started = threading.Event()

    @app.get("/slow")
    def slow() -> str:
        started.set()
        time.sleep(1)
        return "done"

    sockets = listen("127.0.0.1", 0)
    server = Server(sockets[0].getsockname()[1])
    stop = threading.Event()
    thread = threading.Thread(target=serve_app, args=(app, sockets, ServerConfig(), stop))
    thread.start()
    try:
        with closing(server.connect()) as sock:
            sock.sendall(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
            assert started.wait(CLIENT_TIMEOUT_S)
            stop.set()
            answer = read_answer(sock)
        assert (answer.status, answer.body) == (200, b"done")
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()
    with pytest.raises(OSError):
        server.connect()


# -- settings and the CLI -------------------------------------------------------------------


def test_server_settings_come_from_the_environment() -> None:
    settings = Settings.from_env(
        {
            "DALLE_FARM_REQUEST_TIMEOUT_S": "5",
            "DALLE_FARM_IDLE_TIMEOUT_S": "7",
            "DALLE_FARM_MAX_CONNECTIONS": "50",
            "DALLE_FARM_MAX_HEADER_BYTES": "8192",
        }
    )
    config = ServerConfig.from_settings(settings, threads=3)
    assert config == ServerConfig(
        threads=3, request_timeout_s=5, idle_timeout_s=7, max_connections=50, max_header_bytes=8192
    )
    assert ServerConfig.from_settings(Settings.from_env({}), threads=8) == ServerConfig()
    with pytest.raises(SettingsError, match="DALLE_FARM_REQUEST_TIMEOUT_S"):
        Settings.from_env({"DALLE_FARM_REQUEST_TIMEOUT_S": "0"})


def _slow_clients_and_malformed_requests(port: int) -> None:
    server = Server(port)
    slow = [server.connect() for _ in range(3 * THREADS)]
    try:
        for sock in slow:
            sock.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{")
        assert server.get("/healthz").status == 200
        big = server.post_job(job_body("a fox", LIMIT))
        assert big.status == 413 and big.problem()
        bad = server.send(b"GET /healthz HTTP/1.1\r\nX-Bad: \x01\r\n\r\n")
        assert bad.status == 400 and bad.problem()
        for sock in slow:
            assert closed_by_server(sock)
    finally:
        for sock in slow:
            sock.close()


def _answers(port: int) -> bool:
    try:
        return http("GET", f"http://127.0.0.1:{port}/healthz", timeout_s=5)[0] == 200
    except OSError:
        return False


def test_dalle_farm_api_with_several_processes(tmp_path: Path) -> None:
    port = free_port()
    env = subprocess_env(
        {
            "DALLE_FARM_DATA_DIR": str(tmp_path / "data"),
            "DALLE_FARM_REQUEST_TIMEOUT_S": str(REQUEST_TIMEOUT_S),
        }
    )
    api = FarmProcess(
        ["api", "--port", str(port), "--workers", "2", "--threads", str(THREADS)],
        env,
        tmp_path / "api.log",
    ).start()
    try:
        wait_for(lambda: _answers(port), 60, "the API to answer", 0.2)
        _slow_clients_and_malformed_requests(port)
        assert api.terminate() == 0, api.log()[-3000:]
        assert api.log().count("listening on") == 2
    finally:
        api.kill_group()


def test_dalle_farm_serve(tmp_path: Path, small_models_root: Path) -> None:
    port = free_port()
    env = subprocess_env(
        {
            "DALLE_FARM_DATA_DIR": str(tmp_path / "data"),
            "DALLE_FARM_MODELS_ROOT": str(small_models_root),
            "DALLE_FARM_REQUEST_TIMEOUT_S": str(REQUEST_TIMEOUT_S),
        }
    )
    serve = FarmProcess(
        ["serve", "--port", str(port), "--threads", str(THREADS)], env, tmp_path / "serve.log"
    ).start()
    try:
        wait_for(lambda: _answers(port), 90, "the API to answer", 0.2)
        _slow_clients_and_malformed_requests(port)
        serve.wait_for_log("the worker is ready", 90)
        assert serve.terminate() == 0, serve.log()[-3000:]
    finally:
        serve.kill_group()


def test_a_port_in_use_is_one_line_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = subprocess_env({"DALLE_FARM_DATA_DIR": str(tmp_path / "data")})
        api = FarmProcess(["api", "--port", str(port), "--workers", "1"], env, tmp_path / "log")
        api.start()
        assert api.process is not None
        assert api.process.wait(60) == 1
    log = api.log()
    assert f"dalle-farm: error: cannot listen on 127.0.0.1:{port}" in log
    assert "Traceback" not in log
