#!/usr/bin/env bash
# deploy/cluster/load.sh: hot-path CPU per request, embedded SQLite store vs
# NATS JetStream store, in one run, with the wrk settings of deploy/load/run.sh
# (HTTP/1.1, one token, -t THREADS -c CONNS, WARMUP then DURATION seconds).
#
# One plain-HTTP nginx upstream on 127.0.0.1, one nats-server -js, and two
# portcullis processes with the same config (JWT, posture with SEED devices
# seeded through the MDM feed, Cedar with config/policies, no access log)
# except `[store]`: `sqlite` is the embedded default, `nats` is
# `kind = "nats"` against the nats-server. Each round measures both (the
# order alternates); CPU is utime+stime of the portcullis process (and of
# nats-server during the nats run) over the measured run.
#
# Knobs: DURATION=15 WARMUP=3 ROUNDS=2 CONNS=50 THREADS=2 SEED=10000
#        PORTCULLIS_BIN (default: scripts/release-build.sh) KEEP_TMP=0
# Only 127.0.0.1 is a target; every load run is bounded (wrk -d, timeout);
# every process started here is stopped on exit.

set -euo pipefail

DURATION=${DURATION:-15}
WARMUP=${WARMUP:-3}
ROUNDS=${ROUNDS:-2}
CONNS=${CONNS:-50}
THREADS=${THREADS:-2}
SEED=${SEED:-10000}
KEEP_TMP=${KEEP_TMP:-0}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
TMP=$(mktemp -d /tmp/portcullis-cluster-load.XXXXXX)
PIDS=()

