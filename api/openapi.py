"""The OpenAPI 3.1 document, generated from the app itself, served at GET /openapi.json.

Nothing here is written twice: each route is added with `add_route` and the `Operation` that
says what it accepts and answers (api.operations), the schemas are the contract's pydantic
models (core.contract), and `openapi_document` walks the app's url_map, so a route without an
Operation fails the app's creation instead of going undocumented. Per app: JobParams carries
the farm's DALLE_FARM_MAX_GRID_SIZE, and with an anonymous owner (the embedded `serve` on
loopback) there is no security scheme and no 401.

The generator adds what every route shares: 401 (with WWW-Authenticate) to keyed routes when
keys are on, 429 (the per-key request rate) to keyed routes, Retry-After to every 429 and
503, Accept-Post to a 415.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Literal, cast

from flask import Blueprint, Flask, Response, current_app, jsonify
from pydantic import BaseModel, TypeAdapter
from pydantic.json_schema import models_json_schema

from api.problems import PROBLEM_MIMETYPE
from core.contract import Problem, params_model
from core.settings import Settings

_SCHEMAS = "#/components/schemas/"
_OPERATIONS = "dalle_farm_operations"
_DOCUMENT = "dalle_farm_openapi"


@dataclass(frozen=True)
class Header:
    """A response header."""

    description: str
    schema: Mapping[str, Any] = field(default_factory=lambda: {"type": "string"})
    required: bool = True


@dataclass(frozen=True)
class Answer:
    """A success answer: a JSON `model`, or other `content` (media type → schema)."""

    description: str
    model: type[BaseModel] | None = None
    content: Mapping[str, Mapping[str, Any]] | None = None
    headers: Mapping[str, Header] = field(default_factory=dict)
    links: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Param:
    """A path, query or header parameter; `schema` is a type pydantic can describe (an
    Annotated type of the contract, say) or a JSON Schema."""

    name: str
    location: str
    schema: Any
    required: bool = False
    description: str = ""


@dataclass(frozen=True)
class Operation:
    """What one route and method accepts and answers. `problems`: status → when it happens
    (401 is added for `keyed` routes when the app needs keys)."""

    operation_id: str
    summary: str
    answers: Mapping[int, Answer]
    problems: Mapping[int, str] = field(default_factory=dict)
    parameters: tuple[Param, ...] = ()
    body: type[BaseModel] | None = None
    body_description: str = ""
    description: str = ""
    keyed: bool = False


def declare(app: Flask, endpoint: str, operation: Operation) -> None:
    """Say what the route of `endpoint` does (for routes added without add_route)."""
    app.extensions.setdefault(_OPERATIONS, {})[endpoint] = operation


def add_route(
    blueprint: Blueprint,
    rule: str,
    method: str,
    view: Callable[..., Any],
    operation: Operation,
) -> None:
    """Add a route to `blueprint` together with its Operation."""
    endpoint = getattr(view, "__name__", operation.operation_id)
    blueprint.add_url_rule(rule, endpoint=endpoint, view_func=view, methods=[method])
    blueprint.record(
        lambda state: declare(cast(Flask, state.app), f"{state.name}.{endpoint}", operation)
    )


def create_blueprint() -> Blueprint:
    """GET /openapi.json: the document `install` generated for this app."""
    blueprint = Blueprint("openapi", __name__)

    @blueprint.get("/openapi.json")
    def openapi() -> Response:
        return jsonify(current_app.extensions[_DOCUMENT])

    return blueprint


def install(app: Flask, settings: Settings, *, anonymous: bool) -> None:
    """Generate the app's document, once every route is added; raises LookupError naming a
    route that has no Operation."""
    app.extensions[_DOCUMENT] = openapi_document(app, settings, anonymous=anonymous)


def openapi_document(app: Flask, settings: Settings, *, anonymous: bool) -> dict[str, Any]:
    """The document of `app`'s routes, as built with `settings`."""
    declared: dict[str, Operation] = app.extensions.get(_OPERATIONS, {})
    request_params = params_model(settings.max_grid_size)
    operations: list[tuple[str, str, Operation]] = []
    for rule in app.url_map.iter_rules():
        if rule.endpoint not in declared:
            raise LookupError(f"the route {rule.rule} ({rule.endpoint}) has no Operation")
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            operations.append((_openapi_path(rule.rule), method.lower(), declared[rule.endpoint]))

    models: set[type[BaseModel]] = {Problem}
    for _, _, operation in operations:
        models.update(answer.model for answer in operation.answers.values() if answer.model)
    mode: Literal["serialization"] = "serialization"
    pairs = [(model, mode) for model in sorted(models, key=lambda m: m.__name__)]
    _, definitions = models_json_schema(pairs, ref_template=_SCHEMAS + "{model}")
    schemas = definitions.get("$defs", {})
    # The request's JobParams, with this farm's limits; a job's params are within them too.
    schemas["JobParams"] = request_params.model_json_schema(ref_template=_SCHEMAS + "{model}")

    paths: dict[str, dict[str, Any]] = {}
    for path, method, operation in operations:
        paths.setdefault(path, {})[method] = _operation(operation, anonymous)
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "dalle-farm",
            "version": "1",
            "description": "A render farm for DALL·E Mini/Mega text-to-image: submit a job, poll "
            "it, fetch its images. Every error is application/problem+json (RFC 9457) with a "
            "detail that says what to change. Human-readable docs: /docs.",
        },
        "paths": dict(sorted(paths.items())),
        "components": {"schemas": dict(sorted(schemas.items()))},
    }
    if not anonymous:
        document["security"] = [{"apiKey": []}]
        document["components"]["securitySchemes"] = {
            "apiKey": {
                "type": "http",
                "scheme": "bearer",
                "description": "An API key: 'Authorization: Bearer <key>' (the farm's operator "
                "creates keys with `dalle-farm keys create NAME`).",
            }
        }
    return document


