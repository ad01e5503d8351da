#!/usr/bin/env bash
# Runs the benchmarks and writes BENCHMARKS.md: every measure beside a raw
# baseline taken in the same run (see benches/ and BENCHMARKS.md).
#
#   scripts/bench.sh              full run: the harness 3 times, each row the
#                                 median run's (about 40 minutes on 2 cores)
#   scripts/bench.sh --runs N     the harness N times (1: about 13 minutes)
#   scripts/bench.sh --quick      short run, a few seconds per measure, once
#   scripts/bench.sh --out FILE   write FILE instead of BENCHMARKS.md
#   scripts/bench.sh --no-criterion   only the latency harness
#
# Postgres: SHARDLOCK_PG_URL=postgres://user:pw@host:port/db uses your server
# (start it with -c shared_preload_libraries=pg_stat_statements for statement
# counts, and -c max_locks_per_transaction=256 for the 10,000-key rows).
# Otherwise the script starts Docker (scripts/lib/docker.sh), builds the local
# image (scripts/build-images.sh) and runs a throw-away container of
# SHARDLOCK_PG_IMAGE (default shardlock-test/postgres:15) that is removed at
# the end. MySQL/MariaDB the same way: SHARDLOCK_MYSQL_URL=mysql://user:pw@host:port/db
# uses your server (nothing else should use it while the bench runs: statement
# counts are the server's global counters), else a throw-away container of
# SHARDLOCK_MYSQL_IMAGE (default shardlock-test/mariadb:10.11). SHARDLOCK_NO_DOCKER=1
# skips the containers: those rows then say "not measured" and why.
# scripts/test.sh does not run this script.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "[bench.sh] $*" >&2; }

quick=0 criterion=1 out=BENCHMARKS.md runs=
while [ "$#" -gt 0 ]; do
    case "$1" in
    --quick) quick=1 ;;
    --runs)
        runs=${2:?--runs needs a number}
        case "$runs" in
        '' | *[!0-9]* | 0)
            echo "bench.sh: --runs takes a number of runs, 1 or more: $runs" >&2
            exit 2
            ;;
        esac
        shift
        ;;
    --no-criterion) criterion=0 ;;
    --out)
        out=${2:?--out needs a file}
        shift
        ;;
    -h | --help)
        sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "bench.sh: unknown argument: $1 (try --help)" >&2
        exit 2
        ;;
    esac
    shift
done

# A full run takes the median of three; a quick one is for trying things.
if [ -z "$runs" ]; then
    if [ "$quick" -eq 1 ]; then runs=1; else runs=3; fi
fi

if ! command -v cargo >/dev/null 2>&1; then
    log "cargo is not installed: install Rust (https://rustup.rs) first"
    exit 1
fi
target_dir=${CARGO_TARGET_DIR:-target}
work=$target_dir/bench
mkdir -p "$work"
started=$(date +%s)

log "building the harness, the benches and the holder binaries (release)"
cargo build --release -p shardlock-benches --bins
cargo build --release -p shardlock-sqlite -p shardlock-postgres -p shardlock-mysql --examples
cargo bench -p shardlock-benches --bench micro --no-run

