"""The chaos soak's long form: `python -m tests.soak --duration 1200` (seconds).

Builds small random weights in a temporary directory (as the tests' small_models_root does),
runs the farm under load and faults for the duration (tests/soak/harness.py), checks every
accepted job, prints the report table and writes it as JSON under test-artifacts/soak/.
Exits 1 if any invariant is broken (the problems are printed).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

from model.weights.random_weights import SMALL_CONFIG, write_random_weights
from tests.farm_helpers import REPO_ROOT
from tests.soak.harness import SoakConfig, run_soak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__)
    parser.add_argument("--duration", type=float, default=1200, help="seconds (default 1200)")
    parser.add_argument("--submit-interval", type=float, default=4.0, help="seconds per job")
    parser.add_argument("--fault-interval", type=float, default=None, help="seconds per fault")
    parser.add_argument("--seed", type=int, default=16, help="the fault schedule's seed")
    parser.add_argument("--report-dir", type=Path, default=REPO_ROOT / "test-artifacts" / "soak")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with tempfile.TemporaryDirectory(prefix="dalle-farm-soak-") as work:
        models_root = Path(work) / "small-model"
        write_random_weights(models_root, SMALL_CONFIG, is_mega=False, seed=1)
        report = run_soak(
            SoakConfig(
                duration_s=args.duration,
                models_root=models_root,
                work_dir=Path(work),
                report_dir=args.report_dir,
                submit_interval_s=args.submit_interval,
                fault_interval_s=args.fault_interval,
                seed=args.seed,
            )
        )
    print(report.table())
    for problem in report.problems:
        print(f"PROBLEM: {problem}")
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
