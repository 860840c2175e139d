"""The OpenAPI 3.1 document of the API, served at GET /openapi.json.

Written by hand, from the same constants the views use; tests/test_api.py checks that it names
every route and method Flask serves, and nothing else.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify

from api.problems import PROBLEM_MIMETYPE, PROBLEM_TYPES, problem_type
from api.routes import LIST_LIMIT_DEFAULT, LIST_LIMIT_MAX, MAX_BODY_BYTES, MAX_IDEMPOTENCY_KEY_CHARS
from core.job import (
    MODELS,
    PROGRESS_TOTAL,
    SEED_MAX,
    SEED_RANDOM,
    SUPERCONDITION_FACTOR_RANGE,
    TEMPERATURE_MAX,
    TOP_K_MAX,
    JobParams,
    JobStatus,
)
from core.settings import Settings

_SCHEMAS = "#/components/schemas/"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _SCHEMAS + name}


def _json(schema_name: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": _ref(schema_name)}},
    }


def _problem(description: str) -> dict[str, Any]:
    return {"description": description, "content": {PROBLEM_MIMETYPE: {"schema": _ref("Problem")}}}


_JOB_ID_PARAM = {
    "name": "job_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
}
_UNAUTHORIZED = _problem("No API key, or an unknown or revoked one.")
_UNAVAILABLE = _problem("A backend (store, storage, queue) is unavailable; retry later.")


def openapi_document(settings: Settings, *, anonymous: bool = False) -> dict[str, Any]:
    """The document for an app built with `settings`; `anonymous`: no API key is needed."""
    defaults = JobParams(text="")
    low_factor, high_factor = SUPERCONDITION_FACTOR_RANGE
    job_params: dict[str, Any] = {
        "type": "object",
        "additionalProperties": False,
        "required": ["text"],
        "properties": {
            "text": {"type": "string", "minLength": 1, "maxLength": 1000},
            "seed": {
                "type": "integer",
                "minimum": SEED_RANDOM,
                "maximum": SEED_MAX,
                "default": defaults.seed,
                "description": "0 or -1: random; the job records the seed it used.",
            },
            "grid_size": {
                "type": "integer",
                "minimum": 1,
                "maximum": settings.max_grid_size,
                "default": defaults.grid_size,
                "description": "Renders grid_size² images.",
            },
            "is_seamless": {"type": "boolean", "default": defaults.is_seamless},
            "temperature": {
                "type": "number",
                "exclusiveMinimum": 0,
                "maximum": TEMPERATURE_MAX,
                "default": defaults.temperature,
            },
            "top_k": {
                "type": "integer",
                "minimum": 1,
                "maximum": TOP_K_MAX,
                "default": defaults.top_k,
            },
            "supercondition_factor": {
                "type": "number",
                "minimum": low_factor,
                "maximum": high_factor,
                "default": defaults.supercondition_factor,
            },
            "model": {"enum": list(MODELS), "default": defaults.model},
            "progressive_outputs": {
                "type": "boolean",
                "default": defaults.progressive_outputs,
                "description": "Also keep intermediate frames (result.previews).",
            },
        },
    }
    file_ref = {
        "type": "object",
        "required": ["url", "key"],
        "properties": {
            "url": {
                "type": "string",
                "description": "A presigned S3 URL, or /v1/files/{key} (needs the API key).",
            },
            "key": {"type": "string"},
        },
    }
    nullable_string = {"type": ["string", "null"]}
    job: dict[str, Any] = {
        "type": "object",
        "properties": {
            "id": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
            "status": {"enum": [status.value for status in JobStatus]},
            "progress": {
                "type": "object",
                "properties": {
                    "step": {"type": "integer", "minimum": 0},
                    "total": {"type": "integer", "default": PROGRESS_TOTAL},
                },
            },
            "params": {**job_params, "required": list(job_params["properties"])},
            "created_at": {"type": "string", "format": "date-time"},
            "started_at": nullable_string,
            "finished_at": nullable_string,
            "worker": nullable_string,
            "error": nullable_string,
            "attempts": {"type": "integer", "minimum": 0},
            "cancel_requested": {"type": "boolean"},
            "result": {
                "oneOf": [
                    {"type": "null"},
                    {
                        "type": "object",
                        "properties": {
                            "grid": {"oneOf": [{"type": "null"}, _ref("File")]},
                            "images": {"type": "array", "items": _ref("File")},
                            "previews": {"type": "array", "items": _ref("File")},
                        },
                    },
                ]
            },
            "warnings": {
                "type": "array",
                "items": {"type": "string"},
                "description": "Only in POST answers: e.g. the text is too long for the model.",
            },
        },
    }
    # Every field but warnings is in every job answer.
    job["required"] = [name for name in job["properties"] if name != "warnings"]
    problem = {
        "type": "object",
        "required": ["type", "title", "status", "detail"],
        "properties": {
            "type": {
                "type": "string",
                "description": "about:blank, or one of: "
                + ", ".join(problem_type(slug) for slug in PROBLEM_TYPES),
            },
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string", "description": "What happened and what to do."},
            "errors": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["field", "message"],
                    "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
                },
            },
            "checks": {
                "type": "object",
                "additionalProperties": {"type": "string"},
                "description": "readyz only: 'ok' or the failure, per backend.",
            },
        },
    }

    jobs_paths = {
        "/v1/jobs": {
            "post": {
                "operationId": "submitJob",
                "summary": "Submit a job",
                "parameters": [
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "schema": {"type": "string", "maxLength": MAX_IDEMPOTENCY_KEY_CHARS},
                        "description": "The same key and body return the first job.",
                    }
                ],
                "requestBody": {
                    "required": True,
                    "description": f"At most {MAX_BODY_BYTES // 1024} KiB.",
                    "content": {"application/json": {"schema": _ref("JobParams")}},
                },
                "responses": {
                    "202": {
                        **_json("Job", "Queued; Location names the job."),
                        "headers": {"Location": {"schema": {"type": "string"}}},
                    },
                    "200": _json("Job", "An idempotent repeat: the job the key first made."),
                    "400": _problem("Invalid JSON or Idempotency-Key."),
                    "401": _UNAUTHORIZED,
                    "409": _problem("The Idempotency-Key was used with another body."),
                    "413": _problem(f"The body is over {MAX_BODY_BYTES // 1024} KiB."),
                    "415": _problem("The body is not application/json."),
                    "422": _problem("Invalid parameters; `errors` lists each field."),
                    "503": _UNAVAILABLE,
                },
            },
            "get": {
                "operationId": "listJobs",
                "summary": "The caller's jobs, newest first",
                "parameters": [
                    {"name": "status", "in": "query", "schema": job["properties"]["status"]},
                    {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": LIST_LIMIT_MAX,
                            "default": LIST_LIMIT_DEFAULT,
                        },
                    },
                ],
                "responses": {
                    "200": _json("JobList", "A page of jobs."),
                    "400": _problem("Invalid status, cursor or limit, or an unknown parameter."),
                    "401": _UNAUTHORIZED,
                    "503": _UNAVAILABLE,
                },
            },
        },
        "/v1/jobs/{job_id}": {
            "parameters": [_JOB_ID_PARAM],
            "get": {
                "operationId": "getJob",
                "summary": "A job, with its progress and result URLs",
                "responses": {
                    "200": _json("Job", "The job."),
                    "401": _UNAUTHORIZED,
                    "404": _problem("No such job for this API key."),
                    "503": _UNAVAILABLE,
                },
            },
            "delete": {
                "operationId": "cancelJob",
                "summary": "Cancel a job",
                "description": "A queued job is canceled at once; a running one stops at its "
                "worker's next decoder step (cancel_requested). Canceling a canceled job "
                "answers 200; a succeeded or failed one, 409.",
                "responses": {
                    "202": _json("Job", "Canceled, or cancellation requested."),
                    "200": _json("Job", "The job was already canceled."),
                    "401": _UNAUTHORIZED,
                    "404": _problem("No such job for this API key."),
                    "409": _problem("The job already succeeded or failed."),
                    "503": _UNAVAILABLE,
                },
            },
        },
        "/v1/files/{key}": {
            "get": {
                "operationId": "getFile",
                "summary": "A result file, when results are kept on local disk",
                "parameters": [
                    {
                        "name": "key",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                        "description": "jobs/{job_id}/..., as in a job's result.",
                    }
                ],
                "responses": {
                    "200": {
                        "description": "The file.",
                        "content": {"image/png": {}, "application/octet-stream": {}},
                    },
                    "401": _UNAUTHORIZED,
                    "404": _problem("No such file for this API key, or results are in S3."),
                },
            },
        },
    }
    open_paths = {
        "/healthz": {
            "get": {
                "operationId": "healthz",
                "summary": "The process is up",
                "security": [],
                "responses": {"200": {"description": '{"status": "ok"}'}},
            }
        },
        "/readyz": {
            "get": {
                "operationId": "readyz",
                "summary": "The store, storage and queue answer",
                "security": [],
                "responses": {
                    "200": {"description": 'Ready: {"status": "ok", "checks": {...}}'},
                    "503": _problem("Not ready; `checks` says which backend failed and why."),
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics",
                "security": [],
                "responses": {"200": {"description": "Prometheus text exposition."}},
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "security": [],
                "responses": {"200": {"description": "OpenAPI 3.1."}},
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "dalle-farm",
            "version": "1",
            "description": "A render farm for DALL·E Mini/Mega text-to-image. Every error is "
            "application/problem+json (RFC 9457).",
        },
        "security": [] if anonymous else [{"apiKey": []}],
        "paths": {**jobs_paths, **open_paths},
        "components": {
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key: Authorization: Bearer <key>.",
                }
            },
            "schemas": {
                "JobParams": job_params,
                "Job": job,
                "File": file_ref,
                "JobList": {
                    "type": "object",
                    "required": ["jobs", "next_cursor"],
                    "properties": {
                        "jobs": {"type": "array", "items": _ref("Job")},
                        "next_cursor": {
                            "type": ["string", "null"],
                            "description": "Pass as cursor for the next page; null: no more.",
                        },
                    },
                },
                "Problem": problem,
            },
        },
    }


def create_blueprint(settings: Settings, *, anonymous: bool) -> Blueprint:
    blueprint = Blueprint("openapi", __name__)
    document = openapi_document(settings, anonymous=anonymous)

    @blueprint.get("/openapi.json")
    def openapi() -> Response:
        return jsonify(document)

    return blueprint
