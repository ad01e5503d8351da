# shellcheck shell=bash
# scripts/lib/docker.sh: make a Docker engine available. Sourced, not run:
#
#   . "$(dirname "$0")/lib/docker.sh"
#   ensure_docker
#
# ensure_docker
#   1. installs Debian's docker.io (apt-get) when the engine binary `dockerd`
#      is missing (a fresh CI machine only has a docker *client*);
#   2. returns at once when `docker info` already answers;
#   3. otherwise starts `dockerd` in the background, detached from this shell
#      (its own session, stdin from /dev/null, output to a log file) so that it
#      outlives the script and never holds CI's output pipe open;
#   4. waits until `docker info` answers (SHARDLOCK_DOCKER_WAIT seconds,
#      default 60). That a published port really reaches a container is checked
#      by `scripts/build-images.sh --verify` (psql through 127.0.0.1:<port>).
#
# Environment:
#   SHARDLOCK_DOCKERD_ARGS  extra dockerd flags; when set, used as-is and no
#                           fallback is attempted.
#   SHARDLOCK_DOCKER_WAIT   seconds to wait for the engine (default 60).
#   TMPDIR                  the daemon log goes to ${TMPDIR:-/tmp}/shardlock-dockerd.log
#
# dockerd flags, and why:
#   On this kind of machine (Debian bookworm VM, root, cgroup v1, iptables-nft,
#   ext4) dockerd 20.10 starts fine with its DEFAULTS: overlay2 storage, the
#   docker0 bridge and iptables NAT all work, and `-p 127.0.0.1::5432` is served
#   by docker-proxy (the userland proxy; iptables' DNAT rules skip 127/8), which
#   is exactly what testcontainers connects to. So nothing is forced.
#   Only when the default start fails do we retry ONCE with flags chosen from the
#   errors in the log:
#     - overlay/overlay2 errors (e.g. the data root sits on overlayfs itself)
#       -> --storage-driver=vfs (slow, copies layers, but works anywhere);
#     - iptables/nat/bridge errors (no netfilter in a nested sandbox)
#       -> --iptables=false --ip-masq=false. The docker0 bridge is KEPT: with
#          --bridge=none a container has no network at all and a published port
#          cannot work. Without iptables the userland docker-proxy still
#          forwards 127.0.0.1:PORT to the container's bridge address, which is
#          all the tests need (containers never need outbound traffic).
#   The containers' bridge addresses (172.17.0.0/16 by default) are network
#   namespaces this machine made for itself; the tests only ever connect to
#   127.0.0.1:<mapped port>.

_sl_docker_say() { printf '[test.sh] %s\n' "$*" >&2; }

_sl_docker_log() { printf '%s/shardlock-dockerd.log' "${TMPDIR:-/tmp}"; }

