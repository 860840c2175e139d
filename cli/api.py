"""`dalle-farm api`: the REST API, with the backends DALLE_FARM_* describe.

    dalle-farm api --host 0.0.0.0 --port 8000 --workers 2

Every request needs an API key (`dalle-farm keys create NAME`). The API never imports torch:
it records jobs and sends their ids to the workers' queues. The HTTP server is waitress,
hardened against slow and malformed requests (api/server.py); its timeouts and limits are the
DALLE_FARM_* settings in core/settings.py.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

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
        help="serve the REST API; configured by DALLE_FARM_* variables",
        description="Serve the farm's REST API. Jobs go to Redis (DALLE_FARM_REDIS_URL) for "
        "`dalle-farm worker` processes to render.",
    )
    add_server_arguments(parser)
    parser.add_argument(
        "--workers",
        type=_positive_int,
        default=2,
        help="server processes, each with its own request threads (default: %(default)s)",
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
        help="threads that run requests, per server process; a slow client holds none "
        "(default: %(default)s)",
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


def serve_api(
    load_app: Callable[[], Flask],
    args: argparse.Namespace,
    settings: Settings,
    *,
    processes: int = 1,
) -> int:
    """Serve the app `load_app` builds (in each server process) until SIGTERM or Ctrl-C."""
    from api.server import ListenError, ServerConfig
    from api.server import run as run_server

    config = ServerConfig.from_settings(settings, threads=args.threads)
    try:
        return run_server(
            load_app, host=args.host, port=args.port, config=config, processes=processes
        )
    except ListenError as error:
        raise CommandError(error) from error


def run(args: argparse.Namespace) -> int:
    """Serve the API until SIGTERM or Ctrl-C; return the exit status."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s dalle-farm api[%(process)d]: %(message)s"
    )
    settings = load_settings()
    if settings.is_embedded:
        log.warning(
            "DALLE_FARM_REDIS_URL is not set: serving the embedded store in %s; "
            "`dalle-farm serve` runs a worker with it",
            settings.data_dir,
        )
    check_services(settings)
    return serve_api(lambda: create_api_app(settings), args, settings, processes=args.workers)
