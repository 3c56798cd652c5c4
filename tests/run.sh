#!/usr/bin/env bash
# Runs every test of Verge: unit, store suite (SQLite and PostgreSQL),
# end-to-end through the real `verge` binary, registry round trips.
#
# Installs and starts what the tests need when it is missing:
#   - PostgreSQL (Debian's package; the machine's cluster is started and a
#     `verge` superuser role created), exported as VERGE_TEST_POSTGRES;
#   - Debian's docker-registry binary (the tests start their own instances);
#   - cargo-nextest when available, else plain `cargo test`.
# Set VERGE_TEST_POSTGRES yourself to use another PostgreSQL server.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '==> %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

missing=()
command -v docker-registry >/dev/null 2>&1 || missing+=(docker-registry)
if [ -z "${VERGE_TEST_POSTGRES:-}" ]; then
    command -v pg_ctlcluster >/dev/null 2>&1 || missing+=(postgresql)
fi
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ -z "${VERGE_TEST_POSTGRES:-}" ]; then
    version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
    if ! pg_lsclusters -h | awk '{print $1" "$2}' | grep -qx "$version main"; then
        log "creating PostgreSQL $version cluster 'main'"
        as_root pg_createcluster "$version" main >/dev/null
    fi
    port=$(pg_lsclusters -h | awk -v v="$version" '$1==v && $2=="main" {print $3}')
    if ! pg_lsclusters -h | awk -v v="$version" '$1==v && $2=="main" {print $4}' | grep -q online; then
        log "starting PostgreSQL $version on port $port"
        as_root pg_ctlcluster "$version" main start
    fi
    for _ in $(seq 1 100); do
        pg_isready -q -h 127.0.0.1 -p "$port" && break
        sleep 0.1
    done
    pg_isready -h 127.0.0.1 -p "$port" >/dev/null || { echo "PostgreSQL did not become ready on port $port" >&2; exit 1; }
    as_root runuser -u postgres -- psql -q -p "$port" -v ON_ERROR_STOP=1 -c \
        "DO \$\$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'verge') THEN CREATE ROLE verge LOGIN SUPERUSER PASSWORD 'verge'; END IF; END \$\$;" >/dev/null
    export VERGE_TEST_POSTGRES="postgres://verge:verge@127.0.0.1:$port/postgres"
fi
log "PostgreSQL for tests: ${VERGE_TEST_POSTGRES%%:*}://...@${VERGE_TEST_POSTGRES##*@}"

# Databases left by earlier runs (each test makes a fresh one).
psql "$VERGE_TEST_POSTGRES" -Atq -c "SELECT datname FROM pg_database WHERE datname LIKE 'verge_test_%'" |
    while read -r db; do psql "$VERGE_TEST_POSTGRES" -q -c "DROP DATABASE IF EXISTS \"$db\"" >/dev/null || true; done

log "building"
cargo build --workspace --all-targets --locked

log "testing"
if cargo nextest --version >/dev/null 2>&1; then
    # Doc tests first: nextest's summary stays the last word.
    cargo test --workspace --doc --locked --quiet
    cargo nextest run --workspace --no-fail-fast --locked
else
    cargo test --workspace --no-fail-fast --locked
fi
