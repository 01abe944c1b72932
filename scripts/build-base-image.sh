#!/usr/bin/env bash
# Build the test bed's Debian base image, gpufleet/debian:bookworm, without any registry:
# debootstrap (minbase + ca-certificates) from this machine's own Debian mirror, then
# `tar | docker import`. Docker Hub is often unreachable on test machines and in air-gapped
# fleets, while the Debian mirror the machine already uses always is.
#
# Cached: does nothing when the image exists (pass --force to rebuild). Needs root (debootstrap).
#   GPUFLEET_DEBIAN_MIRROR  mirror URL to use instead of the one in /etc/apt/sources*
#   GPUFLEET_CACHE          cache folder (default: .cache/testbed in the repo, git-ignored)
#   GPUFLEET_BASE_IMAGE     image tag (default: gpufleet/debian:bookworm)
set -euo pipefail
cd "$(dirname "$0")/.."

SUITE=bookworm
IMAGE=${GPUFLEET_BASE_IMAGE:-gpufleet/debian:${SUITE}}
CACHE=${GPUFLEET_CACHE:-$PWD/.cache/testbed}
FORCE=0
for arg in "$@"; do
    case $arg in
        --force) FORCE=1 ;;
        -h | --help)
            sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "build-base-image.sh: unknown argument $arg (try --help)" >&2
            exit 2
            ;;
    esac
done

log() { echo "build-base-image.sh: $*" >&2; }
image_exists() { docker image inspect "$IMAGE" >/dev/null 2>&1; }

scripts/docker.sh

if ((FORCE == 0)) && image_exists; then
    log "$IMAGE exists (cached; --force rebuilds it)"
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    log "building $IMAGE needs root (debootstrap); run as root"
    exit 1
fi

mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd) # debootstrap wants absolute paths
# One build at a time: the e2e fixtures of several test runs may ask for the image together.
exec 9>"$CACHE/base-image.lock"
flock 9
if ((FORCE == 0)) && image_exists; then
    log "$IMAGE was built meanwhile by another run"
    exit 0
fi

# --- tools -----------------------------------------------------------------------------------
need_apt=()
command -v debootstrap >/dev/null 2>&1 || need_apt+=(debootstrap)
[[ -f /usr/share/keyrings/debian-archive-keyring.gpg ]] || need_apt+=(debian-archive-keyring)
if ((${#need_apt[@]})); then
    log "apt-get install ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

# --- mirror ----------------------------------------------------------------------------------
# The first enabled "deb" source for $SUITE with component main, from deb822 *.sources files or
# one-line *.list files; failing that, any Debian archive source (a mirror carries every suite).
# Never a hard-coded host: the machine may reach only its configured mirror.
configured_mirrors() {
    local files=()
    local etc=${APT_ETC:-/etc/apt} # APT_ETC: for trying this parser on other layouts
    [[ -f $etc/sources.list ]] && files+=("$etc/sources.list")
    for f in "$etc"/sources.list.d/*.list "$etc"/sources.list.d/*.sources; do
        [[ -f $f ]] && files+=("$f")
    done
    ((${#files[@]})) || return 0
    awk -v suite="$SUITE" '
        function emit(uri, suites, comps) {
            if (uri == "") return
            n = split(suites, s, /[ \t]+/)
            exact = 0
            for (i = 1; i <= n; i++) if (s[i] == suite) exact = 1
            if (exact && comps ~ /(^|[ \t])main([ \t]|$)/) print "1 " uri
            else if (uri ~ /\/debian\/?$/) print "2 " uri
        }
        function flush() {
            if (types ~ /(^|[ \t])deb([ \t]|$)/ && enabled !~ /^[ \t]*no/) { split(uris, u, /[ \t]+/); emit(u[1], suites, comps) }
            types = uris = suites = comps = enabled = ""
        }
        FNR == 1 { flush(); deb822 = (FILENAME ~ /\.sources$/) }
        deb822 {
            if ($0 ~ /^[ \t]*$/) { flush(); next }
            if ($0 ~ /^#/) next
            key = tolower($1); sub(/:$/, "", key); val = $0; sub(/^[^:]*:[ \t]*/, "", val)
            if (key == "types") types = val; else if (key == "uris") uris = val
            else if (key == "suites") suites = val; else if (key == "components") comps = val
            else if (key == "enabled") enabled = val
            next
        }
        $1 == "deb" {
            line = $0; sub(/^deb[ \t]+/, "", line); sub(/^\[[^]]*\][ \t]*/, "", line)
            split(line, f, /[ \t]+/); comps = line; sub(/^[^ \t]+[ \t]+[^ \t]+[ \t]*/, "", comps)
            emit(f[1], f[2], comps)
        }
        END { flush() }
    ' "${files[@]}" | grep -v -- '-security' | sort -s -k1,1 | awk '{print $2}'
}

MIRROR=${GPUFLEET_DEBIAN_MIRROR:-$(configured_mirrors | head -n 1)}
if [[ -z $MIRROR ]]; then
    log "no Debian mirror for $SUITE in /etc/apt/sources.list or /etc/apt/sources.list.d/*.{list,sources};"
    log "set GPUFLEET_DEBIAN_MIRROR=http://<your mirror>/debian"
    exit 1
fi

# --- debootstrap + import ---------------------------------------------------------------------
start=$SECONDS
rootfs=$CACHE/base-rootfs
debs=$CACHE/debootstrap-debs # kept between builds: a rebuild downloads nothing new
rm -rf "$rootfs"
mkdir -p "$rootfs" "$debs"
trap 'rm -rf "$rootfs"' EXIT

log "debootstrap --variant=minbase $SUITE from $MIRROR"
if ! debootstrap --variant=minbase --include=ca-certificates --cache-dir="$debs" \
    "$SUITE" "$rootfs" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1; then
    tail -n 20 "$CACHE/debootstrap.log" >&2
    [[ -f $rootfs/debootstrap/debootstrap.log ]] && tail -n 20 "$rootfs/debootstrap/debootstrap.log" >&2
    log "debootstrap failed; full log: $CACHE/debootstrap.log"
    exit 1
fi

# What the official images leave out too: package lists and downloaded .debs (apt-get update
# brings lists back), and logs that would differ on every build.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin \
    "$rootfs"/var/log/dpkg.log "$rootfs"/var/log/apt/* "$rootfs"/var/log/bootstrap.log
printf 'deb %s %s main\n' "$MIRROR" "$SUITE" >"$rootfs/etc/apt/sources.list"

log "docker import -> $IMAGE"
tar --numeric-owner -C "$rootfs" -c . | docker import \
    --change 'CMD ["/bin/bash"]' \
    --change "LABEL org.opencontainers.image.title=gpufleet-debian" \
    --change "LABEL org.opencontainers.image.description=\"Debian $SUITE minbase + ca-certificates, debootstrapped from $MIRROR for gpufleet's test bed\"" \
    --change "LABEL io.gpufleet.debian.mirror=$MIRROR" \
    --message "gpufleet: debootstrap --variant=minbase $SUITE $MIRROR" \
    - "$IMAGE" >/dev/null

log "built $IMAGE in $((SECONDS - start))s ($(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1 / 1e6}'))"
