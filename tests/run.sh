#!/usr/bin/env bash
# Runs every test of Verge: unit, store suite (SQLite and PostgreSQL),
# end-to-end through the real `verge` binary, registry round trips.
#
# Installs and starts what the tests need when it is missing:
#   - iproute2, gcc, libc6-dev and busybox-static (node tests: namespaces,
#     static workloads, a busybox rootfs);
#   - PostgreSQL (Debian's package; the machine's cluster is started and a
#     `verge` superuser role created), exported as VERGE_TEST_POSTGRES;
#   - Debian's docker-registry binary (the tests start their own instances);
#   - HAProxy (Debian's package; the ingress interop tests start their own,
#     the package's service is stopped and disabled);
#   - cargo-nextest when available, else plain `cargo test`.
# Set VERGE_TEST_POSTGRES yourself to use another PostgreSQL server (then
# neither PostgreSQL nor psql is needed here).
#
# Each test creates its own `verge_test_<ulid>` database; the tests
# themselves drop those older than an hour, so concurrent runs on one
# server never lose each other's databases.
#
# Runs unattended (CI, no stdin, no TTY): never prompts.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif ! command -v sudo >/dev/null 2>&1; then
        die "need root for: $* (run as root, or install sudo)"
    elif [ -t 0 ]; then
        sudo "$@"
    else
        # No terminal to ask a password on: fail instead of waiting.
        sudo -n "$@"
    fi
}

# rustup installs into ~/.cargo/bin, which a non-login shell may not have.
if ! command -v cargo >/dev/null 2>&1 && [ -x "${CARGO_HOME:-${HOME:-/nonexistent}/.cargo}/bin/cargo" ]; then
    export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
fi
command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust with rustup (https://rustup.rs)"

# The newest PostgreSQL server installed, e.g. "15"; empty when none is
# (postgresql-common alone brings pg_ctlcluster but no server).
pg_version() {
    { ls /usr/lib/postgresql 2>/dev/null || true; } | sort -V | tail -n 1
}

# The node tests run real nodes: network namespaces and veths made with
# iproute2 (`ip`), and workloads compiled as static C programs (gcc with
# glibc's static libraries); they need root, like the rest of this script.
[ "$(id -u)" -eq 0 ] || log "warning: not root: the node tests (network namespaces, cgroups) will fail, saying so"

missing=()
# The path the harness runs (tests/src/registry.rs).
[ -x /usr/bin/docker-registry ] || missing+=(docker-registry)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
# The runtime tests' rootfs: a static busybox (sh, ps, ls, ...).
[ -x /bin/busybox ] || missing+=(busybox-static)
command -v gcc >/dev/null 2>&1 || missing+=(gcc)
command -v mkfs.ext4 >/dev/null 2>&1 || [ -x /usr/sbin/mkfs.ext4 ] || [ -x /sbin/mkfs.ext4 ] || missing+=(e2fsprogs)
[ -e /usr/lib/x86_64-linux-gnu/libc.a ] || [ -n "$(find /usr/lib -name libc.a -print -quit 2>/dev/null)" ] || missing+=(libc6-dev)
# The ingress's PROXY protocol interop test (ingress/tests/haproxy.rs).
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
# The ingress balancing tests make an instance refuse or fail (ingress_balance.rs).
command -v ip6tables >/dev/null 2>&1 || [ -x /usr/sbin/ip6tables ] || missing+=(iptables)
if [ -z "${VERGE_TEST_POSTGRES:-}" ]; then
    if [ -z "$(pg_version)" ] || ! command -v pg_ctlcluster >/dev/null 2>&1 ||
        ! command -v psql >/dev/null 2>&1; then
        missing+=(postgresql)
    fi
fi
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    # Wait for another apt (e.g. unattended-upgrades on a fresh machine)
    # rather than fail on its lock.
    apt=(apt-get -q -y -o DPkg::Lock::Timeout=600)
    as_root env DEBIAN_FRONTEND=noninteractive "${apt[@]}" update >/dev/null
    as_root env DEBIAN_FRONTEND=noninteractive "${apt[@]}" install "${missing[@]}" >/dev/null
    if [[ " ${missing[*]} " == *" haproxy "* ]]; then
        # The package may start a system-wide HAProxy; the tests run their own.
        as_root systemctl disable --now haproxy >/dev/null 2>&1 ||
            as_root service haproxy stop >/dev/null 2>&1 || true
    fi
fi
[ -x /usr/bin/docker-registry ] || die "/usr/bin/docker-registry is still missing"

if [ -z "${VERGE_TEST_POSTGRES:-}" ]; then
    version=$(pg_version)
    [ -n "$version" ] || die "no PostgreSQL server under /usr/lib/postgresql after installing postgresql"
    # Field $1 of this version's "main" in pg_lsclusters -h (version, cluster,
    # port, status, ...). awk reads all its input: no SIGPIPE under pipefail.
    cluster_field() {
        pg_lsclusters -h | awk -v v="$version" -v f="$1" '!done && $1==v && $2=="main" {print $f; done=1}'
    }
    if [ -z "$(cluster_field 2)" ]; then
        log "creating PostgreSQL $version cluster 'main'"
        as_root pg_createcluster "$version" main >/dev/null
    fi
    port=$(cluster_field 3)
    [ -n "$port" ] || die "PostgreSQL $version cluster 'main' has no port"
    case "$(cluster_field 4)" in
        online*) ;;
        *)
            log "starting PostgreSQL $version on port $port"
            as_root pg_ctlcluster "$version" main start
            ;;
    esac
    for _ in $(seq 1 300); do
        pg_isready -q -h 127.0.0.1 -p "$port" && break
        sleep 0.1
    done
    pg_isready -h 127.0.0.1 -p "$port" >/dev/null || die "PostgreSQL did not become ready on port $port"
    # From /: the postgres user may not be able to enter the checkout.
    (cd / && as_root runuser -u postgres -- psql -X -q -p "$port" -v ON_ERROR_STOP=1 -c \
        "DO \$\$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'verge') THEN CREATE ROLE verge LOGIN SUPERUSER PASSWORD 'verge'; END IF; END \$\$;" \
        </dev/null >/dev/null)
    export VERGE_TEST_POSTGRES="postgres://verge:verge@127.0.0.1:$port/postgres"
fi
log "PostgreSQL for tests: ${VERGE_TEST_POSTGRES%%:*}://...@${VERGE_TEST_POSTGRES##*@}"

log "building"
cargo build --workspace --all-targets --locked

log "testing"
if cargo nextest --version >/dev/null 2>&1; then
    # Doc tests first: nextest's summary stays the last word. Nextest bounds
    # every test (.config/nextest.toml).
    cargo test --workspace --doc --locked --quiet
    cargo nextest run --workspace --no-fail-fast --locked
elif [ -t 0 ]; then
    cargo test --workspace --no-fail-fast --locked
else
    # Unattended and without nextest's per-test timeout: bound the whole run
    # so a hang cannot stall CI forever.
    timeout --kill-after=60 3600 cargo test --workspace --no-fail-fast --locked
fi
