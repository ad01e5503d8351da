#!/usr/bin/env bash
# Builds the local Docker images the integration tests use by name, from
# Debian packages (this machine reaches no container registry):
#
#   shardlock-test/postgres:15   Debian bookworm + postgresql-15 (always)
#   shardlock-test/postgres:17   Debian trixie   + postgresql-17 (with --pg17)
#   shardlock-test/mariadb:10.11 Debian bookworm + mariadb-server 10.11 (always,
#                                unless --only-pg17 / --no-mariadb)
#
# Method: `debootstrap --variant=minbase --include=postgresql-N SUITE DIR`
# (cached under $SHARDLOCK_IMAGE_CACHE), then `tar -C DIR -c . | docker import`
# (docs, man pages, translations, apt lists and the LLVM JIT left out) as
# shardlock-test/postgres-rootfs:N, then scripts/images/postgres/Dockerfile on
# top: an entrypoint that behaves like the official `postgres` image for
# testcontainers-modules' `postgres::Postgres`. MariaDB the same way:
# `debootstrap --include=mariadb-server,mariadb-client bookworm`, imported as
# shardlock-test/mariadb-rootfs:10.11, then scripts/images/mariadb/Dockerfile
# (an entrypoint like the official `mariadb` image's, for
# testcontainers-modules' `mariadb::Mariadb`).
#
# Idempotent: an image that already exists is left alone (unless --force), and
# a finished debootstrap (marker file) is reused.
#
# Usage: scripts/build-images.sh [--pg17] [--only-pg17] [--no-mariadb] [--only-mariadb]
#                                 [--force] [--refresh] [--verify]
#   --pg17       also build shardlock-test/postgres:17 (Debian trixie)
#   --only-pg17  build only shardlock-test/postgres:17
#   --no-mariadb   leave shardlock-test/mariadb:10.11 out
#   --only-mariadb build only shardlock-test/mariadb:10.11
#   --force      rebuild the images even if they exist (reuses the debootstrap cache)
#   --refresh    also redo the debootstrap (fresh packages); implies --force
#   --verify     afterwards start each image, wait for it to be ready and run a
#                query through the published port with psql and a password
#
# Environment:
#   SHARDLOCK_IMAGE_CACHE   debootstrap cache (default /var/cache/shardlock-images)
#   SHARDLOCK_DEBIAN_MIRROR Debian mirror for debootstrap (default: debootstrap's own)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/lib/docker.sh
. "$here/lib/docker.sh"

cache=${SHARDLOCK_IMAGE_CACHE:-/var/cache/shardlock-images}
context=$here/images/postgres
mariadb_context=$here/images/mariadb

want_15=1 want_17=0 want_mariadb=1 force=0 refresh=0 verify=0
for arg in "$@"; do
    case "$arg" in
    --pg17) want_17=1 ;;
    --only-pg17) want_15=0 want_17=1 want_mariadb=0 ;;
    --no-mariadb) want_mariadb=0 ;;
    --only-mariadb) want_15=0 want_17=0 want_mariadb=1 ;;
    --force) force=1 ;;
    --refresh) force=1 refresh=1 ;;
    --verify) verify=1 ;;
    -h | --help)
        sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "build-images.sh: unknown argument: $arg (try --help)" >&2
        exit 2
        ;;
    esac
done

say() { printf '[build-images] %s\n' "$*" >&2; }
die() {
    say "ERROR: $*"
    exit 1
}
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1fs", b - a }'; }

# Removes a (possibly half-built) debootstrap target. An interrupted debootstrap
# leaves proc/sys (and, inside containers, a bind-mounted /dev) mounted in it:
# unmount those first so that rm can never reach into the host's /dev or /proc.
safe_rm_tree() {
    local dir=$1 m
    [ -e "$dir" ] || return 0
    while read -r m; do
        say "unmounting leftover $m"
        umount -l "$m" 2>/dev/null || true
    done < <(awk -v d="$dir/" 'index($2, d) == 1 { print $2 }' /proc/mounts | sort -r)
    if awk -v d="$dir/" 'index($2, d) == 1 { found = 1 } END { exit !found }' /proc/mounts; then
        die "cannot unmount everything under $dir; remove it by hand"
    fi
    rm -rf --one-file-system "$dir"
}

ensure_host_tools() {
    local missing=()
    # debootstrap checks the Release signature with gpgv and Debian's keyring
    # (both normally present: apt depends on them; named in case they are not).
    command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap debian-archive-keyring gpgv)
    if [ "$verify" -eq 1 ] && [ "$want_15$want_17" != 00 ] && ! command -v psql >/dev/null 2>&1; then
        missing+=(postgresql-client)
    fi
    if [ "${#missing[@]}" -gt 0 ]; then
        say "installing missing host tools: ${missing[*]}"
        _sl_apt_install "${missing[@]}"
    fi
}

