"""The chaos soak, CI form: the distributed farm on loopback (Redis with Sentinel, moto S3, two
API processes, three workers) for 3 minutes of steady interactive and bulk load while every
fault kind happens at least once (kill -9 of a worker, SIGTERM of a rendering worker, Redis
failover, S3 down for 20 s, an API restart). DALLE_FARM_SOAK_S sets the duration in seconds.

Run: `.venv/bin/python -m pytest -q -x tests/soak -s`; the long form is
`python -m tests.soak --duration 1200` (tests/soak/__main__.py). The report table is printed and
written as JSON under test-artifacts/soak/. The test asserts the invariants, not timings.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from tests.farm_helpers import REPO_ROOT
from tests.soak.harness import FAULT_KINDS, SoakConfig, run_soak

DURATION_S = float(os.environ.get("DALLE_FARM_SOAK_S", "180"))


def test_nothing_is_lost_duplicated_or_stuck_under_faults(
    small_models_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="soak")
    report = run_soak(
        SoakConfig(
            duration_s=DURATION_S,
            models_root=small_models_root,
            work_dir=tmp_path,
            report_dir=REPO_ROOT / "test-artifacts" / "soak",
        )
    )
    print(f"\n{report.table()}")
    assert report.accepted > 0 and report.succeeded > 0
    assert set(report.faults) == set(FAULT_KINDS), report.fault_log
    assert not report.problems, "\n".join(report.problems)
    assert report.succeeded + report.failed == report.accepted
