"""`dalle-farm api`: the REST API under gunicorn, with the backends DALLE_FARM_* describe.

    dalle-farm api --host 0.0.0.0 --port 8000 --workers 2

Every request needs an API key (`dalle-farm keys create NAME`). The API never imports torch:
it records jobs and sends their ids to the workers' queues.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cli.main import CommandError

if TYPE_CHECKING:
    from flask import Flask

    from core.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``api`` sub-parser."""
    parser = subparsers.add_parser(
        "api",
        help="serve the REST API (gunicorn); configured by DALLE_FARM_* variables",
        description="Serve the farm's REST API with gunicorn. Jobs go to Redis "
        "(DALLE_FARM_REDIS_URL) for `dalle-farm worker` processes to render.",
    )
    add_server_arguments(parser)
    parser.add_argument(
        "--workers",
        type=_positive_int,
        default=2,
        help="gunicorn worker processes (default: %(default)s)",
    )


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host", default=DEFAULT_HOST, help="address to listen on (default: %(default)s)"
    )
    parser.add_argument(
        "--port", type=_port, default=DEFAULT_PORT, help="port to listen on (default: %(default)s)"
    )
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=8,
        help="request threads per worker process (default: %(default)s)",
    )


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def _port(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {value!r}") from None
    if not 1 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"must be from 1 to 65535, got {number}")
    return number


def is_loopback(host: str) -> bool:
    """Whether `host` binds to this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind_address(host: str, port: int) -> str:
    return f"[{host.strip('[]')}]:{port}" if ":" in host else f"{host}:{port}"


def load_settings() -> Settings:
    from core.settings import Settings, SettingsError

    try:
        return Settings.from_env()
    except SettingsError as error:
        raise CommandError(error) from error


def create_api_app(settings: Settings, anonymous_owner: str | None = None) -> Flask:
    """The Flask app over the services `settings` describe (built in the calling process)."""
    from api.app import create_app
    from api.services import load_tokenizer
    from core.services import build_services

    services = build_services(settings, ensure_bucket=False)
    return create_app(
        settings,
        store=services.store,
        storage=services.storage,
        queue=services.queue,
        anonymous_owner=anonymous_owner,
        tokenizer=load_tokenizer(settings.models_root, settings.model),
    )


def check_services(settings: Settings) -> None:
    """Fail fast, with the reason, when the store or storage cannot be used; create the
    bucket (or folder) if missing."""
    from core.services import build_services
    from core.storage import StorageError
    from core.store import StoreError

    try:
        services = build_services(settings, ensure_bucket=True)
    except (StorageError, StoreError, OSError) as error:
        raise CommandError(error) from error
    try:
        services.store.check()
        services.queue.check()
    except StoreError as error:
        raise CommandError(error) from error
    finally:
        services.close()


def run_gunicorn(
    load_app: Callable[[], Flask],
    *,
    bind: str,
    workers: int,
    threads: int,
    hooks: dict[str, Callable[..., Any]] | None = None,
) -> int:
    """Serve the app `load_app` builds (in each worker process) until gunicorn stops."""
    from gunicorn.app.base import BaseApplication

    options: dict[str, Any] = {
        "bind": [bind],
        "workers": workers,
        "worker_class": "gthread",
        "threads": threads,
        "accesslog": "-",
        "errorlog": "-",
        "timeout": 60,
        "graceful_timeout": 20,
        "proc_name": "dalle-farm-api",
        # gunicorn's control socket has one default path per user: two servers would clash.
        "control_socket_disable": True,
        **(hooks or {}),
    }

    class Application(BaseApplication):
        def load_config(self) -> None:
            for name, value in options.items():
                self.cfg.set(name, value)

        def load(self) -> Flask:
            return load_app()

    arbiter_pid = os.getpid()
    try:
        Application().run()
    except SystemExit as exit_:
        if os.getpid() != arbiter_pid:
            raise  # a gunicorn worker process leaving: nothing of ours to do
        return exit_.code if isinstance(exit_.code, int) else 1
    return 0


def run(args: argparse.Namespace) -> int:
    """Serve the API until SIGTERM or Ctrl-C; return the exit status."""
    settings = load_settings()
    if settings.is_embedded:
        log.warning(
            "DALLE_FARM_REDIS_URL is not set: serving the embedded store in %s; "
            "`dalle-farm serve` runs a worker with it",
            settings.data_dir,
        )
    check_services(settings)
    return run_gunicorn(
        lambda: create_api_app(settings),
        bind=bind_address(args.host, args.port),
        workers=args.workers,
        threads=args.threads,
    )
