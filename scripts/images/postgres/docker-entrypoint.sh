#!/bin/bash
# Entrypoint of the local test image shardlock-test/postgres:<major>, built by
# scripts/build-images.sh from Debian packages. It follows the official
# `postgres` image's conventions closely enough for testcontainers:
#
#   - POSTGRES_USER / POSTGRES_PASSWORD / POSTGRES_DB (defaults postgres /
#     postgres / postgres; the official image has no default password),
#     POSTGRES_HOST_AUTH_METHOD (default scram-sha-256; `trust` allowed),
#     POSTGRES_INITDB_ARGS, PGDATA (default /var/lib/postgresql/data);
#   - args that start with `-` are passed to postgres (`-c fsync=off`), and
#     `postgres ARGS...` works like the official CMD;
#   - on first start: initdb, then a temporary socket-only server (pg_ctl, its
#     log on STDOUT) runs /docker-entrypoint-initdb.d/*.sh|*.sql|*.sql.gz, is
#     stopped, and the real server starts listening on 0.0.0.0:5432 (its log on
#     STDERR). So "database system is ready to accept connections" is printed
#     twice, once on stdout and once on stderr: testcontainers-modules'
#     `postgres::Postgres` waits for that line on both streams;
#   - anything else (`bash`, `psql ...`) is simply exec'd.
set -Eeuo pipefail

say() { printf '%s\n' "$*"; }

if [ "$#" -eq 0 ] || [ "${1:0:1}" = '-' ]; then
    set -- postgres "$@"
fi

if [ "$1" != 'postgres' ]; then
    exec "$@"
fi

: "${PGDATA:=/var/lib/postgresql/data}"
export PGDATA

# Running as root: prepare the directories, then re-run this script as the
# `postgres` user (setpriv comes with util-linux, which every Debian has).
if [ "$(id -u)" = '0' ]; then
    mkdir -p "$PGDATA" /var/run/postgresql
    chown -R postgres:postgres "$PGDATA" /var/run/postgresql
    chmod 700 "$PGDATA"
    chmod 3777 /var/run/postgresql
    exec setpriv --reuid=postgres --regid=postgres --init-groups \
        env HOME=/var/lib/postgresql /bin/bash "${BASH_SOURCE[0]}" "$@"
fi

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    : "${POSTGRES_USER:=postgres}"
    : "${POSTGRES_PASSWORD:=postgres}"
    : "${POSTGRES_DB:=$POSTGRES_USER}"
    : "${POSTGRES_HOST_AUTH_METHOD:=scram-sha-256}"

    # --no-sync: a throwaway test database need not wait for the disk.
    # shellcheck disable=SC2086  # POSTGRES_INITDB_ARGS is a flag list
    initdb --username="$POSTGRES_USER" --pwfile=<(printf '%s\n' "$POSTGRES_PASSWORD") \
        --encoding=UTF8 --locale=C.UTF-8 --no-sync ${POSTGRES_INITDB_ARGS:-}

    {
        echo
        echo "# added by docker-entrypoint.sh"
        echo "listen_addresses = '*'"
    } >>"$PGDATA/postgresql.conf"
    {
        echo
        echo "# added by docker-entrypoint.sh: password (or trust) from any host"
        echo "host all all all $POSTGRES_HOST_AUTH_METHOD"
    } >>"$PGDATA/pg_hba.conf"

    # Temporary server: unix socket only, with the same extra args (-c ...) as
    # the real one; its log goes to stdout like the official image's.
    shift
    temp_opts=$(printf '%q ' "$@" -c "listen_addresses=" -p "${PGPORT:-5432}")
    export PGUSER="${PGUSER:-$POSTGRES_USER}" PGPASSWORD="${PGPASSWORD:-$POSTGRES_PASSWORD}"
    pg_ctl -D "$PGDATA" -o "$temp_opts" -w start

    psql_base=(psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --no-password --no-psqlrc)
    if [ "$POSTGRES_DB" != 'postgres' ]; then
        "${psql_base[@]}" --dbname postgres --set db="$POSTGRES_DB" <<<'CREATE DATABASE :"db" ;'
    fi

    shopt -s nullglob
    for f in /docker-entrypoint-initdb.d/*; do
        case "$f" in
        *.sh)
            if [ -x "$f" ]; then
                say "$0: running $f"
                "$f"
            else
                say "$0: sourcing $f"
                # shellcheck disable=SC1090
                . "$f"
            fi
            ;;
        *.sql)
            say "$0: running $f"
            "${psql_base[@]}" --dbname "$POSTGRES_DB" -f "$f"
            ;;
        *.sql.gz)
            say "$0: running $f"
            gunzip -c "$f" | "${psql_base[@]}" --dbname "$POSTGRES_DB"
            ;;
        *) say "$0: ignoring $f" ;;
        esac
    done
    shopt -u nullglob

    pg_ctl -D "$PGDATA" -m fast -w stop
    unset PGPASSWORD
    say
    say 'PostgreSQL init process complete; ready for start up.'
    say
    set -- postgres "$@"
else
    say 'PostgreSQL Database directory appears to contain a database; Skipping initialization'
fi

exec "$@"
