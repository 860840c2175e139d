"""/v1: submit, read, list and cancel jobs, and fetch result files kept on local disk.

Every route needs the caller's API key (see api.auth), and a caller sees only its own jobs:
another key's job answers 404, exactly as a job that does not exist.

Cancel (DELETE /v1/jobs/{id}): a queued job is canceled at once and a running one is asked to
stop at its worker's next decoder step (202, with the job); an already canceled job answers 200
unchanged, so a retried DELETE succeeds; a succeeded or failed job cannot be canceled (409).
"""

from __future__ import annotations

import base64
import binascii
import difflib
import json
import logging
import mimetypes
import re
from http import HTTPStatus
from typing import Any, NoReturn

from flask import Blueprint, Response, jsonify, request
from pydantic import TypeAdapter, ValidationError

from api import operations
from api.auth import current_owner
from api.job_json import job_json, job_page_json
from api.limits import RequestLimiter, key_limits, too_many_jobs, v1_blueprint
from api.openapi import add_route
from api.problems import Problem, redact, unavailable
from api.services import Services
from core.contract import (
    IDEMPOTENCY_KEY_MAX_CHARS,
    PAGE_LIMIT_DEFAULT,
    PAGE_LIMIT_MAX,
    Cursor,
    IdempotencyKey,
    PageLimit,
)
from core.job import (
    FieldError,
    InvalidParams,
    JobParams,
    JobRecord,
    JobStatus,
    is_job_id,
    new_job_id,
    params_fingerprint,
    parse_params,
    resolve_seed,
    result_prefix,
    text_token_warning,
    utc_now,
)
from core.settings import Settings
from core.storage import LocalStorage, ObjectNotFound
from core.store import IdempotencyConflict, JobNotFound, JobStore, NotConfirmed, TooManyJobs
from core.webhooks import AllowList, WebhookRefused, resolve_url

logger = logging.getLogger(__name__)

LIST_QUERY_FIELDS = ("status", "cursor", "limit")
_QUERY_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
# The checks the OpenAPI document describes, from the same contract types.
_IDEMPOTENCY_KEY: TypeAdapter[str] = TypeAdapter(IdempotencyKey)
_CURSOR: TypeAdapter[str] = TypeAdapter(Cursor)
_PAGE_LIMIT: TypeAdapter[int] = TypeAdapter(PageLimit)


def create_blueprint(
    settings: Settings,
    services: Services,
    anonymous_owner: str | None,
    limiter: RequestLimiter,
) -> Blueprint:
    """The /v1 routes, bound to `services`."""
    blueprint = v1_blueprint("v1", settings, services.store, anonymous_owner, limiter)
    views = JobViews(settings, services)
    add_route(blueprint, "/jobs", "POST", views.submit_job, operations.SUBMIT_JOB)
    add_route(blueprint, "/jobs", "GET", views.list_jobs, operations.LIST_JOBS)
    add_route(blueprint, "/jobs/<job_id>", "GET", views.get_job, operations.GET_JOB)
    add_route(blueprint, "/jobs/<job_id>", "DELETE", views.cancel_job, operations.CANCEL_JOB)
    add_route(blueprint, "/files/<path:key>", "GET", views.get_file, operations.GET_FILE)
    return blueprint


