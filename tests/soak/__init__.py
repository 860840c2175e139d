"""The chaos soak: the distributed farm on loopback under steady load and a fault schedule.

- `harness.py`: the farm (Redis with Sentinel, moto S3, two `dalle-farm api` processes, three
  `dalle-farm worker` processes on small random weights), the load and the faults.
- `checks.py`: the records, the invariants checked at the end, the recoveries, the report.
- `test_soak.py`: the CI form, 3 minutes (DALLE_FARM_SOAK_S overrides):
  `.venv/bin/python -m pytest -q -x tests/soak -s`.
- `__main__.py`: the long form, `python -m tests.soak --duration 1200`.

Each writes its report as JSON under test-artifacts/soak/.
"""