# rootfs TAG SUITE PACKAGES: prints the path of a finished debootstrap of SUITE
# with PACKAGES (comma-separated), running debootstrap only when the cache has
# none. TAG names the cached tree (pg15, mariadb).
rootfs() {
    local tag=$1 suite=$2 packages=$3 dir key marker log t0 status
    dir=$cache/rootfs-$suite-$tag
    marker=$dir/.shardlock-debootstrap-done
    # What the tree was built from: a change here (other packages) forces a rebuild.
    key="suite=$suite variant=minbase include=$packages mirror=${SHARDLOCK_DEBIAN_MIRROR:-default}"
    if [ "$refresh" -eq 0 ] && [ -f "$marker" ] && [ "$(cat "$marker")" = "$key" ]; then
        say "reusing cached debootstrap $dir"
        printf '%s\n' "$dir"
        return 0
    fi
    safe_rm_tree "$dir.partial"
    log=$cache/debootstrap-$suite-$tag.log
    say "debootstrap $suite + $packages into $dir.partial (full log: $log)"
    t0=$(now)
    set +e
    # shellcheck disable=SC2086  # the mirror is an optional extra word
    debootstrap --variant=minbase --include="$packages" "$suite" "$dir.partial" \
        ${SHARDLOCK_DEBIAN_MIRROR:-} 2>&1 |
        tee "$log" |
        { grep --line-buffered -E '^(E:|W:|I: (Resolving|Found|Retrieving Release|Checking Release|Installing core|Unpacking the base|Configuring the base|Base system))' |
            sed -u 's/^/[build-images]   /' >&2 || true; }
    status=${PIPESTATUS[0]}
    set -e
    if [ "$status" -ne 0 ]; then
        say "last lines of $log:"
        tail -n 20 "$log" | sed 's/^/[build-images]   /' >&2
        die "debootstrap failed (exit $status)"
    fi
    # The downloaded .debs (~100 MB) are not needed once installed.
    find "$dir.partial/var/cache/apt/archives" -maxdepth 1 -name '*.deb' -delete
    printf '%s\n' "$key" >"$dir.partial/.shardlock-debootstrap-done"
    safe_rm_tree "$dir"
    mv "$dir.partial" "$dir"
    say "debootstrap done in $(since "$t0") ($(du -sh --one-file-system "$dir" | cut -f1))"
    printf '%s\n' "$dir"
}

