"""Schemathesis checks of our own, loaded by the CLI through SCHEMATHESIS_HOOKS (see
tests/test_schemathesis.py and tests/schemathesis.toml).

`documented_rejections` is the other half of the two exceptions in schemathesis.toml: there,
positive_data_acceptance is told that POST /v1/jobs may answer 422 and GET /v1/jobs 400 to
schema-valid requests; here, each such answer must be the one documented reason for it, or the
run fails:

- POST /v1/jobs, 422: the body names a model that no live worker serves (the harness says which
  models are served in DALLE_FARM_SCHEMATHESIS_SERVED_MODELS), and every error is on `model`;
  or its webhook_url's host does not resolve or resolves to a non-public address, and the one
  error is on `webhook_url`.
- GET /v1/jobs, 400: the request carries a cursor the API never gave out in this run, and every
  error is on `cursor`. A next_cursor the API returned must be accepted.
"""

from __future__ import annotations

import json
import os
from typing import Any

import schemathesis
from schemathesis.specs.openapi.checks import is_unexpected_http_status_case

SERVED_MODELS_ENV = "DALLE_FARM_SCHEMATHESIS_SERVED_MODELS"
JOBS_PATH = "/v1/jobs"

# Every next_cursor a list answer carried in this run; checks run in order in one process
# (workers = 1 in schemathesis.toml), and an answer is checked before a later request reuses it.
_issued_cursors: set[str] = set()


def _served_models() -> set[str]:
    served = os.environ.get(SERVED_MODELS_ENV, "")
    return {name.strip() for name in served.split(",") if name.strip()}


def _is_positive(case: Any) -> bool:
    # case.meta is None for cases schemathesis did not generate (none here, but be exact).
    meta = case.meta
    return meta is not None and bool(meta.generation.mode.is_positive)


def _problem_fields(response: Any) -> list[str] | None:
    """The `field` of each entry in a problem's `errors`, or None if the body is no problem."""
    try:
        body = json.loads(response.content)
    except (ValueError, TypeError):
        return None
    if not isinstance(body, dict) or not isinstance(body.get("errors"), list):
        return None
    fields = [error.get("field") for error in body["errors"] if isinstance(error, dict)]
    return [field for field in fields if isinstance(field, str)]


def _remember_cursor(response: Any) -> None:
    try:
        body = json.loads(response.content)
    except (ValueError, TypeError):
        return
    cursor = body.get("next_cursor") if isinstance(body, dict) else None
    if isinstance(cursor, str):
        _issued_cursors.add(cursor)


def _submit_rejection(case: Any, response: Any) -> None:
    body = case.body if isinstance(case.body, dict) else {}
    model = body.get("model")
    served = _served_models()
    fields = _problem_fields(response)
    if model is not None and model not in served and fields and set(fields) == {"model"}:
        return
    # A webhook_url whose host does not resolve or resolves to a non-public address: no schema
    # can say which names resolve where (README: Webhooks).
    if body.get("webhook_url") is not None and fields == ["webhook_url"]:
        return
    raise AssertionError(
        f"a schema-valid job was refused with 422; the only documented reason is a model that "
        f"no live worker serves (served here: {sorted(served)}, asked for: {model!r}) with "
        f"every error on 'model' (errors on: {fields})"
    )


def _list_rejection(case: Any, response: Any) -> None:
    query = case.query or {}
    cursor = query.get("cursor")
    fields = _problem_fields(response)
    issued = cursor is not None and cursor in _issued_cursors
    if cursor is not None and not issued and fields and set(fields) == {"cursor"}:
        return
    raise AssertionError(
        "a schema-valid list request was refused with 400; the only documented reason is a "
        f"cursor the API never gave out, with every error on 'cursor' (cursor: {cursor!r}, "
        f"given out by the API: {issued}, errors on: {fields})"
    )


@schemathesis.check
def documented_rejections(ctx: Any, response: Any, case: Any) -> bool | None:
    """Schema-valid requests refused only for the reasons the API documents."""
    method = case.operation.method.upper()
    path = case.operation.path
    if method == "GET" and path == JOBS_PATH and response.status_code == 200:
        _remember_cursor(response)
        return None
    # A probe of the request's shape (an undeclared method, another Content-Type) is not the
    # schema-valid request it was made from; the built-in checks skip it the same way.
    if not _is_positive(case) or is_unexpected_http_status_case(case):
        return None
    if method == "POST" and path == JOBS_PATH and response.status_code == 422:
        _submit_rejection(case, response)
    elif method == "GET" and path == JOBS_PATH and response.status_code == 400:
        _list_rejection(case, response)
    return None
