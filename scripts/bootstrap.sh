#!/usr/bin/env bash
# Install what gpufleet's commands and tests need on a fresh Debian/Ubuntu machine, idempotently:
# Python 3.10+ with venv (from apt when missing, as root), then .venv with gpufleet and its dev tools,
# then a running Docker daemon for the e2e tests and the test bed (scripts/docker.sh; skipped with
# --no-docker). Re-running changes nothing once everything is in place.
set -euo pipefail
cd "$(dirname "$0")/.."

with_docker=1
for arg in "$@"; do
    case $arg in
        --no-docker) with_docker=0 ;;
        *)
            echo "bootstrap: unknown argument $arg (only --no-docker)" >&2
            exit 2
            ;;
    esac
done

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

need_apt=()
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    need_apt+=(python3 python3-venv python3-pip)
elif ! "$PYTHON" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 10))' >/dev/null 2>&1; then
    need_apt+=(python3-venv python3-pip)
fi
command -v git >/dev/null 2>&1 || need_apt+=(git)
# the test bed's signed mirror of stand-in packages: gpg signs, gpgv checks, busybox runs the
# stand-in nvidia-smi as it runs in a busybox-only container
command -v gpg >/dev/null 2>&1 || need_apt+=(gnupg)
command -v gpgv >/dev/null 2>&1 || need_apt+=(gpgv)
command -v busybox >/dev/null 2>&1 || need_apt+=(busybox)
# nginx: the gateway's integration tests run a real one on loopback from a temporary prefix.
# It lives in /usr/sbin, which a non-root PATH may lack, so look there too.
need_nginx=0
if ! command -v nginx >/dev/null 2>&1 && [[ ! -x /usr/sbin/nginx ]]; then
    need_nginx=1
fi
# promtool and amtool: the monitoring tests check and unit-test the rendered Prometheus rules and
# Alertmanager configuration. Their packages bring services that must not start either.
need_quiet=()
command -v promtool >/dev/null 2>&1 || need_quiet+=(prometheus)
command -v amtool >/dev/null 2>&1 || need_quiet+=(prometheus-alertmanager)

if ((${#need_apt[@]} || need_nginx || ${#need_quiet[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        missing="${need_apt[*]}"
        ((need_nginx)) && missing="${missing:+$missing }nginx-light (or nginx)"
        ((${#need_quiet[@]})) && missing="${missing:+$missing }${need_quiet[*]}"
        echo "bootstrap: missing $missing; run as root or install them with apt-get install -y" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    if ((${#need_apt[@]})); then
        echo "bootstrap: apt-get install ${need_apt[*]}"
        apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
    fi
    if ((need_nginx)); then
        # nginx-light where the release has it (Debian 12, Ubuntu 22.04), else nginx
        nginx_package=nginx
        apt-cache show nginx-light >/dev/null 2>&1 && nginx_package=nginx-light
        need_quiet=("$nginx_package" "${need_quiet[@]}")
    fi
    if ((${#need_quiet[@]})); then
        echo "bootstrap: apt-get install ${need_quiet[*]} (their services are not started)"
        # Installed without starting the packaged services (nginx would take port 80, Prometheus
        # and Alertmanager theirs; the tests run their own): a policy-rc.d that refuses every
        # start, only if none exists, removed afterwards even when the install fails.
        policy=/usr/sbin/policy-rc.d
        if [[ ! -e $policy ]]; then
            trap 'rm -f "$policy"' EXIT
            printf '#!/bin/sh\n# bootstrap.sh: no service starts while these packages install\nexit 101\n' >"$policy"
            chmod 755 "$policy"
            apt-get install -y -qq --no-install-recommends "${need_quiet[@]}" >/dev/null
            rm -f "$policy"
            trap - EXIT
        else
            apt-get install -y -qq --no-install-recommends "${need_quiet[@]}" >/dev/null
        fi
    fi
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

# Docker: the e2e tier and the one-machine test bed run containers (scripts/docker.sh installs
# docker.io and starts dockerd when no daemon answers; nothing when one does).
if ((with_docker)); then
    scripts/docker.sh
fi
