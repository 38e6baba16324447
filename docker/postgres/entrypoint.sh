#!/bin/sh
# A small stand-in for the postgres:15 image's entrypoint, for what docker-compose.yml uses:
# a new volume gets a cluster (trust only) and the init scripts; then PostgreSQL runs in front.
set -eu

: "${PGDATA:=/var/lib/postgresql/data}"
: "${PGPORT:=5432}"
export PGDATA PGPORT

# Only the `postgres` command gets the set-up; anything else (psql in a client container) runs
# as asked.
if [ "${1:-}" != postgres ]; then
    exec "$@"
fi

# As root: own the volume, then run the rest as the postgres user (initdb refuses root).
if [ "$(id -u)" = 0 ]; then
    mkdir -p "$PGDATA"
    chown postgres:postgres "$PGDATA"
    chmod 0700 "$PGDATA"
    exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
fi

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    # The official image wants a password or trust; this stand-in supports trust alone, and
    # says so rather than inventing a password.
    if [ "${POSTGRES_HOST_AUTH_METHOD:-}" != trust ]; then
        echo "eastwall-pg-entrypoint: only POSTGRES_HOST_AUTH_METHOD=trust is supported" >&2
        exit 1
    fi
    initdb --username=postgres --auth=trust --encoding=UTF8 --locale=C.UTF-8 -D "$PGDATA"
    # Socket only while the init scripts run, as the official image does.
    pg_ctl -D "$PGDATA" -w -t 60 -o "-c listen_addresses='' -p $PGPORT" start
    for f in /docker-entrypoint-initdb.d/*; do
        [ -e "$f" ] || continue
        case "$f" in
            *.sql)
                echo "eastwall-pg-entrypoint: running $f"
                psql -v ON_ERROR_STOP=1 -U postgres -p "$PGPORT" -d postgres -f "$f"
                ;;
            *) echo "eastwall-pg-entrypoint: ignoring $f" ;;
        esac
    done
    pg_ctl -D "$PGDATA" -w -t 60 -m fast stop
    echo "eastwall-pg-entrypoint: cluster ready"
fi

exec "$@"
