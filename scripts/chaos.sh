#!/usr/bin/env bash
# The long fault-injection run: real `shardlock node` processes (3 nodes,
# 12 shards) under random faults from a fixed seed, on PostgreSQL (default
# timings and --poll-ms 300) and on SQLite; writes RELIABILITY.md.
#
#   scripts/chaos.sh                       300 faults per setting, one after the other
#   scripts/chaos.sh --parallel            the settings at the same time (faster)
#   scripts/chaos.sh --faults 50 --settings postgres-poll300
#   SHARDLOCK_CHAOS_SEED=123 scripts/chaos.sh   replay a schedule
#
# Options:
#   --faults N        faults per setting (default 300)
#   --settings LIST   comma separated, from postgres-default, postgres-poll300,
#                     sqlite-default, sqlite-poll300
#                     (default postgres-default,postgres-poll300,sqlite-poll300)
#   --parallel        run the settings concurrently (own nodes, container and
#                     firewall chain each)
#   --release         build the nodes with --release
#   --out FILE        report path (default RELIABILITY.md)
#   --keep            keep every work folder (node logs and records)
#
# Needs root (iptables for the network-cut faults; installed with apt-get if
# missing, else those faults are skipped with a loud line) and Docker with
# the image shardlock-test/postgres:15 (built by scripts/build-images.sh), or
# SHARDLOCK_PG_URL (then no server restarts). The harness is the test
# `chaos_long` in cli/tests/faults.rs; every firewall chain (SHARDLOCK_CHAOS_*)
# and container (label shardlock.test=chaos) it makes is removed on exit, on
# failure and on ctrl-c, here too.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "[chaos.sh] $*" >&2; }

faults=300
settings=postgres-default,postgres-poll300,sqlite-poll300
parallel=0
profile=()
out=RELIABILITY.md
keep=0
args_seen="$*"
while [ $# -gt 0 ]; do
    case "$1" in
    --faults) faults=$2; shift ;;
    --settings) settings=$2; shift ;;
    --parallel) parallel=1 ;;
    --release) profile=(--release) ;;
    --out) out=$2; shift ;;
    --keep) keep=1 ;;
    -h | --help) sed -n '2,29p' "$0"; exit 0 ;;
    *) log "unknown option $1"; exit 2 ;;
    esac
    shift
done

# Removes firewall chains and containers of chaos runs whose process is gone.
cleanup() {
    if command -v iptables >/dev/null 2>&1; then
        iptables -w -S 2>/dev/null | sed -n 's/^-N \(SHARDLOCK_CHAOS[A-Za-z0-9_]*\)$/\1/p' |
            while read -r chain; do
                pid=$(echo "$chain" | cut -d_ -f3)
                if [ -n "$pid" ] && [ -d "/proc/$pid" ]; then continue; fi
                while iptables -w -D OUTPUT -d 127.0.0.0/8 -j "$chain" 2>/dev/null; do :; done
                iptables -w -F "$chain" 2>/dev/null || true
                iptables -w -X "$chain" 2>/dev/null || true
                log "removed firewall chain $chain"
            done
    fi
    if command -v docker >/dev/null 2>&1; then
        docker ps -a --filter label=shardlock.test=chaos \
            --format '{{.ID}} {{.Label "shardlock.chaos.pid"}}' 2>/dev/null |
            while read -r id pid; do
                if [ -n "$pid" ] && [ -d "/proc/$pid" ]; then continue; fi
                docker rm -f "$id" >/dev/null 2>&1 || true
                log "removed container $id"
            done
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if ! command -v cargo >/dev/null 2>&1; then
    log "cargo is not installed: install Rust (https://rustup.rs) first"
    exit 1
fi
if ! command -v iptables >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        log "installing iptables (network-cut faults)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iptables >/dev/null ||
            log "WARNING: iptables could not be installed: network-cut faults will be SKIPPED"
    else
        log "WARNING: no iptables and no way to install it: network-cut faults will be SKIPPED"
    fi
fi
if [ "$(id -u)" != 0 ]; then
    log "WARNING: not root: iptables will fail and network-cut faults will be SKIPPED"
fi
if [[ "$settings" == *postgres* ]] && [ -z "${SHARDLOCK_PG_URL:-}" ] && [ -z "${SHARDLOCK_NO_DOCKER:-}" ]; then
    # shellcheck source=lib/docker.sh
    . scripts/lib/docker.sh
    ensure_docker
    if [ "${SHARDLOCK_PG_IMAGE:-shardlock-test/postgres:15}" = "shardlock-test/postgres:15" ]; then
        bash scripts/build-images.sh
    fi
fi
cleanup

report=$(realpath -m "$out")
tmp_report="$report.tmp.$$"
export SHARDLOCK_CHAOS_FAULTS="$faults"
export SHARDLOCK_CHAOS_SETTINGS="$settings"
export SHARDLOCK_CHAOS_PARALLEL="$parallel"
export SHARDLOCK_CHAOS_REPORT="$tmp_report"
export SHARDLOCK_CHAOS_COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
    export SHARDLOCK_CHAOS_DIRTY=1
fi
export SHARDLOCK_CHAOS_DATE="$(date -u '+%Y-%m-%d %H:%M UTC')"
export SHARDLOCK_CHAOS_COMMAND="scripts/chaos.sh${args_seen:+ $args_seen}"
[ "$keep" = 1 ] && export SHARDLOCK_CHAOS_KEEP=1

log "building (cargo test ${profile[*]} -p shardlock-cli --test faults --no-run)"
cargo test "${profile[@]}" --locked -p shardlock-cli --test faults --no-run
log "$faults faults per setting: $settings$([ "$parallel" = 1 ] && echo ' (in parallel)')"
status=0
SHARDLOCK_CHAOS_LONG=1 cargo test "${profile[@]}" --locked -p shardlock-cli --test faults -- \
    --exact chaos_long --nocapture --test-threads 1 || status=$?
if [ -s "$tmp_report" ]; then
    mv "$tmp_report" "$report"
    log "report: $report"
else
    rm -f "$tmp_report"
    log "no report written"
fi
if [ "$status" != 0 ]; then
    log "FAILED (exit $status): overlaps or a failed setting; see the output above and $report"
fi
exit "$status"