class JobViews:
    def __init__(self, settings: Settings, services: Services) -> None:
        self.settings = settings
        self.store = services.store
        self.storage = services.storage
        self.queue = services.queue
        self.tokenizer = services.tokenizer

    def submit_job(self) -> Response:
        """POST /v1/jobs: validate, record and enqueue a job (202), or replay an idempotent
        submission (200)."""
        idempotency_key = _idempotency_key()
        try:
            params = parse_params(_json_body(), max_grid_size=self.settings.max_grid_size)
        except InvalidParams as error:
            raise Problem(
                HTTPStatus.UNPROCESSABLE_ENTITY,
                f"the job parameters are not valid: {error}",
                slug="invalid-params",
                errors=error.errors,
            ) from None
        self._require_served(params.model)
        self._check_webhook(params.webhook_url)
        record = JobRecord(
            id=new_job_id(),
            owner=current_owner(),
            status=JobStatus.QUEUED,
            params=resolve_seed(params).to_dict(),
            created_at=utc_now(),
        )
        # The fingerprint takes the seed as sent, so a replay of a "random seed" body matches.
        fingerprint = params_fingerprint(params) if idempotency_key is not None else None
        try:
            limits = key_limits(self.settings)
            job, created = self.store.create_job(
                record, idempotency_key, fingerprint, max_active=limits.max_jobs
            )
        except TooManyJobs as error:
            raise too_many_jobs(limits, error.active) from None
        except NotConfirmed as error:
            # Kept unless Redis fails over now: queue it so that it runs if kept, and let the
            # client ask again (the same Idempotency-Key answers with this job if it was kept).
            self._enqueue(error.job)
            raise Problem(
                HTTPStatus.SERVICE_UNAVAILABLE,
                f"no Redis replica confirmed job {error.job.id} in time (a failover may be "
                "under way), so it may be lost; send the request again with the same "
                "Idempotency-Key, which answers with this job if it was kept",
                slug="unavailable",
            ) from None
        except IdempotencyConflict:
            raise Problem(
                HTTPStatus.CONFLICT,
                f"the Idempotency-Key {idempotency_key!r} was used before with a different "
                "body; send a new key for a new job, or the same body to get the first job",
                slug="idempotency-conflict",
            ) from None
        if created:
            self._enqueue(job)
        response = jsonify(job_json(job, self.storage, warnings=self._warnings(params)))
        response.status_code = HTTPStatus.ACCEPTED if created else HTTPStatus.OK
        response.headers["Location"] = f"/v1/jobs/{job.id}"
        if not created:
            response.headers["Idempotent-Replayed"] = "true"
        return response

    def _require_served(self, model: str) -> None:
        """422 unless a live worker serves `model`: a job no worker would take is refused now
        rather than left waiting (workers announce their models; see core/unserved.py)."""
        served = self.store.served_models()
        if model in served:
            return
        message = (
            f"no worker serves model {model!r} now (served: {', '.join(sorted(served)) or 'none'});"
            f" ask for a model that is served, or start a worker with DALLE_FARM_MODEL={model}"
        )
        raise Problem(
            HTTPStatus.UNPROCESSABLE_ENTITY,
            message,
            slug="model-not-served",
            errors=[FieldError("model", message)],
        )

    def _check_webhook(self, url: str | None) -> None:
        """422 for a webhook_url that may not be called (core/webhooks.py: a host that does
        not resolve, or resolves to a loopback, private or other non-public address)."""
        if url is None:
            return
        try:
            resolve_url(url, AllowList.parse(self.settings.webhook_allow))
        except WebhookRefused as error:
            raise Problem(
                HTTPStatus.UNPROCESSABLE_ENTITY,
                str(error),
                slug="webhook-refused",
                errors=[FieldError("webhook_url", str(error))],
            ) from None

    def _enqueue(self, job: JobRecord) -> None:
        try:
            self.queue.enqueue(
                job.id, model=job.params.get("model"), priority=job.params.get("priority")
            )
        except Exception as error:
            # A queued record that no message points to would wait forever: fail it instead.
            logger.exception("could not enqueue job %s", job.id)
            try:
                self.store.transition(
                    job.id,
                    JobStatus.FAILED,
                    error=f"the job could not be queued ({redact(error)}); submit it again",
                    finished_at=utc_now(),
                )
            except Exception:
                logger.exception("could not mark job %s failed; it stays queued", job.id)
            raise unavailable("job queue", error) from error

    def _warnings(self, params: JobParams) -> list[str]:
        if self.tokenizer is None:
            return []
        warning = text_token_warning(params.text, self.tokenizer)
        return [warning] if warning is not None else []

    def get_job(self, job_id: str) -> Response:
        """GET /v1/jobs/{id}."""
        return jsonify(job_json(owned_job(self.store, job_id), self.storage))

    def cancel_job(self, job_id: str) -> Response:
        """DELETE /v1/jobs/{id}: see the module docstring for the answers."""
        job = owned_job(self.store, job_id)
        if job.status is JobStatus.CANCELED:
            return jsonify(job_json(job, self.storage))
        if not job.status.is_terminal:
            try:
                job = self.store.request_cancel(job_id)
            except JobNotFound:
                _job_not_found(job_id)
        if job.status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
            raise Problem(
                HTTPStatus.CONFLICT,
                f"job {job_id} already {job.status.value}; only queued or running jobs can be "
                "canceled",
                slug="job-finished",
            )
        response = jsonify(job_json(job, self.storage))
        response.status_code = HTTPStatus.ACCEPTED
        return response

    def list_jobs(self) -> Response:
        """GET /v1/jobs?status=&cursor=&limit=: the caller's jobs, newest first."""
        status, cursor, limit = _list_query()
        try:
            jobs, store_cursor = self.store.list_jobs(
                current_owner(), status=status, cursor=cursor, limit=limit
            )
        except ValueError as error:
            raise _invalid_request([_bad_cursor(str(error))]) from None
        next_cursor = _encode_cursor(store_cursor) if store_cursor is not None else None
        return jsonify(job_page_json(jobs, next_cursor, self.storage))

    def get_file(self, key: str) -> Response:
        """GET /v1/files/{key}: a result file of the caller's job, when results are on local
        disk (with S3, clients fetch the presigned URLs in the job's result instead)."""
        if not isinstance(self.storage, LocalStorage):
            raise Problem(
                HTTPStatus.NOT_FOUND,
                "this farm keeps results in S3: fetch them from the URLs in the job's result",
            )
        job_id = _job_id_of_key(key)
        job = self.store.get_job(job_id) if job_id is not None else None
        if job is None or job.owner != current_owner():
            _file_not_found(key)
        try:
            data = self.storage.get(key)
        except (ObjectNotFound, ValueError):
            _file_not_found(key)
        mimetype = mimetypes.guess_type(key)[0] or "application/octet-stream"
        response = Response(data, mimetype=mimetype)
        response.headers["Cache-Control"] = "private, max-age=3600"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response


