"""core.contract: the pydantic models of the job contract, and parse_params' wording of their
errors. Pure logic; the document and the server agreeing is in tests/test_openapi.py."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from pydantic import ValidationError

from core.contract import (
    GRID_SIZE_LIMIT,
    TEMPERATURE_MAX,
    TEMPERATURE_MIN,
    FieldError,
    Job,
    JobPage,
    JobParams,
    JobStatus,
    Problem,
    params_model,
)
from core.job import InvalidParams, encodable, params_fingerprint, parse_params
from tests.test_job import REPO_ROOT


def errors_of(body: object, **limits: int) -> list[FieldError]:
    with pytest.raises(InvalidParams) as caught:
        parse_params(body, **limits)
    return caught.value.errors


@pytest.mark.parametrize("field", ["seed", "grid_size", "top_k"])
def test_an_integer_written_with_a_zero_fraction_is_that_integer(field: str) -> None:
    value = getattr(parse_params({"text": "a", field: 2.0}), field)
    assert value == 2 and type(value) is int


@pytest.mark.parametrize("value", [2.5, True, "2", 1e300, float("nan"), None])
@pytest.mark.parametrize("field", ["seed", "grid_size", "top_k"])
def test_integers_refuse_fractions_booleans_and_strings(field: str, value: object) -> None:
    (error,) = errors_of({"text": "a", field: value})
    assert error.field == field and "must be an integer from" in error.message


def test_a_zero_fraction_integer_has_the_fingerprint_of_the_integer() -> None:
    assert params_fingerprint({"text": "a", "seed": 7.0}) == params_fingerprint(
        {"text": "a", "seed": 7}
    )


def test_fingerprints_are_those_of_the_dataclass_contract() -> None:
    # Values from the contract before it was pydantic: idempotency keys stored then still match.
    assert params_fingerprint({"text": "a"}) == (
        "9f6e94c8266228acefd964cf44ab798daf2ea8dd28cbf3e0ad34957e22be5c3f"
    )
    body = {
        "text": "a fox 🦊",
        "seed": 7,
        "grid_size": 2,
        "temperature": 2,
        "supercondition_factor": 0,
        "model": "mega",
        "top_k": 5,
        "is_seamless": True,
        "progressive_outputs": True,
    }
    assert params_fingerprint(body) == (
        "d282e8b4d9c0596f13dbcea83e134409ad8965bff6cfb647ffe14e6da50509a7"
    )


def test_temperature_bounds_are_inclusive_constants() -> None:
    assert parse_params({"text": "a", "temperature": TEMPERATURE_MIN}).temperature == 0.01
    assert parse_params({"text": "a", "temperature": TEMPERATURE_MAX}).temperature == 100
    schema = JobParams.model_json_schema()["properties"]["temperature"]
    assert (schema["minimum"], schema["maximum"]) == (TEMPERATURE_MIN, TEMPERATURE_MAX)
    assert "exclusiveMinimum" not in schema


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("a\ud800b", "U+D800 at character 2"),
        ("\udfff", "U+DFFF at character 1"),
        ("a fox\x00", "U+0000 at character 6"),
        ("\x1b[31mred", "U+001B at character 1"),
        ("fox\x7f", "U+007F at character 4"),
        ("a\x0bb", "U+000B at character 2"),
    ],
)
def test_text_that_cannot_be_stored_or_means_nothing_is_refused(text: str, shown: str) -> None:
    (error,) = errors_of({"text": text})
    assert error.field == "text"
    assert error.message == (
        "text must not hold control characters (but tab and line breaks) or unpaired "
        f"surrogates; found {shown}"
    )


@pytest.mark.parametrize("text", ["a\tb", "a\nb\r\n", "🦊", "\u00a0fox", "\u0085x", "日本"])
def test_tabs_line_breaks_and_any_other_character_are_kept(text: str) -> None:
    assert parse_params({"text": text}).text == text


@pytest.mark.parametrize("text", [" ", "\t\n", "\u3000", "\u00a0 \u2003"])
def test_whitespace_of_any_kind_alone_is_blank(text: str) -> None:
    assert errors_of({"text": text}) == [FieldError("text", "text must not be blank")]


def test_messages_quoting_unencodable_input_can_be_encoded() -> None:
    errors = errors_of({"text": "a", "\ud800": 1, "model": "\udc80x"})
    assert [error.field for error in errors] == ["\\ud800", "model"]
    for error in errors:
        (error.field + error.message).encode("utf8")
    assert encodable("fox") == "fox"


def test_the_farm_limit_bounds_grid_size_in_validation_and_schema() -> None:
    model = params_model(3)
    assert model.model_json_schema()["properties"]["grid_size"]["maximum"] == 3
    assert model.model_json_schema()["title"] == "JobParams"
    params = parse_params({"text": "a", "grid_size": 3}, max_grid_size=3)
    assert type(params) is JobParams and params == JobParams(text="a", grid_size=3)
    assert params_model(GRID_SIZE_LIMIT) is JobParams
    assert params_model(3) is model


def test_job_params_built_in_python_are_checked_too() -> None:
    assert JobParams(text="a", temperature=1).temperature == 1.0
    with pytest.raises(ValidationError):
        JobParams(text="a", grid_size=GRID_SIZE_LIMIT + 1)
    with pytest.raises(ValidationError):
        JobParams(text="a", model="large")  # type: ignore[arg-type]


def job_json(**changes: Any) -> dict[str, Any]:
    job = {
        "id": "0193a5c0ffee00000000000000000001",
        "status": "succeeded",
        "progress": {"step": 256, "total": 256},
        "params": JobParams(text="a fox", seed=7).to_dict(),
        "created_at": "2026-11-30T10:00:00.000+00:00",
        "started_at": "2026-11-30T10:00:01.000+00:00",
        "finished_at": "2026-11-30T10:00:02.000+00:00",
        "worker": "gpu0@node-a",
        "error": None,
        "attempts": 1,
        "cancel_requested": False,
        "queue_position": None,
        "result": {
            "grid": {"url": "/v1/files/g", "key": "g"},
            "images": [{"url": "/v1/files/0", "key": "0"}],
        },
    }
    job.update(changes)
    return job


def test_a_job_round_trips_and_leaves_empty_optional_lists_out() -> None:
    job = Job.model_validate_json(json.dumps(job_json()))
    assert job.status is JobStatus.SUCCEEDED and job.result is not None
    assert job.model_dump(mode="json") == job_json()
    with_extras = job_json(warnings=["long"])
    assert with_extras["result"] is not None
    with_extras["result"]["previews"] = [{"url": "/v1/files/p", "key": "p"}]
    assert Job.model_validate_json(json.dumps(with_extras)).model_dump(mode="json") == with_extras


@pytest.mark.parametrize(
    "changes",
    [
        {"status": "done"},
        {"id": "not-an-id"},
        {"attempts": -1},
        {"surprise": 1},
        {"progress": {"step": "1", "total": 256}},
    ],
)
def test_a_job_off_the_contract_is_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Job.model_validate_json(json.dumps(job_json(**changes)))


def test_a_page_and_a_problem() -> None:
    page = JobPage.model_validate_json(json.dumps({"jobs": [job_json()], "next_cursor": None}))
    assert page.jobs[0].params.seed == 7
    problem = Problem(type="about:blank", title="Bad", status=422, detail="fix it")
    assert problem.model_dump() == {
        "type": "about:blank",
        "title": "Bad",
        "status": 422,
        "detail": "fix it",
    }
    with_errors = Problem.model_validate_json(
        json.dumps({**problem.model_dump(), "errors": [{"field": "a", "message": "b"}]})
    )
    assert with_errors.errors == [FieldError("a", "b")]


def test_importing_the_contract_loads_no_heavy_dependency() -> None:
    code = (
        "import sys, core.contract\n"
        "heavy = [m for m in ('torch', 'flask', 'celery', 'boto3', 'redis') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)
