#!/usr/bin/env bash
# deploy/cluster/run.sh: three portcullis replicas sharing one picture through
# NATS JetStream, on 127.0.0.1 (see README.md in this folder).
#
# It starts nats-server -js (store in a scratch directory), a plain upstream,
# and replicas r1..r3 from r1.toml..r3.toml; then shows the point: a token
# works at every replica, the operator revokes its subject at r1, and r2 and
# r3 refuse it too. With KEEP_RUNNING=1 it leaves everything up until Ctrl-C.
#
# Knobs: PORTCULLIS_BIN (default: scripts/release-build.sh), NATS_PORT=4222,
# UPSTREAM_PORT=8480, KEEP_RUNNING=0, KEEP_TMP=0.
# Every process started here is stopped on exit.

set -euo pipefail

NATS_PORT=${NATS_PORT:-4222}
UPSTREAM_PORT=${UPSTREAM_PORT:-8480}
KEEP_RUNNING=${KEEP_RUNNING:-0}
KEEP_TMP=${KEEP_TMP:-0}
ADMIN_TOKEN=cluster-example-admin-token-0123456789

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
TMP=$(mktemp -d /tmp/portcullis-cluster.XXXXXX)
PIDS=()

log() { printf '[cluster] %s\n' "$*" >&2; }
die() { printf '[cluster] FAIL: %s\n' "$*" >&2; exit 1; }
cleanup() {
    local i
    for (( i=${#PIDS[@]}-1; i>=0; i-- )); do kill -TERM "${PIDS[i]}" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [[ $KEEP_TMP == 1 ]] && log "kept $TMP" || rm -rf "$TMP"
}
trap cleanup EXIT INT TERM

command -v nats-server >/dev/null || die "nats-server not found (Debian: apt-get install nats-server)"
if [[ -n ${PORTCULLIS_BIN:-} ]]; then
    BIN=$PORTCULLIS_BIN
else
    log "building portcullis (scripts/release-build.sh)"
    "$ROOT/scripts/release-build.sh" --quiet
    BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/portcullis
fi

wait_http() { # url what
    local n=0
    until curl -fs -o /dev/null --max-time 2 "$1"; do
        (( n++ < 100 )) || die "$2 did not come up"
        sleep 0.1
    done
}

# Dev CA, server certificate and issuer key, from the demo's generator.
log "generating dev certificates and a token (portcullis demo)"
"$BIN" demo --data-dir "$TMP/pki" --proxy-port 0 --admin-port 0 >"$TMP/demo.log" 2>&1 &
DEMO=$!
n=0
until [[ -s $TMP/pki/demo.env ]]; do
    kill -0 "$DEMO" 2>/dev/null || { cat "$TMP/demo.log" >&2; die "demo exited early"; }
    (( n++ < 300 )) || die "demo.env not written"
    sleep 0.1
done
sleep 0.2
# shellcheck disable=SC1091
source "$TMP/pki/demo.env"
kill -TERM "$DEMO" 2>/dev/null || true
wait "$DEMO" 2>/dev/null || true

log "nats-server -js on 127.0.0.1:$NATS_PORT"
nats-server -js -a 127.0.0.1 -p "$NATS_PORT" -sd "$TMP/nats" >"$TMP/nats.log" 2>&1 &
PIDS+=($!)

log "upstream on 127.0.0.1:$UPSTREAM_PORT"
mkdir -p "$TMP/www" && echo "hello from the app" >"$TMP/www/index.html"
python3 -m http.server "$UPSTREAM_PORT" --bind 127.0.0.1 --directory "$TMP/www" >"$TMP/upstream.log" 2>&1 &
PIDS+=($!)

for i in 1 2 3; do
    d=$TMP/r$i
    mkdir -p "$d"
    cp "$TMP/pki/server.pem" "$TMP/pki/server-key.pem" "$TMP/pki/issuer-jwks.json" "$d/"
    sed -e "s|@ISSUER@|$PORTCULLIS_ISSUER|" -e "s|@AUDIENCE@|$PORTCULLIS_AUDIENCE|" \
        -e "s|@UPSTREAM@|http://127.0.0.1:$UPSTREAM_PORT|" -e "s|@NATS_URL@|nats://127.0.0.1:$NATS_PORT|" \
        "$HERE/r$i.toml" >"$d/portcullis.toml"
    "$BIN" check --config "$d/portcullis.toml" >/dev/null || die "r$i: config rejected"
    "$BIN" serve --config "$d/portcullis.toml" >"$d/log" 2>&1 &
    PIDS+=($!)
done
for i in 1 2 3; do wait_http "http://127.0.0.1:909$i/readyz" "r$i"; done
log "three replicas ready: https://127.0.0.1:8442..8444, admin :9091..9093"

ask() { # replica
    curl -s -o /dev/null -w '%{http_code}' --cacert "$TMP/pki/ca.pem" \
        -H "authorization: Bearer $PORTCULLIS_TOKEN" "https://localhost:844$(( $1 + 1 ))/"
}
for i in 1 2 3; do log "r$i with the token: $(ask "$i")"; done

SUB=$(python3 -c 'import base64,json,sys; p=sys.argv[1].split(".")[1]; print(json.loads(base64.urlsafe_b64decode(p+"="*(-len(p)%4)))["sub"])' "$PORTCULLIS_TOKEN")
log "operator revokes subject '$SUB' at r1"
curl -fsS -X POST -H "authorization: Bearer $ADMIN_TOKEN" -H 'content-type: application/json' \
    -d "{\"subject\":\"$SUB\",\"reason\":\"cluster example\"}" http://127.0.0.1:9091/admin/v1/revoke >/dev/null
for i in 1 2 3; do log "r$i with the same token: $(ask "$i")"; done

if [[ $KEEP_RUNNING == 1 ]]; then
    log "running; Ctrl-C stops everything"
    wait
fi
