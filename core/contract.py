"""The job contract as pydantic models: what a client may send, and what the API answers.

One definition gives both the validation (the API's, and the worker's when it reads a record)
and the JSON Schema of the OpenAPI document, so the two cannot disagree.

    JobParams     a job's parameters (the POST /v1/jobs body); `params_model` is the same with
                  a farm's own limits (DALLE_FARM_MAX_GRID_SIZE)
    Job           a job as the API answers it: status, progress, params, result, warnings
    JobPage       a page of jobs (GET /v1/jobs)
    Problem       an error answer (RFC 9457), with a FieldError per bad field

The models are strict: a bool is not a number, "5" is not an integer, null is not a default,
unknown fields are refused. An integer may be written 5.0 (JSON Schema counts it as an
integer), but not 5.5. core.job.parse_params validates a body with them and words pydantic's
errors for people (FieldError).

Text must contain a character that is not whitespace, and no character that cannot be stored
or means nothing in a prompt: C0 control characters other than tab, line feed and carriage
return, DEL, and unpaired UTF-16 surrogates (valid JSON escapes such as "\\ud800" that no UTF-8
store can hold; the schema's pattern cannot name them, see TEXT_PATTERN, so its description
says it).

Torch-, Flask- and service-free (stdlib and pydantic), so the API and the client import it.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sized
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    create_model,
)

# ModelConfig.text_token_count for both presets; a copy, so this module needs no model import.
TEXT_TOKEN_COUNT = 64
# ModelConfig's IMAGE_TOKEN_COUNT: one progress step per decoded image token.
PROGRESS_TOTAL = 256

SEED_RANDOM = -1
SEED_MAX = 2**31 - 1
# As in the model (and min-dalle), a seed <= 0 means "random": -1 and 0 are both accepted and
# replaced by a drawn seed from SEED_MIN_FIXED up, so the recorded seed always reproduces.
SEED_MIN_FIXED = 1
# The smallest temperature accepted (inclusive). The logits are divided by it: below 2**-126
# (model.generate.MIN_TEMPERATURE) float32 cannot compute that, and such a job once made the
# shared batch step fail every job in it. At 0.01 sampling is already greedy in practice, so
# nothing useful is refused. Above 100 the distribution is uniform for all practical purposes.
TEMPERATURE_MIN = 0.01
TEMPERATURE_MAX = 100.0
# The VQGAN has 2**14 codes, so a larger top_k samples from the same set.
TOP_K_MAX = 2**14
# 0 ignores the text, 1 is plain conditioning, min-dalle's UI offered 4..64 (default 16);
# past 128 the logits saturate and nothing changes but numerical trouble.
SUPERCONDITION_FACTOR_RANGE = (0.0, 128.0)
MODELS = ("mini", "mega")
# grid_size bounds: DEFAULT_MAX_GRID_SIZE when no farm setting is given, GRID_SIZE_LIMIT the
# most any farm may allow (Settings.max_grid_size is checked against it).
DEFAULT_MAX_GRID_SIZE = 8
GRID_SIZE_LIMIT = 16
MAX_TEXT_CHARS = 1000

# Characters a prompt may not hold (see the module docstring), as regex class bodies. The
# pattern spells its whitespace out (what str.isspace() calls whitespace, but the forbidden
# controls) rather than using \s, which means other sets in other regex engines; and it cannot
# name unpaired surrogates, which Rust or Go regexes (and so other tools reading the document)
# refuse as escapes: the server refuses those as text that is not Unicode.
_TEXT_CONTROLS = r"\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f"
_TEXT_SPACES = r"\t\n\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
TEXT_PATTERN = rf"^[^{_TEXT_CONTROLS}]*[^{_TEXT_SPACES}{_TEXT_CONTROLS}][^{_TEXT_CONTROLS}]*$"
FORBIDDEN_TEXT_CHARACTER = re.compile(rf"[{_TEXT_CONTROLS}\ud800-\udfff]")

JOB_ID_PATTERN = r"^[0-9a-f]{32}$"
# Visible ASCII at both ends (HTTP strips a header value's outer spaces), printable inside.
IDEMPOTENCY_KEY_PATTERN = r"^[!-~]([ -~]*[!-~])?$"
IDEMPOTENCY_KEY_MAX_CHARS = 255
PAGE_LIMIT_DEFAULT = 50
PAGE_LIMIT_MAX = 100
# webhook_url: ASCII, http or https, a host, no credentials, spaces or fragment; what the shape
# cannot say (a name that resolves to a private address) is checked on submit (core/webhooks.py).
WEBHOOK_URL_MAX_CHARS = 2048
WEBHOOK_URL_PATTERN = r"^[Hh][Tt][Tt][Pp][Ss]?://[A-Za-z0-9._~\[\]:-]+([/?][!-\x22$-~]*)?$"
# A job's lane (README: Priority lanes): workers take interactive jobs first; bulk jobs when no
# interactive job waits, or once the oldest of them has waited DALLE_FARM_BULK_MAX_WAIT_S.
Priority = Literal["interactive", "bulk"]
PRIORITIES: tuple[Priority, ...] = ("interactive", "bulk")
DEFAULT_PRIORITY: Priority = "interactive"


class JobStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED})


def _integral_float_to_int(value: object) -> object:
    """5.0 → 5: JSON Schema's "integer" includes numbers with a zero fraction."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Integer = Annotated[int, BeforeValidator(_integral_float_to_int)]