# Installs Debian packages, running `apt-get update` at most once per shell.
_sl_apt_install() {
    if [ -z "${_SL_APT_UPDATED:-}" ]; then
        _sl_docker_say "apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        _SL_APT_UPDATED=1
    fi
    _sl_docker_say "apt-get install -y $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# pid of a running dockerd, or nothing.
_sl_dockerd_pid() {
    local pid
    if [ -s /var/run/docker.pid ]; then
        pid=$(cat /var/run/docker.pid 2>/dev/null || true)
        if [ -n "$pid" ] && [ -d "/proc/$pid" ] &&
            grep -q dockerd "/proc/$pid/comm" 2>/dev/null; then
            printf '%s\n' "$pid"
            return 0
        fi
    fi
    return 1
}

# Starts dockerd with the given flags; returns 0 once `docker info` answers,
# 1 if the daemon died or the wait timed out.
_sl_dockerd_start() {
    local log wait pid i first
    log=$(_sl_docker_log)
    wait=${SHARDLOCK_DOCKER_WAIT:-60}
    # A pid file left behind by a machine that was stopped with dockerd running
    # makes dockerd refuse to start ("pid file found, ensure docker is not running").
    if [ -e /var/run/docker.pid ] && ! _sl_dockerd_pid >/dev/null; then
        _sl_docker_say "removing stale /var/run/docker.pid"
        rm -f /var/run/docker.pid
    fi
    _sl_docker_say "starting dockerd${*:+ $*} (log: $log)"
    first=$(($(wc -l <"$log" 2>/dev/null || echo 0) + 1))
    # setsid: own session, so the daemon survives this script and any
    # process-group kill aimed at the test run; no fd of ours stays open in it.
    setsid dockerd "$@" </dev/null >>"$log" 2>&1 &
    pid=$!
    for ((i = 0; i < wait * 2; i++)); do
        if docker info >/dev/null 2>&1; then
            _sl_docker_say "docker engine ready after $((i / 2))s (dockerd pid $pid)"
            return 0
        fi
        # ($! is dockerd itself: setsid only forks when it is a group leader,
        # which a background job of a script is not; the pid file covers that.)
        if ! kill -0 "$pid" 2>/dev/null && ! _sl_dockerd_pid >/dev/null; then
            _sl_docker_say "dockerd exited during start-up; last lines of $log:"
            tail -n +"$first" "$log" | tail -n 15 | sed 's/^/[test.sh]   /' >&2
            return 1
        fi
        sleep 0.5
    done
    _sl_docker_say "dockerd did not answer within ${wait}s; last lines of $log:"
    tail -n +"$first" "$log" | tail -n 15 | sed 's/^/[test.sh]   /' >&2
    kill "$pid" 2>/dev/null || true
    # Let it go (and drop its pid file) before anyone starts another one.
    for ((i = 0; i < 20; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
    done
    return 1
}

ensure_docker() {
    local log wait i errors fallback=()
    log=$(_sl_docker_log)
    wait=${SHARDLOCK_DOCKER_WAIT:-60}

    if ! command -v dockerd >/dev/null 2>&1; then
        _sl_docker_say "no docker engine (dockerd) on this machine: installing docker.io"
        _sl_apt_install docker.io
    fi
    if ! command -v docker >/dev/null 2>&1; then
        _sl_docker_say "no docker client: installing docker.io"
        _sl_apt_install docker.io
    fi

    if docker info >/dev/null 2>&1; then
        _sl_docker_say "docker engine already running"
        return 0
    fi

    # Someone (an earlier run, the package's postinst) is starting it: wait.
    if _sl_dockerd_pid >/dev/null; then
        _sl_docker_say "dockerd is running but not answering yet: waiting up to ${wait}s"
        for ((i = 0; i < wait * 2; i++)); do
            docker info >/dev/null 2>&1 && {
                _sl_docker_say "docker engine ready"
                return 0
            }
            sleep 0.5
        done
        _sl_docker_say "ERROR: dockerd (pid $(_sl_dockerd_pid)) does not answer; see $log"
        return 1
    fi

    : >"$log"
    if [ -n "${SHARDLOCK_DOCKERD_ARGS:-}" ]; then
        # shellcheck disable=SC2086  # word splitting of the flag list is intended
        _sl_dockerd_start $SHARDLOCK_DOCKERD_ARGS && return 0
        _sl_docker_say "ERROR: dockerd failed with SHARDLOCK_DOCKERD_ARGS='$SHARDLOCK_DOCKERD_ARGS'"
        return 1
    fi

    _sl_dockerd_start && return 0

    # Default start failed: pick fallback flags from the errors in the log
    # (error/fatal lines only: info lines mention bridge and overlay every time).
    errors=$(grep -iE 'level=(error|fatal)|failed to start daemon|error initializing' "$log" || true)
    if grep -qiE 'overlay|graphdriver|storage.driver|driver not supported' <<<"$errors"; then
        fallback+=(--storage-driver=vfs)
    fi
    if grep -qiE 'iptables|ip6tables|nat table|netfilter|bridge|docker0' <<<"$errors"; then
        fallback+=(--iptables=false --ip-masq=false)
    fi
    if [ "${#fallback[@]}" -eq 0 ]; then
        _sl_docker_say "ERROR: dockerd failed to start for an unrecognised reason; see $log"
        return 1
    fi
    _sl_docker_say "retrying dockerd with fallback flags: ${fallback[*]}"
    # A daemon that died half-way may leave its pid file behind.
    _sl_dockerd_pid >/dev/null || rm -f /var/run/docker.pid
    _sl_dockerd_start "${fallback[@]}" && return 0
    _sl_docker_say "ERROR: dockerd failed even with ${fallback[*]}; see $log"
    return 1
}
