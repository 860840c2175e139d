"""The HTTP server of `dalle-farm api` and `dalle-farm serve`: waitress, hardened (api.protocol).

    sockets = listen(host, port)
    serve_app(app, sockets, config, stop)             this process, until stop is set (tests)
    run(load_app, host, port, config, processes=N)    the CLI: N processes, until SIGTERM/SIGINT

Why waitress. A Flask app needs a WSGI server, and the API's clients are on the open network,
so a slow client must not hold what other requests need. gunicorn's gthread worker reads a
request's body on the thread that runs the app: a few clients sending their bodies slowly held
every thread, and /healthz timed out. waitress reads each request whole in one I/O loop (poll)
and only then gives it to a thread, so slow clients cost a socket each, up to
`max_connections`; each request has `request_timeout_s` to arrive whole, and an idle connection
is closed after `idle_timeout_s`. No proxy is needed in front for that (infra/README.md).

Event streams (GET /v1/jobs/{id}/events, /v1/events; api/events.py) last as long as a client
watches, so they run on a pool of threads of their own, grown as needed up to
`event_streams` + a few (to answer the 429 past the app's limit at once); the `threads` that
answer every other request are never taken by a stream. The app finds the server's stop Event
in its WSGI environ, so every stream ends as soon as the server stops.

Several processes (`processes` > 1) share the listening sockets, each with its own threads and
its own copy of the app, built after the fork: the app's connections to Redis and S3 are never
shared between processes. SIGTERM or SIGINT stops accepting, lets the requests in progress
finish and their answers go out (at most `shutdown_timeout_s`), then exits with status 0.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from waitress import wasyncore
from waitress.adjustments import Adjustments
from waitress.task import ThreadedTaskDispatcher

from api.events import STOP_ENVIRON_KEY, is_event_stream
from api.protocol import HardenedAdjustments, HardenedServer, Limits, busy_channels

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

    from core.settings import Settings

log = logging.getLogger(__name__)
access_log = logging.getLogger("api.access")

# How often the I/O loop wakes up to check for a stop; the longest a stop waits to begin.
LOOP_TIMEOUT_S = 0.5
# A process that cannot build the app exits with this status: starting another would fail too.
EXIT_BOOT_FAILED = 3
RESTART_PAUSE_S = 1.0
BACKLOG = 1024
# Stream threads beyond the app's stream limit, so that a stream past it gets its 429 at once.
SPARE_STREAM_THREADS = 8


@dataclass(frozen=True)
class ServerConfig:
    """How the server treats connections; the defaults are core.settings' defaults."""

    threads: int = 8
    request_timeout_s: float = 30
    idle_timeout_s: float = 60
    max_connections: int = 1000
    max_header_bytes: int = 16384
    shutdown_timeout_s: float = 20
    event_streams: int = 256

    @classmethod
    def from_settings(cls, settings: Settings, threads: int) -> ServerConfig:
        return cls(
            threads=threads,
            request_timeout_s=settings.request_timeout_s,
            idle_timeout_s=settings.idle_timeout_s,
            max_connections=settings.max_connections,
            max_header_bytes=settings.max_header_bytes,
            event_streams=settings.max_event_streams,
        )


class ListenError(OSError):
    """The address cannot be listened on (the port is taken, the host is not this machine)."""