JobId = Annotated[str, StringConstraints(pattern=JOB_ID_PATTERN)]
IdempotencyKey = Annotated[
    str,
    StringConstraints(
        min_length=1, max_length=IDEMPOTENCY_KEY_MAX_CHARS, pattern=IDEMPOTENCY_KEY_PATTERN
    ),
    Field(
        description="Any printable ASCII, a UUID say: the same key and body return the job "
        "the key first made (200), another body with it is 409. Keys are per API key.",
        examples=["3f0c1b9e-6a55-4c61-9bb2-0f4d6b1f2a10"],
    ),
]
Cursor = Annotated[
    str,
    StringConstraints(min_length=1, pattern=r"^[A-Za-z0-9_-]+$"),
    Field(
        description="next_cursor from the previous page, as given (base64url); omit it for "
        "the first page. Any other value is 400."
    ),
]
# The bounds before the 5.0 → 5 step: after it, pydantic's schema would lose them.
PageLimit = Annotated[
    int,
    Field(
        ge=1,
        le=PAGE_LIMIT_MAX,
        description="Jobs per page.",
        json_schema_extra={"default": PAGE_LIMIT_DEFAULT},
    ),
    BeforeValidator(_integral_float_to_int),
]

_STRICT = ConfigDict(strict=True, extra="forbid", frozen=True, regex_engine="python-re")


def _text_field(max_text_chars: int) -> Any:
    return Field(
        min_length=1,
        max_length=max_text_chars,
        pattern=TEXT_PATTERN,
        description=f"The prompt, 1 to {max_text_chars} characters, not all whitespace, "
        "without control characters other than tab and line breaks, and Unicode text (an "
        "unpaired surrogate escape such as \\ud800 alone is refused too). The model reads its "
        f"first {TEXT_TOKEN_COUNT} tokens; a longer text gets a warning.",
        examples=["a painting of a fox in the snow"],
    )


def _grid_size_field(max_grid_size: int) -> Any:
    return Field(
        default=1,
        ge=1,
        le=max_grid_size,
        description="Renders grid_size² images, one grid image and its tiles.",
        examples=[2],
    )


def _no_items(items: Sized) -> bool:
    return not items


def _is_none(value: object) -> bool:
    return value is None


# Build JobParams from an untrusted body with parse_params: its errors are worded for people.
class JobParams(BaseModel):
    """A job's parameters: what to render, and how."""

    model_config = ConfigDict(**_STRICT, title="JobParams")

    text: str = _text_field(MAX_TEXT_CHARS)
    seed: Integer = Field(
        default=SEED_RANDOM,
        ge=SEED_RANDOM,
        le=SEED_MAX,
        description="0 or -1: random; the job records the seed it used. The same params and "
        "seed give the same images on the same weights, device and dtype.",
        examples=[7],
    )
    grid_size: Integer = _grid_size_field(GRID_SIZE_LIMIT)
    is_seamless: bool = Field(default=False, description="Tiles that join seamlessly.")
    temperature: float = Field(
        default=1.0,
        ge=TEMPERATURE_MIN,
        le=TEMPERATURE_MAX,
        allow_inf_nan=False,
        description="Sampling temperature: lower is more conservative.",
        examples=[1.0],
    )
    top_k: Integer = Field(
        default=256, ge=1, le=TOP_K_MAX, description="Sample from the k likeliest image tokens."
    )
    supercondition_factor: float = Field(
        default=16.0,
        ge=SUPERCONDITION_FACTOR_RANGE[0],
        le=SUPERCONDITION_FACTOR_RANGE[1],
        allow_inf_nan=False,
        description="How strongly the text steers the image (0 ignores it, 1 is plain).",
    )
    model: Literal["mini", "mega"] = Field(default="mini", description="DALL·E Mini or Mega.")
    progressive_outputs: bool = Field(
        default=False, description="Also keep 8 intermediate frames (result.previews)."
    )
    # Left out of the params when unset: records and fingerprints stay those without webhooks.
    webhook_url: str | None = Field(
        default=None,
        exclude_if=_is_none,
        min_length=1,
        max_length=WEBHOOK_URL_MAX_CHARS,
        pattern=WEBHOOK_URL_PATTERN,
        description="An http(s) URL to POST the job's JSON to when it finishes (succeeded, "
        "failed or canceled), signed with the API key's webhook secret (README: Webhooks). "
        "A URL whose host resolves to a loopback, private, link-local or other non-public "
        "address is refused (422) unless the farm's operator allows it.",
        examples=["https://example.com/hooks/dalle-farm"],
    )

    priority: Priority = Field(
        default=DEFAULT_PRIORITY,
        description="The job's lane: interactive (a person waits) or bulk (dalle-farm bulk "
        "and other batch runs). Workers take interactive jobs first; a bulk job is taken when "
        "none waits, or once the oldest bulk job has waited DALLE_FARM_BULK_MAX_WAIT_S (README: "
        "Priority lanes). How a job is scheduled, not what it renders: an Idempotency-Key "
        "replayed with another priority returns the first job as it is.",
        examples=["bulk"],
    )

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()


