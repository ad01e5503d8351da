#!/usr/bin/env bash
# The one test command: installs and starts what the tests need, then runs
# formatting, lints, the whole test suite and the doctests.
#
#   scripts/test.sh            everything (starts Docker and builds the local
#                              database images when they are missing)
#   SHARDLOCK_PG_URL=postgres://user:pw@host/db scripts/test.sh
#                              Postgres suite against your own server, no Docker
#   SHARDLOCK_MYSQL_URL=mysql://user:pw@host/db scripts/test.sh
#                              MySQL/MariaDB suite against your own server
#                              (MySQL 8 included); with both URLs set, no Docker
#   SHARDLOCK_NO_DOCKER=1      do not install/start Docker (real-database tests
#                              then print SKIPPED lines)
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "[test.sh] $*"; }
started=$(date +%s)

if ! command -v cargo >/dev/null 2>&1; then
    echo "[test.sh] cargo is not installed: install Rust (https://rustup.rs) first" >&2
    exit 1
fi
# C libraries some crates build against (tiberius' native-tls: OpenSSL),
# PgBouncer, which the Postgres suite runs to prove transaction pooling
# is refused, and iptables + iproute2 (ss), which the fault-injection run
# uses to cut a node's connections on loopback, and tmux, in which the
# `status --watch` test reads the redrawn screen.
missing=""
for pkg in pkg-config libssl-dev pgbouncer iptables iproute2 tmux; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
done
if [ -n "$missing" ] && command -v apt-get >/dev/null 2>&1; then
    log "installing$missing"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
fi
if ! cargo nextest --version >/dev/null 2>&1; then
    log "installing cargo-nextest"
    cargo install cargo-nextest --locked
fi

# Real databases: Docker engine and locally built images (Postgres 15 and
# MariaDB 10.11), unless both URLs are given or Docker is switched off.
if { [ -z "${SHARDLOCK_PG_URL:-}" ] || [ -z "${SHARDLOCK_MYSQL_URL:-}" ]; } &&
    [ -z "${SHARDLOCK_NO_DOCKER:-}" ] && [ -f scripts/lib/docker.sh ]; then
    # shellcheck source=lib/docker.sh
    . scripts/lib/docker.sh
    ensure_docker
    images=()
    if [ -n "${SHARDLOCK_PG_URL:-}" ]; then images+=(--only-mariadb); fi
    if [ -n "${SHARDLOCK_MYSQL_URL:-}" ]; then images+=(--no-mariadb); fi
    bash scripts/build-images.sh "${images[@]}"
fi
if [ "${CI:-}" = "true" ] && [ -z "${SHARDLOCK_REQUIRE+x}" ]; then
    # In CI a skipped Postgres or MySQL suite (or the tmux terminal test)
    # is a failure, not a pass.
    export SHARDLOCK_REQUIRE=postgres,mysql,tmux
fi

log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
log "cargo nextest run --workspace"
cargo nextest run --workspace --locked --profile ci
log "doctests"
cargo test --workspace --doc --locked
log "cargo doc (broken links and doc warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --quiet
log "all checks passed in $(( $(date +%s) - started )) s"
