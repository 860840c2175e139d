#!/usr/bin/env bash
# The Python wheels that bench/bench_farm_gpu.py needs on a GPU machine with no package index,
# downloaded here into .carry/wheels (run where pip reaches PyPI; about 20 MB).
#
#   bench/carry_wheels.sh                 # the embedded farm (`dalle-farm serve`) and the bench
#   bench/carry_wheels.sh --distributed   # also Celery, Redis's client, moto; and redis-server
#
# The GPU image already has torch, triton, numpy, pillow, safetensors, requests, urllib3, jinja2,
# markupsafe, python-dateutil, six, tqdm, msgpack, pyarrow and pyyaml; every other package the
# farm imports comes from here, at the versions this checkout's .venv runs (a tested set), built
# for the GPU machine's Python (3.12, x86-64 manylinux). Installed there, offline, with:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/wheels/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
#
# (bench/gpu_farm_run.sh does exactly that). --no-deps: the list below is the whole closure, so
# pip never needs the index. With --distributed, redis-server comes as Debian packages unpacked
# into .carry/redis (run with PATH=$PWD/.carry/redis/usr/bin:$PATH and LD_LIBRARY_PATH=
# $PWD/.carry/redis/usr/lib/x86_64-linux-gnu, as gpu_farm_run.sh does); they are this machine's
# Debian build (bookworm), which needs glibc 2.36 and libssl3 on the GPU machine. About 45 MB
# in all with --distributed: the device tool carries at most 64 MiB with the working tree.
#
# .carry/ is added to .git/info/exclude (local, never committed); name it in the device tool's
# `carry` list.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON_VERSION=${PYTHON_VERSION:-3.12}
OUT=${CARRY_WHEELS_DIR:-.carry/wheels}
EMBEDDED=(
    flask werkzeug itsdangerous blinker click waitress
    pydantic pydantic_core annotated-types typing-inspection typing_extensions
    boto3 botocore s3transfer jmespath
    emoji swagger-ui-bundle-v2 prometheus_client redis async-timeout
    limits deprecated wrapt packaging
)
DISTRIBUTED=(
    celery kombu amqp billiard vine click-didyoumean click-repl click-plugins prompt_toolkit
    wcwidth tzdata
    moto responses xmltodict flask-cors cryptography cffi pycparser tzlocal
)
packages=("${EMBEDDED[@]}")
distributed=0
if [[ ${1:-} == --distributed ]]; then
    distributed=1
    packages+=("${DISTRIBUTED[@]}")
fi

# The version of each package in .venv (pip freeze), so the set is the one the tests ran.
freeze=$(.venv/bin/python -m pip freeze 2>/dev/null)
pins=()
for package in "${packages[@]}"; do
    pattern=$(echo "$package" | sed 's/[-_]/[-_]/g')
    pin=$(echo "$freeze" | grep -i -E "^${pattern}==" | head -1 || true)
    if [[ -z $pin ]]; then
        pin=$package  # not in .venv (tzdata, say): the newest
        echo "note: $package is not in .venv; taking the newest release" >&2
    fi
    pins+=("$pin")
done

mkdir -p "$OUT"
grep -qx '/.carry/' .git/info/exclude 2>/dev/null || echo '/.carry/' >>.git/info/exclude
platforms=()
for n in 17 27 28 31 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --dest "$OUT" \
    --python-version "$PYTHON_VERSION" --implementation cp --abi "cp${PYTHON_VERSION/./}" \
    --abi abi3 --abi none "${platforms[@]}" --platform manylinux2014_x86_64 --platform any \
    "${pins[@]}"

if ((distributed)); then
    mkdir -p .carry/redis .carry/debs
    (cd .carry/debs && apt-get download redis-server redis-tools libjemalloc2 liblzf1)
    for deb in .carry/debs/*.deb; do dpkg -x "$deb" .carry/redis; done
    rm -rf .carry/debs
fi
echo "$(ls "$OUT" | wc -l) wheels in $OUT ($(du -sh "$OUT" | cut -f1))"
