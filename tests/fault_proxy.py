"""A small HTTP proxy for tests that puts faults in front of a real server: it answers chosen
requests itself (429 with Retry-After, 503, …), optionally after forwarding them (so the
server acts but the client never sees its answer), and forwards everything else unchanged."""

from __future__ import annotations

import http.client
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

# Headers that belong to one connection, not to the message (RFC 9110 section 7.6.1).
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
}


@dataclass(frozen=True)
class Fault:
    """An answer the proxy gives instead of the server's. With `forward`, the request reaches
    the server first and its answer is dropped: a response lost on the way back."""

    status: int
    retry_after: str | None = None
    forward: bool = False


@dataclass(frozen=True)
class Seen:
    """One request as the proxy saw it, and what it answered."""

    method: str
    path: str
    idempotency_key: str | None
    status: int
    injected: bool
    at: float


@dataclass
class _Rule:
    method: str
    path_prefix: str
    faults: list[Fault] = field(default_factory=list)


class FaultProxy:
    """A proxy on a free loopback port in front of `upstream` (http://host:port)."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        assert parts.hostname is not None and parts.port is not None, upstream
        self.upstream_host, self.upstream_port = parts.hostname, parts.port
        self.seen: list[Seen] = []
        self._rules: list[_Rule] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    def inject(self, method: str, path_prefix: str, *faults: Fault) -> None:
        """Answer the next len(faults) requests `method path_prefix…` with `faults`, in order."""
        with self._lock:
            self._rules.append(_Rule(method, path_prefix, list(faults)))

    def pending_faults(self) -> int:
        with self._lock:
            return sum(len(rule.faults) for rule in self._rules)

    def injected(self) -> list[Seen]:
        return [seen for seen in self.seen if seen.injected]

    def _next_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for rule in self._rules:
                if rule.faults and rule.method == method and path.startswith(rule.path_prefix):
                    return rule.faults.pop(0)
        return None

    def _forward(
        self, method: str, path: str, headers: list[tuple[str, str]], body: bytes | None
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        connection = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=60)
        try:
            connection.request(method, path, body=body, headers=dict(headers))
            response = connection.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            connection.close()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # quiet
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = [
                    (name, value)
                    for name, value in self.headers.items()
                    if name.lower() not in _HOP_BY_HOP and name.lower() != "host"
                ]
                fault = proxy._next_fault(self.command, self.path)
                if fault is None or fault.forward:
                    status, answer_headers, answer = proxy._forward(
                        self.command, self.path, headers, body
                    )
                if fault is not None:
                    status, answer_headers, answer = _fault_answer(fault)
                proxy.seen.append(
                    Seen(
                        self.command,
                        self.path,
                        self.headers.get("Idempotency-Key"),
                        status,
                        fault is not None,
                        time.monotonic(),
                    )
                )
                self.send_response(status)
                for name, value in answer_headers:
                    if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            do_GET = do_POST = do_DELETE = _handle

        return Handler


def _fault_answer(fault: Fault) -> tuple[int, list[tuple[str, str]], bytes]:
    problem = {
        "type": "about:blank",
        "title": "injected fault",
        "status": fault.status,
        "detail": f"the fault proxy answered {fault.status}",
    }
    headers = [("Content-Type", "application/problem+json")]
    if fault.retry_after is not None:
        headers.append(("Retry-After", fault.retry_after))
    return fault.status, headers, json.dumps(problem).encode()
