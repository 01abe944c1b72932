#!/usr/bin/env bash
# Make sure a Docker daemon answers, idempotently: the e2e tests and the one-machine test bed run
# their simulated GPU hosts and engine containers on it.
#
#   - a daemon already answers (`docker info`)   -> nothing to do, exit 0 at once
#   - the client or dockerd is missing           -> apt-get install docker.io (root; Debian/Ubuntu)
#   - no daemon answers                          -> start dockerd in the background (no systemd is
#                                                   assumed: test machines and CI containers often
#                                                   have none), log to $DOCKERD_LOG, wait <= 60 s
#
# dockerd starts with its defaults (overlay2, iptables). Only when it dies on start does this
# script look at why and retry with the narrowest fallback, printing what it chose:
#   iptables/nat errors   -> --iptables=false --ip6tables=false: kernels or sandboxes without
#                            netfilter NAT. Publishing on 127.0.0.1 still works (docker-proxy);
#                            containers just get no outbound NAT, which builds here never need.
#   overlay/storage errors -> --storage-driver=vfs: /var/lib/docker on a filesystem overlayfs
#                            cannot sit on (overlay-on-overlay). Slower and bigger, but works.
# GPUFLEET_DOCKERD_FLAGS="..." replaces the defaults outright (no fallbacks).
set -euo pipefail

DOCKERD_LOG=${DOCKERD_LOG:-/var/log/gpufleet-dockerd.log}
WAIT_S=${DOCKER_WAIT_S:-60}
PIDFILE=${DOCKERD_PIDFILE:-/var/run/docker.pid} # dockerd's default; overridable for trying this script

log() { echo "docker.sh: $*" >&2; }

daemon_answers() { command -v docker >/dev/null 2>&1 && timeout 10 docker info >/dev/null 2>&1; }

if daemon_answers; then
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    log "no Docker daemon answers and this is not root: run 'sudo $0', or start Docker and add $(id -un) to the docker group"
    exit 1
fi

# --- install -------------------------------------------------------------------------------
# /usr/local/bin/docker (a lone client) may exist without a daemon, so check dockerd as well.
if ! command -v docker >/dev/null 2>&1 || ! command -v dockerd >/dev/null 2>&1; then
    if ! command -v apt-get >/dev/null 2>&1; then
        log "Docker is missing and there is no apt-get to install it; install Docker Engine and re-run"
        exit 1
    fi
    log "apt-get install docker.io"
    export DEBIAN_FRONTEND=noninteractive
    # Without systemd, docker.io's postinst would try to start the daemon through invoke-rc.d; keep
    # it from doing so (the standard policy-rc.d mechanism) and start it below, where we watch it.
    policy=/usr/sbin/policy-rc.d
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        trap 'rm -f "$policy"' EXIT
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends docker.io >/dev/null
    rm -f "$policy"
    trap - EXIT
    hash -r
fi

# --- start ---------------------------------------------------------------------------------
mkdir -p "$(dirname "$DOCKERD_LOG")"
touch "$DOCKERD_LOG"

# A stale pid file from a dockerd that died (or a previous VM boot) makes dockerd refuse to start.
pidfile=$PIDFILE
if [[ -f $pidfile ]] && ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    rm -f "$pidfile"
fi
if [[ -f $pidfile ]]; then
    # dockerd runs but does not answer yet (still starting); just wait for it below
    running_pid=$(cat "$pidfile")
else
    running_pid=""
fi

# start_dockerd FLAGS...: start dockerd detached (setsid: it must outlive make's and pytest's
# process groups) and wait until it answers; return 1 if it exits first, 2 if it never answers.
start_dockerd() {
    local offset pid waited=0
    offset=$(stat -c %s "$DOCKERD_LOG")
    log "starting dockerd ${*:-(default flags)} (log: $DOCKERD_LOG)"
    setsid nohup dockerd "$@" >>"$DOCKERD_LOG" 2>&1 </dev/null &
    pid=$!
    while ((waited < WAIT_S)); do
        if daemon_answers; then
            log "dockerd is up (pid $pid, ${waited}s)"
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            START_ERRORS=$(tail -c +"$((offset + 1))" "$DOCKERD_LOG" | grep -iE 'level=(error|fatal)|failed' | tail -n 5 || true)
            return 1
        fi
        sleep 1
        waited=$((waited + 1))
    done
    START_ERRORS="dockerd (pid $pid) did not answer within ${WAIT_S}s"
    return 2
}

if [[ -n $running_pid ]]; then
    for ((i = 0; i < WAIT_S; i++)); do
        daemon_answers && exit 0
        sleep 1
    done
    log "dockerd (pid $running_pid) runs but does not answer after ${WAIT_S}s; see $DOCKERD_LOG"
    exit 1
fi

START_ERRORS=""
if [[ -n ${GPUFLEET_DOCKERD_FLAGS:-} ]]; then
    # shellcheck disable=SC2086  # word splitting is the point
    start_dockerd $GPUFLEET_DOCKERD_FLAGS && exit 0
    log "dockerd failed with GPUFLEET_DOCKERD_FLAGS=$GPUFLEET_DOCKERD_FLAGS:"$'\n'"$START_ERRORS"
    exit 1
fi

flags=()
for attempt in 1 2 3; do
    rc=0
    start_dockerd "${flags[@]}" || rc=$?
    ((rc == 0)) && exit 0
    if ((rc == 2)); then
        log "$START_ERRORS; see $DOCKERD_LOG"
        exit 1
    fi
    log "dockerd exited on start (attempt $attempt):"$'\n'"$START_ERRORS"
    changed=0
    if grep -qiE 'iptables|ip6tables|NAT chain|netfilter|nf_tables' <<<"$START_ERRORS" && [[ " ${flags[*]} " != *" --iptables=false "* ]]; then
        log "falling back to --iptables=false --ip6tables=false (no netfilter NAT here)"
        flags+=(--iptables=false --ip6tables=false)
        changed=1
    fi
    if grep -qiE 'overlay|storage.driver|graphdriver|driver not supported' <<<"$START_ERRORS" && [[ " ${flags[*]} " != *" --storage-driver=vfs "* ]]; then
        log "falling back to --storage-driver=vfs (overlayfs unusable on /var/lib/docker)"
        flags+=(--storage-driver=vfs)
        changed=1
    fi
    if ((changed == 0)); then
        log "no known fallback for that error; see $DOCKERD_LOG"
        exit 1
    fi
done
log "dockerd would not start; see $DOCKERD_LOG"
exit 1
