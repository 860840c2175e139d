"""Per-key limits: how many jobs a key may have queued or running at once, and how many
requests it may make in a time.

    DALLE_FARM_KEY_MAX_JOBS   jobs queued plus running per key (default 1000; 0: no limit)
    DALLE_FARM_KEY_RATE       requests per key, "R/s", "R/m" or "R/h" (default: none, no limit)

A key may have its own of either (`dalle-farm keys create --max-jobs N --rate R/s`, or
`dalle-farm keys set`), which replaces the farm's for that key. The job limit is checked by the
store in the same atomic step that creates the job (core/store.py), so concurrent submits
across API processes never pass it together; the rate is counted in Redis by the API
(api/limits.py), shared by every API process, or in memory in the embedded farm.

This module is pure: parsing and choosing, no I/O.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass

UNITS = {"s": "second", "m": "minute", "h": "hour"}
UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600}
NO_LIMIT = "none"
MAX_AMOUNT = 1_000_000
_RATE = re.compile(r"([1-9][0-9]{0,6})\s*/\s*([smh])")


@dataclass(frozen=True)
class Rate:
    """`amount` requests per `unit` ("s", "m" or "h")."""

    amount: int
    unit: str

    def __str__(self) -> str:
        return f"{self.amount}/{self.unit}"

    @property
    def window_s(self) -> int:
        return UNIT_SECONDS[self.unit]

    def describe(self) -> str:
        noun = "request" if self.amount == 1 else "requests"
        return f"{self.amount} {noun} per {UNITS[self.unit]}"


@functools.lru_cache(maxsize=1024)  # read for every request: the farm's rate, or the key's
def parse_rate(text: str | None) -> Rate | None:
    """A rate from "R/s", "R/m" or "R/h" (R a whole number from 1); None for "none" or
    nothing. ValueError says what is wrong."""
    if text is None or not text.strip() or text.strip().lower() == NO_LIMIT:
        return None
    match = _RATE.fullmatch(text.strip())
    if match is None or int(match.group(1)) > MAX_AMOUNT:
        raise ValueError(
            f"a rate is R/s, R/m or R/h with R a whole number from 1 to {MAX_AMOUNT} (say "
            f"10/s), or {NO_LIMIT!r}; got {text[:40]!r}"
        )
    return Rate(int(match.group(1)), match.group(2))


@dataclass(frozen=True)
class KeyLimits:
    """The limits that hold for one key: its own where it has them, else the farm's; None is
    no limit. `own_*`: whether the key set that limit itself (for messages)."""

    max_jobs: int | None
    rate: Rate | None
    own_max_jobs: bool = False
    own_rate: bool = False


def limits_for(
    key_max_jobs: int | None,
    key_rate: str | None,
    farm_max_jobs: int | None,
    farm_rate: Rate | None,
) -> KeyLimits:
    """What holds for a key with these own settings (None: the farm's) on this farm.
    A key's own 0 or "none" lifts the farm's limit for it."""
    own_jobs = key_max_jobs is not None
    own_rate = key_rate is not None
    return KeyLimits(
        max_jobs=(key_max_jobs or None) if own_jobs else farm_max_jobs,
        rate=parse_rate(key_rate) if own_rate else farm_rate,
        own_max_jobs=own_jobs,
        own_rate=own_rate,
    )


KEY_LIMITS = ("max_jobs", "rate")


def check_key_limits(limits: Mapping[str, int | str | None]) -> dict[str, int | str | None]:
    """A key's own limits, checked and written as stored: max_jobs a whole number from 0 (no
    limit) or None, rate as core.limits writes it ("10/s", "none") or None."""
    checked: dict[str, int | str | None] = {}
    for name, value in limits.items():
        if name not in KEY_LIMITS:
            raise ValueError(f"unknown key limit {name!r}; known: {', '.join(KEY_LIMITS)}")
        if value is None:
            checked[name] = None
        elif name == "max_jobs":
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or not 0 <= value <= MAX_AMOUNT
            ):
                raise ValueError(
                    f"max_jobs must be a whole number from 0 (no limit) to {MAX_AMOUNT}"
                )
            checked[name] = value
        else:
            rate = parse_rate(str(value))
            checked[name] = NO_LIMIT if rate is None else str(rate)
    return checked
