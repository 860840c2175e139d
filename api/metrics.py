"""/metrics: the farm's state in Prometheus text, read from the store and queue at each scrape.

Nothing is counted in the API process, so every API process (and every API replica) answers
the same numbers. Labels never carry a job id or a key: only a job status, a lane or a model.

    dalle_farm_jobs{status}                 gauge      jobs in each status
    dalle_farm_queue_depth                  gauge      jobs waiting for a worker (a job canceled
                                                       or failed while queued never counts)
    dalle_farm_queue_depth_by_lane{lane}    gauge      the same per priority lane (interactive,
                                                       bulk; core/lanes.py)
    dalle_farm_job_duration_seconds         histogram  finished jobs' run time
    dalle_farm_images_generated_total       counter    images rendered
    dalle_farm_workers_alive                gauge      workers with a recent heartbeat
    dalle_farm_model_served{model}          gauge      1 while a live worker serves the model
"""

from __future__ import annotations

from collections.abc import Iterator

from flask import Blueprint, Response, request
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from api.services import Services
from core.job import MODELS, PRIORITIES, JobStatus
from core.queue import JobQueue
from core.store import DURATION_BUCKETS_S, JobStore


class FarmCollector(Collector):
    """Prometheus metric families from store.metrics(), store.served_models() and
    queue.depth()."""

    def __init__(self, store: JobStore, queue: JobQueue) -> None:
        self.store = store
        self.queue = queue

    def collect(self) -> Iterator[Metric]:
        snapshot = self.store.metrics()
        depth = self.queue.depth()

        jobs = GaugeMetricFamily("dalle_farm_jobs", "Jobs in each status.", labels=["status"])
        # Every status and only those: a store's stray key must not become a label.
        for status in JobStatus:
            jobs.add_metric([status.value], snapshot.jobs_by_status.get(status.value, 0))
        yield jobs

        yield GaugeMetricFamily(
            "dalle_farm_queue_depth", "Jobs waiting in the queue for a worker.", value=depth
        )
        lanes = GaugeMetricFamily(
            "dalle_farm_queue_depth_by_lane",
            "Jobs waiting for a worker, per priority lane (promoted bulk jobs are interactive).",
            labels=["lane"],
        )
        by_lane = self.queue.depth_by_lane()
        for lane in PRIORITIES:  # the known lanes only
            lanes.add_metric([lane], by_lane.get(lane, 0))
        yield lanes

        bounds = [*(floatToGoString(bound) for bound in DURATION_BUCKETS_S), "+Inf"]
        counts = snapshot.duration_bucket_counts
        if len(counts) != len(bounds):
            raise ValueError(
                f"the store's duration histogram has {len(counts)} buckets, expected "
                f"{len(bounds)} (DURATION_BUCKETS_S and +Inf)"
            )
        yield HistogramMetricFamily(
            "dalle_farm_job_duration_seconds",
            "Run time of finished jobs, from start to end.",
            buckets=list(zip(bounds, counts, strict=True)),
            sum_value=snapshot.duration_sum_s,
        )

        yield CounterMetricFamily(
            "dalle_farm_images_generated",
            "Images rendered by the farm's workers.",
            value=snapshot.images_generated,
        )
        yield GaugeMetricFamily(
            "dalle_farm_workers_alive",
            "Workers that sent a heartbeat recently.",
            value=snapshot.workers_alive,
        )

        served = self.store.served_models()
        models = GaugeMetricFamily(
            "dalle_farm_model_served", "1 while a live worker serves the model.", labels=["model"]
        )
        for model in MODELS:  # the known models only: a worker's odd name is no label
            models.add_metric([model], 1 if model in served else 0)
        yield models


def create_blueprint(services: Services) -> Blueprint:
    blueprint = Blueprint("metrics", __name__)
    # A registry of its own: the global one would mix in other apps' (and tests') collectors.
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FarmCollector(services.store, services.queue))

    @blueprint.get("/metrics")
    def metrics() -> Response:
        """Prometheus exposition, in the format the scraper's Accept header asks for."""
        encode, content_type = choose_encoder(request.headers.get("Accept", ""))
        return Response(encode(registry), headers={"Content-Type": content_type})

    return blueprint
