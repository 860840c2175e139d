# Sourced by scripts/test and scripts/demo: create .venv on first use and install the project.
#   ensure_venv EXTRAS    e.g. ensure_venv '[test]' or ensure_venv ''
# torch is installed first and pinned: a bare `torch` requirement resolves to the newest release,
# which on Linux comes with several GB of CUDA packages. Override for another build, e.g.
# TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu".

venv=${DALLE_FARM_VENV:-.venv}
python="$venv/bin/python"

ensure_venv() {
    local extras=$1
    if [ ! -x "$python" ]; then
        if ! python3 -m venv "$venv"; then
            echo "cannot create a virtual environment; on Debian/Ubuntu run" \
                 "'sudo apt-get install python3-venv' (Python 3.10 or newer) and try again" >&2
            exit 1
        fi
    fi
    if ! "$python" -c "import torch" 2>/dev/null; then
        # shellcheck disable=SC2086  # TORCH_SPEC may carry pip options
        "$python" -m pip install --quiet ${TORCH_SPEC:-torch==2.13.0}
    fi
    "$python" -m pip install --quiet -e ".$extras"
}

ensure_redis_server() {
    # The integration tests start their own redis-server processes.
    if ! command -v redis-server >/dev/null; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
        else
            echo "redis-server is needed by the tests: sudo apt-get install redis-server" >&2
            exit 1
        fi
    fi
}

ensure_chromium() {
    # tests/test_docs_browser.py opens /docs in headless Chromium. Debian's package, because
    # Playwright's own browser download needs more internet than PyPI and Debian.
    if ! command -v chromium >/dev/null; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            apt-get update -qq && apt-get install -y -qq chromium >/dev/null
        else
            echo "chromium is needed by the tests: sudo apt-get install chromium" >&2
            exit 1
        fi
    fi
}