def listen(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for `host` and `port` (one per address a name such as localhost has);
    ListenError if that fails."""
    sockets: list[socket.socket] = []
    try:
        addresses: list[Any] = Adjustments(host=host, port=port).listen  # (family, ...)
        for family, kind, protocol, address in addresses:
            sock = socket.socket(family, kind, protocol)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
    except (OSError, ValueError) as error:
        for sock in sockets:
            sock.close()
        raise ListenError(f"cannot listen on {host}:{port}: {error}") from error
    return sockets


def body_limit(app: WSGIApplication) -> int:
    """The app's body limit (Flask's MAX_CONTENT_LENGTH), which the server enforces too."""
    config = getattr(app, "config", {})
    limit = config.get("MAX_CONTENT_LENGTH")
    if not isinstance(limit, int):
        raise ValueError("the app sets no MAX_CONTENT_LENGTH; the server needs a body limit")
    return limit


def serve_app(
    app: WSGIApplication,
    sockets: list[socket.socket],
    config: ServerConfig,
    stop: threading.Event,
) -> None:
    """Serve `app` on `sockets` in this thread until `stop` is set, then shut down gracefully.
    The sockets are closed on return."""
    limits = Limits(
        max_body_bytes=body_limit(app),
        max_header_bytes=config.max_header_bytes,
        request_timeout_s=config.request_timeout_s,
    )
    adjustments = HardenedAdjustments(
        limits,
        threads=config.threads,
        channel_timeout=max(1, round(config.idle_timeout_s)),
        # Checks for idle and slow connections run this often (seconds).
        cleanup_interval=1,
        connection_limit=config.max_connections,
        max_request_header_size=config.max_header_bytes,
        # waitress's own limit counts chunk framing; api.protocol holds the decoded body to
        # max_body_bytes, so this one only bounds the framing of tiny chunks.
        max_request_body_size=4 * limits.max_body_bytes,
        # poll(), not select(), which fails on file descriptors past 1023.
        asyncore_use_poll=True,
        ident="dalle-farm",
    )
    socket_map: dict[int, Any] = {}
    dispatcher = _Dispatcher(config.threads, config.event_streams + SPARE_STREAM_THREADS)
    servers = [
        HardenedServer(
            _with_stop(_with_access_log(app), stop),
            socket_map,
            _sock=sock,
            dispatcher=cast(Any, dispatcher),
            adj=adjustments,
            bind_socket=False,
            sockinfo=(sock.family, sock.type, sock.proto, sock.getsockname()),
        )
        for sock in sockets
    ]
    for sock in sockets:
        log.info("listening on %s (pid %d)", _url(sock), os.getpid())
    try:
        while not stop.is_set():
            wasyncore.loop(timeout=LOOP_TIMEOUT_S, map=socket_map, use_poll=True, count=1)
        log.info("stopping (pid %d): finishing the requests in progress", os.getpid())
        _drain(servers, socket_map, time.monotonic() + config.shutdown_timeout_s)
    finally:
        dispatcher.shutdown(cancel_pending=True, timeout=1)
        wasyncore.close_all(socket_map)
        for sock in sockets:
            sock.close()


class _GrowingPool(ThreadedTaskDispatcher):
    """waitress's thread pool, started empty and grown by a thread whenever a task finds none
    idle, up to `limit` (stream threads are many and mostly unused)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def add_task(self, task: Any) -> None:
        with self.lock:
            idle = len(self.threads) - self.stop_count - self.active_count
            grow = idle <= len(self.queue) and len(self.threads) < self.limit
        if grow:
            self.set_thread_count(len(self.threads) + 1)
        with self.lock:  # as waitress's add_task, without its warning about a queue
            self.queue.append(task)
            self.queue_cv.notify()


class _Dispatcher:
    """Hands each request to the request threads, or an event stream to the stream threads."""

    def __init__(self, threads: int, stream_threads: int) -> None:
        self.requests = ThreadedTaskDispatcher()
        self.requests.set_thread_count(threads)
        self.streams = _GrowingPool(stream_threads)

    def add_task(self, channel: Any) -> None:
        # The channel's next request is whole (waitress queues a channel once it is).
        request = channel.requests[0] if channel.requests else None
        stream = (
            request is not None
            and request.error is None
            and is_event_stream(request.command, request.path)
        )
        (self.streams if stream else self.requests).add_task(channel)

    def set_thread_count(self, count: int) -> None:
        self.requests.set_thread_count(count)

    def shutdown(self, cancel_pending: bool = True, timeout: int = 5) -> bool:
        streams = self.streams.shutdown(cancel_pending, timeout)
        return self.requests.shutdown(cancel_pending, timeout) and streams


def _drain(servers: list[HardenedServer], socket_map: dict[int, Any], deadline: float) -> None:
    """Stop accepting; let the requests in progress finish and their answers go out."""
    for server in servers:
        server.accepting = False
    while True:
        busy = 0
        for server in servers:
            count, idle = busy_channels(server)
            busy += count
            for channel in idle:  # keep-alive connections, and requests still arriving
                channel.will_close = True
        if not busy:
            break
        if time.monotonic() >= deadline:
            log.warning("stopping with %d request(s) still in progress", busy)
            break
        wasyncore.loop(timeout=0.1, map=socket_map, use_poll=True, count=1)
    # One more turn, so that the connections marked above are closed cleanly.
    wasyncore.loop(timeout=0, map=socket_map, use_poll=True, count=1)


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _with_stop(app: WSGIApplication, stop: threading.Event) -> WSGIApplication:
    """The app, with the server's stop Event in each request's environ (api/events.py)."""

    def stoppable(environ: WSGIEnvironment, start_response: StartResponse) -> Any:
        environ[STOP_ENVIRON_KEY] = stop
        return app(environ, start_response)

    return stoppable


