"""The job's life on the farm: untrusted bodies → params, status moves, ids, records, storage
keys, token checkpoints.

The models of what a client may send and what the API answers (JobParams, Job, the limits such
as TEMPERATURE_MIN/TEMPERATURE_MAX, JobStatus) are the contract, core/contract.py; this module
re-exports them for the modules that read both. `parse_params` validates a body with them and
words pydantic's errors for people:

    InvalidParams(ValueError)   a request body is not valid JobParams; `.errors` lists every
                                problem as a FieldError(field, message)

Torch-free and service-free, so the API can import it without loading the model.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import random
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from pydantic.fields import FieldInfo

from core.contract import (
    DEFAULT_MAX_GRID_SIZE,
    FORBIDDEN_TEXT_CHARACTER,
    GRID_SIZE_LIMIT,
    MAX_TEXT_CHARS,
    MODELS,
    PARAM_FIELDS,
    PRIORITIES,
    PROGRESS_TOTAL,
    SEED_MAX,
    SEED_MIN_FIXED,
    SEED_RANDOM,
    SUPERCONDITION_FACTOR_RANGE,
    TEMPERATURE_MAX,
    TEMPERATURE_MIN,
    TERMINAL_STATUSES,
    TEXT_TOKEN_COUNT,
    TOP_K_MAX,
    WEBHOOK_URL_MAX_CHARS,
    FieldError,
    JobParams,
    JobStatus,
    params_model,
)
from core.webhooks import check_url_syntax

if TYPE_CHECKING:
    from model.tokenizer import TextTokenizer

# The contract's names that modules reading job records import from here.
__all__ = [
    "DEFAULT_MAX_GRID_SIZE",
    "GRID_SIZE_LIMIT",
    "MAX_TEXT_CHARS",
    "MODELS",
    "PARAM_FIELDS",
    "PRIORITIES",
    "PROGRESS_TOTAL",
    "SEED_MAX",
    "SEED_MIN_FIXED",
    "SEED_RANDOM",
    "SUPERCONDITION_FACTOR_RANGE",
    "TEMPERATURE_MAX",
    "TEMPERATURE_MIN",
    "TERMINAL_STATUSES",
    "TEXT_TOKEN_COUNT",
    "TOP_K_MAX",
    "FieldError",
    "JobParams",
    "JobStatus",
]


class InvalidParams(ValueError):
    """A request body is not valid JobParams; `errors` lists every problem found."""

    def __init__(self, errors: list[FieldError]):
        super().__init__("; ".join(error.message for error in errors))
        self.errors = errors


def parse_params(
    body: object,
    *,
    max_grid_size: int = DEFAULT_MAX_GRID_SIZE,
    max_text_chars: int = MAX_TEXT_CHARS,
) -> JobParams:
    """Validate a decoded JSON body into JobParams, filling defaults.

    Raises InvalidParams listing every error, not just the first, each naming its field.
    """
    if not isinstance(body, Mapping):
        raise InvalidParams(
            [FieldError("body", f"the body must be a JSON object, got {_describe(body)}")]
        )
    model = params_model(max_grid_size, max_text_chars)
    # Unknown names are found here, not by pydantic: it stops at a name it cannot read (an
    # unpaired surrogate) without saying which.
    unknown = [
        FieldError(encodable(str(name)), _unknown_field_message(name))
        for name in body
        if name not in model.model_fields
    ]
    known = {name: value for name, value in body.items() if name in model.model_fields}
    try:
        params = model.model_validate(known)
    except ValidationError as error:
        errors = unknown + _field_errors(known, error, model)
        raise InvalidParams(
            errors or [FieldError("body", "the body is not valid JobParams")]
        ) from None
    if unknown:
        raise InvalidParams(unknown)
    if params.webhook_url is not None:
        try:
            check_url_syntax(params.webhook_url)
        except ValueError as error:
            raise InvalidParams([FieldError("webhook_url", str(error))]) from None
    return params if type(params) is JobParams else JobParams.model_construct(**dict(params))


def _field_errors(
    body: Mapping[str, Any], error: ValidationError, model: type[JobParams]
) -> list[FieldError]:
    """One FieldError per bad field, in the model's field order."""
    by_field: dict[str, FieldError] = {}
    for detail in error.errors(include_url=False, include_context=False, include_input=False):
        name = str(detail["loc"][0]) if detail["loc"] else ""
        if name in model.model_fields and name not in by_field:
            message = _message(name, detail["type"], body, model.model_fields[name])
            by_field[name] = FieldError(name, message)
    return [by_field[name] for name in model.model_fields if name in by_field]


def _message(name: str, error_type: str, body: Mapping[Any, Any], field: FieldInfo) -> str:
    if name == "text":
        return _text_message(error_type, body.get("text"), field)
    if name == "webhook_url":
        value = body.get(name)
        if isinstance(value, str):
            try:
                check_url_syntax(value)
            except ValueError as error:
                return str(error)
        return (
            f"webhook_url must be null or an http:// or https:// URL of at most "
            f"{WEBHOOK_URL_MAX_CHARS} printable ASCII characters, got {_describe(value)}"
        )
    return f"{name} must be {_expected(name, field)}, got {_describe(body.get(name))}"


