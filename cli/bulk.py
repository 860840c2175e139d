"""`dalle-farm bulk`: a dataset from a file of prompts, rendered by a farm over its REST API.

    dalle-farm bulk prompts.txt --out dataset/ --server http://farm:8000 --key KEY \\
        --seeds-per-prompt 4 --grid-size 1 --concurrency 8

Reads and checks the whole input first (a bad line is reported with its number, and nothing is
submitted), then submits with at most --concurrency jobs in flight, downloads each job's images
and writes them as webdataset shards or plain files, with a parquet manifest (see
client.dataset). Running the same command again resumes: finished jobs are skipped, submitted
ones re-attached (by their Idempotency-Keys), failed ones retried up to --max-attempts.

Ctrl-C (or SIGTERM) stops cleanly: nothing is left half-written, and the jobs already submitted
keep running on the farm for the next run to collect. A second Ctrl-C quits at once. The exit
status is 0 when the dataset is complete, 1 when jobs failed (they are listed), 130 when
stopped. The client package is imported inside `run` only; see `cli.main`.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from cli.main import EXIT_ERROR, EXIT_INTERRUPTED, CommandError

if TYPE_CHECKING:
    from client.bulk import BulkResult
    from client.rows import PlannedJob

# Failures listed one per line at the end before "and N more".
FAILURES_SHOWN = 50
PLAN_SHOWN = 10


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``bulk`` sub-parser."""
    parser = subparsers.add_parser(
        "bulk",
        help="render a file of prompts into a dataset on a farm (resumable)",
        description="Render every prompt of PROMPTS (.txt: one per line; .csv or .jsonl: a "
        "prompt column, optional seed and settings) on a farm, into webdataset shards or "
        "files with a parquet manifest. Run the same command again to resume.",
    )
    parser.add_argument("prompts", type=Path, metavar="PROMPTS", help=".txt, .csv or .jsonl")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="dataset folder")
    parser.add_argument(
        "--server",
        default=None,
        metavar="URL",
        help="the farm's API (default: $DALLE_FARM_SERVER, else http://127.0.0.1:8000)",
    )
    parser.add_argument(
        "--key", default=None, metavar="KEY", help="API key (default: $DALLE_FARM_API_KEY)"
    )
    parser.add_argument(
        "--seeds-per-prompt",
        type=_positive_int,
        default=1,
        metavar="N",
        help="jobs per prompt, each with its own seed (default: %(default)s)",
    )
    settings = parser.add_argument_group(
        "generation settings", "defaults for rows that do not set their own (default: the API's)"
    )
    settings.add_argument("--grid-size", type=int, metavar="N", help="grid_size² images per job")
    settings.add_argument("--temperature", type=float, metavar="T")
    settings.add_argument("--top-k", type=int, metavar="K")
    settings.add_argument("--supercondition-factor", type=float, metavar="F")
    settings.add_argument("--seamless", action="store_true", default=None, help="is_seamless")
    settings.add_argument("--model", choices=("mini", "mega"))
    parser.add_argument(
        "--concurrency",
        type=_positive_int,
        default=4,
        metavar="N",
        help="jobs in flight at once (default: %(default)s)",
    )
    parser.add_argument(
        "--priority",
        choices=("bulk", "interactive"),
        default="bulk",
        help="the jobs' lane on the farm: its workers take interactive jobs first, and bulk "
        "ones when none waits (default: %(default)s)",
    )
    parser.add_argument(
        "--format",
        choices=("webdataset", "files"),
        default="webdataset",
        help="tar shards with a parquet each, or a plain folder (default: %(default)s)",
    )
    parser.add_argument(
        "--shard-size",
        type=_positive_int,
        default=1000,
        metavar="N",
        help="images per webdataset shard (default: %(default)s)",
    )
    parser.add_argument(
        "--max-attempts",
        type=_positive_int,
        default=3,
        metavar="N",
        help="failed attempts of a job, over all runs, before it is given up (default: "
        "%(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds to wait for each answer (default: %(default)s)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="check the input and show the plan; submit nothing"
    )


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def run(args: argparse.Namespace) -> int:
    """Run the bulk command; return the exit status."""
    from client.bulk import BulkOptions, run_bulk
    from client.dataset import OutputError
    from client.errors import FarmError
    from client.http import FarmClient
    from client.rows import InputError, dataset_id, plan_jobs, read_rows
    from core.job import InvalidParams, parse_params

    defaults = _settings(args)
    try:
        parse_params({"text": "-", **defaults}, max_grid_size=16)
    except InvalidParams as error:
        raise CommandError(f"the generation settings are not valid: {error}") from None
    try:
        rows = read_rows(args.prompts)
        jobs = plan_jobs(rows, defaults, args.seeds_per_prompt, source=str(args.prompts))
        options = BulkOptions(
            out_dir=args.out,
            format=args.format,
            concurrency=args.concurrency,
            max_attempts=args.max_attempts,
            shard_size=args.shard_size,
            priority=args.priority,
        )
    except (InputError, ValueError) as error:
        raise CommandError(error) from None
    dataset = dataset_id(jobs)
    if args.dry_run:
        _show_plan(args, len(rows), jobs, dataset)
        return 0

    stop = threading.Event()
    try:
        client = FarmClient(args.server, args.key, timeout_s=args.timeout, sleep=stop.wait)
    except ValueError as error:
        raise CommandError(error) from None
    with client, _stop_on_signals(stop):
        try:
            client.list_page(limit=1)  # fail fast, once, on a wrong URL or key
        except FarmError as error:
            raise CommandError(f"cannot use the farm at {client.server}: {error}") from None
        try:
            result = run_bulk(client, jobs, dataset, options, progress=_progress_bar, stop=stop)
        except (OutputError, OSError) as error:
            raise CommandError(error) from None
    return _report(result, args.out)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    given = {
        "grid_size": args.grid_size,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "supercondition_factor": args.supercondition_factor,
        "is_seamless": args.seamless,
        "model": args.model,
    }
    return {name: value for name, value in given.items() if value is not None}


