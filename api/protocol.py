"""HTTP/1.1 on the wire, before the app sees a request: waitress's parser and channel with the
API's limits, and its error answers as problem details.

waitress reads each request whole (request line, headers and body) in its I/O loop, and only
then hands it to a thread that runs the app, so a slow client holds a socket, never a thread.
On top of that this module adds what the API needs:

- The body limit (the app's MAX_CONTENT_LENGTH) for every framing: a Content-Length over it is
  refused before the body is read, and a chunked body as soon as its decoded size passes it.
  waitress leaves the decoded size to the app (it sets CONTENT_LENGTH once the last chunk is in)
  and counts the chunk framing in its own, larger limit.
- A deadline for the whole request (`request_timeout_s`): a client that trickles its headers or
  body gets 408 and is closed, however often it sends a byte; waitress's own timeout
  (`channel_timeout`) only counts silence.
- Requests that proxies could read differently are refused: Content-Length together with
  Transfer-Encoding, Transfer-Encoding in HTTP/1.0, and HTTP versions other than 1.0 and 1.1.
- Every answer waitress makes itself (a malformed request line or header, bad chunking, a
  limit) is application/problem+json with a detail that says what to change, like the app's,
  never waitress's text/plain page; bad input gets a 4xx, never a 5xx.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, cast

from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.server import TcpWSGIServer
from waitress.task import ErrorTask
from waitress.utilities import (
    BadRequest,
    Error,
    RequestEntityTooLarge,
    RequestHeaderFieldsTooLarge,
    ServerNotImplemented,
)

from api.problems import PROBLEM_MIMETYPE

logger = logging.getLogger(__name__)

# At most this many reads of 64 KiB are discarded when a connection closes.
DISCARD_READS = 8


@dataclass(frozen=True)
class Limits:
    """What one request may be: its body and header sizes, and how long it may take to arrive."""

    max_body_bytes: int
    max_header_bytes: int
    request_timeout_s: float


class HardenedAdjustments(Adjustments):
    """waitress's settings plus the API's `Limits`, which every parser and channel can reach."""

    def __init__(self, limits: Limits, **settings: Any) -> None:
        super().__init__(**settings)
        self.limits = limits


class HttpProblem(Error):
    """An error answer whose detail is ready for the client."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.code = status
        self.reason = HTTPStatus(status).phrase


def body_too_large(limits: Limits) -> HttpProblem:
    # The app words its own 413 the same way (api/problems.py).
    return HttpProblem(
        413,
        f"the request body is larger than {limits.max_body_bytes // 1024} KiB; send a smaller body",
    )


class HardenedParser(HTTPRequestParser):
    """waitress's request parser, with the checks described in the module docstring."""

    def __init__(self, adj: Adjustments) -> None:
        super().__init__(adj)
        # When the request's first bytes arrived: the request deadline counts from here.
        self.started = time.monotonic()
        self.limits = cast(HardenedAdjustments, adj).limits

    def received(self, data: bytes) -> int:
        in_headers = not self.headers_finished and self.body_rcv is None
        header_so_far = self.header_plus + data if in_headers else b""
        consumed = super().received(data)
        if isinstance(self.error, RequestHeaderFieldsTooLarge):
            if b"\r\n" not in header_so_far.lstrip(b"\r\n")[: self.limits.max_header_bytes]:
                self.error = HttpProblem(
                    414,
                    f"the request line is longer than {self.limits.max_header_bytes} bytes; "
                    "shorten the URL (every route of this API has a short path)",
                )
            return consumed
        if self.error is not None:
            return consumed
        problem = None
        if in_headers and self.headers_finished and not self.empty:
            problem = self._framing_problem()
        elif self.chunked and len(self.body_rcv or b"") > self.limits.max_body_bytes:
            problem = body_too_large(self.limits)
        if problem is not None:
            self.error = problem
            self.completed = True
            # No "100 Continue" for a body that will be refused anyway.
            self.expect_continue = False
        return consumed

    def _framing_problem(self) -> HttpProblem | None:
        if self.version not in ("1.0", "1.1"):
            got = f"HTTP/{self.version}" if self.version else "no HTTP version"
            return HttpProblem(
                400,
                f"this server speaks HTTP/1.1 and HTTP/1.0, got {got}; end the request line "
                "with HTTP/1.1",
            )
        if "TRANSFER_ENCODING" in self.headers:  # waitress removes it from HTTP/1.1 requests
            return HttpProblem(
                400,
                "Transfer-Encoding needs HTTP/1.1; send an HTTP/1.1 request, or the body "
                "with Content-Length",
            )
        if self.chunked and "CONTENT_LENGTH" in self.headers:
            return HttpProblem(
                400,
                "the request has both Content-Length and Transfer-Encoding: chunked; send "
                "only one of them",
            )
        if not self.chunked and self.content_length > self.limits.max_body_bytes:
            return body_too_large(self.limits)
        return None


CHUNKED_ADVICE = (
    "the chunked body is malformed: send each chunk as its size in hexadecimal, CR LF, the data "
    "and CR LF, and end the body with a chunk of size 0 (0 CR LF CR LF)"
)
# waitress's messages for malformed requests (by prefix) → what the client should change.
BAD_REQUEST_ADVICE = (
    (
        "Bare CR or LF found in HTTP message",
        "the request line contains a bare CR or LF; end "
        "every line of the request line and headers with CR LF",
    ),
    (
        "Bare CR or LF found in header",
        "a header contains a bare CR or LF; end every header line with CR LF",
    ),
    (
        "Invalid header",
        "a header line is not valid: each must be 'Name: value', the name a "
        "token (letters, digits and !#$%&'*+-.^`|~) and the value free of control characters",
    ),
    (
        "Malformed header line",
        "a header line starts with a space or tab (obsolete line "
        "folding); send each header on one line",
    ),
    ("HTTP message header invalid", "the request line is not followed by CR LF and the headers"),
    (
        "Start line is invalid",
        "the request line is not valid: send 'METHOD /path HTTP/1.1', separated by single spaces",
    ),
    ("Malformed HTTP method", "the method must be an upper-case token such as GET or POST"),
    (
        "Content-Length is invalid",
        "Content-Length must be a single number of digits: the body's size in bytes",
    ),
    ("Bad URI", "the request target is not a valid URI; percent-encode the path"),
    ("Chunk not properly terminated", CHUNKED_ADVICE),
    ("Invalid chunk", CHUNKED_ADVICE),
)