def _text_message(error_type: str, text: object, field: FieldInfo) -> str:
    if error_type == "missing":
        return "text is required: the prompt to draw"
    if not isinstance(text, str):
        return f"text must be a string, got {_describe(text)}"
    bad = FORBIDDEN_TEXT_CHARACTER.search(text)
    if bad is not None:
        return (
            f"text must not hold control characters (but tab and line breaks) or unpaired "
            f"surrogates; found U+{ord(bad.group()):04X} at character {bad.start() + 1}"
        )
    if not text.strip():
        return "text must not be blank"
    return f"text must be at most {_bound(field, 'max_length')} characters, got {len(text)}"


_HINTS = {"seed": " (0 or -1: random)"}


def _expected(name: str, field: FieldInfo) -> str:
    """What a field accepts, in words, from its type and bounds."""
    if field.annotation is bool:
        return "true or false"
    if name == "model":
        return " or ".join(f'"{model}"' for model in MODELS)
    if name == "priority":
        return " or ".join(f'"{priority}"' for priority in PRIORITIES)
    low, high = (_number(_bound(field, bound)) for bound in ("ge", "le"))
    kind = "a number" if field.annotation is float else "an integer"
    return f"{kind} from {low} to {high}{_HINTS.get(name, '')}"


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def _bound(field: FieldInfo, name: str) -> Any:
    for constraint in field.metadata:
        if hasattr(constraint, name):
            return getattr(constraint, name)
    raise LookupError(f"the field has no {name} bound")


def _unknown_field_message(name: object) -> str:
    if not isinstance(name, str):
        return f"unknown field {_describe(name)}; field names are strings"
    close = difflib.get_close_matches(name, PARAM_FIELDS, n=1)
    if close:
        return f"unknown field {name!r}; did you mean {close[0]!r}?"
    return f"unknown field {name!r}; known fields are {', '.join(PARAM_FIELDS)}"


def _describe(value: object) -> str:
    """A value as the client wrote it in JSON, cut short if long."""
    if isinstance(value, list):
        return "an array"
    if isinstance(value, Mapping):
        return "an object"
    try:
        text = encodable(json.dumps(value, ensure_ascii=False))
    except (TypeError, ValueError):  # not JSON, or an int too long to print
        return type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def encodable(text: str) -> str:
    """`text`, with what UTF-8 cannot encode (unpaired surrogates) written as escapes, so that
    a message quoting a client's input can always be sent and logged."""
    try:
        text.encode("utf8")
    except UnicodeEncodeError:
        return text.encode("utf8", "backslashreplace").decode("utf8")
    return text


def resolve_seed(params: JobParams, rng: random.Random | None = None) -> JobParams:
    """Replace a random seed (<= 0) with a drawn one, so the seed actually used is recorded."""
    if params.seed >= SEED_MIN_FIXED:
        return params
    rng = rng if rng is not None else random.SystemRandom()
    return params.model_copy(update={"seed": rng.randint(SEED_MIN_FIXED, SEED_MAX)})


def params_fingerprint(params_body: JobParams | Mapping[str, object]) -> str:
    """sha256 (hex) of the canonical JSON of the validated params, defaults filled, seed as given,
    priority left out.

    Same Idempotency-Key + same fingerprint → same job; a different fingerprint → conflict. A
    body is validated with parse_params' default limits (InvalidParams if it fails); pass the
    JobParams you already parsed to use other limits.
    """
    params = params_body if isinstance(params_body, JobParams) else parse_params(params_body)
    fields = params.to_dict()
    # The lane says how the job is scheduled, not what it renders: a replay with another
    # priority is the same job (and keys used before lanes existed keep their fingerprints).
    del fields["priority"]
    for name in ("temperature", "supercondition_factor"):
        fields[name] = float(fields[name])
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf8")).hexdigest()


# Status only moves forward, with one exception: running → queued is a requeue, when a worker
# dies or retries and the broker redelivers the job. Terminal states never change, and a status
# never "moves" to itself (progress updates do not change the status).
_NEXT_STATUSES: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.FAILED, JobStatus.CANCELED}),
    JobStatus.RUNNING: frozenset(
        {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED, JobStatus.QUEUED}
    ),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELED: frozenset(),
}


def can_move(from_status: JobStatus | str, to_status: JobStatus | str) -> bool:
    """Whether a job may go from `from_status` to `to_status` (see _NEXT_STATUSES)."""
    return JobStatus(to_status) in _NEXT_STATUSES[JobStatus(from_status)]


def text_token_warning(
    text: str, tokenizer: TextTokenizer, text_token_count: int = TEXT_TOKEN_COUNT
) -> str | None:
    """A warning for the client when the model will cut the text short, else None.

    The count includes the <s> and </s> tokens, as the model sees them.
    """
    token_count = len(tokenizer.tokenize(text))
    if token_count <= text_token_count:
        return None
    return (
        f"the text is {token_count} tokens long; the model reads only the first {text_token_count}"
    )


