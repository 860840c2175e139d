"""Tests for core.job, the job contract: pure logic, no Redis or model weights needed."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from core.checkpoint import decode_tokens, encode_tokens
from core.job import (
    PARAM_FIELDS,
    PROGRESS_TOTAL,
    SEED_MAX,
    SUPERCONDITION_FACTOR_RANGE,
    TEMPERATURE_MAX,
    TEMPERATURE_MIN,
    TEXT_TOKEN_COUNT,
    TOP_K_MAX,
    FieldError,
    InvalidParams,
    JobParams,
    JobRecord,
    JobStatus,
    can_move,
    grid_key,
    image_key,
    is_job_id,
    job_id_timestamp_ms,
    job_json_key,
    model_image_for_tile,
    new_job_id,
    params_fingerprint,
    parse_params,
    resolve_seed,
    result_prefix,
    text_token_warning,
    tile_index,
    utc_now,
)
from model.config import IMAGE_TOKEN_COUNT, VQGAN_CODE_COUNT, ModelConfig
from model.tokenizer import TextTokenizer
from model.weights.random_weights import write_tokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent
NAN = float("nan")
INF = float("inf")


def errors_of(body: object, **limits: int) -> list[FieldError]:
    with pytest.raises(InvalidParams) as caught:
        parse_params(body, **limits)
    return caught.value.errors


def only_error(body: object, **limits: int) -> FieldError:
    errors = errors_of(body, **limits)
    assert len(errors) == 1, errors
    return errors[0]


# --- constants agree with the model ---------------------------------------------------------


def test_constants_match_the_model_config() -> None:
    assert ModelConfig.mini().text_token_count == TEXT_TOKEN_COUNT
    assert ModelConfig.mega().text_token_count == TEXT_TOKEN_COUNT
    assert PROGRESS_TOTAL == IMAGE_TOKEN_COUNT
    assert TOP_K_MAX == VQGAN_CODE_COUNT


def test_importing_the_contract_loads_no_heavy_dependency() -> None:
    code = (
        "import sys, core.job\n"
        "heavy = [m for m in ('torch', 'flask', 'celery', 'boto3', 'redis') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)


# --- parse_params: defaults and valid values ------------------------------------------------


def test_minimal_body_fills_every_default() -> None:
    params = parse_params({"text": "a fox"})
    assert params == JobParams(
        text="a fox",
        seed=-1,
        grid_size=1,
        is_seamless=False,
        temperature=1.0,
        top_k=256,
        supercondition_factor=16.0,
        model="mini",
        progressive_outputs=False,
    )


def test_full_valid_body() -> None:
    body = {
        "text": "an astronaut riding a horse",
        "seed": 42,
        "grid_size": 3,
        "is_seamless": True,
        "temperature": 0.5,
        "top_k": 128,
        "supercondition_factor": 32,
        "model": "mega",
        "progressive_outputs": True,
    }
    params = parse_params(body)
    assert params.to_dict() == {**body, "supercondition_factor": 32.0, "priority": "interactive"}
    assert isinstance(params.supercondition_factor, float)


def test_integer_numbers_become_floats() -> None:
    params = parse_params({"text": "a", "temperature": 2, "supercondition_factor": 0})
    assert params.temperature == 2.0 and isinstance(params.temperature, float)
    assert params.supercondition_factor == 0.0 and isinstance(params.supercondition_factor, float)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("seed", -1),
        ("seed", 1),
        ("seed", SEED_MAX),
        ("grid_size", 1),
        ("grid_size", 8),
        ("temperature", TEMPERATURE_MIN),
        ("temperature", TEMPERATURE_MAX),
        ("top_k", 1),
        ("top_k", TOP_K_MAX),
        ("supercondition_factor", SUPERCONDITION_FACTOR_RANGE[0]),
        ("supercondition_factor", SUPERCONDITION_FACTOR_RANGE[1]),
        ("model", "mini"),
        ("model", "mega"),
        ("is_seamless", False),
        ("progressive_outputs", True),
    ],
)
def test_boundary_values_are_accepted(field: str, value: object) -> None:
    assert getattr(parse_params({"text": "a", field: value}), field) == value


def test_text_is_kept_as_given() -> None:
    assert parse_params({"text": "  A Fox 🦊  "}).text == "  A Fox 🦊  "


def test_text_at_the_length_limit_is_accepted() -> None:
    assert parse_params({"text": "x" * 1000}).text == "x" * 1000
    assert parse_params({"text": "x" * 20}, max_text_chars=20).text == "x" * 20


# --- parse_params: each bad input -----------------------------------------------------------


@pytest.mark.parametrize("body", [None, [], ["text"], "a fox", 3, True])
def test_body_must_be_an_object(body: object) -> None:
    error = only_error(body)
    assert error.field == "body"
    assert "must be a JSON object" in error.message


def test_text_is_required() -> None:
    error = only_error({})
    assert error == FieldError("text", "text is required: the prompt to draw")


@pytest.mark.parametrize("text", [None, 3, True, ["a"], {"a": 1}])
def test_text_must_be_a_string(text: object) -> None:
    error = only_error({"text": text})
    assert error.field == "text"
    assert error.message.startswith("text must be a string, got ")


@pytest.mark.parametrize("text", ["", " ", "\n\t  "])
def test_text_must_not_be_blank(text: str) -> None:
    assert only_error({"text": text}) == FieldError("text", "text must not be blank")


def test_text_length_limit() -> None:
    assert only_error({"text": "x" * 1001}) == FieldError(
        "text", "text must be at most 1000 characters, got 1001"
    )
    assert only_error({"text": "x" * 21}, max_text_chars=20).message == (
        "text must be at most 20 characters, got 21"
    )


SEED_MESSAGE = "seed must be an integer from -1 to 2147483647 (0 or -1: random), got "


@pytest.mark.parametrize(
    ("seed", "shown"),
    [
        (True, "true"),
        (False, "false"),
        (3.5, "3.5"),
        (NAN, "NaN"),
        ("3", '"3"'),
        (None, "null"),
        (-2, "-2"),
        (2**31, "2147483648"),
    ],
)
def test_bad_seed(seed: object, shown: str) -> None:
    assert only_error({"text": "a", "seed": seed}) == FieldError("seed", SEED_MESSAGE + shown)


@pytest.mark.parametrize(
    ("grid_size", "shown"),
    [(0, "0"), (9, "9"), (-1, "-1"), (True, "true"), (2.5, "2.5"), ("2", '"2"'), (None, "null")],
)
def test_bad_grid_size(grid_size: object, shown: str) -> None:
    assert only_error({"text": "a", "grid_size": grid_size}) == FieldError(
        "grid_size", f"grid_size must be an integer from 1 to 8, got {shown}"
    )


def test_grid_size_limit_is_configurable() -> None:
    assert parse_params({"text": "a", "grid_size": 4}, max_grid_size=4).grid_size == 4
    assert only_error({"text": "a", "grid_size": 5}, max_grid_size=4).message == (
        "grid_size must be an integer from 1 to 4, got 5"
    )


@pytest.mark.parametrize("field", ["is_seamless", "progressive_outputs"])
@pytest.mark.parametrize(
    ("value", "shown"), [(1, "1"), (0, "0"), ("true", '"true"'), (None, "null")]
)
def test_flags_must_be_booleans(field: str, value: object, shown: str) -> None:
    assert only_error({"text": "a", field: value}) == FieldError(
        field, f"{field} must be true or false, got {shown}"
    )


@pytest.mark.parametrize(
    ("temperature", "shown"),
    [
        (0, "0"),
        (0.0, "0.0"),
        (0.0099, "0.0099"),
        (-1.5, "-1.5"),
        (100.5, "100.5"),
        (NAN, "NaN"),
        (INF, "Infinity"),
        (-INF, "-Infinity"),
        (True, "true"),
        ("1", '"1"'),
        (None, "null"),
    ],
)
def test_bad_temperature(temperature: object, shown: str) -> None:
    assert only_error({"text": "a", "temperature": temperature}) == FieldError(
        "temperature", f"temperature must be a number from {TEMPERATURE_MIN:g} to 100, got {shown}"
    )


@pytest.mark.parametrize(
    ("top_k", "shown"),
    [(0, "0"), (-1, "-1"), (16385, "16385"), (256.5, "256.5"), (True, "true"), ("256", '"256"')],
)
def test_bad_top_k(top_k: object, shown: str) -> None:
    assert only_error({"text": "a", "top_k": top_k}) == FieldError(
        "top_k", f"top_k must be an integer from 1 to 16384, got {shown}"
    )


@pytest.mark.parametrize(
    ("factor", "shown"),
    [
        (-1, "-1"),
        (-0.001, "-0.001"),
        (128.5, "128.5"),
        (NAN, "NaN"),
        (INF, "Infinity"),
        (False, "false"),
        ("16", '"16"'),
    ],
)
def test_bad_supercondition_factor(factor: object, shown: str) -> None:
    assert only_error({"text": "a", "supercondition_factor": factor}) == FieldError(
        "supercondition_factor",
        f"supercondition_factor must be a number from 0 to 128, got {shown}",
    )


@pytest.mark.parametrize(
    ("model", "shown"),
    [("Mini", '"Mini"'), ("large", '"large"'), (True, "true"), (["mini"], "an array")],
)
def test_bad_model(model: object, shown: str) -> None:
    assert only_error({"text": "a", "model": model}) == FieldError(
        "model", f'model must be "mini" or "mega", got {shown}'
    )


def test_long_values_are_cut_short_in_messages() -> None:
    error = only_error({"text": "a", "model": "m" * 500})
    assert len(error.message) < 100
    assert error.message.endswith("...")


def test_huge_integer_is_described_without_crashing() -> None:
    # Python refuses to print ints past 4300 digits; the message must still be built.
    error = only_error({"text": "a", "seed": 10**5000})
    assert error.message == SEED_MESSAGE + "int"


# --- parse_params: unknown fields and collected errors --------------------------------------


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [
        ("grid-size", "grid_size"),
        ("gridSize", "grid_size"),
        ("Text", "text"),
        ("temprature", "temperature"),
        ("topk", "top_k"),
        ("seamless", "is_seamless"),
    ],
)
def test_unknown_field_close_to_a_known_one_gets_a_suggestion(name: str, suggestion: str) -> None:
    errors = errors_of({"text": "a", name: 1})
    assert errors == [
        FieldError(name, f"unknown field {name!r}; did you mean {suggestion!r}?"),
    ]


def test_unknown_field_far_from_any_lists_the_known_fields() -> None:
    error = only_error({"text": "a", "colour": "red"})
    assert error.field == "colour"
    assert error.message == ("unknown field 'colour'; known fields are " + ", ".join(PARAM_FIELDS))


def test_non_string_field_name_is_rejected() -> None:
    error = only_error({"text": "a", 3: 1})
    assert error.field == "3"
    assert error.message.startswith("unknown field 3")


def test_all_errors_are_collected() -> None:
    body = {
        "grid-size": 2,
        "seed": True,
        "grid_size": 0,
        "is_seamless": "yes",
        "temperature": NAN,
        "top_k": 3.5,
        "supercondition_factor": -1,
        "model": "large",
        "progressive_outputs": 1,
    }
    errors = errors_of(body)
    assert [error.field for error in errors] == [
        "grid-size",
        "text",
        "seed",
        "grid_size",
        "is_seamless",
        "temperature",
        "top_k",
        "supercondition_factor",
        "model",
        "progressive_outputs",
    ]


def test_invalid_params_is_a_value_error_with_every_message() -> None:
    with pytest.raises(ValueError, match="grid_size must be") as caught:
        parse_params({"text": "", "grid_size": 9})
    assert str(caught.value) == (
        "text must not be blank; grid_size must be an integer from 1 to 8, got 9"
    )


# --- text_token_warning ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> TextTokenizer:
    directory = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer(directory)
    return TextTokenizer.from_files(directory / "vocab.json", directory / "merges.txt")


def text_of_token_count(tokenizer: TextTokenizer, token_count: int) -> str:
    """A text that tokenizes to exactly `token_count` tokens, <s> and </s> included."""
    # Digits are not in the small vocabulary: each "1" is the tokens "Ġ" and <unk>.
    assert tokenizer.tokenize("1") == [
        tokenizer.start_token,
        tokenizer.token_from_subword["Ġ"],
        tokenizer.unknown_token,
        tokenizer.end_token,
    ]
    words = ["1"] * ((token_count - 2) // 2)
    if token_count % 2:
        words.append("a")  # "Ġa" is one token
    text = " ".join(words)
    assert len(tokenizer.tokenize(text)) == token_count
    return text


def test_no_warning_for_a_text_the_model_reads_whole(tokenizer: TextTokenizer) -> None:
    assert text_token_warning("a fox in the snow", tokenizer) is None
    assert text_token_warning(text_of_token_count(tokenizer, 64), tokenizer) is None


@pytest.mark.parametrize("token_count", [65, 83])
def test_warning_for_a_text_longer_than_the_model_reads(
    tokenizer: TextTokenizer, token_count: int
) -> None:
    text = text_of_token_count(tokenizer, token_count)
    assert text_token_warning(text, tokenizer) == (
        f"the text is {token_count} tokens long; the model reads only the first 64"
    )


def test_warning_uses_the_given_token_count(tokenizer: TextTokenizer) -> None:
    text = text_of_token_count(tokenizer, 11)
    assert text_token_warning(text, tokenizer, text_token_count=11) is None
    assert text_token_warning(text, tokenizer, text_token_count=10) == (
        "the text is 11 tokens long; the model reads only the first 10"
    )


# --- resolve_seed ---------------------------------------------------------------------------


def test_fixed_seed_is_kept() -> None:
    params = parse_params({"text": "a", "seed": 7})
    assert resolve_seed(params) is params


@pytest.mark.parametrize("seed", [-1, 0])
def test_random_seed_is_drawn_in_range_and_recorded(seed: int) -> None:
    params = parse_params({"text": "a", "seed": seed})
    rng = random.Random(0)
    seeds = {resolve_seed(params, rng).seed for _ in range(2000)}
    assert all(1 <= seed <= SEED_MAX for seed in seeds)
    assert len(seeds) > 1990  # drawn afresh each time
    resolved = resolve_seed(params)
    assert 1 <= resolved.seed <= SEED_MAX
    assert resolved == JobParams(**{**params.to_dict(), "seed": resolved.seed})


def test_random_seed_reaches_both_ends_of_the_range() -> None:
    class Extremes(random.Random):
        def __init__(self, pick_high: bool) -> None:
            super().__init__()
            self.pick_high = pick_high

        def randint(self, a: int, b: int) -> int:
            return b if self.pick_high else a

    params = parse_params({"text": "a"})
    assert resolve_seed(params, Extremes(False)).seed == 1
    assert resolve_seed(params, Extremes(True)).seed == 2**31 - 1


def test_seeded_rng_resolves_reproducibly() -> None:
    params = parse_params({"text": "a"})
    assert resolve_seed(params, random.Random(5)) == resolve_seed(params, random.Random(5))


# --- params_fingerprint ---------------------------------------------------------------------


def test_fingerprint_is_a_sha256_of_canonical_json() -> None:
    fingerprint = params_fingerprint({"text": "a"})
    fields = parse_params({"text": "a"}).to_dict()
    del fields["priority"]  # how the job is scheduled, not what it renders
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    assert fingerprint == hashlib.sha256(canonical.encode()).hexdigest()
    assert len(fingerprint) == 64


def test_fingerprint_ignores_key_order_and_spelled_out_defaults() -> None:
    body: dict[str, Any] = {"text": "a fox", "grid_size": 2, "temperature": 2}
    reordered = {"temperature": 2.0, "grid_size": 2, "text": "a fox"}
    with_defaults = {**body, "seed": -1, "model": "mini", "top_k": 256, "is_seamless": False}
    fingerprint = params_fingerprint(body)
    assert params_fingerprint(reordered) == fingerprint
    assert params_fingerprint(with_defaults) == fingerprint
    assert params_fingerprint(parse_params(body)) == fingerprint


def test_fingerprint_normalises_floats_in_directly_built_params() -> None:
    assert params_fingerprint(JobParams(text="a", temperature=1)) == params_fingerprint(
        {"text": "a"}
    )


@pytest.mark.parametrize(
    "change",
    [
        {"text": "a fox "},
        {"seed": 5},
        {"grid_size": 2},
        {"is_seamless": True},
        {"temperature": 1.5},
        {"top_k": 255},
        {"supercondition_factor": 16.5},
        {"model": "mega"},
        {"progressive_outputs": True},
    ],
)
def test_fingerprint_differs_for_different_params(change: dict[str, Any]) -> None:
    assert params_fingerprint({"text": "a fox", **change}) != params_fingerprint({"text": "a fox"})


def test_fingerprint_keeps_the_seed_as_given() -> None:
    params = parse_params({"text": "a"})
    assert params_fingerprint(params) != params_fingerprint(resolve_seed(params))


def test_fingerprint_of_an_invalid_body_raises() -> None:
    with pytest.raises(InvalidParams):
        params_fingerprint({"text": "a", "grid_size": 0})


# --- storage keys and the tile layout -------------------------------------------------------


def test_storage_keys() -> None:
    job_id = "0190a1b2c3d4e5f6a7b8c9d0e1f2a3b4"
    assert result_prefix(job_id) == f"jobs/{job_id}"
    assert grid_key(job_id) == f"jobs/{job_id}/grid.png"
    assert image_key(job_id, 0) == f"jobs/{job_id}/0.png"
    assert image_key(job_id, 8) == f"jobs/{job_id}/8.png"
    assert job_json_key(job_id) == f"jobs/{job_id}/job.json"


def test_tile_index_is_row_major() -> None:
    assert tile_index(0, 0, 1) == 0
    assert [tile_index(row, col, 2) for row in range(2) for col in range(2)] == [0, 1, 2, 3]
    assert tile_index(1, 2, 3) == 5
    assert tile_index(2, 0, 3) == 6


@pytest.mark.parametrize(("row", "col"), [(-1, 0), (0, -1), (3, 0), (0, 3)])
def test_tile_index_outside_the_grid(row: int, col: int) -> None:
    with pytest.raises(ValueError, match="outside a 3×3 grid"):
        tile_index(row, col, 3)


@pytest.mark.parametrize(
    ("grid_size", "model_images"),
    [
        (1, [0]),
        (2, [0, 2, 1, 3]),
        (3, [0, 3, 6, 1, 4, 7, 2, 5, 8]),
    ],
)
def test_model_image_for_each_tile(grid_size: int, model_images: list[int]) -> None:
    tiles = range(grid_size**2)
    assert [model_image_for_tile(i, grid_size) for i in tiles] == model_images
    assert sorted(model_images) == list(tiles)  # a permutation


@pytest.mark.parametrize("grid_size", range(1, 9))
def test_tile_mapping_matches_the_models_grid_layout(grid_size: int) -> None:
    # The model's image a·g + b sits at tile row b, column a.
    for a in range(grid_size):
        for b in range(grid_size):
            assert model_image_for_tile(tile_index(b, a, grid_size), grid_size) == a * grid_size + b
    images = [model_image_for_tile(i, grid_size) for i in range(grid_size**2)]
    assert sorted(images) == list(range(grid_size**2))


@pytest.mark.parametrize("i", [-1, 4])
def test_model_image_for_tile_outside_the_grid(i: int) -> None:
    with pytest.raises(ValueError, match="outside a 2×2 grid"):
        model_image_for_tile(i, 2)


# --- job ids --------------------------------------------------------------------------------


def test_job_id_is_url_safe_and_fixed_width() -> None:
    job_id = new_job_id()
    assert is_job_id(job_id)
    assert len(job_id) == 32
    assert set(job_id) <= set("0123456789abcdef")


def test_job_ids_sort_by_creation_time() -> None:
    times = [0, 1, 999, 1_000, 1_700_000_000_000, 1_700_000_000_001, 2**48 - 1]
    ids = [new_job_id(t) for t in times]
    assert sorted(ids) == ids
    assert sorted(ids, reverse=True) == ids[::-1]  # newest first
    assert [job_id_timestamp_ms(job_id) for job_id in ids] == times


def test_job_ids_made_in_the_same_millisecond_differ() -> None:
    ids = {new_job_id(1_700_000_000_000) for _ in range(1000)}
    assert len(ids) == 1000


def test_job_id_carries_the_current_time() -> None:
    import time

    before = time.time_ns() // 1_000_000
    job_id = new_job_id()
    after = time.time_ns() // 1_000_000
    assert before <= job_id_timestamp_ms(job_id) <= after


@pytest.mark.parametrize("timestamp_ms", [-1, 2**48])
def test_job_id_timestamp_must_fit(timestamp_ms: int) -> None:
    with pytest.raises(ValueError, match="48 bits"):
        new_job_id(timestamp_ms)


@pytest.mark.parametrize(
    "value",
    ["", "abc", "0" * 31, "0" * 33, "0190A1B2C3D4E5F6A7B8C9D0E1F2A3B4", "../" + "0" * 29, None, 3],
)
def test_is_job_id_rejects_other_values(value: object) -> None:
    assert not is_job_id(value)
    if isinstance(value, str):
        with pytest.raises(ValueError, match="not a job id"):
            job_id_timestamp_ms(value)


# --- statuses -------------------------------------------------------------------------------

ALLOWED_MOVES = {
    ("queued", "running"),
    ("queued", "failed"),
    ("queued", "canceled"),
    ("running", "succeeded"),
    ("running", "failed"),
    ("running", "canceled"),
    ("running", "queued"),  # requeue: redelivery or retry
}


def test_status_values() -> None:
    assert [status.value for status in JobStatus] == [
        "queued",
        "running",
        "succeeded",
        "failed",
        "canceled",
    ]
    assert JobStatus("queued") is JobStatus.QUEUED
    assert JobStatus.QUEUED == "queued"


@pytest.mark.parametrize("from_status", list(JobStatus))
@pytest.mark.parametrize("to_status", list(JobStatus))
def test_can_move(from_status: JobStatus, to_status: JobStatus) -> None:
    expected = (from_status.value, to_status.value) in ALLOWED_MOVES
    assert can_move(from_status, to_status) is expected
    assert can_move(from_status.value, to_status.value) is expected


def test_terminal_statuses_never_change() -> None:
    terminal = [status for status in JobStatus if status.is_terminal]
    assert terminal == [JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED]
    for status in terminal:
        assert not any(can_move(status, other) for other in JobStatus)


def test_can_move_rejects_unknown_statuses() -> None:
    with pytest.raises(ValueError):
        can_move("queued", "done")


# --- job records ----------------------------------------------------------------------------


def full_record() -> JobRecord:
    return JobRecord(
        id="018bcfe56800b4a5212d3b9ca8adf28e",
        owner="key_123",
        status=JobStatus.RUNNING,
        params=resolve_seed(
            parse_params({"text": "a fox 🦊", "grid_size": 2}), random.Random(1)
        ).to_dict(),
        created_at="2024-01-01T12:00:00.000+00:00",
        started_at="2024-01-01T12:00:01.500+00:00",
        finished_at=None,
        progress_step=17,
        progress_total=256,
        worker="worker-1@host",
        error=None,
        attempts=2,
    )


def test_record_round_trips_through_json() -> None:
    record = full_record()
    as_dict = record.to_dict()
    assert as_dict["status"] == "running" and type(as_dict["status"]) is str
    text = json.dumps(as_dict)
    assert JobRecord.from_dict(json.loads(text)) == record
    assert JobRecord.from_json(record.to_json()) == record
    assert JobRecord.from_json(record.to_json().encode()) == record


def test_record_defaults() -> None:
    record = JobRecord.from_dict(
        {
            "id": "x",
            "owner": "key_1",
            "status": "queued",
            "params": {"text": "a"},
            "created_at": utc_now(),
        }
    )
    assert record.status is JobStatus.QUEUED
    assert (record.started_at, record.finished_at, record.worker, record.error) == (None,) * 4
    assert (record.progress_step, record.progress_total, record.attempts) == (0, 256, 0)


def test_record_from_dict_copies_params() -> None:
    fields = full_record().to_dict()
    record = JobRecord.from_dict(fields)
    fields["params"]["text"] = "changed"
    assert record.params["text"] == "a fox 🦊"


def test_record_ignores_unknown_keys_from_a_newer_writer() -> None:
    fields = {**full_record().to_dict(), "priority": 5}
    assert JobRecord.from_dict(fields) == full_record()


def test_record_missing_required_keys() -> None:
    fields = full_record().to_dict()
    del fields["owner"], fields["created_at"]
    with pytest.raises(ValueError, match="missing owner, created_at"):
        JobRecord.from_dict(fields)


def test_record_with_unknown_status() -> None:
    fields = {**full_record().to_dict(), "status": "done"}
    with pytest.raises(ValueError):
        JobRecord.from_dict(fields)


def test_utc_now_is_iso_8601_utc() -> None:
    from datetime import datetime, timedelta

    now = utc_now()
    parsed = datetime.fromisoformat(now)
    assert parsed.utcoffset() == timedelta(0)
    assert now.endswith("+00:00")


def test_token_checkpoints_round_trip_and_refuse_other_text() -> None:
    rows = [[0, 16383, 5], [7, 8, 9]]
    text = encode_tokens(rows)
    assert decode_tokens(text) == rows
    assert len(text) < 20  # two bytes a token, base64
    for bad in ("", "x:AAAA", "0:", "2:AAA=", "3:AAAA", "1:!!!!"):
        with pytest.raises(ValueError, match="not a token checkpoint"):
            decode_tokens(bad)
    with pytest.raises(ValueError, match="same length"):
        encode_tokens([[1, 2], [3]])