# ----- Postgres -----------------------------------------------------------
cid=
mysql_cid=
cleanup() {
    for c in "$cid" "$mysql_cid"; do
        if [ -n "$c" ]; then
            log "removing the bench container ${c:0:12}"
            docker rm -f "$c" >/dev/null 2>&1 || true
        fi
    done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

pg_skip=
pin_server=()
pin_client=()
# CPU placement: on this 2-core machine a round trip between two processes
# costs ~25 µs when the scheduler keeps them on one core and ~75 µs across
# cores, and each connection's server thread settles in one mode or the
# other, which biased ratios by up to 3x between two otherwise identical
# connections. So the servers get the last CPU and the benchmarks the others
# (taskset): every round trip crosses cores, the same for shardlock and raw.
pin() {
    if [ "${#pin_server[@]}" -eq 0 ] && [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null 2>&1; then
        last=$(($(nproc) - 1))
        pin_server=(--cpuset-cpus="$last")
        pin_client=(taskset -c "0-$((last - 1))")
    fi
}
# A free local TCP port in [$1, $1 + 99], or nothing.
free_port() {
    for candidate in $(seq "$1" "$(($1 + 99))"); do
        if ! ss -Hltn "sport = :$candidate" 2>/dev/null | grep -q .; then
            echo "$candidate"
            return
        fi
    done
}
if [ -n "${SHARDLOCK_PG_URL:-}" ]; then
    log "Postgres: using SHARDLOCK_PG_URL"
elif [ -n "${SHARDLOCK_NO_DOCKER:-}" ]; then
    pg_skip="SHARDLOCK_NO_DOCKER is set and SHARDLOCK_PG_URL is not"
else
    # shellcheck source=scripts/lib/docker.sh
    . scripts/lib/docker.sh
    image=${SHARDLOCK_PG_IMAGE:-shardlock-test/postgres:15}
    if ! ensure_docker; then
        pg_skip="no Docker engine could be started (see ${TMPDIR:-/tmp}/shardlock-dockerd.log); set SHARDLOCK_PG_URL"
    elif [ "$image" = "shardlock-test/postgres:15" ] && ! bash scripts/build-images.sh; then
        pg_skip="the local image $image could not be built (scripts/build-images.sh); set SHARDLOCK_PG_URL"
    else
        # Host networking: the client reaches the server over loopback
        # directly; a published port (-p) would put docker-proxy, a userland
        # copy loop, into every round trip. Fall back to -p if it fails.
        # fsync off: a throw-away server; lock-table room for the 10,000-key
        # rows plus a raw baseline; connections for 100 tenants: the node's
        # three per database (session, watcher, listener) and the raw side's one.
        pin
        pg_args=(-c fsync=off -c shared_preload_libraries=pg_stat_statements
            -c max_locks_per_transaction=256 -c max_connections=600)
        port=$(free_port 56432)
        if [ -n "$port" ]; then
            log "Postgres: starting a container of $image (host network, 127.0.0.1:$port)"
            cid=$(docker run -d --network host "${pin_server[@]}" -e POSTGRES_PASSWORD=postgres \
                --label shardlock.bench=postgres "$image" "${pg_args[@]}" \
                -c listen_addresses=127.0.0.1 -c port="$port") || cid=
        fi
        if [ -z "$cid" ]; then
            log "Postgres: host networking unavailable; publishing a port instead"
            cid=$(docker run -d -p 127.0.0.1::5432 "${pin_server[@]}" -e POSTGRES_PASSWORD=postgres \
                --label shardlock.bench=postgres "$image" "${pg_args[@]}") || cid=
            port=
            for _ in $(seq 1 100); do
                [ -n "$cid" ] || break
                port=$(docker port "$cid" 5432/tcp 2>/dev/null | head -n 1 | sed 's/.*://')
                [ -n "$port" ] && break
                sleep 0.1
            done
        fi
        if [ -z "$cid" ] || [ -z "$port" ]; then
            pg_skip="docker run $image failed"
        else
            # The harness waits until a real query succeeds.
            export SHARDLOCK_PG_URL="postgres://postgres:postgres@127.0.0.1:$port/postgres"
            log "Postgres: container ${cid:0:12} on 127.0.0.1:$port"
        fi
    fi
fi
if [ -n "$pg_skip" ]; then
    log "Postgres rows will not be measured: $pg_skip"
    export SHARDLOCK_BENCH_PG_SKIP="$pg_skip"
fi

# ----- MySQL / MariaDB ------------------------------------------------------
mysql_skip=
if [ -n "${SHARDLOCK_MYSQL_URL:-}" ]; then
    log "MySQL: using SHARDLOCK_MYSQL_URL"
elif [ -n "${SHARDLOCK_NO_DOCKER:-}" ]; then
    mysql_skip="SHARDLOCK_NO_DOCKER is set and SHARDLOCK_MYSQL_URL is not"
else
    # shellcheck source=scripts/lib/docker.sh
    . scripts/lib/docker.sh
    mysql_image=${SHARDLOCK_MYSQL_IMAGE:-shardlock-test/mariadb:10.11}
    if ! ensure_docker; then
        mysql_skip="no Docker engine could be started (see ${TMPDIR:-/tmp}/shardlock-dockerd.log); set SHARDLOCK_MYSQL_URL"
    elif [ "$mysql_image" = "shardlock-test/mariadb:10.11" ] && ! bash scripts/build-images.sh --only-mariadb; then
        mysql_skip="the local image $mysql_image could not be built (scripts/build-images.sh); set SHARDLOCK_MYSQL_URL"
    else
        # The same placement as Postgres (both servers share the last CPU;
        # the measures use one server at a time): host network, pinned.
        # Root without a password and a database of the bench's own (the
        # image's entrypoint follows the official image's variables; args
        # starting with - go to mariadbd and override its defaults).
        pin
        port=$(free_port 53306)
        mysql_env=(-e MARIADB_ALLOW_EMPTY_ROOT_PASSWORD=1 -e MARIADB_DATABASE=shardlock_bench)
        mysql_args=(--max-connections=500)
        if [ -n "$port" ]; then
            log "MySQL: starting a container of $mysql_image (host network, 127.0.0.1:$port)"
            mysql_cid=$(docker run -d --network host "${pin_server[@]}" "${mysql_env[@]}" \
                --label shardlock.bench=mysql "$mysql_image" "${mysql_args[@]}" \
                --bind-address=127.0.0.1 --port="$port") || mysql_cid=
        fi
        if [ -z "$mysql_cid" ]; then
            log "MySQL: host networking unavailable; publishing a port instead"
            mysql_cid=$(docker run -d -p 127.0.0.1::3306 "${pin_server[@]}" "${mysql_env[@]}" \
                --label shardlock.bench=mysql "$mysql_image" "${mysql_args[@]}") || mysql_cid=
            port=
            for _ in $(seq 1 100); do
                [ -n "$mysql_cid" ] || break
                port=$(docker port "$mysql_cid" 3306/tcp 2>/dev/null | head -n 1 | sed 's/.*://')
                [ -n "$port" ] && break
                sleep 0.1
            done
        fi
        if [ -z "$mysql_cid" ] || [ -z "$port" ]; then
            mysql_skip="docker run $mysql_image failed"
        else
            # The harness waits until a real query succeeds (the first start
            # initialises the data directory: a few seconds).
            export SHARDLOCK_MYSQL_URL="mysql://root@127.0.0.1:$port/shardlock_bench"
            log "MySQL: container ${mysql_cid:0:12} on 127.0.0.1:$port"
        fi
    fi
fi
if [ -n "$mysql_skip" ]; then
    log "MySQL rows will not be measured: $mysql_skip"
    export SHARDLOCK_BENCH_MYSQL_SKIP="$mysql_skip"
fi

# ----- the latency harness --------------------------------------------------
# Each run is a process of its own; with several, every row of the table is
# the median run's row (shardlock-bench median-of), its setup listing them all.
harness_args=()
[ "$quick" -eq 1 ] && harness_args+=(--quick)
run_files=()
for i in $(seq 1 "$runs"); do
    run_file="$work/harness-$i.md"
    log "harness run $i of $runs (${harness_args[*]:-full})${pin_client[*]:+ under ${pin_client[*]}}"
    "${pin_client[@]}" "$target_dir/release/shardlock-bench" "${harness_args[@]}" --out "$run_file"
    run_files+=("$run_file")
done
if [ "$runs" -eq 1 ]; then
    cp "${run_files[0]}" "$work/harness.md"
else
    "$target_dir/release/shardlock-bench" median-of "$work/harness.md" "${run_files[@]}"
fi

# ----- criterion ------------------------------------------------------------
criterion_md="(not run: --no-criterion)"
if [ "$criterion" -eq 1 ]; then
    export CRITERION_HOME="$PWD/$work/criterion"
    rm -rf "$CRITERION_HOME"
    criterion_args=(--noplot)
    if [ "$quick" -eq 1 ]; then
        criterion_args+=(--warm-up-time 0.5 --measurement-time 1 --sample-size 10)
    fi
    log "running criterion (${criterion_args[*]})"
    "${pin_client[@]}" cargo bench -p shardlock-benches --bench micro -- "${criterion_args[@]}" 2>&1 |
        tee "$work/criterion.log" | grep -E '^(try_acquire|batch_)|time:|SKIPPED' >&2 || true
    if [ -d "$CRITERION_HOME" ]; then
        criterion_md=$("$target_dir/release/shardlock-bench" criterion-summary "$CRITERION_HOME")
    else
        criterion_md="(criterion wrote no results; see $work/criterion.log)"
    fi
fi

# ----- BENCHMARKS.md ----------------------------------------------------------
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git status --porcelain 2>/dev/null | grep -v '^??' || true)" ]; then
    commit="$commit (with uncommitted changes)"
fi
cpu=$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | sed 's/.*: //' || echo unknown)
mem=$(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo 2>/dev/null || echo unknown)
pinning="not pinned"
[ "${#pin_client[@]}" -gt 0 ] && pinning="server: docker ${pin_server[*]}; benchmarks: ${pin_client[*]}"
mode=full
[ "$quick" -eq 1 ] && mode="quick (--quick: few rounds, not for comparison)"
[ "$runs" -gt 1 ] && mode="$mode, each row the median of $runs runs of the harness"
{
    cat <<HEADER
# shardlock benchmarks

Written by \`scripts/bench.sh\`; do not edit by hand (run it again).

| | |
|---|---|
| date | $(date -u '+%Y-%m-%d %H:%M UTC') |
| git commit | $commit |
| run | $mode, took $(($(date +%s) - started)) s |
| CPU | $cpu, \`nproc\` = $(nproc) |
| memory | $mem |
| OS | $(uname -sr) |
| Rust | $(rustc --version) |

## Method

Every measure is taken beside a **raw baseline in the same run**: the same
operation done directly over one connection of the same kind (sqlx on one
\`PgConnection\`, rusqlite on a key file, a \`Mutex<HashMap>\` or a
\`tokio::sync::Mutex\`). Rounds of shardlock and raw are interleaved (the
order alternates each round) so that the noise of this shared 2-core machine
hits both sides alike. **ratio** = shardlock's p50 / raw's p50 (lower is
better; 1.00× means no overhead). The Postgres and MariaDB servers run in
local Docker containers on the host network (reached on 127.0.0.1 without
docker-proxy), Postgres with \`fsync=off\`, both pinned to the last CPU
while the benchmarks run on the others (\`$pinning\`): on 2 cores a round
trip costs about 25 µs when client and server share a core and 75 µs across
cores, and an unpinned connection settles in either mode, which skewed
ratios by up to 3×. Statement counts are the servers' own
(\`pg_stat_statements\`, read from a separate connection in another
database; MariaDB's global \`Com_select\` and \`Questions\`, read from a
separate connection on the otherwise idle server). The harness is
\`benches/src/bin/shardlock-bench\`; the criterion benches are
\`benches/benches/micro.rs\`.

## Results

HEADER
    cat "$work/harness.md"
    cat <<CRIT

## Criterion micro-benchmarks

Criterion's median per iteration (\`cargo bench -p shardlock-benches --bench
micro\`), run after the harness. Criterion measures the two sides one after
the other, not interleaved, so the harness's ratios above are the ones to
trust on this noisy machine; these are a cross-check.

$criterion_md
CRIT
} >"$out"
log "wrote $out in $(($(date +%s) - started)) s"
