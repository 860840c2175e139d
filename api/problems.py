"""Every error the API answers, as RFC 9457 problem details (application/problem+json).

A problem has `type`, `title`, `status` and `detail` (what happened and what to do), and for bad
input `errors`: [{"field", "message"}, ...], one per problem found. Generic HTTP errors (unknown
route, wrong method, body too large) have type "about:blank" and the status phrase as title;
problems a client may want to tell apart have a type of their own (PROBLEM_TYPES), a tag URI that
names the problem and is not meant to be fetched.

Views raise `Problem`; `register_error_handlers` turns it, werkzeug's HTTP errors, and anything
unexpected (500, logged) into responses.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from http import HTTPStatus
from typing import Any

from flask import Flask, Response, current_app, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from core.contract import FieldError
from core.contract import Problem as ProblemBody
from core.job import encodable
from core.storage import StorageUnavailable
from core.store import StoreUnavailable

logger = logging.getLogger(__name__)

PROBLEM_MIMETYPE = "application/problem+json"
_TYPE_PREFIX = "tag:dalle-farm,2024:problems/"

# slug → title; the type URI is _TYPE_PREFIX + slug.
PROBLEM_TYPES = {
    "invalid-params": "The job parameters are not valid",
    "model-not-served": "No live worker serves the model",
    "webhook-refused": "The webhook URL may not be called",
    "invalid-request": "The request is not valid",
    "idempotency-conflict": "The Idempotency-Key was used with another body",
    "job-finished": "The job has already finished",
    "too-many-streams": "Too many event streams are open",
    "rate-limited": "Too many requests for this API key",
    "too-many-jobs": "Too many jobs queued or running for this API key",
    "unauthorized": "An API key is required",
    "unavailable": "A backend the API needs is unavailable",
    "not-ready": "The API is not ready",
}
# Seconds a client should wait before retrying a 503.
RETRY_AFTER_S = 5


def problem_type(slug: str) -> str:
    """The type URI of one of PROBLEM_TYPES."""
    if slug not in PROBLEM_TYPES:
        raise ValueError(f"unknown problem type {slug!r}")
    return _TYPE_PREFIX + slug


class Problem(Exception):
    """An error answer: raise it from a view. `slug` picks a PROBLEM_TYPES type; without one the
    type is about:blank and the title the HTTP status phrase."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        slug: str | None = None,
        errors: Iterable[FieldError] = (),
        headers: Mapping[str, str] | None = None,
        extensions: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.type = problem_type(slug) if slug is not None else "about:blank"
        self.title = PROBLEM_TYPES[slug] if slug is not None else HTTPStatus(status).phrase
        self.errors = list(errors)
        self.headers = dict(headers or {})
        self.extensions = dict(extensions or {})

    def to_dict(self) -> dict[str, Any]:
        """The body, as the contract's Problem (fields without a value are left out)."""
        errors = [FieldError(encodable(e.field), encodable(e.message)) for e in self.errors]
        body = ProblemBody(
            type=self.type,
            title=self.title,
            status=int(self.status),
            detail=encodable(self.detail),
            errors=errors,
            **self.extensions,
        )
        return body.model_dump(mode="json")


def problem_response(problem: Problem) -> Response:
    response = Response(
        current_app.json.dumps(problem.to_dict()) + "\n",
        status=problem.status,
        mimetype=PROBLEM_MIMETYPE,
    )
    response.headers.update(problem.headers)
    if problem.status == HTTPStatus.SERVICE_UNAVAILABLE and "Retry-After" not in response.headers:
        response.headers["Retry-After"] = str(RETRY_AFTER_S)
    return response


# user:password@ in a URL a backend's message may quote (a Redis URL, say).
_URL_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]*@")


def redact(message: object) -> str:
    """A backend's error message with any credentials in URLs blanked, fit to show a client."""
    return _URL_CREDENTIALS.sub("***@", str(message))


def unavailable(what: str, error: Exception) -> Problem:
    """503 for a backend (store, storage, queue) that failed: the message says which and why."""
    return Problem(
        HTTPStatus.SERVICE_UNAVAILABLE,
        f"the {what} is unavailable ({redact(error)}); retry later",
        slug="unavailable",
    )


def _http_problem(error: HTTPException) -> Problem:
    status = error.code or HTTPStatus.INTERNAL_SERVER_ERROR
    headers: dict[str, str] = {}
    if status == HTTPStatus.NOT_FOUND:
        detail = f"no route {request.method} {request.path}; /openapi.json lists the routes"
    elif isinstance(error, MethodNotAllowed):
        allowed = sorted(set(error.valid_methods or ()) - {"OPTIONS"})
        headers["Allow"] = ", ".join(sorted(set(error.valid_methods or ())))
        detail = f"{request.method} is not allowed on {request.path}; use {', '.join(allowed)}"
    elif status == HTTPStatus.REQUEST_ENTITY_TOO_LARGE:
        limit = current_app.config["MAX_CONTENT_LENGTH"]
        detail = f"the request body is larger than {limit // 1024} KiB; send a smaller body"
    else:
        detail = error.description or HTTPStatus(status).description
    return Problem(status, detail, headers=headers)


def register_error_handlers(app: Flask) -> None:
    """Answer Problem, HTTP errors, unreachable backends and unexpected errors as problems."""

    @app.errorhandler(Problem)
    def handle_problem(problem: Problem) -> Response:
        return problem_response(problem)

    @app.errorhandler(HTTPException)
    def handle_http_error(error: HTTPException) -> Response:
        return problem_response(_http_problem(error))

    @app.errorhandler(StoreUnavailable)
    def handle_store_unavailable(error: StoreUnavailable) -> Response:
        logger.warning("job store unavailable: %s", error)
        return problem_response(unavailable("job store", error))

    @app.errorhandler(StorageUnavailable)
    def handle_storage_unavailable(error: StorageUnavailable) -> Response:
        logger.warning("result storage unavailable: %s", error)
        return problem_response(unavailable("result storage", error))

    @app.errorhandler(Exception)
    def handle_unexpected(error: Exception) -> Response:
        logger.exception("unexpected error in %s %s", request.method, request.path)
        return problem_response(
            Problem(
                HTTPStatus.INTERNAL_SERVER_ERROR,
                "the server failed unexpectedly; the error is in its log. Retry later, and "
                "report it if it persists",
            )
        )
