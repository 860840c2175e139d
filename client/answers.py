"""Reading the API's answers: which failures to retry, Retry-After, and jobs checked against
the contract (client.http uses these)."""

from __future__ import annotations

import time
from email.utils import parsedate_to_datetime
from typing import Any

import requests
from pydantic import ValidationError

from client.errors import FarmError
from client.jobs import Job


def is_retryable(status: int) -> bool:
    """408 (the request did not arrive whole in time), 429 (too many requests) and 5xx are worth
    retrying; other errors would fail again."""
    return status in (408, 429) or status >= 500


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After in seconds: delay-seconds or an HTTP date; None if absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(when.timestamp() - time.time(), 0.0)


def job_of(response: requests.Response, body: Any = None) -> Job:
    """The job in `response` (or `body`, one job of its page), checked against the contract."""
    body = json_of(response) if body is None else body
    if not isinstance(body, dict):
        raise not_the_contract(response, "it is not a JSON object")
    try:
        return Job.from_json(body)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, detail['loc'])) or 'the job'}: {detail['msg']}"
            for detail in error.errors(include_url=False)[:3]
        )
        raise not_the_contract(response, problems) from None


def not_the_contract(response: requests.Response, why: str) -> FarmError:
    return FarmError(
        f"{response.request.method} {response.url.split('?', 1)[0]}: the answer is not a job "
        f"of this client's API contract ({why}); is the server a farm of the same version?"
    )


def json_of(response: requests.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        raise FarmError(
            f"{response.request.method} {response.url.split('?', 1)[0]}: the answer "
            f"({response.status_code}, {response.headers.get('Content-Type')}) is not JSON; "
            "is the server URL the farm's API?"
        ) from None