# build_image KIND VERSION TAG SUITE PACKAGES CONTEXT [TAR-EXCLUDE...] [-- BUILD-ARG...]:
# builds shardlock-test/KIND:VERSION (unless it exists and no --force) from a
# debootstrap of SUITE with PACKAGES (cached as TAG, see rootfs), imported
# trimmed as shardlock-test/KIND-rootfs:VERSION, then CONTEXT's Dockerfile on
# top. TAR-EXCLUDEs (--exclude=...) leave more out of the import; BUILD-ARGs
# go to docker build.
build_image() {
    local kind=$1 version=$2 tag=$3 suite=$4 packages=$5 context_dir=$6
    local image rootfs_image dir t0 t_all excludes=() build_args=()
    shift 6
    while [ $# -gt 0 ] && [ "$1" != -- ]; do
        excludes+=("$1")
        shift
    done
    if [ $# -gt 0 ]; then shift; fi
    build_args=("$@")
    image=shardlock-test/$kind:$version
    rootfs_image=shardlock-test/$kind-rootfs:$version
    if [ "$force" -eq 0 ] && docker image inspect "$image" >/dev/null 2>&1; then
        say "$image already exists (use --force to rebuild)"
        return 0
    fi
    t_all=$(now)
    say "building $image from Debian $suite"

    dir=$(rootfs "$tag" "$suite" "$packages")

    t0=$(now)
    say "importing $dir as $rootfs_image (trimmed)"
    # Left out of every image: documentation, man/info pages, translations and
    # locale sources (C.UTF-8 is built into glibc), apt's caches and logs.
    # /dev, /proc, /sys are provided by docker.
    tar -C "$dir" --numeric-owner \
        --exclude=./.shardlock-debootstrap-done \
        --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' \
        --exclude='./usr/share/doc/*' --exclude='./usr/share/man/*' \
        --exclude='./usr/share/info/*' --exclude='./usr/share/locale/*' \
        --exclude='./usr/share/i18n/*' --exclude='./usr/share/lintian/*' \
        --exclude='./var/cache/apt/*' --exclude='./var/lib/apt/lists/*' \
        --exclude='./var/cache/debconf/*-old' --exclude='./var/log/*' \
        "${excludes[@]}" \
        -c . |
        docker import --message "debootstrap $suite $packages" - "$rootfs_image" >/dev/null
    say "import done in $(since "$t0")"

    t0=$(now)
    say "docker build $image"
    # The legacy builder is enough (one RUN, one COPY) and needs no buildx plugin.
    DOCKER_BUILDKIT=0 docker build -q \
        --build-arg "ROOTFS=$rootfs_image" "${build_args[@]}" \
        --label "org.shardlock.test-image=$kind" \
        -t "$image" "$context_dir" >/dev/null \
        2> >(grep -v -E 'DEPRECATED: The legacy builder|BuildKit is currently disabled|^ *environment-variable\.$|^ *$' >&2 || true)
    say "docker build done in $(since "$t0")"
    # Earlier builds of the same tag are left dangling: drop them.
    docker image prune -f --filter "label=org.shardlock.test-image=$kind" >/dev/null 2>&1 || true

    say "$image built in $(since "$t_all"), size $(docker image inspect -f '{{.Size}}' "$image" |
        awk '{ printf "%.0f MB", $1 / 1e6 }')"
}

build_pg() {
    local major=$1 suite=$2
    # Also left out: Debian's own `main` cluster that postgresql-common
    # created, the LLVM JIT (with its plugin gone PostgreSQL silently runs
    # without JIT; libLLVM and libz3 are ~130 MB that nothing else uses), and
    # perl beyond perl-base (~50 MB; only Debian's /usr/bin wrappers such as
    # /usr/bin/psql -> pg_wrapper need it, and the image's PATH puts
    # /usr/lib/postgresql/N/bin first, so `psql`, `pg_isready`, `pg_ctl` are
    # the real binaries).
    build_image postgres "$major" "pg$major" "$suite" "postgresql-$major" "$context" \
        --exclude="./var/lib/postgresql/$major/main" \
        --exclude="./etc/postgresql/$major/main" \
        --exclude="./usr/lib/postgresql/$major/lib/llvmjit*" \
        --exclude="./usr/lib/postgresql/$major/lib/bitcode" \
        --exclude='./usr/lib/*/libLLVM*' --exclude='./usr/lib/*/libz3.so*' \
        --exclude='./usr/share/perl/*' --exclude='./usr/lib/*/perl/*' \
        --exclude='./usr/lib/*/libperl.so*' \
        -- --build-arg "PG_MAJOR=$major"
}

# await_ready CID IMAGE PREDICATE WHAT: polls PREDICATE CID every 0.25 s for up
# to 60 s; dies with the container's last log lines if it exits first or WHAT
# (the ready condition, for the message) never shows.
await_ready() {
    local cid=$1 image=$2 ready=$3 what=$4 i
    for ((i = 0; i < 240; i++)); do
        if "$ready" "$cid"; then
            return 0
        fi
        if [ "$(docker inspect -f '{{.State.Running}}' "$cid")" != true ]; then
            docker logs "$cid" 2>&1 | tail -n 30 | sed 's/^/[build-images]   /' >&2
            die "$image: container exited before it was ready"
        fi
        sleep 0.25
    done
    docker logs "$cid" 2>&1 | tail -n 30 | sed 's/^/[build-images]   /' >&2
    die "$image: no $what within 60s"
}

# pg_ready CID: the ready line on stdout AND stderr, as testcontainers waits.
pg_ready() {
    local line='database system is ready to accept connections'
    # grep without -q reads to the end: no SIGPIPE for docker under pipefail.
    docker logs "$1" 2>/dev/null | grep -F "$line" >/dev/null &&
        docker logs "$1" 2>&1 >/dev/null | grep -F "$line" >/dev/null
}

# mariadb_ready CID: the final ready line (port 3306, not the init server's).
mariadb_ready() {
    local logs
    logs=$(docker logs "$1" 2>&1 >/dev/null || true)
    grep -q 'mariadbd: ready for connections' <<<"$logs" && grep -q 'port: 3306' <<<"$logs"
}

# verify_pg MAJOR: start the image the way testcontainers does, wait for the
# ready line on stdout AND stderr, query it through the published port.
verify_pg() {
    local major=$1 image cid port t0 out
    image=shardlock-test/postgres:$major
    t0=$(now)
    cid=$(docker run -d -p 127.0.0.1::5432 -e POSTGRES_PASSWORD=postgres "$image" -c fsync=off)
    # shellcheck disable=SC2064  # expand $cid now
    trap "docker rm -f $cid >/dev/null 2>&1 || true" EXIT
    await_ready "$cid" "$image" pg_ready "a ready line on both stdout and stderr"
    say "$image: ready $(since "$t0") after docker run"
    port=$(docker port "$cid" 5432/tcp | head -n 1 | sed 's/.*://')
    out=$(PGPASSWORD=postgres PGCONNECT_TIMEOUT=10 psql -X -A -t -v ON_ERROR_STOP=1 \
        -h 127.0.0.1 -p "$port" -U postgres -d postgres \
        -c 'select version(), pg_try_advisory_lock(1)' \
        -c "select count(*) from pg_available_extensions where name = 'pg_stat_statements'" \
        -c 'show fsync') || die "$image: psql through 127.0.0.1:$port failed"
    say "$image: psql via 127.0.0.1:$port -> $(printf '%s' "$out" | tr '\n' ' ')"
    case "$out" in
    *"PostgreSQL $major"*"|t"*) ;;
    *) die "$image: unexpected answer from the server" ;;
    esac
    if PGPASSWORD=wrong PGCONNECT_TIMEOUT=10 psql -X -A -t -h 127.0.0.1 -p "$port" -U postgres \
        -d postgres -c 'select 1' >/dev/null 2>&1; then
        die "$image: a wrong password was accepted"
    fi
    say "$image: a wrong password is refused: password auth is on"
    docker rm -f "$cid" >/dev/null
    trap - EXIT
}