log() { printf '[cluster-load] %s\n' "$*" >&2; }
die() { printf '[cluster-load] FAIL: %s\n' "$*" >&2; exit 1; }
cleanup() {
    local rc=$? i
    trap - EXIT INT TERM
    for (( i=${#PIDS[@]}-1; i>=0; i-- )); do kill -TERM "${PIDS[i]}" 2>/dev/null || true; done
    for (( i=${#PIDS[@]}-1; i>=0; i-- )); do wait "${PIDS[i]}" 2>/dev/null || true; done
    if [[ $KEEP_TMP == 1 || $rc -ne 0 ]]; then log "kept $TMP"; else rm -rf "$TMP"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

for v in DURATION WARMUP ROUNDS CONNS THREADS SEED; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a non-negative integer"
done
for t in wrk curl jq nats-server; do
    command -v "$t" >/dev/null || die "$t not found (Debian: wrk curl jq nats-server)"
done
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
[[ -x $NGINX ]] || die "nginx not found (Debian: nginx)"

if [[ -n ${PORTCULLIS_BIN:-} ]]; then
    BIN=$PORTCULLIS_BIN
else
    log "building portcullis (scripts/release-build.sh)"
    "$ROOT/scripts/release-build.sh" --quiet
    target_dir=${CARGO_TARGET_DIR:-target}
    [[ $target_dir = /* ]] || target_dir=$ROOT/$target_dir
    BIN=$target_dir/release/portcullis
fi
[[ -x $BIN ]] || die "no portcullis binary at $BIN"

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
NEXT_PORT=${BASE_PORT:-19080}
pick_port() {
    while port_in_use "$NEXT_PORT"; do NEXT_PORT=$((NEXT_PORT+1)); done
    echo "$NEXT_PORT"; NEXT_PORT=$((NEXT_PORT+1))
}
wait_port() { # port name pid
    local n=0
    until port_in_use "$1"; do
        kill -0 "$3" 2>/dev/null || die "$2 exited"
        (( n++ < 100 )) || die "$2 not listening on $1"
        sleep 0.1
    done
}
cpu_ticks() { # pid: utime + stime
    local stat rest; local -a f
    stat=$(< "/proc/$1/stat") || die "pid $1 vanished"
    rest=${stat##*) }; read -r -a f <<< "$rest"
    echo $(( f[11] + f[12] ))
}
CLK_TCK=$(getconf CLK_TCK)

# Certificates, issuer key and one token from the demo.
PKI=$TMP/pki
"$BIN" demo --data-dir "$PKI" --proxy-port 0 --admin-port 0 >"$TMP/demo.log" 2>&1 &
DEMO=$!; PIDS+=("$DEMO")
n=0
until [[ -s $PKI/demo.env ]]; do
    kill -0 "$DEMO" 2>/dev/null || { cat "$TMP/demo.log" >&2; die "demo exited early"; }
    (( n++ < 300 )) || die "demo.env not written"
    sleep 0.1
done
sleep 0.2
source "$PKI/demo.env"
TOKEN=$(curl -sS --fail --max-time 10 \
    "$PORTCULLIS_ISSUER/token?sub=user-00000@load.example&device_id=dev-00000" | jq -r .access_token)
[[ -n $TOKEN && $TOKEN != null ]] || die "no token from the demo issuer"
kill -TERM "$DEMO"; wait "$DEMO" 2>/dev/null || true

# Upstream: nginx answering 200.
UP_PORT=$(pick_port); UP=$TMP/upstream; mkdir -p "$UP/logs"
cat > "$UP/nginx.conf" <<EOF
worker_processes 1;
pid $UP/nginx.pid;
error_log $UP/logs/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $UP/cb; proxy_temp_path $UP/p; fastcgi_temp_path $UP/f;
    uwsgi_temp_path $UP/u; scgi_temp_path $UP/s;
    keepalive_requests 10000000; keepalive_timeout 120s;
    server { listen 127.0.0.1:$UP_PORT; default_type text/plain; location / { return 200 "ok\n"; } }
}
EOF
"$NGINX" -p "$UP" -e "$UP/logs/error.log" -c "$UP/nginx.conf" -g 'daemon off;' 2>>"$UP/logs/stderr.log" &
UP_PID=$!; PIDS+=("$UP_PID"); wait_port "$UP_PORT" "upstream nginx" "$UP_PID"

# NATS JetStream.
NATS_PORT=$(pick_port)
nats-server -js -a 127.0.0.1 -p "$NATS_PORT" -sd "$TMP/nats" >"$TMP/nats.log" 2>&1 &
NATS_PID=$!; PIDS+=("$NATS_PID"); wait_port "$NATS_PORT" nats-server "$NATS_PID"

MDM_SECRET=$(openssl rand -hex 24)
declare -A PID URL ADMIN
start_portcullis() { # name store-toml
    local name=$1 dir=$TMP/$1
    mkdir -p "$dir/policies"
    cp "$PKI/server.pem" "$PKI/server-key.pem" "$PKI/issuer-jwks.json" "$dir/"
    cp "$ROOT"/config/policies/*.cedar "$ROOT"/config/policies/*.cedarschema "$dir/policies/"
    cat > "$dir/portcullis.toml" <<EOF
[proxy]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"

[log]
level = "warn"

$2

[policy]
dir = "policies"

[feeds]
max_body_bytes = 1048576

[[feeds.mdm]]
name = "load"
secret = "$MDM_SECRET"

[[tls.certificates]]
cert = "server.pem"
key = "server-key.pem"

[[issuers]]
name = "demo"
issuer = "$PORTCULLIS_ISSUER"
audiences = ["$PORTCULLIS_AUDIENCE"]
algorithms = ["ES256"]
jwks_file = "issuer-jwks.json"
device_claim = "$PORTCULLIS_DEVICE_CLAIM"

[[routes]]
name = "app"
path_prefix = "/"
upstream = "http://127.0.0.1:$UP_PORT"
sensitivity = "medium"
auth = "bearer"
EOF
    (cd "$dir" && exec "$BIN" serve --config portcullis.toml --addr-file addr.json \
        >stdout.log 2>stderr.log) &
    PID[$name]=$!; PIDS+=("${PID[$name]}")
    local n=0
    until [[ -s $dir/addr.json ]]; do
        kill -0 "${PID[$name]}" 2>/dev/null || { cat "$dir/stderr.log" >&2; die "$name exited"; }
        (( n++ < 600 )) || die "$name did not start"
        sleep 0.1
    done
    URL[$name]=https://$(jq -r .proxy "$dir/addr.json")/
    ADMIN[$name]=$(jq -r .admin "$dir/addr.json")
    log "$name (pid ${PID[$name]}) on ${URL[$name]}"
}
start_portcullis sqlite $'[store]\npath = "portcullis.db"'
start_portcullis nats "$(printf '[store]\npath = "portcullis.db"\nkind = "nats"\n\n[store.nats]\nurl = "nats://127.0.0.1:%s"\nreplica = "load"' "$NATS_PORT")"

# The same SEED devices in both, through the MDM feed.
log "seeding $SEED devices into each"
now_ms=$(( $(date +%s) * 1000 ))
for (( off=0; off<SEED; off+=500 )); do
    jq -n -c --argjson now "$now_ms" --argjson off "$off" --argjson n "$SEED" '
        [range($off; [$off + 500, $n] | min) | ("dev-" + (tostring | ("0000" + .)[-5:])) as $d | {
            event_id: ("seed-" + $d), device_id: $d, occurred_at: $now, lifecycle: "enrolled",
            compliance: "compliant", compromised: false, patch_behind: false,
            ownership: "corporate", platform: "macos", os_version: "15.3.2",
            last_check_in: $now, subjects: [ "user-" + ($d | ltrimstr("dev-")) + "@load.example" ] }]' \
        > "$TMP/seed.json"
    for name in sqlite nats; do
        code=$(curl -sS -o "$TMP/seed.body" -w '%{http_code}' --max-time 60 -X POST \
            -H "Authorization: Bearer $MDM_SECRET" -H 'Content-Type: application/json' \
            --data-binary "@$TMP/seed.json" "http://${ADMIN[$name]}/mdm/v1/load/events")
        [[ $code == 2* ]] || die "seeding $name: $code $(head -c 300 "$TMP/seed.body")"
    done
done
for name in sqlite nats; do
    code=$(curl -sS -o /dev/null -w '%{http_code}' --max-time 5 --cacert "$PKI/ca.pem" \
        -H "Authorization: Bearer $TOKEN" "${URL[$name]}")
    [[ $code == 200 ]] || die "$name answered $code to the load token"
done

declare -A TICKS REQS NTICKS
measure() { # round name
    local name=$1 url=${URL[$1]} out=$TMP/wrk-$1-$2.txt
    timeout --kill-after=5 $(( WARMUP + 30 )) wrk -t"$THREADS" -c"$CONNS" -d"$WARMUP"s \
        -H "Authorization: Bearer $TOKEN" "$url" >/dev/null 2>&1 || die "warm-up failed"
    local t0 t1 n0 n1
    t0=$(cpu_ticks "${PID[$name]}"); n0=$(cpu_ticks "$NATS_PID")
    timeout --kill-after=5 $(( DURATION + 30 )) wrk -t"$THREADS" -c"$CONNS" -d"$DURATION"s --latency \
        -H "Authorization: Bearer $TOKEN" "$url" > "$out" 2>&1 || die "wrk failed"
    t1=$(cpu_ticks "${PID[$name]}"); n1=$(cpu_ticks "$NATS_PID")
    local reqs rps p50 p99 bad
    reqs=$(awk '/requests in/ { print $1; exit }' "$out")
    rps=$(awk '/^Requests\/sec:/ { print $2; exit }' "$out")
    p50=$(awk '$1 == "50%" { print $2; exit }' "$out")
    p99=$(awk '$1 == "99%" { print $2; exit }' "$out")
    bad=$(awk '/Non-2xx or 3xx responses:/ { print $NF; exit }' "$out")
    [[ -n $reqs && $reqs -gt 0 ]] || { cat "$out" >&2; die "cannot parse $out"; }
    TICKS[$name]=$(( ${TICKS[$name]:-0} + t1 - t0 ))
    REQS[$name]=$(( ${REQS[$name]:-0} + reqs ))
    NTICKS[$name]=$(( ${NTICKS[$name]:-0} + n1 - n0 ))
    log "round $2, $name: $reqs req, $rps req/s, p50 $p50, p99 $p99, $(awk -v t=$(( t1 - t0 )) -v hz="$CLK_TCK" -v n="$reqs" 'BEGIN { printf "%.1f", t / hz * 1e6 / n }') CPU-us/req${bad:+, non-2xx: $bad}"
}
for (( r=1; r<=ROUNDS; r++ )); do
    if (( r % 2 )); then order="sqlite nats"; else order="nats sqlite"; fi
    for name in $order; do measure "$name" "$r"; done
done

printf '\nstore    requests  CPU-us/req  nats-server CPU-us/req   (%s rounds x %ss, wrk -t%s -c%s, load: %s)\n' \
    "$ROUNDS" "$DURATION" "$THREADS" "$CONNS" "$(cut -d' ' -f1-3 /proc/loadavg)"
for name in sqlite nats; do
    awk -v n="$name" -v r="${REQS[$name]}" -v t="${TICKS[$name]}" -v nt="${NTICKS[$name]}" -v hz="$CLK_TCK" \
        'BEGIN { printf "%-8s %8d  %10.1f  %10.1f\n", n, r, t / hz * 1e6 / r, nt / hz * 1e6 / r }'
done