def owned_job(store: JobStore, job_id: str) -> JobRecord:
    """The caller's job `job_id`; 404 if there is none (another key's job is none)."""
    job = store.get_job(job_id) if is_job_id(job_id) else None
    if job is None or job.owner != current_owner():
        _job_not_found(job_id)
    return job


def _job_not_found(job_id: str) -> NoReturn:
    if not is_job_id(job_id):
        detail = f"{job_id[:64]!r} is not a job id (32 lowercase hex digits)"
    else:
        detail = f"there is no job {job_id} for this API key"
    raise Problem(HTTPStatus.NOT_FOUND, detail)


def _file_not_found(key: str) -> NoReturn:
    raise Problem(HTTPStatus.NOT_FOUND, f"there is no file {key[:200]!r} for this API key")


def _job_id_of_key(key: str) -> str | None:
    """The job whose result folder holds `key` (jobs/{id}/...), or None."""
    parts = key.split("/", 2)
    if len(parts) < 3 or not is_job_id(parts[1]) or not parts[2]:
        return None
    job_id = parts[1]
    return job_id if key.startswith(result_prefix(job_id) + "/") else None


def _invalid_request(errors: list[FieldError], status: int = HTTPStatus.BAD_REQUEST) -> Problem:
    return Problem(
        status, "; ".join(error.message for error in errors), slug="invalid-request", errors=errors
    )


def _idempotency_key() -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    try:
        return _IDEMPOTENCY_KEY.validate_python(key, strict=True)
    except ValidationError:
        message = (
            f"Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_MAX_CHARS} printable ASCII "
            f"characters, not starting or ending with a space (a UUID, say), got {len(key)} "
            "characters"
        )
        raise _invalid_request([FieldError("Idempotency-Key", message)]) from None