MARIADB_VERSION=10.11

build_mariadb() {
    # bookworm's mariadb-server is 10.11; the client gives the entrypoint
    # `mariadb` for its init scripts. Also left out: the datadir that the
    # package's postinst created (the entrypoint initialises its own).
    build_image mariadb "$MARIADB_VERSION" mariadb bookworm mariadb-server,mariadb-client \
        "$mariadb_context" --exclude='./var/lib/mysql/*'
}

# verify_mariadb: start the image the way testcontainers' `mariadb::Mariadb`
# does (empty root password, database `test`), wait for its ready lines on
# stderr, then query it over TCP with the image's own client (the host needs
# no MySQL client).
verify_mariadb() {
    local image cid t0 out
    image=shardlock-test/mariadb:$MARIADB_VERSION
    t0=$(now)
    cid=$(docker run -d -p 127.0.0.1::3306 -e MARIADB_DATABASE=test \
        -e MARIADB_ALLOW_EMPTY_ROOT_PASSWORD=1 -e MARIADB_USER=shardlock \
        -e MARIADB_PASSWORD=secret "$image")
    # shellcheck disable=SC2064  # expand $cid now
    trap "docker rm -f $cid >/dev/null 2>&1 || true" EXIT
    await_ready "$cid" "$image" mariadb_ready "a ready line on stderr"
    say "$image: ready $(since "$t0") after docker run"
    out=$(docker exec "$cid" mariadb --protocol=tcp -h 127.0.0.1 -u shardlock -psecret -N -B test \
        -e "SELECT VERSION(), GET_LOCK('a', 0), GET_LOCK('b', 0), IS_USED_LOCK('a') = CONNECTION_ID()") ||
        die "$image: query over TCP failed"
    say "$image: mariadb via TCP -> $(printf '%s' "$out" | tr '\t\n' '  ')"
    case "$out" in
    "$MARIADB_VERSION"*) ;;
    *) die "$image: unexpected answer from the server" ;;
    esac
    if docker exec "$cid" mariadb --protocol=tcp -h 127.0.0.1 -u shardlock -pwrong -e 'select 1' >/dev/null 2>&1; then
        die "$image: a wrong password was accepted"
    fi
    say "$image: a wrong password is refused"
    docker rm -f "$cid" >/dev/null
    trap - EXIT
}

t_start=$(now)
ensure_host_tools
ensure_docker
mkdir -p "$cache"
# One build at a time per cache (two test runs starting together).
exec 9>"$cache/.lock"
if ! flock -n 9; then
    say "another build-images.sh holds $cache/.lock: waiting"
    flock 9
fi

if [ "$want_15" -eq 1 ]; then build_pg 15 bookworm; fi
if [ "$want_17" -eq 1 ]; then build_pg 17 trixie; fi
if [ "$want_mariadb" -eq 1 ]; then build_mariadb; fi
if [ "$verify" -eq 1 ]; then
    if [ "$want_15" -eq 1 ]; then verify_pg 15; fi
    if [ "$want_17" -eq 1 ]; then verify_pg 17; fi
    if [ "$want_mariadb" -eq 1 ]; then verify_mariadb; fi
fi
say "all done in $(since "$t_start")"