PARAM_FIELDS = tuple(JobParams.model_fields)


@functools.lru_cache(maxsize=32)
def params_model(
    max_grid_size: int = DEFAULT_MAX_GRID_SIZE, max_text_chars: int = MAX_TEXT_CHARS
) -> type[JobParams]:
    """JobParams with a farm's limits: what its API accepts and its document shows."""
    if max_grid_size == GRID_SIZE_LIMIT and max_text_chars == MAX_TEXT_CHARS:
        return JobParams
    return create_model(
        "JobParams",
        __base__=JobParams,
        __doc__=JobParams.__doc__,
        text=(str, _text_field(max_text_chars)),
        grid_size=(Integer, _grid_size_field(max_grid_size)),
    )


class Progress(BaseModel):
    model_config = _STRICT

    step: int = Field(ge=0, description="Image tokens decoded so far.")
    total: int = Field(ge=1, description=f"Image tokens in all ({PROGRESS_TOTAL}).")


class FileRef(BaseModel):
    """A result file."""

    model_config = _STRICT

    url: str = Field(
        description="A presigned S3 URL (expires), or /v1/files/{key} on the API (needs the "
        "API key)."
    )
    key: str = Field(
        description="The storage key, which does not expire.", examples=["jobs/…/grid.png"]
    )


class JobResult(BaseModel):
    model_config = _STRICT

    grid: FileRef | None = Field(description="The whole grid as one PNG.")
    images: list[FileRef] = Field(description="The grid's tiles, row-major from 0.")
    previews: list[FileRef] = Field(
        default_factory=list,
        exclude_if=_no_items,
        description="Only with progressive_outputs: the grid at each stored frame.",
    )


class Job(BaseModel):
    """A job as the API answers it."""

    model_config = _STRICT

    id: JobId = Field(description="32 lowercase hex digits; ids sort by creation time.")
    status: JobStatus = Field(description="Only moves forward (a requeue aside).")
    progress: Progress
    params: JobParams = Field(description="As submitted, with the seed used.")
    created_at: str = Field(json_schema_extra={"format": "date-time"})
    started_at: str | None
    finished_at: str | None
    worker: str | None = Field(description="The worker that ran it last.")
    error: str | None = Field(description="Why it failed, or null.")
    attempts: int = Field(ge=0, description="How many times a worker started it.")
    cancel_requested: bool
    queue_position: int | None = Field(
        default=None,
        ge=1,
        description="While queued: the job's place in its lane among the queued jobs of its "
        "model, 1 next. The lane is params.priority, or interactive once a bulk job that "
        "waited too long was promoted (README: Priority lanes). Null once it has started, or "
        "when unknown.",
        examples=[3],
    )
    result: JobResult | None = Field(description="The files, once the job has succeeded.")
    warnings: list[str] = Field(
        default_factory=list,
        exclude_if=_no_items,
        description="Only in answers to POST, when there is one: e.g. the text is longer than "
        "the model reads.",
    )


class JobPage(BaseModel):
    """A page of the caller's jobs, newest first."""

    model_config = _STRICT

    jobs: list[Job]
    next_cursor: str | None = Field(
        description="Pass it as cursor for the next page; null: this is the last."
    )


@dataclasses.dataclass(frozen=True)
class FieldError:
    """One bad field (or header, query parameter, the body) and what to change."""

    __pydantic_config__ = ConfigDict(strict=True, extra="forbid")

    field: str
    message: str


class Problem(BaseModel):
    """An error answer, application/problem+json (RFC 9457)."""

    model_config = _STRICT

    type: str = Field(description="about:blank, or a tag: URI naming the problem.")
    title: str
    status: int = Field(ge=400, le=599)
    detail: str = Field(description="What happened and what to do.")
    errors: list[FieldError] = Field(
        default_factory=list,
        exclude_if=_no_items,
        description="Bad input: one entry per field, header or parameter.",
    )
    checks: dict[str, str] = Field(
        default_factory=dict,
        exclude_if=_no_items,
        description="/readyz only: 'ok' or the failure, per backend.",
    )