def _json_body() -> Any:
    # Exactly application/json (any charset), the one media type the document names.
    if request.mimetype != "application/json":
        got = request.mimetype or "no Content-Type"
        message = f"the body must be JSON sent with 'Content-Type: application/json', got {got}"
        raise Problem(
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
            message,
            errors=[FieldError("Content-Type", message)],
            headers={"Accept-Post": "application/json"},
        )
    data = request.get_data(cache=False)  # over MAX_CONTENT_LENGTH: 413
    try:
        return json.loads(data, parse_constant=_reject_constant)
    except json.JSONDecodeError as error:
        reason = f"{error.msg} at line {error.lineno} column {error.colno}"
    except (ValueError, RecursionError) as error:  # bad UTF-8, NaN, a huge integer, deep nesting
        reason = str(error) if isinstance(error, ValueError) else "it is nested too deeply"
    message = f"the body is not valid JSON: {reason}"
    raise _invalid_request([FieldError("body", message)])


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON value")


def _encode_cursor(store_cursor: str) -> str:
    """The store's cursor wrapped, so that the API can tell its own cursors from anything else
    whatever the store's cursors look like."""
    text = json.dumps({"after": store_cursor}, separators=(",", ":"))
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> str:
    if not cursor:
        raise ValueError("it is empty; omit cursor for the first page")
    try:
        _CURSOR.validate_python(cursor, strict=True)  # the document's pattern
        padded = cursor + "=" * (-len(cursor) % 4)
        fields = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
        store_cursor = fields["after"]
    except (ValueError, TypeError, KeyError, binascii.Error):
        raise ValueError("it is not a cursor this API gave out") from None
    if not isinstance(store_cursor, str):
        raise ValueError("it is not a cursor this API gave out")
    return store_cursor


def _bad_cursor(reason: str) -> FieldError:
    return FieldError(
        "cursor", f"cursor is not valid: {reason}; pass next_cursor from the previous page"
    )


def _list_query() -> tuple[JobStatus | None, str | None, int]:
    args = request.args
    errors = []
    for name in args:
        if name not in LIST_QUERY_FIELDS:
            close = difflib.get_close_matches(name, LIST_QUERY_FIELDS, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"use {', '.join(LIST_QUERY_FIELDS)}"
            errors.append(FieldError(name, f"unknown query parameter {name!r}; {hint}"))
        elif len(args.getlist(name)) > 1:
            errors.append(FieldError(name, f"{name} may be given only once"))

    status: JobStatus | None = None
    if "status" in args:
        try:
            status = JobStatus(args["status"])
        except ValueError:
            names = ", ".join(member.value for member in JobStatus)
            errors.append(
                FieldError("status", f"status must be one of {names}, got {args['status'][:40]!r}")
            )
    cursor = None
    if "cursor" in args:
        try:
            cursor = _decode_cursor(args["cursor"])
        except ValueError as error:
            errors.append(_bad_cursor(str(error)))
    limit = PAGE_LIMIT_DEFAULT
    if "limit" in args:
        raw = args["limit"]
        try:
            # A JSON number, as the document's integer schema reads it (5 or 5.0, not 5.5),
            # and nothing int() or float() would also take (" 5", "1_0", "nan").
            if not (len(raw) <= 32 and _QUERY_NUMBER.fullmatch(raw)):
                raise ValueError(raw)
            number = json.loads(raw)
            limit = _PAGE_LIMIT.validate_python(number, strict=True)
        except ValueError:  # pydantic's ValidationError is one
            errors.append(
                FieldError(
                    "limit",
                    f"limit must be an integer from 1 to {PAGE_LIMIT_MAX}, got {raw[:40]!r}",
                )
            )
    if errors:
        raise _invalid_request(errors)
    return status, cursor, limit
