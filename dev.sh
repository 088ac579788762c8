#!/usr/bin/env bash
# Set-up and everyday entry points. Creates .venv at the repo root on first use.
#   ./dev.sh demo   build the tiny LTX-2.3, quantize it, render two prompts
#   ./dev.sh test   run the test suite
set -euo pipefail
cd "$(dirname "$0")"

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
STAMP=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"

ensure_venv() {
    if [ ! -f "$STAMP" ]; then
        [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
        .venv/bin/pip install -q --upgrade pip
        # torch is pinned to 2.13.0 in pyproject.toml: the CPU build that lies on
        # these machines' disk (an unpinned torch pulls a multi-GB CUDA build).
        .venv/bin/pip install -q -e '.[dev]'
        rm -f .venv/.installed-*
        touch "$STAMP"
    fi
}

ensure_chromium() {
    # The HTML report test opens the report in Debian's headless chromium.
    command -v chromium >/dev/null && return
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
            || echo "dev.sh: could not install chromium; the browser test will be skipped" >&2
    fi
}

case "${1:-}" in
    demo)
        ensure_venv
        shift
        exec .venv/bin/hlwq demo "$@"
        ;;
    test)
        ensure_venv
        ensure_chromium
        shift
        exec .venv/bin/python -m pytest -q "$@"
        ;;
    *)
        echo "usage: ./dev.sh demo | ./dev.sh test [pytest args]" >&2
        exit 2
        ;;
esac
