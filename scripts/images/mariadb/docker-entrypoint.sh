#!/bin/bash
# Entrypoint of the local test image shardlock-test/mariadb:10.11, built by
# scripts/build-images.sh from Debian packages. It follows the official
# `mariadb` image's conventions closely enough for testcontainers:
#
#   - MARIADB_ROOT_PASSWORD, or MARIADB_ALLOW_EMPTY_ROOT_PASSWORD=1 (root
#     without a password), or MARIADB_RANDOM_ROOT_PASSWORD=1 (printed as
#     "GENERATED ROOT PASSWORD: ..."); MARIADB_DATABASE; MARIADB_USER +
#     MARIADB_PASSWORD (all privileges on MARIADB_DATABASE). Each MARIADB_*
#     variable may also be spelled MYSQL_*;
#   - args that start with `-` are passed to mariadbd (`--max-connections=500`),
#     and `mariadbd ARGS...` / `mysqld ARGS...` work like the official CMD;
#   - on first start: mariadb-install-db, then a temporary socket-only server
#     (--skip-networking, its log on STDOUT) sets the accounts, creates the
#     database and runs /docker-entrypoint-initdb.d/*.sh|*.sql|*.sql.gz, is shut
#     down, and the real server starts on 0.0.0.0:3306 with its log on STDERR,
#     where it prints "mariadbd: ready for connections." and "port: 3306": the
#     lines testcontainers-modules' `mariadb::Mariadb` waits for;
#   - anything else (`bash`, `mariadb ...`) is simply exec'd.
set -Eeuo pipefail

say() { printf '%s\n' "$*"; }
die() {
    printf 'docker-entrypoint.sh: ERROR: %s\n' "$*" >&2
    exit 1
}

if [ "$#" -eq 0 ] || [ "${1:0:1}" = '-' ]; then
    set -- mariadbd "$@"
fi
case "$1" in
mariadbd | mysqld) ;;
*) exec "$@" ;;
esac
shift

# MARIADB_X, else MYSQL_X, else the default.
env_or() {
    local m="MARIADB_$1" y="MYSQL_$1"
    if [ -n "${!m:-}" ]; then
        printf '%s' "${!m}"
    elif [ -n "${!y:-}" ]; then
        printf '%s' "${!y}"
    else
        printf '%s' "${2:-}"
    fi
}
# SQL string literal ('...' with quotes and backslashes escaped).
sql_str() {
    local s=${1//\\/\\\\}
    printf "'%s'" "${s//\'/\\\'}"
}
# SQL identifier (`...`).
sql_ident() { printf '`%s`' "${1//\`/\`\`}"; }

datadir=/var/lib/mysql
mkdir -p "$datadir" /run/mysqld
chown mysql:mysql "$datadir" /run/mysqld

# Server options used for both the temporary and the real server. Debian's
# config binds to 127.0.0.1: the real server listens on every address.
common=(--user=mysql --datadir="$datadir" --socket=/run/mysqld/mysqld.sock
    --skip-name-resolve --skip-host-cache)

if [ ! -d "$datadir/mysql" ]; then
    root_password=$(env_or ROOT_PASSWORD)
    allow_empty=$(env_or ALLOW_EMPTY_ROOT_PASSWORD)
    random_root=$(env_or RANDOM_ROOT_PASSWORD)
    database=$(env_or DATABASE)
    user=$(env_or USER)
    password=$(env_or PASSWORD)
    if [ -z "$root_password" ] && [ -z "$allow_empty" ] && [ -z "$random_root" ]; then
        die "set one of MARIADB_ROOT_PASSWORD, MARIADB_ALLOW_EMPTY_ROOT_PASSWORD, MARIADB_RANDOM_ROOT_PASSWORD"
    fi
    if [ -n "$random_root" ]; then
        root_password=$(head -c 18 /dev/urandom | base64 | tr -d '/+=')
        say "GENERATED ROOT PASSWORD: $root_password"
    fi
    if [ "$user" = root ]; then
        die "MARIADB_USER=root: set MARIADB_ROOT_PASSWORD instead"
    fi

    say "docker-entrypoint.sh: initialising $datadir"
    mariadb-install-db --user=mysql --datadir="$datadir" --auth-root-authentication-method=normal \
        --skip-test-db --skip-name-resolve --cross-bootstrap >/dev/null

    # Temporary server: unix socket only; its log goes to stdout.
    mariadbd "${common[@]}" --skip-networking "$@" 2>&1 &
    temp_pid=$!
    for ((i = 0; i < 120; i++)); do
        if mariadb --protocol=socket -uroot -e 'SELECT 1' >/dev/null 2>&1; then
            break
        fi
        kill -0 "$temp_pid" 2>/dev/null || die "the temporary server exited"
        sleep 0.5
    done
    client=(mariadb --no-defaults --protocol=socket -uroot --socket=/run/mysqld/mysqld.sock)

    {
        # Root from anywhere, like the official image; no anonymous users.
        echo "DELETE FROM mysql.user WHERE user = '' OR (user = 'root' AND host NOT IN ('localhost'));"
        echo "FLUSH PRIVILEGES;"
        echo "CREATE USER 'root'@'%' IDENTIFIED BY $(sql_str "$root_password");"
        echo "GRANT ALL ON *.* TO 'root'@'%' WITH GRANT OPTION;"
        echo "ALTER USER 'root'@'localhost' IDENTIFIED BY $(sql_str "$root_password");"
        if [ -n "$database" ]; then
            echo "CREATE DATABASE IF NOT EXISTS $(sql_ident "$database");"
        fi
        if [ -n "$user" ]; then
            echo "CREATE USER $(sql_str "$user")@'%' IDENTIFIED BY $(sql_str "$password");"
            if [ -n "$database" ]; then
                echo "GRANT ALL ON $(sql_ident "$database").* TO $(sql_str "$user")@'%';"
            fi
        fi
    } | "${client[@]}"
    if [ -n "$root_password" ]; then
        client+=(--password="$root_password")
    fi
    if [ -n "$database" ]; then
        client+=("--database=$database")
    fi

    shopt -s nullglob
    for f in /docker-entrypoint-initdb.d/*; do
        case "$f" in
        *.sh)
            say "docker-entrypoint.sh: running $f"
            # shellcheck disable=SC1090
            . "$f"
            ;;
        *.sql)
            say "docker-entrypoint.sh: running $f"
            "${client[@]}" <"$f"
            ;;
        *.sql.gz)
            say "docker-entrypoint.sh: running $f"
            gunzip -c "$f" | "${client[@]}"
            ;;
        *) say "docker-entrypoint.sh: ignoring $f" ;;
        esac
    done
    shopt -u nullglob

    kill -TERM "$temp_pid"
    wait "$temp_pid" || true
    say
    say 'MariaDB init process done. Ready for start up.'
    say
else
    say 'docker-entrypoint.sh: the datadir already holds a database; skipping initialisation'
fi

# The real server: log on stderr (no --log-error file), all addresses.
exec mariadbd "${common[@]}" --bind-address=0.0.0.0 --port=3306 "$@"
