"""What the farm benchmarks (bench/bench_farm.py, bench/bench_farm_gpu.py) do around their work.

    prepare_process()   at the start of main: SIGTERM as Ctrl-C, a quiet moto, fake S3 credentials
    run_main(main)      under `if __name__ == "__main__"`: one line and exit status 130 when stopped

Both start a farm of their own inside `with` blocks (an ExitStack, a temporary folder), which
stop everything they started on the way out; SIGTERM raises KeyboardInterrupt as Ctrl-C does, so
that a terminated benchmark leaves nothing running either.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable
from types import FrameType

from tests.farm_helpers import AWS_ENV, AWS_ENV_REMOVED


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def prepare_process() -> None:
    """SIGTERM raises KeyboardInterrupt; moto's S3 server logs no requests; this process reads
    S3 (job.json, grids) with fake credentials, none of the machine's."""
    signal.signal(signal.SIGTERM, _interrupt)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    for name in AWS_ENV_REMOVED:
        os.environ.pop(name, None)
    os.environ.update(AWS_ENV)


def run_main(main: Callable[[], object]) -> None:
    """Run a benchmark's main; when interrupted (Ctrl-C, SIGTERM), say so and exit with 130."""
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted; everything this benchmark started is stopped", file=sys.stderr)
        sys.exit(130)
