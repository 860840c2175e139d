"""What each route accepts and answers, for the generated OpenAPI document (api.openapi).

The /v1 routes are added with these (api.routes); /healthz, /readyz and /metrics are declared by
endpoint in `declare_other_routes`. Problem statuses are the ones the code can really answer:
503 wherever a store, storage or queue is called (the key check calls the store too).
"""

from __future__ import annotations

from flask import Flask

from api.openapi import Answer, Header, Operation, Param, declare
from core.contract import (
    IDEMPOTENCY_KEY_MAX_CHARS,
    JOB_ID_PATTERN,
    Cursor,
    IdempotencyKey,
    Job,
    JobPage,
    JobParams,
    JobStatus,
    PageLimit,
)

MAX_BODY_BYTES = 64 * 1024
BACKEND_DOWN = "A backend (job store, result storage or queue) is unavailable; retry later."

JOB_ID = Param(
    "job_id",
    "path",
    {"type": "string", "pattern": JOB_ID_PATTERN},
    description="The job's id; anything else is 404.",
)
_BY_ID = {"job_id": "$response.body#/id"}
JOB_LINKS = {
    "GetJob": {"operationId": "getJob", "parameters": _BY_ID},
    "CancelJob": {"operationId": "cancelJob", "parameters": _BY_ID},
}
LOCATION = Header("/v1/jobs/{id}: where to poll the job.")

SUBMIT_JOB = Operation(
    "submitJob",
    "Submit a job",
    description="Validates the body against JobParams (every bad field is listed in the 422's "
    "`errors`), records the job and queues it. With an Idempotency-Key, the same key and body "
    "answer the job the key first made (200, Idempotent-Replayed), so a retried POST never "
    "makes a second job.",
    body=JobParams,
    body_description=f"The job's parameters, as JSON, at most {MAX_BODY_BYTES // 1024} KiB.",
    parameters=(Param("Idempotency-Key", "header", IdempotencyKey),),
    answers={
        202: Answer("Queued.", Job, headers={"Location": LOCATION}, links=JOB_LINKS),
        200: Answer(
            "An idempotent repeat: the job the Idempotency-Key first made.",
            Job,
            headers={
                "Location": LOCATION,
                "Idempotent-Replayed": Header("Always true.", {"type": "string", "enum": ["true"]}),
            },
            links=JOB_LINKS,
        ),
    },
    problems={
        400: "The body is not JSON, or the Idempotency-Key is not "
        f"1 to {IDEMPOTENCY_KEY_MAX_CHARS} printable ASCII characters.",
        409: "The Idempotency-Key was used before with another body.",
        429: "Or: the API key has its limit of jobs queued or running (its own, or "
        "DALLE_FARM_KEY_MAX_JOBS).",
        413: f"The body is over {MAX_BODY_BYTES // 1024} KiB.",
        415: "The body is not sent as application/json.",
        422: "The parameters are not valid; `errors` names each field and what to change. "
        "Also when no live worker serves the job's `model` (type .../model-not-served, the "
        "error on `model`), and when `webhook_url` may not be called: its host does not "
        "resolve or resolves to a non-public address (type .../webhook-refused, the error on "
        "`webhook_url`).",
        503: BACKEND_DOWN,
    },
    keyed=True,
)

LIST_JOBS = Operation(
    "listJobs",
    "The caller's jobs, newest first",
    parameters=(
        Param("status", "query", JobStatus, description="Only jobs in this status."),
        Param("cursor", "query", Cursor),
        Param("limit", "query", PageLimit),
    ),
    answers={
        200: Answer(
            "A page of jobs.",
            JobPage,
            links={
                "GetFirstJob": {
                    "operationId": "getJob",
                    "parameters": {"job_id": "$response.body#/jobs/0/id"},
                }
            },
        )
    },
    problems={
        400: "An unknown status, a cursor this API did not give out, a limit out of range, or "
        "an unknown or repeated query parameter; `errors` names each.",
        503: BACKEND_DOWN,
    },
    keyed=True,
)

GET_JOB = Operation(
    "getJob",
    "A job: its status, progress and result URLs",
    parameters=(JOB_ID,),
    answers={200: Answer("The job.", Job, links={"CancelJob": JOB_LINKS["CancelJob"]})},
    problems={404: "No such job for this API key.", 503: BACKEND_DOWN},
    keyed=True,
)

CANCEL_JOB = Operation(
    "cancelJob",
    "Cancel a job",
    description="A queued job is canceled at once; a running one stops at its worker's next "
    "decoder step (cancel_requested). Canceling a canceled job answers 200; a succeeded or "
    "failed one, 409.",
    parameters=(JOB_ID,),
    answers={
        202: Answer("Canceled, or cancellation requested.", Job),
        200: Answer("The job was already canceled.", Job),
    },
    problems={
        404: "No such job for this API key.",
        409: "The job already succeeded or failed.",
        503: BACKEND_DOWN,
    },
    keyed=True,
)

