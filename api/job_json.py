"""A JobRecord as the API shows it: core/job_json.py, where the workers' webhook deliveries
(worker/webhooks.py) build the same JSON; re-exported for the API's modules."""

from __future__ import annotations

from core.job_json import job_json, job_page_json

__all__ = ["job_json", "job_page_json"]