# Storage layout: jobs/{id}/job.json, jobs/{id}/grid.png, and one jobs/{id}/{i}.png per tile.


def result_prefix(job_id: str) -> str:
    return f"jobs/{job_id}"


def grid_key(job_id: str) -> str:
    return f"{result_prefix(job_id)}/grid.png"


def image_key(job_id: str, i: int) -> str:
    """The key of tile file `i` (row-major on the grid image, see tile_index)."""
    return f"{result_prefix(job_id)}/{i}.png"


def preview_key(job_id: str, frame: int) -> str:
    """The key of progressive preview `frame` (from 1): the whole grid at that decoder frame."""
    return f"{result_prefix(job_id)}/previews/{frame}.png"


def job_json_key(job_id: str) -> str:
    return f"{result_prefix(job_id)}/job.json"


def tile_index(row: int, col: int, grid_size: int) -> int:
    """The file index of the tile at (row, col): tiles are numbered row-major from 0.

    The model yields images column-major instead (its image a·g + b sits at tile row b,
    column a), so use model_image_for_tile to find which model image fills a tile.
    """
    if not (0 <= row < grid_size and 0 <= col < grid_size):
        raise ValueError(f"tile ({row}, {col}) is outside a {grid_size}×{grid_size} grid")
    return row * grid_size + col


def model_image_for_tile(i: int, grid_size: int) -> int:
    """The index, in the model's output order, of the image shown as tile file `i`."""
    if not 0 <= i < grid_size**2:
        raise ValueError(f"tile {i} is outside a {grid_size}×{grid_size} grid")
    row, col = divmod(i, grid_size)
    return col * grid_size + row


# A job id is 32 lowercase hex digits: 12 for the creation time in milliseconds since the Unix
# epoch (48 bits, enough until the year 10889), then 20 random (80 bits). Fixed width, so ids
# sort as strings by creation time (ids made in the same millisecond sort in random order).
_JOB_ID = re.compile(r"[0-9a-f]{32}")


def new_job_id(timestamp_ms: int | None = None) -> str:
    """A new URL-safe job id that sorts by creation time (now, unless `timestamp_ms` is given)."""
    if timestamp_ms is None:
        timestamp_ms = time.time_ns() // 1_000_000
    if not 0 <= timestamp_ms < 2**48:
        raise ValueError(f"timestamp_ms must fit in 48 bits, got {timestamp_ms}")
    return f"{timestamp_ms:012x}{secrets.token_hex(10)}"


def is_job_id(value: object) -> bool:
    """Whether `value` looks like a new_job_id() id (check ids from URLs before using them)."""
    return isinstance(value, str) and _JOB_ID.fullmatch(value) is not None


def job_id_timestamp_ms(job_id: str) -> int:
    """The creation time encoded in a job id, in milliseconds since the Unix epoch."""
    if not is_job_id(job_id):
        raise ValueError(f"not a job id: {job_id!r}")
    return int(job_id[:12], 16)


def utc_now() -> str:
    """Now as ISO-8601 UTC with milliseconds, the format of JobRecord times."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class JobRecord:
    """A job as stored (Redis, job.json) and shown by the API. Times are ISO-8601 UTC strings."""

    id: str
    owner: str  # the id of the API key that created the job
    status: JobStatus
    params: dict[str, Any]
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    progress_step: int = 0
    progress_total: int = PROGRESS_TOTAL
    worker: str | None = None
    error: str | None = None
    attempts: int = 0  # how many times a worker has started this job
    cancel_requested: bool = False
    # The image tokens generated so far, saved every 32 steps (core/checkpoint.py), so that a job
    # redelivered after its worker died resumes there; cleared when the job ends.
    checkpoint: str | None = None
    # Storage keys, set when the objects exist: {"grid": key, "images": [key, ...],
    # "previews": [key, ...]} (previews only with progressive_outputs).
    result: dict[str, Any] | None = None
    # Not stored: while the job is queued, its 1-based place in its lane, as the store that
    # read the record computed it (None: not queued, or unknown). to_dict leaves it out.
    queue_position: int | None = dataclasses.field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only; the stored fields (queue_position is not one)."""
        fields = dataclasses.asdict(self)
        fields["status"] = self.status.value
        del fields["queue_position"]
        return fields

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> JobRecord:
        """The inverse of to_dict. Unknown keys are ignored, so a newer writer's record loads."""
        required = ("id", "owner", "status", "params", "created_at")
        missing = [name for name in required if name not in fields]
        if missing:
            raise ValueError(f"job record is missing {', '.join(missing)}")
        known = {field.name for field in dataclasses.fields(cls)} - {"queue_position"}
        values = {name: value for name, value in fields.items() if name in known}
        values["status"] = JobStatus(values["status"])
        values["params"] = dict(values["params"])
        return cls(**values)

    def to_json(self) -> str:
        """JSON with every non-ASCII character escaped, so that any string, a lone surrogate
        included, is stored and read back unchanged."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> JobRecord:
        return cls.from_dict(json.loads(text))
