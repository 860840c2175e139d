"""Priority lanes: which queued job a worker takes next.

A job's params.priority puts it in a lane: `interactive` (the API's and the web app's default:
a person waits) or `bulk` (the default of `dalle-farm bulk` and client.bulk.run_bulk). The rule,
the same in both modes:

1. Workers take interactive jobs first, oldest first; bulk jobs, oldest first, only when no
   interactive job of their model waits.
2. Bulk work is never starved: once the oldest queued bulk job of a model has waited
   DALLE_FARM_BULK_MAX_WAIT_S (Settings.bulk_max_wait_s, default 300 s), it is *promoted*: it
   joins the back of the interactive lane, as if submitted interactive at that moment.
3. One promoted job per model at a time: the next is promoted only once the previous one has
   started. So a backlog of 10,000 old bulk jobs does not become 10,000 interactive ones (which
   would starve people again); an interactive job waits behind at most one bulk job per model
   more than it would without bulk work, and under interactive load that fills the farm, bulk
   work still moves: one job per model each time the interactive jobs queued ahead of the
   promoted one have started (looked at every PROMOTE_INTERVAL_S on the distributed farm).

How each mode does it:

- Distributed (Celery on Redis, core/queue_celery.py): two Celery queues per model,
  `dalle-farm.mini` and `dalle-farm.mini.bulk`; every worker consumes both, interactive first,
  with the Redis transport's `queue_order_strategy: "priority"` (BRPOP on the lists in that
  order, so the bulk list is read only when the interactive one is empty). Rule 2 cannot be
  decided when a job is queued, and kombu cannot look at a message's age, so each worker runs
  a BulkPromoter: every PROMOTE_INTERVAL_S one atomic store step (RedisJobStore.promote_bulk_job)
  picks the overdue bulk job and moves it to the interactive lane index, and the promoter sends
  a second message for it to the interactive queue. The bulk message stays where it is: when a
  worker takes it, the job is running or finished, and run_job drops it (a finished job is
  done; a running one's live lease defers the message until the job is finished). A promoted
  job still queued after another bound (its message lost, say) is sent again.
- Embedded (`dalle-farm serve`, core/queue_sqlite.py): the take orders the queue table by lane,
  then by the time each job entered its lane, and promotes in the same transaction.

Redis' numeric message priorities are not used: kombu emulates them on Redis with several lists
per queue (priority_steps), which a consumer reads in one BRPOP per step; combined with
prefetching, a worker can hold low-priority messages it reserved before higher ones arrived, and
a job's place cannot be shown. Separate queues read in a fixed order, with
worker_prefetch_multiplier=1 (a worker reserves only what its free job slots will run now), make
the rule exact and each lane's order a plain sorted set (queue_position).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from core.contract import DEFAULT_PRIORITY, PRIORITIES
from core.periodic import Periodic

log = logging.getLogger(__name__)

INTERACTIVE, BULK = PRIORITIES
# How often a worker's promoter looks for an overdue bulk job (at most; less for short bounds).
PROMOTE_INTERVAL_S = 5.0


def lane_of(params: Mapping[str, Any]) -> str:
    """A job's lane from its params: bulk only when they say so (records from before lanes
    existed have no priority, and are interactive)."""
    priority = params.get("priority", DEFAULT_PRIORITY)
    return BULK if priority == BULK else INTERACTIVE


class PromotingStore(Protocol):
    def promote_bulk_job(self, model: str, max_wait_s: float) -> list[str]:
        """Promote the model's overdue bulk job, if rule 2 and 3 allow one now; its id (or
        none). Atomic, so that several workers promoting at once promote one job."""
        ...


class BulkPromoter(Periodic):
    """Promotes overdue bulk jobs of `models` every `interval_s` on a daemon thread, and
    calls `send(job_id)` to queue each promoted job in the interactive lane. Never raises:
    failures are logged and the next round tries again (a job whose message could not be sent
    is sent again once it has waited another bound)."""

    def __init__(
        self,
        store: PromotingStore,
        models: list[str],
        max_wait_s: float,
        send: Callable[[str], None],
        *,
        interval_s: float | None = None,
    ) -> None:
        super().__init__(
            "bulk-promoter",
            min(PROMOTE_INTERVAL_S, max_wait_s / 4) if interval_s is None else interval_s,
        )
        self.store = store
        self.models = list(models)
        self.max_wait_s = max_wait_s
        self.send = send

    def start(self) -> BulkPromoter:
        log.info(
            "bulk jobs of %s that waited %g s are promoted (looked for every %g s)",
            ", ".join(self.models),
            self.max_wait_s,
            self.interval_s,
        )
        super().start()
        return self

    def run_once(self) -> list[str]:
        return self.promote_once()

    def promote_once(self) -> list[str]:
        """One round: the ids promoted and sent."""
        promoted: list[str] = []
        for model in self.models:
            try:
                for job_id in self.store.promote_bulk_job(model, self.max_wait_s):
                    self.send(job_id)
                    promoted.append(job_id)
                    log.info("bulk job %s waited %gs: promoted", job_id, self.max_wait_s)
            except Exception as error:  # a Redis blip: the next round tries again
                log.warning("could not promote %s bulk jobs: %s", model, error)
        return promoted
