#!/usr/bin/env bash
# The farm end to end on one GPU, in one command (issue 14): about 7–8 minutes on an H200.
#
#   bench/carry_wheels.sh            # first, where pip reaches PyPI: .carry/wheels (~25 MB)
#   bench/gpu_farm_run.sh            # on the GPU machine, from the repository root
#
# With the device tool: run(command="bench/gpu_farm_run.sh", carry=[".carry"], timeout_s=590).
# It installs the carried wheels offline into /tmp/site, then runs bench/bench_farm_gpu.py:
# Mega-size random weights in bfloat16 (written to $MODELS, /tmp/mega, on the first run),
# `dalle-farm serve` (embedded: SQLite, local files), its cold start, 64 and 256 4×4 jobs from 16
# client threads, $STEADY more jobs for the steady state (default 300), then the same 64 and 256
# jobs through the worker's Engine alone in the bench's process. The whole run is cut at
# $LIMIT_S seconds (default 470); the JSON is written after every part, so what finished is
# kept. Results: $OUT/farm-gpu.json, $OUT/run.log and $OUT/logs/farm.log ($OUT defaults to
# /tmp/gpu-farm-out when the device tool does not set it). A compact summary is printed at the
# end. Extra arguments go to bench_farm_gpu.py and win over the ones above (CPU smoke test:
# `bench/gpu_farm_run.sh --small --jobs 2 --steady-jobs 2 --baseline-jobs 1`). The distributed
# farm: `bench/carry_wheels.sh --distributed` here (about 45 MB), then
# `bench/gpu_farm_run.sh --mode distributed` there.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-/tmp/gpu-farm-out}
WHEELS=${WHEELS:-.carry/wheels}
MODELS=${MODELS:-/tmp/mega}
STEADY=${STEADY:-300}
LIMIT_S=${LIMIT_S:-470}
mkdir -p "$OUT"

if [[ -d $WHEELS ]]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site \
        "$WHEELS"/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    echo "no .carry/wheels: run bench/carry_wheels.sh where pip reaches PyPI, and carry .carry" >&2
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
if [[ -d .carry/redis ]]; then  # bench/carry_wheels.sh --distributed: redis-server's packages
    export PATH=$PWD/.carry/redis/usr/bin:$PATH
    export LD_LIBRARY_PATH=$PWD/.carry/redis/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

timeout --signal=TERM --kill-after=20 "$LIMIT_S" python3 -m bench.bench_farm_gpu \
    --models-root "$MODELS" --model mega --dtype bfloat16 --device cuda \
    --jobs 64,256 --clients 16 --grid-size 4 --max-jobs 64 --steady-jobs "$STEADY" \
    --out "$OUT/farm-gpu.json" --log-dir "$OUT/logs" "$@" 2>&1 | tee "$OUT/run.log"
status=${PIPESTATUS[0]}

# The compact summary, from the JSON: the table again only when the run was cut short (the
# bench prints it when it ends), then the steady state's GPU and graphs and the time split.
python3 - "$OUT/farm-gpu.json" "$status" <<'EOF'
import json, sys
try:
    results = json.load(open(sys.argv[1]))
except (OSError, ValueError) as error:
    sys.exit(f"no results: {error}")
from bench.farm_gpu_measure import summary
if sys.argv[2] != "0":
    print(summary(results))
steady = results.get("steady", {})
for key in ("gpu", "cuda_graphs"):
    if key in steady:
        print(f"steady {key}: {json.dumps(steady[key])}")
for name, part in results.items():
    if isinstance(part, dict) and "worker_time" in part:
        times = part["worker_time"].items()
        split = {k: v["mean"] for k, v in times if isinstance(v, dict) and "mean" in v}
        print(f"{name} worker time means (s): {json.dumps(split)}")
EOF
echo "bench exit status: $status (124: cut at ${LIMIT_S} s; the JSON keeps the finished parts)"
exit "$status"
