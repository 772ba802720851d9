#!/usr/bin/env bash
# Contract test: starts `tally serve` (SQLite in a temp dir, a free port, an
# admin token) and runs schemathesis with every check against the OpenAPI
# document it serves. Fails on any finding. Usage: scripts/contract.sh [tally binary]
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${1:-target/debug/tally}"
[ -x "$bin" ] || { echo "error: $bin not found; build it with cargo build" >&2; exit 1; }
command -v schemathesis >/dev/null 2>&1 || {
  echo "error: schemathesis not found; install it with: python3 -m pip install schemathesis==4.32.5" >&2
  exit 1
}
dir="$(mktemp -d)"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
export TALLY_DATABASE_URL="sqlite://$dir/tally.sqlite"
unset TALLY_NATS_URL
token="$("$bin" tokens create --name contract --scope admin | grep -oE 'tally_[0-9a-f]+_[0-9a-f]+')"
"$bin" serve --http-addr "127.0.0.1:$port" >"$dir/serve.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$dir"' EXIT
for _ in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
  kill -0 $pid 2>/dev/null || { cat "$dir/serve.log" >&2; exit 1; }
  sleep 0.1
done
echo "==> schemathesis $(schemathesis --version 2>&1 | grep -oE '[0-9]+\.[0-9]+\.[0-9]+' | head -1) against http://127.0.0.1:$port/openapi.json"
# One worker: hypothesis' lambda-source cache is not thread-safe on Python 3.11.
schemathesis --config-file tests/contract/schemathesis.toml run \
  "http://127.0.0.1:$port/openapi.json" \
  --checks all --workers 1 --seed 1 \
  -H "Authorization: Bearer $token"
