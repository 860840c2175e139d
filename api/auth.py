"""Who is calling: an API key sent as `Authorization: Bearer <secret>`, or, for the embedded
`serve` bound to loopback, one anonymous owner that needs no key.

The owner of a request is the id of its key (never the secret); jobs record it, and a caller only
ever sees its own jobs.
"""

from __future__ import annotations

from http import HTTPStatus

from flask import Blueprint, g, request

from api.problems import Problem
from core.store import ApiKey, JobStore

_CHALLENGE = 'Bearer realm="dalle-farm"'


def require_owner(blueprint: Blueprint, store: JobStore, anonymous_owner: str | None) -> None:
    """Authenticate every request to `blueprint` before its view runs (401 problem if not)."""

    @blueprint.before_request
    def authenticate() -> None:
        key = None if anonymous_owner is not None else _key(store)
        g.key = key  # its own limits (api/limits.py)
        g.owner = anonymous_owner if key is None else key.id


def current_owner() -> str:
    """The owner of the current request; set by require_owner."""
    owner: str = g.owner
    return owner


def _key(store: JobStore) -> ApiKey:
    header = request.headers.get("Authorization")
    if header is None:
        raise _unauthorized(
            "this request needs an API key: send it as 'Authorization: Bearer <key>' "
            "(the farm's operator creates keys with the dalle-farm command)",
            _CHALLENGE,
        )
    scheme, _, secret = header.strip().partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not secret:
        raise _unauthorized(
            "the Authorization header must be 'Bearer <key>'",
            f'{_CHALLENGE}, error="invalid_request"',
        )
    key = store.authenticate(secret)
    if key is None:
        # One answer for unknown and revoked keys: it tells a guesser nothing.
        raise _unauthorized(
            "the API key is unknown or has been revoked; ask the farm's operator for a valid key",
            f'{_CHALLENGE}, error="invalid_token"',
        )
    return key


def _unauthorized(detail: str, challenge: str) -> Problem:
    return Problem(
        HTTPStatus.UNAUTHORIZED,
        detail,
        slug="unauthorized",
        headers={"WWW-Authenticate": challenge},
    )
