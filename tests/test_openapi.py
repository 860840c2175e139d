"""The generated OpenAPI document (api/openapi.py, api/operations.py): valid OpenAPI 3.1, and
exactly what the server accepts and answers. Each agreement case is sent to a real app (SQLite
store and queue, local files) and checked against the document's own schemas with jsonschema."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
from flask import Flask
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate

from api.app import create_app
from api.openapi import Operation, openapi_document
from core.queue_sqlite import SqliteJobQueue
from core.settings import Settings
from core.storage import LocalStorage
from core.store_sqlite import SqliteJobStore

MAX_GRID_SIZE = 3


class Api:
    def __init__(self, tmp_path: Path, anonymous: bool) -> None:
        self.store = SqliteJobStore(tmp_path / "farm.db")
        # A stand-in worker for every model: the API refuses jobs no live worker serves.
        self.store.worker_heartbeat("tests", models=["mini", "mega"], ttl_s=3600)
        self.queue = SqliteJobQueue(tmp_path / "farm.db")
        storage = LocalStorage(tmp_path / "files")
        storage.ensure_bucket()
        self.app = create_app(
            Settings(data_dir=tmp_path, max_grid_size=MAX_GRID_SIZE),
            store=self.store,
            storage=storage,
            queue=self.queue,
            anonymous_owner="local" if anonymous else None,
        )
        self.client = self.app.test_client()
        self.headers = {} if anonymous else {"Authorization": f"Bearer {self.new_key()}"}
        self.document: dict[str, Any] = self.client.get("/openapi.json").get_json()

    def new_key(self) -> str:
        return self.store.create_key("alice")[1]

    def validator(self, component: str) -> Draft202012Validator:
        """Validates against components/schemas/`component`, refs resolved in the document."""
        return Draft202012Validator({**self.document, "$ref": f"#/components/schemas/{component}"})

    def responses(self, path: str, method: str) -> dict[str, Any]:
        responses: dict[str, Any] = self.document["paths"][path][method]["responses"]
        return responses

    def check_answer(self, path: str, method: str, response: Any) -> None:
        """The status is documented, and the body fits the documented schema."""
        documented = self.responses(path, method)
        assert str(response.status_code) in documented, (path, method, response.status_code)
        content = documented[str(response.status_code)].get("content", {})
        assert response.mimetype in content, (response.mimetype, list(content))
        ref = content[response.mimetype].get("schema", {}).get("$ref")
        if ref is not None:
            self.validator(ref.rsplit("/", 1)[1]).validate(response.get_json())
        for name, header in documented[str(response.status_code)].get("headers", {}).items():
            if header["required"]:
                assert name in response.headers, name
                Draft202012Validator(header["schema"]).validate(response.headers[name])


@pytest.fixture(params=[False, True], ids=["keys", "anonymous"])
def api(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Api]:
    api = Api(tmp_path, anonymous=request.param)
    yield api
    api.store.close()
    api.queue.close()


def test_the_document_is_valid_openapi_3_1(api: Api) -> None:
    assert api.document["openapi"] == "3.1.0"
    validate(api.document)
    # pydantic writes constraints it cannot say in JSON Schema under its own names (ge, le).
    assert not re.search(r'"(ge|le|gt|lt)":', json.dumps(api.document))


def test_every_pattern_is_a_regex_for_other_engines_too(api: Api) -> None:
    # Rust's regex (jsonschema_rs, schemathesis' engine) refuses what only Python's re reads.
    patterns = re.findall(r'"pattern": ("(?:[^"\\]|\\.)*")', json.dumps(api.document))
    assert len(patterns) >= 4
    for pattern in map(json.loads, patterns):
        jsonschema_rs.validator_for({"type": "string", "pattern": pattern})


def test_the_job_params_schema_carries_the_farms_limits(api: Api) -> None:
    params = api.document["components"]["schemas"]["JobParams"]
    assert params["properties"]["grid_size"]["maximum"] == MAX_GRID_SIZE
    assert params["additionalProperties"] is False and params["required"] == ["text"]


def test_security_and_401_only_when_keys_are_needed(api: Api) -> None:
    anonymous = "Authorization" not in api.headers
    assert ("security" in api.document) is not anonymous
    for path, item in api.document["paths"].items():
        for operation in item.values():
            keyed = path.startswith("/v1/")
            assert ("401" in operation["responses"]) is (keyed and not anonymous), path
            assert operation.get("security") == (None if keyed else []), path


def test_every_503_has_retry_after_and_backends_may_be_down(api: Api) -> None:
    for path, item in api.document["paths"].items():
        for method, operation in item.items():
            if path.startswith("/v1/") or path in ("/readyz", "/metrics"):
                assert "503" in operation["responses"], (path, method)
            if "503" in operation["responses"]:
                assert "Retry-After" in operation["responses"]["503"]["headers"]


def test_links_name_existing_operations_and_parameters(api: Api) -> None:
    operations = {
        operation["operationId"]: operation
        for item in api.document["paths"].values()
        for operation in item.values()
    }
    submit = api.document["paths"]["/v1/jobs"]["post"]["responses"]
    assert set(submit["202"]["links"]) == {"GetJob", "CancelJob"}
    assert "GetFirstJob" in api.document["paths"]["/v1/jobs"]["get"]["responses"]["200"]["links"]
    for operation in operations.values():
        for response in operation["responses"].values():
            for link in response.get("links", {}).values():
                target = operations[link["operationId"]]
                names = {parameter["name"] for parameter in target.get("parameters", [])}
                assert set(link["parameters"]) <= names


def test_a_route_without_an_operation_fails_the_document(api: Api) -> None:
    app = Flask(__name__, static_folder=None)
    app.extensions.update(api.app.extensions)
    app.add_url_rule("/undocumented", "undocumented", lambda: "x")
    with pytest.raises(LookupError, match="/undocumented"):
        openapi_document(app, Settings(), anonymous=True)
    assert isinstance(app.extensions["dalle_farm_operations"]["v1.submit_job"], Operation)


# -- the document and the server agree -------------------------------------------------------

BODIES = [
    {"text": "a fox"},
    {"text": "a fox", "seed": 5.0, "grid_size": 2.0, "top_k": 16.0},
    {"text": "a fox", "seed": 5.5},
    {"text": "a fox", "seed": True},
    {"text": "a fox", "seed": "5"},
    {"text": "a fox", "top_k": 1e300},
    {"text": "a fox", "grid_size": MAX_GRID_SIZE},
    {"text": "a fox", "grid_size": MAX_GRID_SIZE + 1},
    {"text": "a fox", "temperature": 0.01},
    {"text": "a fox", "temperature": 0.0099},
    {"text": "a fox", "temperature": 100},
    {"text": "a fox", "supercondition_factor": 0},
    {"text": "a fox", "model": "Mini"},
    {"text": "a fox", "grid-size": 2},
    {"text": " \t\n"},
    {"text": "\u3000"},
    {"text": "\u2028\u00a0"},
    {"text": "\ufeff"},
    {"text": ""},
    {"text": "x" * 1000},
    {"text": "x" * 1001},
    {"text": "a fox 🦊 日本"},
    {"text": "a\tfox\r\n"},
    {"text": "a \ud800 fox"},
    {"text": "\udc00"},
    {"text": "a\x00fox"},
    {"text": "a\x1bfox"},
    {"text": "a\x7ffox"},
    {"text": "a\x85fox"},
    {"text": None},
    {},
    [],
]


@pytest.mark.parametrize("body", BODIES, ids=[json.dumps(body)[:40] for body in BODIES])
def test_a_body_is_accepted_exactly_when_the_schema_says_so(api: Api, body: Any) -> None:
    # Unpaired surrogates are not Unicode text: the server refuses them, and the schema says so
    # in words only, since a pattern naming them is not a regex in Rust or Go (core.contract).
    written = json.dumps(body, ensure_ascii=False)
    unicode_only = written.encode("utf8", "replace").decode("utf8") == written
    valid = api.validator("JobParams").is_valid(body) and unicode_only
    response = api.client.post(
        "/v1/jobs",
        data=json.dumps(body),
        content_type="application/json",
        headers=api.headers,
    )
    assert response.status_code == (202 if valid else 422), response.get_data(as_text=True)
    api.check_answer("/v1/jobs", "post", response)
    if not valid:
        assert response.get_json()["errors"]


def header_schema(api: Api) -> dict[str, Any]:
    (parameter,) = api.document["paths"]["/v1/jobs"]["post"]["parameters"]
    assert parameter["name"] == "Idempotency-Key" and parameter["in"] == "header"
    schema: dict[str, Any] = parameter["schema"]
    return schema


@pytest.mark.parametrize(
    "key", ["k", "order 42", "a" * 255, "a" * 256, "", " k", "k ", "\tk", "é", "k\x7f"]
)
def test_an_idempotency_key_is_accepted_exactly_when_the_schema_says_so(api: Api, key: str) -> None:
    valid = Draft202012Validator(header_schema(api)).is_valid(key)
    response = api.client.post(
        "/v1/jobs",
        json={"text": "a fox"},
        headers={**api.headers, "Idempotency-Key": key.encode().decode("latin-1")},
    )
    assert response.status_code == (202 if valid else 400), response.get_data(as_text=True)
    api.check_answer("/v1/jobs", "post", response)


@pytest.mark.parametrize(
    "query",
    [
        "",
        "limit=1",
        "limit=100",
        "limit=5.0",
        "limit=1e1",
        "limit=0",
        "limit=101",
        "limit=5.5",
        "limit=true",
        "limit=%205",
        "cursor=",
        "cursor=a+b",
        "status=done",
        "status=queued",
    ],
)
def test_list_queries_are_refused_exactly_when_the_schema_says_so(api: Api, query: str) -> None:
    parameters = {
        p["name"]: p["schema"] for p in api.document["paths"]["/v1/jobs"]["get"]["parameters"]
    }
    name, _, raw = query.partition("=")
    valid = True
    if name:
        schema = parameters[name]
        value: Any = raw
        if schema.get("type") == "integer":
            try:
                value = json.loads(raw)
            except ValueError:
                value = raw
        valid = Draft202012Validator(schema).is_valid(value)
    response = api.client.get(f"/v1/jobs?{query}", headers=api.headers)
    assert response.status_code == (200 if valid else 400), response.get_data(as_text=True)
    api.check_answer("/v1/jobs", "get", response)


def test_every_answer_of_a_jobs_life_fits_the_document(api: Api) -> None:
    submitted = api.client.post("/v1/jobs", json={"text": "a fox"}, headers=api.headers)
    api.check_answer("/v1/jobs", "post", submitted)
    job_id = submitted.get_json()["id"]
    assert submitted.headers["Location"] == f"/v1/jobs/{job_id}"
    for method, path, template in [
        ("get", f"/v1/jobs/{job_id}", "/v1/jobs/{job_id}"),
        ("get", "/v1/jobs?limit=1", "/v1/jobs"),
        ("delete", f"/v1/jobs/{job_id}", "/v1/jobs/{job_id}"),
        ("delete", f"/v1/jobs/{job_id}", "/v1/jobs/{job_id}"),
        ("get", f"/v1/jobs/{'0' * 32}", "/v1/jobs/{job_id}"),
        ("get", "/v1/files/jobs/x/grid.png", "/v1/files/{key}"),
        ("get", "/healthz", "/healthz"),
        ("get", "/readyz", "/readyz"),
        ("get", "/metrics", "/metrics"),
        ("get", "/openapi.json", "/openapi.json"),
        ("get", "/docs", "/docs"),
        ("get", "/docs/static/nothing.js", "/docs/static/{filename}"),
    ]:
        response = api.client.open(path, method=method.upper(), headers=api.headers)
        api.check_answer(template, method, response)
    if "Authorization" in api.headers:
        response = api.client.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 401
        api.check_answer("/v1/jobs/{job_id}", "get", response)


def test_a_replayed_submission_and_a_conflict_fit_the_document(api: Api) -> None:
    headers = {**api.headers, "Idempotency-Key": "order-42"}
    api.client.post("/v1/jobs", json={"text": "a fox"}, headers=headers)
    replay = api.client.post("/v1/jobs", json={"text": "a fox"}, headers=headers)
    assert replay.status_code == 200 and replay.headers["Idempotent-Replayed"] == "true"
    api.check_answer("/v1/jobs", "post", replay)
    conflict = api.client.post("/v1/jobs", json={"text": "a cat"}, headers=headers)
    assert conflict.status_code == 409
    api.check_answer("/v1/jobs", "post", conflict)
    for response in [
        api.client.post("/v1/jobs", data=b"{", content_type="application/json", headers=headers),
        api.client.post("/v1/jobs", data=b"text", content_type="text/plain", headers=headers),
        api.client.post(
            "/v1/jobs",
            data=b'{"text": "a"}',
            content_type="application/merge-patch+json",
            headers=headers,
        ),
        api.client.post(
            "/v1/jobs", data=b" " * (65 * 1024), content_type="application/json", headers=headers
        ),
    ]:
        assert response.status_code in (400, 413, 415)
        api.check_answer("/v1/jobs", "post", response)


def test_a_down_store_is_a_documented_503(api: Api) -> None:
    api.store.close()
    response = api.client.get("/v1/jobs", headers=api.headers)
    assert response.status_code == 503
    api.check_answer("/v1/jobs", "get", response)