def _progress_bar(total: int, initial: int) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total, initial=initial, desc="bulk", unit="job", file=sys.stderr, smoothing=0.05
    )


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """Ctrl-C and SIGTERM set `stop` (the run winds down cleanly); a second one quits now."""

    def handle(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print(
            "\nstopping after the current steps; the submitted jobs keep running on the farm "
            "(Ctrl-C again to quit at once)",
            file=sys.stderr,
        )

    previous = {number: signal.signal(number, handle) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _report(result: BulkResult, out: Path) -> int:
    done = f"{result.finished} of {result.planned} jobs are in {out}"
    if result.stopped:
        print(f"stopped: {done}; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    if result.failures:
        failures = sorted(result.failures, key=lambda failure: failure.job.key)
        for failure in failures[:FAILURES_SHOWN]:
            job = failure.job
            print(
                f"failed: line {job.line} (row {job.row}, sample {job.sample}, "
                f"seed {job.params['seed']}): {failure.error}",
                file=sys.stderr,
            )
        if len(failures) > FAILURES_SHOWN:
            print(f"… and {len(failures) - FAILURES_SHOWN} more", file=sys.stderr)
        print(
            f"{len(failures)} jobs failed; {done}. Run the same command again to retry them",
            file=sys.stderr,
        )
        return EXIT_ERROR
    print(f"done: {done}; manifest: {result.manifest}")
    return 0


def _show_plan(args: argparse.Namespace, rows: int, jobs: list[PlannedJob], dataset: str) -> None:
    images = sum(job.params["grid_size"] ** 2 for job in jobs)
    shards = f", shards of {args.shard_size} images" if args.format == "webdataset" else ""
    print(f"{args.prompts}: {rows} rows → {len(jobs)} jobs, {images} images")
    print(f"into {args.out} ({args.format}{shards}); dataset id {dataset[:16]}")
    state = args.out / ".bulk" / "dataset.json"
    if state.exists():
        same = json.loads(state.read_text()).get("dataset") == dataset
        finished = len([path for path in (args.out / ".bulk" / "jobs").glob("*_???.json")])
        print(
            f"{args.out} holds this dataset: {finished} jobs done"
            if same
            else f"{args.out} holds another dataset: a run would be refused"
        )
    for job in jobs[:PLAN_SHOWN]:
        params = job.params
        print(
            f"  line {job.line:<5} {job.key}  seed {params['seed']:<10}  grid {params['grid_size']}"
            f"  {params['model']}  {job.prompt[:60]!r}"
        )
    if len(jobs) > PLAN_SHOWN:
        print(f"  … and {len(jobs) - PLAN_SHOWN} more")
    print("nothing submitted (--dry-run)")