def describe(error: Error, request: HTTPRequestParser, limits: Limits) -> tuple[int, str]:
    """The status and detail of the answer to a request waitress or our parser refused."""
    if isinstance(error, HttpProblem):
        return error.code, str(error.body)
    if isinstance(error, RequestEntityTooLarge):
        if request.chunked:  # waitress's own limit, which counts the chunk framing too
            return 413, (
                f"the chunked body, with its framing, is larger than "
                f"{4 * limits.max_body_bytes // 1024} KiB; send it in larger chunks or with "
                "Content-Length"
            )
        return 413, str(body_too_large(limits).body)
    if isinstance(error, RequestHeaderFieldsTooLarge):
        return 431, (
            f"the request line and headers are larger than {limits.max_header_bytes} bytes; "
            "send fewer or shorter headers"
        )
    if isinstance(error, ServerNotImplemented):
        # RFC 9112 suggests 501, but the fault is the client's: an unknown coding is bad input.
        return 400, (
            "the request's Transfer-Encoding is not supported: send the body with Content-Length, "
            "or with 'Transfer-Encoding: chunked' alone"
        )
    if isinstance(error, BadRequest):
        message = str(error.body)
        for prefix, advice in BAD_REQUEST_ADVICE:
            if message.startswith(prefix):
                return 400, advice
        return 400, (
            f"the request is not valid HTTP/1.1 ({message[:200]}); check its request line, "
            "headers and body framing"
        )
    return 500, (
        "the server failed unexpectedly; the error is in its log. Retry later, and report it "
        "if it persists"
    )


def problem_body(status: int, detail: str) -> bytes:
    problem = {
        "type": "about:blank",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
    }
    return (json.dumps(problem) + "\n").encode()


class ProblemErrorTask(ErrorTask):
    """Answers a refused request with a problem, then closes the connection."""

    def execute(self) -> None:
        # The stubs type this request as an Error; it is the parser of the refused request.
        request = cast(HardenedParser, self.request)
        assert request.error is not None
        limits = cast(HardenedAdjustments, self.channel.adj).limits
        status, detail = describe(request.error, request, limits)
        if status >= 500:
            logger.error("%d from the HTTP server itself: %s", status, request.error.body)
        else:
            logger.info("refused a request from %s: %d %s", self.channel.addr, status, detail)
        body = problem_body(status, detail)
        self.status = f"{status} {HTTPStatus(status).phrase}"
        self.response_headers = [*self.response_headers, ("Content-Type", PROBLEM_MIMETYPE)]
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class HardenedChannel(HTTPChannel):
    """One client connection."""

    parser_class = HardenedParser
    error_task_class = ProblemErrorTask

    def handle_close(self) -> None:
        # Closing a socket with unread bytes in it sends a reset, and a client that is still
        # sending (a body refused after its headers) may then lose the answer before it reads
        # it: say we are done (FIN), and discard what has already arrived.
        sock = self.socket
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
                for _ in range(DISCARD_READS):
                    if not sock.recv(65536):
                        break
        super().handle_close()

    def time_out_request(self, started_before: float) -> None:
        """Answer 408 to a request that started arriving before `started_before` and is still
        incomplete, unless the connection is busy with an earlier request (then the wait is not
        the client's doing). Called from the I/O loop, the only thread that parses."""
        channel: Any = self  # the stubs lack requests_lock, and type requests as read-only
        with channel.requests_lock:
            request = self.request
            if (
                not isinstance(request, HardenedParser)
                or request.started >= started_before
                or channel.requests
                or self.will_close
                or self.close_when_flushed
            ):
                return
            timeout_s = request.limits.request_timeout_s
            request.error = HttpProblem(
                408,
                f"the request did not arrive whole within {timeout_s:g} s; send the request "
                "line, headers and body without pausing, and a Content-Length that matches the "
                "body",
            )
            request.completed = True
            request.expect_continue = False
            self.request = None
            channel.requests.append(request)
            self.server.add_task(cast(Any, self))


class HardenedServer(TcpWSGIServer):
    """A listening socket whose connections are `HardenedChannel`s."""

    channel_class = HardenedChannel

    def maintenance(self, now: float) -> None:
        # Closes connections idle for longer than channel_timeout (the stubs say int: it is
        # time.time()).
        super().maintenance(cast(Any, now))
        limits = cast(HardenedAdjustments, self.adj).limits
        started_before = time.monotonic() - limits.request_timeout_s
        channels: dict[int, HardenedChannel] = cast(Any, self).active_channels
        for channel in list(channels.values()):
            channel.time_out_request(started_before)


def busy_channels(server: HardenedServer) -> tuple[int, list[HardenedChannel]]:
    """How many connections are serving a request or sending an answer, and the others."""
    channels: dict[int, HardenedChannel] = cast(Any, server).active_channels
    busy = 0
    idle = []
    for channel in list(channels.values()):
        if channel.requests or channel.total_outbufs_len:
            busy += 1
        else:
            idle.append(channel)
    return busy, idle
