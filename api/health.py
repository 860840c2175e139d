"""/healthz (the process answers) and /readyz (its store, storage and queue answer too, and a
live worker serves a model, so that a job submitted now is taken).

Neither needs an API key: load balancers and orchestrators call them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from http import HTTPStatus

from flask import Blueprint, Response, jsonify

from api.problems import Problem, redact
from api.services import Services

logger = logging.getLogger(__name__)


def create_blueprint(services: Services) -> Blueprint:
    blueprint = Blueprint("health", __name__)
    checks: dict[str, Callable[[], None]] = {
        "store": services.store.check,
        "storage": services.storage.check,
        "queue": services.queue.check,
        "workers": lambda: _check_workers(services),
    }

    @blueprint.get("/healthz")
    def healthz() -> Response:
        """The process is up; says nothing about its backends."""
        return jsonify({"status": "ok"})

    @blueprint.get("/readyz")
    def readyz() -> Response:
        """200 when every backend answers its check and some worker serves a model, else 503
        naming each check that failed."""
        results: dict[str, str] = {}
        for name, check in checks.items():
            try:
                check()
            except Exception as error:
                # Whatever a check raises, the probe must answer, and say which backend failed.
                logger.warning("readiness check %s failed: %s", name, error)
                results[name] = redact(error) or type(error).__name__
            else:
                results[name] = "ok"
        failed = [name for name, result in results.items() if result != "ok"]
        if failed:
            raise Problem(
                HTTPStatus.SERVICE_UNAVAILABLE,
                "not ready: " + "; ".join(f"{name}: {results[name]}" for name in failed),
                slug="not-ready",
                extensions={"checks": results},
            )
        return jsonify({"status": "ok", "checks": results})

    return blueprint


def _check_workers(services: Services) -> None:
    if not services.store.served_models():
        # Until one announces (once its model is loaded), every submit would be refused (422).
        raise RuntimeError(
            "no live worker serves a model yet; a worker announces its model once loaded"
        )