GET_FILE = Operation(
    "getFile",
    "A result file, when results are kept on local disk (embedded mode)",
    parameters=(
        Param(
            "key",
            "path",
            {"type": "string", "pattern": r"^jobs/[0-9a-f]{32}/.+"},
            description="A storage key from a job's result: jobs/{job_id}/grid.png, "
            "jobs/{job_id}/{i}.png, jobs/{job_id}/previews/{k}.png or jobs/{job_id}/job.json.",
        ),
    ),
    answers={
        200: Answer(
            "The file.",
            content={
                "image/png": {"schema": {"type": "string", "format": "binary"}},
                "application/json": {"schema": {"type": "object"}},
            },
        )
    },
    problems={
        404: "No such file for this API key, or this farm keeps results in S3 (use the URLs "
        "in the job's result).",
        503: BACKEND_DOWN,
    },
    keyed=True,
)

_EVENT_STREAM = {
    "text/event-stream": {
        "schema": {
            "type": "string",
            "description": "Server-Sent Events: `id:`, `event:` (status, progress, preview or "
            "done) and `data:` (one line of JSON) per event; comment lines keep the connection "
            "alive.",
        }
    }
}
LAST_EVENT_ID = Param(
    "Last-Event-ID",
    "header",
    {"type": "string", "minLength": 1, "maxLength": 64, "pattern": r"^[\x21-\x7e]+$"},
    description="The id of the last event received, to resume after it on a reconnect.",
)
_STREAM_PROBLEMS = {
    400: "Last-Event-ID is not an id this stream sends.",
    429: "Or: this API process has DALLE_FARM_MAX_EVENT_STREAMS streams open.",
    503: BACKEND_DOWN,
}

JOB_EVENTS = Operation(
    "jobEvents",
    "A job's live events (Server-Sent Events)",
    description="First the job's state now (a `status` event, or `done` when it is finished), "
    "then each change: `status` (the job's JSON), `progress` ({id, step, total}), `preview` "
    "({id, frame, key, url}), and last `done` (the final job JSON), after which the stream "
    "ends. Reconnect with Last-Event-ID to resume without loss.",
    parameters=(JOB_ID, LAST_EVENT_ID),
    answers={200: Answer("The event stream.", content=_EVENT_STREAM)},
    problems={404: "No such job for this API key.", **_STREAM_PROBLEMS},
    keyed=True,
)

OWNER_EVENTS = Operation(
    "events",
    "Live events of all the caller's jobs (Server-Sent Events)",
    description="The events of GET /v1/jobs/{id}/events for every job of this API key, from "
    "now on (or after Last-Event-ID), until the client closes the stream.",
    parameters=(LAST_EVENT_ID,),
    answers={200: Answer("The event stream.", content=_EVENT_STREAM)},
    problems=_STREAM_PROBLEMS,
    keyed=True,
)

_TEXT = {"schema": {"type": "string"}}


def declare_other_routes(app: Flask) -> None:
    """The routes of api.health, api.metrics, api.openapi and api.docs."""
    status_ok = {
        "type": "object",
        "required": ["status"],
        "additionalProperties": False,
        "properties": {"status": {"const": "ok"}},
    }
    ready = {
        "type": "object",
        "required": ["status", "checks"],
        "additionalProperties": False,
        "properties": {
            "status": {"const": "ok"},
            "checks": {"type": "object", "additionalProperties": {"const": "ok"}},
        },
    }
    declare(
        app,
        "health.healthz",
        Operation(
            "healthz",
            "The process is up",
            {200: Answer("Up.", content={"application/json": {"schema": status_ok}})},
        ),
    )
    declare(
        app,
        "health.readyz",
        Operation(
            "readyz",
            "The store, storage and queue answer",
            {200: Answer("Ready.", content={"application/json": {"schema": ready}})},
            {503: "Not ready; `checks` says which backend failed and why."},
        ),
    )
    declare(
        app,
        "metrics.metrics",
        Operation(
            "metrics",
            "Prometheus metrics",
            {
                200: Answer(
                    "Prometheus text exposition, or OpenMetrics when the Accept header asks.",
                    content={"text/plain": _TEXT, "application/openmetrics-text": _TEXT},
                )
            },
            {503: "The job store is unavailable."},
        ),
    )
    declare(
        app,
        "openapi.openapi",
        Operation(
            "openapi",
            "This document",
            {200: Answer("OpenAPI 3.1.", content={"application/json": {"schema": {}}})},
        ),
    )
    declare(
        app,
        "docs.docs",
        Operation(
            "docs",
            "This document as a web page (Swagger UI, served from this server)",
            {200: Answer("An HTML page.", content={"text/html": _TEXT})},
        ),
    )
    declare(
        app,
        "docs.static",
        Operation(
            "docsAsset",
            "A file of the /docs page",
            {200: Answer("The file.", content={"*/*": {"schema": {}}})},
            {404: "No such file."},
            parameters=(Param("filename", "path", {"type": "string"}),),
        ),
    )