def _with_access_log(app: WSGIApplication) -> WSGIApplication:
    def logged(environ: WSGIEnvironment, start_response: StartResponse) -> Any:
        started = time.monotonic()

        def start(status: str, headers: Any, exc_info: Any = None) -> Any:
            # The path only: query strings may carry cursors that nobody needs in a log.
            access_log.info(
                '%s "%s %s" %s %.1f ms',
                environ.get("REMOTE_ADDR", "-"),
                environ.get("REQUEST_METHOD", "-"),
                environ.get("PATH_INFO", "-"),
                status.split(" ", 1)[0],
                1000 * (time.monotonic() - started),
            )
            return start_response(status, headers, exc_info)

        return app(environ, start)

    return logged


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGTERM and SIGINT set `stop` (the loops that read it never hold its lock, so setting it
    from a signal handler is safe)."""

    def handle(signum: int, frame: object) -> None:
        stop.set()  # no logging here: a handler that logs can deadlock on the logging lock

    previous = {number: signal.signal(number, handle) for number in STOP_SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _raise_file_limit(max_connections: int) -> None:
    """Each connection is a file descriptor: lift the soft limit towards what is configured."""
    try:
        import resource
    except ImportError:  # not on Unix
        return
    wanted = max_connections + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new_soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
        if new_soft < wanted:
            log.warning(
                "open files are limited to %d (ulimit -n): fewer than the %d connections "
                "DALLE_FARM_MAX_CONNECTIONS allows",
                new_soft,
                max_connections,
            )


def run(
    load_app: Callable[[], WSGIApplication],
    *,
    host: str,
    port: int,
    config: ServerConfig,
    processes: int = 1,
) -> int:
    """Serve the app `load_app` builds until SIGTERM or SIGINT; return the exit status.
    ListenError if the address cannot be listened on."""
    _raise_file_limit(config.max_connections)
    sockets = listen(host, port)
    if processes == 1:
        app = load_app()
        stop = threading.Event()
        with _stop_on_signals(stop):
            serve_app(app, sockets, config, stop)
        return 0
    return _ProcessGroup(load_app, sockets, config, processes).run()


class _ProcessGroup:
    """`processes` forked server processes on shared sockets; one that dies is replaced."""

    def __init__(
        self,
        load_app: Callable[[], WSGIApplication],
        sockets: list[socket.socket],
        config: ServerConfig,
        processes: int,
    ) -> None:
        self.load_app = load_app
        self.sockets = sockets
        self.config = config
        self.processes = processes
        self.children: dict[int, int] = {}  # pid → process number

    def run(self) -> int:
        stop = threading.Event()
        failed = False
        with _stop_on_signals(stop):
            for number in range(1, self.processes + 1):
                self._spawn(number)
            while not stop.is_set():
                for number, status in self._reap():
                    if status == EXIT_BOOT_FAILED:
                        log.error("API process %d could not start; stopping", number)
                        failed = True
                        stop.set()
                    else:
                        log.error("API process %d exited (%d); starting another", number, status)
                        time.sleep(RESTART_PAUSE_S)
                        self._spawn(number)
                time.sleep(0.2)
            self._stop_children()
        for sock in self.sockets:
            sock.close()
        return 1 if failed else 0

    def _spawn(self, number: int) -> None:
        # Signals wait until the child has its own handlers (delivered then), not the parent's.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                os._exit(self._child(number))
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        self.children[pid] = number

    def _child(self, number: int) -> int:
        try:
            stop = threading.Event()
            with _stop_on_signals(stop):
                signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
                log.info(
                    "Booting worker process %d of %d (pid %d)", number, self.processes, os.getpid()
                )
                try:
                    app = self.load_app()
                except Exception:
                    log.exception("API process %d could not build the app", number)
                    return EXIT_BOOT_FAILED
                serve_app(app, self.sockets, self.config, stop)
            return 0
        except BaseException:
            log.exception("API process %d failed", number)
            return 1
        finally:
            logging.shutdown()

    def _reap(self) -> list[tuple[int, int]]:
        """The children that exited: (process number, exit status)."""
        exited = []
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            number = self.children.pop(pid, None)
            if number is not None:
                exited.append((number, os.waitstatus_to_exitcode(status)))
        return exited

    def _stop_children(self) -> None:
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.config.shutdown_timeout_s + 5
        while self.children and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.1)
        for pid in self.children:
            log.warning("API process %d did not stop; killing it", self.children[pid])
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        while self.children:
            pid, _ = os.waitpid(-1, 0)
            self.children.pop(pid, None)
