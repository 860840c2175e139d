"""The Flask app factory.

    create_app(settings, store=..., storage=..., queue=...)   tests and the embedded `serve`
    create_app_from_env()                                      `dalle-farm api` (api.server)

One Settings object, read once, and the backends are passed in; nothing is global, so several
apps (tests) live side by side in one process. Torch is never imported here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from flask import Flask
from flask.json.provider import DefaultJSONProvider

from api import docs, events, health, metrics, openapi, operations, routes, web
from api.limits import RequestLimiter
from api.problems import register_error_handlers
from api.services import Services, ServicesBuilder, services_from_settings
from core.queue import JobQueue
from core.settings import Settings
from core.storage import Storage
from core.store import JobStore
from core.unserved import UnservedJobSweeper

if TYPE_CHECKING:
    from model.tokenizer import TextTokenizer


class _JSONProvider(DefaultJSONProvider):
    # Keep fields in the order the API writes them (id and status first), not alphabetical.
    sort_keys = False


def create_app(
    settings: Settings,
    *,
    store: JobStore,
    storage: Storage,
    queue: JobQueue,
    anonymous_owner: str | None = None,
    tokenizer: TextTokenizer | None = None,
) -> Flask:
    """The API for the given backends.

    With `anonymous_owner` (the embedded `serve`, bound to loopback) requests need no API key and
    every job belongs to that owner; otherwise each request needs `Authorization: Bearer <key>`
    and its owner is the key's id. With `tokenizer`, submissions whose text the model will cut
    short answer with a warning.
    """
    services = Services(store=store, storage=storage, queue=queue, tokenizer=tokenizer)
    app = Flask(__name__, static_folder=None)
    app.json = _JSONProvider(app)
    app.config["MAX_CONTENT_LENGTH"] = operations.MAX_BODY_BYTES
    # For whoever runs the app (the embedded `serve`, tests) to reach and close the backends.
    app.extensions["dalle_farm"] = services
    register_error_handlers(app)
    # One counter of requests per key for every /v1 route (api/limits.py).
    limiter = RequestLimiter.from_settings(settings)
    app.register_blueprint(routes.create_blueprint(settings, services, anonymous_owner, limiter))
    app.register_blueprint(events.create_blueprint(settings, services, anonymous_owner, limiter))
    app.register_blueprint(health.create_blueprint(services))
    app.register_blueprint(metrics.create_blueprint(services))
    app.register_blueprint(openapi.create_blueprint())
    app.register_blueprint(docs.create_blueprint())
    app.register_blueprint(web.create_blueprint(storage))  # the web app at /
    operations.declare_other_routes(app)
    openapi.install(app, settings, anonymous=anonymous_owner is not None)
    # Jobs whose model lost its last worker fail on time even when no worker at all is alive
    # to sweep them: every API process sweeps too, at most every few seconds.
    sweeper = UnservedJobSweeper(store, settings.unserved_job_timeout_s)

    @app.before_request
    def sweep_unserved_jobs() -> None:
        sweeper.maybe()  # never raises; returns None so the request goes on

    return app


def create_app_from_env(
    build_services: ServicesBuilder = services_from_settings,
    environ: Mapping[str, str] = os.environ,
) -> Flask:
    """The API configured from DALLE_FARM_* variables (see core.settings); `build_services`
    makes the store, storage and queue those settings describe."""
    settings = Settings.from_env(environ)
    services = build_services(settings)
    return create_app(
        settings,
        store=services.store,
        storage=services.storage,
        queue=services.queue,
        tokenizer=services.tokenizer,
    )
