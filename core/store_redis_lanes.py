"""Priority lanes on Redis, a part of RedisJobStore (core/store_redis.py): queued jobs'
positions, and promoting overdue bulk jobs (the rule: core/lanes.py).

    {p}:queued-by-lane:{model}:{lane}   sorted set of the queued jobs of a model and lane, each
                                        scored by when it entered the lane (ms, Redis' clock)
    {p}:promoted:{model}                the promoted bulk job still queued, scored by when it
                                        was promoted

The scripts that create and move jobs (core/store_redis_lua.py) keep both in step with each
job's status atomically, from the job hash's _model and _lane fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from core.job import MODELS
from core.lanes import BULK, INTERACTIVE
from core.store import DEFAULT_MODEL, check_models, check_ttl
from core.store_redis_base import RedisBackend, text
from core.store_redis_lua import LANE_FIELD, MODEL_FIELD, PROMOTE_BULK

LanePlace = tuple[str, str | None, str]  # (model, lane or None, job id)


class RedisLanes(RedisBackend):
    """Queue positions and bulk promotion on Redis."""

    def _positions(self, places: list[LanePlace]) -> list[int | None]:
        """1-based ranks of (model, lane, id) in the lane indexes; None where in none. Call
        inside self._errors()."""
        with self._client.pipeline(transaction=False) as pipe:
            for model, lane, job_id in places:
                if lane is not None:
                    pipe.zrank(self._key("queued-by-lane", model, lane), job_id)
            ranks = iter(pipe.execute() if len(pipe) else [])
        positions: list[int | None] = []
        for _, lane, _ in places:
            rank = next(ranks) if lane is not None else None
            positions.append(None if rank is None else int(rank) + 1)
        return positions

    def count_queued_by_lane(self) -> dict[str, int]:
        """Queued jobs per lane, all models together (promoted bulk jobs are interactive)."""
        places = [(lane, model) for lane in (INTERACTIVE, BULK) for model in MODELS]
        with self._errors(), self._client.pipeline(transaction=False) as pipe:
            for lane, model in places:
                pipe.zcard(self._key("queued-by-lane", model, lane))
            counts = [int(count) for count in pipe.execute()]
        totals: dict[str, int] = {INTERACTIVE: 0, BULK: 0}
        for (lane, _), count in zip(places, counts, strict=True):
            totals[lane] += count
        return totals

    def promote_bulk_job(self, model: str, max_wait_s: float) -> list[str]:
        """Promote the model's oldest bulk job to the interactive lane once it has waited
        `max_wait_s`, one at a time (core/lanes.py); the ids to send to the interactive queue
        (none, or one)."""
        (name,) = check_models([model])
        check_ttl(max_wait_s)
        with self._errors():
            reply = self._script(PROMOTE_BULK)(
                keys=[
                    self._key("queued-by-lane", name, BULK),
                    self._key("queued-by-lane", name, INTERACTIVE),
                    self._key("promoted", name),
                ],
                args=[self._key_prefix, max(1, round(max_wait_s * 1000))],
            )
        return [text(job_id) for job_id in reply]

    def unfinished_jobs(self) -> list[tuple[str, str, str]]:
        """(model, lane, id) of every queued or running job: the jobs that should have a
        message in their model's queue (core/queue_audit.py). A running job's lane, and the
        lane of a queued job stored before lanes, is interactive."""
        with self._errors():
            indexes = [self._key("queued-by-model", model) for model in MODELS]
            running = self._key("jobs-by-status", "running", "*")
            indexes += self._client.scan_iter(match=running, count=1000)
            found = [text(i) for index in indexes for i in self._client.zrange(index, 0, -1)]
            ids = list(dict.fromkeys(found))  # a job that started meanwhile is in both
            with self._client.pipeline(transaction=False) as pipe:
                for job_id in ids:
                    pipe.hmget(self._key("job", job_id), "status", MODEL_FIELD, LANE_FIELD)
                fields: list[list[Any]] = pipe.execute() if ids else []
        places: list[tuple[str, str, str]] = []
        for job_id, (status, model, lane) in zip(ids, fields, strict=True):
            if status is None or text(status) not in ("queued", "running"):  # done meanwhile
                continue
            queued = text(status) == "queued" and lane is not None
            places.append(
                (
                    DEFAULT_MODEL if model is None else text(model),
                    text(lane) if queued else INTERACTIVE,
                    job_id,
                )
            )
        return places


def lane_key(fields: Mapping[Any, Any], job_id: str) -> LanePlace:
    """(model, lane, id) of a job from its hash; lane None for a job stored before lanes."""
    values = {text(name): value for name, value in fields.items()}
    model = values.get(MODEL_FIELD)
    lane = values.get(LANE_FIELD)
    return (
        DEFAULT_MODEL if model is None else text(model),
        None if lane is None else text(lane),
        job_id,
    )
