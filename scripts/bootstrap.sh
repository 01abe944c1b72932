#!/usr/bin/env bash
# Install what gpufleet's commands and tests need on a fresh Debian/Ubuntu machine, idempotently:
# Python 3.10+ with venv (from apt when missing, as root), then .venv with gpufleet and its dev tools.
# Re-running changes nothing once everything is in place.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

need_apt=()
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    need_apt+=(python3 python3-venv python3-pip)
elif ! "$PYTHON" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 10))' >/dev/null 2>&1; then
    need_apt+=(python3-venv python3-pip)
fi
command -v git >/dev/null 2>&1 || need_apt+=(git)

if ((${#need_apt[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "bootstrap: missing ${need_apt[*]}; run as root or install them: apt-get install -y ${need_apt[*]}" >&2
        exit 1
    fi
    echo "bootstrap: apt-get install ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "bootstrap: creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi

stamp="$VENV/.gpufleet-installed"
if [[ ! -f "$stamp" || pyproject.toml -nt "$stamp" ]]; then
    echo "bootstrap: installing gpufleet and its dev tools into $VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e '.[dev]'
    touch "$stamp"
fi
