"""A Python client of the farm's REST API, and bulk dataset generation on top of it.

    from client import FarmClient
    with FarmClient("http://127.0.0.1:8000", api_key="…") as farm:
        job = farm.wait(farm.submit("a painting of a fox", seed=7).id)
        png = farm.download(job.images[0])

Torch-, Flask-, Celery- and boto3-free: it talks HTTP with requests.

    http.py      FarmClient: the API's calls, with timeouts, retries, idempotency, events
    answers.py   reading answers: what to retry, Retry-After, jobs checked against the contract
    jobs.py      Job and FileRef: the answers, checked against core.contract
    errors.py    the errors it raises (FarmError and its tree)
    rows.py      bulk input: prompt files (.txt, .csv, .jsonl) → rows → planned jobs
    dataset.py   bulk output: the folder's state, webdataset shards or files, the manifest
    bulk.py      run_bulk: planned jobs → a dataset, concurrently and resumably
"""

from client.errors import (
    ApiError,
    BadRequest,
    Conflict,
    FarmError,
    JobFailed,
    NoEventStream,
    NotFound,
    Problem,
    RateLimited,
    RequestTimeout,
    ServerError,
    TransportError,
    Unauthorized,
    WaitTimeout,
)
from client.http import API_KEY_ENV, SERVER_ENV, FarmClient, FileRef, Job

__all__ = [
    "API_KEY_ENV",
    "SERVER_ENV",
    "ApiError",
    "BadRequest",
    "Conflict",
    "FarmClient",
    "FarmError",
    "FileRef",
    "Job",
    "JobFailed",
    "NoEventStream",
    "NotFound",
    "Problem",
    "RateLimited",
    "RequestTimeout",
    "ServerError",
    "TransportError",
    "Unauthorized",
    "WaitTimeout",
]
