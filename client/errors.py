"""The errors the client raises, each saying what happened and, where the server said it, why.

FarmError                 every error of this package
├── TransportError        no answer: the connection failed or was cut
│   └── RequestTimeout    no answer within the client's timeout
├── ApiError              the server answered with an error; `.problem` holds its
│   │                     problem detail (RFC 9457) and `.status` the HTTP status
│   ├── BadRequest        400, 413, 415, 422: the request is not valid (`.problem.errors`)
│   ├── Unauthorized      401: no API key, or an unknown or revoked one
│   ├── NotFound          404: no such job or file for this key
│   ├── Conflict          409: an Idempotency-Key reused with another body, or a finished
│   │                     job canceled
│   ├── RateLimited       429: too many requests, still so after the retries
│   └── ServerError       5xx: the server or a backend failed, still so after the retries
├── JobFailed             wait(): the job ended failed or canceled; `.job` is the job
└── WaitTimeout           wait(): the job was not finished in time; `.job` is the last seen
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from client.jobs import Job


@dataclass(frozen=True)
class Problem:
    """A problem detail as the server sent it (application/problem+json), or one made up from
    a plain error answer (a proxy's HTML page, S3's XML) with the body's start as `detail`."""

    status: int
    title: str
    detail: str
    type: str = "about:blank"
    errors: list[dict[str, str]] = field(default_factory=list)
    body: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_response(cls, status: int, reason: str, content_type: str, content: bytes) -> Problem:
        """Parse an error answer; anything that is not a JSON object becomes the detail."""
        parsed: Any = None
        if "json" in content_type:
            try:
                parsed = json.loads(content)
            except ValueError:
                parsed = None
        if not isinstance(parsed, dict):
            text = content[:300].decode("utf-8", "replace").strip()
            return cls(status=status, title=reason, detail=text or reason)
        errors = parsed.get("errors")
        return cls(
            status=status,
            title=str(parsed.get("title") or reason),
            detail=str(parsed.get("detail") or parsed.get("title") or reason),
            type=str(parsed.get("type") or "about:blank"),
            errors=[error for error in errors if isinstance(error, dict)]
            if isinstance(errors, list)
            else [],
            body=parsed,
        )


class FarmError(Exception):
    """Every error of the dalle-farm client."""


class TransportError(FarmError):
    """The request got no answer: the connection was refused, reset or cut."""


class NoEventStream(FarmError):
    """The server answered, but with no event stream (an older farm)."""


class RequestTimeout(TransportError):
    """The server did not answer within the client's timeout."""


class ApiError(FarmError):
    """The server answered with an error status; `problem` is what it said."""

    def __init__(self, method: str, url: str, problem: Problem) -> None:
        super().__init__(f"{method} {url}: {problem.status} {problem.title}: {problem.detail}")
        self.method = method
        self.url = url
        self.problem = problem

    @property
    def status(self) -> int:
        return self.problem.status


class BadRequest(ApiError):
    """400, 413, 415 or 422: the request is not valid; `problem.errors` lists the fields."""


class Unauthorized(ApiError):
    """401: no API key, or an unknown or revoked one."""


class NotFound(ApiError):
    """404: no such job or file for this API key."""


class Conflict(ApiError):
    """409: an Idempotency-Key reused with another body, or a finished job canceled."""


class RateLimited(ApiError):
    """429: too many requests, and still so after the client's retries."""


class ServerError(ApiError):
    """5xx: the server or one of its backends failed, and still so after the retries."""


class JobFailed(FarmError):
    """wait(): the job ended failed or canceled."""

    def __init__(self, job: Job) -> None:
        reason = f": {job.error}" if job.error else ""
        super().__init__(f"job {job.id} {job.status}{reason}")
        self.job = job


class WaitTimeout(FarmError):
    """wait(): the job was still not finished when the time was up."""

    def __init__(self, job: Job, timeout_s: float) -> None:
        super().__init__(f"job {job.id} is still {job.status} after {timeout_s:g} s")
        self.job = job


_STATUS_ERRORS: dict[int, type[ApiError]] = {
    400: BadRequest,
    401: Unauthorized,
    404: NotFound,
    409: Conflict,
    413: BadRequest,
    415: BadRequest,
    422: BadRequest,
    429: RateLimited,
}


def api_error(method: str, url: str, problem: Problem) -> ApiError:
    """The ApiError subclass for the problem's status."""
    if problem.status >= 500:
        return ServerError(method, url, problem)
    return _STATUS_ERRORS.get(problem.status, ApiError)(method, url, problem)