_RULE_ARGUMENT = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")


def _openapi_path(rule: str) -> str:
    """/v1/jobs/<job_id> → /v1/jobs/{job_id}; converters (<path:key>) are dropped."""
    return _RULE_ARGUMENT.sub(r"{\1}", rule)


def _operation(operation: Operation, anonymous: bool) -> dict[str, Any]:
    problems = dict(operation.problems)
    if operation.keyed and not anonymous:
        problems[HTTPStatus.UNAUTHORIZED] = "No API key, or an unknown or revoked one."
    if operation.keyed:  # api/limits.py counts every request of a key
        rate = "Past the API key's request rate (its own, or DALLE_FARM_KEY_RATE)."
        more = problems.get(HTTPStatus.TOO_MANY_REQUESTS)
        problems[HTTPStatus.TOO_MANY_REQUESTS] = f"{rate} {more}" if more else rate
    responses: dict[str, Any] = {}
    for status, answer in sorted(operation.answers.items()):
        responses[str(status)] = _answer(answer)
    for status, when in sorted(problems.items()):
        responses[str(int(status))] = _problem(int(status), when)
    item: dict[str, Any] = {
        "operationId": operation.operation_id,
        "summary": operation.summary,
    }
    if operation.description:
        item["description"] = operation.description
    if operation.parameters:
        item["parameters"] = [_parameter(param) for param in operation.parameters]
    if operation.body is not None:
        item["requestBody"] = {
            "required": True,
            "description": operation.body_description,
            "content": {"application/json": {"schema": {"$ref": _SCHEMAS + "JobParams"}}},
        }
    if not operation.keyed:
        item["security"] = []
    item["responses"] = responses
    return item


def _schema(schema: Any) -> dict[str, Any]:
    if isinstance(schema, Mapping):
        return dict(schema)
    return TypeAdapter(schema).json_schema(ref_template=_SCHEMAS + "{model}")


def _parameter(param: Param) -> dict[str, Any]:
    schema = _schema(param.schema)
    parameter: dict[str, Any] = {
        "name": param.name,
        "in": param.location,
        "required": param.required or param.location == "path",
    }
    description = param.description or schema.pop("description", "")
    if description:
        parameter["description"] = description
    schema.pop("examples", None)
    parameter["schema"] = schema
    return parameter


def _answer(answer: Answer) -> dict[str, Any]:
    response: dict[str, Any] = {"description": answer.description}
    if answer.model is not None:
        schema = {"$ref": _SCHEMAS + answer.model.__name__}
        response["content"] = {"application/json": {"schema": schema}}
    elif answer.content is not None:
        response["content"] = {media: dict(schema) for media, schema in answer.content.items()}
    if answer.headers:
        response["headers"] = {name: _header(header) for name, header in answer.headers.items()}
    if answer.links:
        response["links"] = {name: dict(link) for name, link in answer.links.items()}
    return response


def _header(header: Header) -> dict[str, Any]:
    return {
        "description": header.description,
        "required": header.required,
        "schema": dict(header.schema),
    }


# Headers the API sends with every problem of a status.
_PROBLEM_HEADERS = {
    HTTPStatus.UNAUTHORIZED: {
        "WWW-Authenticate": Header('Bearer realm="dalle-farm", and the error if any.')
    },
    HTTPStatus.UNSUPPORTED_MEDIA_TYPE: {"Accept-Post": Header("application/json")},
    HTTPStatus.TOO_MANY_REQUESTS: {
        "Retry-After": Header(
            "Seconds to wait before retrying.", {"type": "string", "pattern": "^[0-9]+$"}
        )
    },
    HTTPStatus.SERVICE_UNAVAILABLE: {
        "Retry-After": Header(
            "Seconds to wait before retrying.", {"type": "string", "pattern": "^[0-9]+$"}
        )
    },
}


def _problem(status: int, when: str) -> dict[str, Any]:
    answer = Answer(when, headers=_PROBLEM_HEADERS.get(HTTPStatus(status), {}))
    response = _answer(answer)
    response["content"] = {PROBLEM_MIMETYPE: {"schema": {"$ref": _SCHEMAS + "Problem"}}}
    return response
