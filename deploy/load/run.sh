#!/usr/bin/env bash
# deploy/load/run.sh: CPU per request of portcullis next to two peers, in one run.
#
# One run: one shared plain-HTTP nginx upstream on 127.0.0.1 and three TLS
# proxies in front of it:
#   nginx       TLS reverse proxy, no auth (the floor);
#   haproxy     HAProxy 2.6 with jwt_verify (ES256, the same tokens) plus a
#               device map lookup (device -> allow);
#   portcullis  every check on: JWT, posture (10k seeded devices), Cedar with
#               the default policies (config/policies) and the decision cache
#               at its defaults, no access log.
# Every mode is measured on every peer, interleaved (the peer order rotates
# each round), then one table reports req/s, p50, p99, CPU-µs/req and the
# ratio to nginx per mode. See deploy/load/README.md.
#
# Knobs (environment):
#   DURATION=15        seconds of each measured window
#   WARMUP=3           seconds of warm-up before it: each (mode, peer) is one
#                      load run of WARMUP + DURATION seconds on the same
#                      client connections; only its last DURATION seconds
#                      are measured (the steady state: no reconnects)
#   ROUNDS=1           measure every (mode, peer) this many times (a multiple
#                      of the number of peers puts each peer in each place
#                      of the rotating order equally often)
#   MODES="h1 h1-10k h2 rate"   which modes (any subset, in this order)
#                        h1      wrk, HTTP/1.1, one token
#                        h1-10k  wrk + Lua, HTTP/1.1, TOKENS distinct tokens
#                        h2      h2load, HTTP/2, one token, H2_CONNS x H2_STREAMS
#                        rate    h2load --h1 at a fixed RATE req/s, one token
#   PEERS="nginx haproxy portcullis"
#                      nginx-b may be added: a second nginx proxy with the
#                      same config, the A/A control (how far two identical
#                      peers' p99 and CPU a request move apart in one run);
#                      and nginx-id: that nginx config plus the 13 lines
#                      portcullis adds to a forwarded request, less the
#                      client's Authorization (the request the upstream
#                      reads behind portcullis, without any check)
#   CONNS=50           wrk connections (-c)
#   THREADS=2          wrk / h2load threads (-t)
#   TOKENS=10000       distinct tokens / subjects / devices for h1-10k
#   FILL_TIMEOUT=300   h1-10k: at most this many seconds for the pass that sends
#                      every token once before the warm-up (fills the caches)
#   H2_CONNS=10 H2_STREAMS=10   h2 mode: connections x concurrent streams
#   RATE=5000 RATE_CONNS=50     rate mode: total req/s over this many connections
#   RATE_RAMP_MS=1     rate mode: each h2load thread opens one connection every
#                      this many ms (h2load -r/--rate-period), so the
#                      connections' request timers are spread evenly over
#                      the period; 0: all at once, as before stop 34 (each
#                      connection's timer then starts when its handshake
#                      ends, and when those ends bunch up the fixed rate
#                      becomes a burst of up to RATE_CONNS requests every
#                      period: the latency measured is then the burst's,
#                      set by start-up, not the proxy's; the note line's
#                      "phase" shows how even the starts were)
#   PORTCULLIS_BIN     prebuilt binary; default: the release build
#                      (scripts/release-build.sh: cargo build --release with
#                      the profile in build/pgo) into
#                      ${CARGO_TARGET_DIR:-<repo>/target} and use release/portcullis
#   PIN=0              1: pin every proxy's worker threads one per CPU, alike:
#                      portcullis [listener] pin_workers, nginx
#                      worker_cpu_affinity auto, HAProxy cpu-map (the shared
#                      upstream nginx is left unpinned); 0: none pinned, as the outside harness ran them
#   PORTCULLIS_EXTRA   extra TOML appended to portcullis's config (experiments)
#   PROFILE_DIR        when set: perf record -e cpu-clock -g portcullis during
#                      each of its measured runs, reports (text) into this dir
#   PERF_CALLGRAPH     perf's call-graph option for PROFILE_DIR (default -g;
#                      "--call-graph dwarf" for stacks through code without
#                      frame pointers)
#   CALLGRIND=1        run portcullis and the nginx proxy under valgrind
#                      --tool=callgrind and report user-space instructions
#                      (Ir) per request for their runs, and portcullis's count
#                      over nginx's per mode: a repeatable measure on a busy
#                      machine (use a small CONNS; wall-clock numbers of both
#                      are meaningless then)
#   CACHE_SIM=1        with CALLGRIND=1: also simulate the caches
#                      (--cache-sim=yes) and report first-level instruction
#                      misses (I1mr), first-level data misses (D1mr + D1mw)
#                      and last-level data misses (DLmr + DLmw) per request,
#                      for both peers: the cost of a large code path and of
#                      cold memory (10k tokens) as counts that do not move
#                      with the machine's noise
#   CACHE_LL           with CACHE_SIM=1: the simulated last level as
#                      size,assoc,line (valgrind --LL), e.g. 2097152,16,64
#   ORDER_FILE=path    with CALLGRIND=1: also write the functions portcullis
#                      ran in the measured runs (every mode), most
#                      instructions first, by their linked symbol names, to
#                      path: the link order file (build/link.order, see
#                      build.rs)
#   PORTCULLIS_POLICY  extra keys for portcullis's [policy] table (experiments)
#   PORTCULLIS_PROXY   extra keys for portcullis's [proxy] table (experiments)
#   STRACE_DIR         when set: strace -c -f every peer's processes during its
#                      measured runs, syscall counts per request into this dir
#                      (counts only: ptrace makes every timing meaningless)
#   SCHED_DIR          when set (root, bpftrace): trace the scheduler during
#                      every peer's measured runs (sched.bt) and add to each
#                      run's line who had the CPUs and who waited for one:
#                      the CPUs' idle time, and the waits longer than 0.5 ms
#                      for a CPU of the proxy, the load generator and the
#                      upstream, and the share of each one's wake-ups that
#                      put it on a busy CPU while another was idle (each
#                      process's raw counts in this dir)
#   BASE_PORT=18080    first port tried when picking free loopback ports
#   KEEP_TMP=1         keep the scratch directory (configs, logs) after the run
#
# Only 127.0.0.1 is ever used as a target. Every load loop is a bounded run
# (wrk -d / h2load -D, wrapped in timeout). Every process started here is
# stopped on exit.

set -euo pipefail

DURATION=${DURATION:-15}
WARMUP=${WARMUP:-3}
ROUNDS=${ROUNDS:-1}
MODES=${MODES:-h1 h1-10k h2 rate}
PEERS=${PEERS:-nginx haproxy portcullis}
CONNS=${CONNS:-50}
PIN=${PIN:-0}
if [[ $PIN == 1 ]]; then
    PC_PIN=$'[listener]\npin_workers = true'
    NG_PIN="worker_cpu_affinity auto;"
    HA_PIN="cpu-map auto:1/1-2 0-1"
else
    PC_PIN="" NG_PIN="" HA_PIN=""
fi
THREADS=${THREADS:-2}
TOKENS=${TOKENS:-10000}
H2_CONNS=${H2_CONNS:-10}
H2_STREAMS=${H2_STREAMS:-10}
RATE=${RATE:-5000}
RATE_CONNS=${RATE_CONNS:-50}
RATE_RAMP_MS=${RATE_RAMP_MS:-1}
BASE_PORT=${BASE_PORT:-18080}
KEEP_TMP=${KEEP_TMP:-0}
PROFILE_DIR=${PROFILE_DIR:-}
STRACE_DIR=${STRACE_DIR:-}
SCHED_DIR=${SCHED_DIR:-}
FILL_TIMEOUT=${FILL_TIMEOUT:-300}
CALLGRIND=${CALLGRIND:-0}
CACHE_SIM=${CACHE_SIM:-0}
CACHE_LL=${CACHE_LL:-}
ORDER_FILE=${ORDER_FILE:-}

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)
# shellcheck source=deploy/load/lib.sh
source "$SCRIPT_DIR/lib.sh"   # cpu_ticks, cpu_split, to_ms, h2load_percentiles

log() { printf '[load] %s\n' "$*" >&2; }
die() { printf '[load] FAIL: %s\n' "$*" >&2; exit 1; }

for v in DURATION WARMUP CONNS THREADS ROUNDS BASE_PORT TOKENS H2_CONNS H2_STREAMS RATE RATE_CONNS RATE_RAMP_MS; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a non-negative integer (got '${!v}')"
done
(( DURATION > 0 && CONNS > 0 && THREADS > 0 && ROUNDS > 0 && TOKENS > 0 )) \
    || die "DURATION, CONNS, THREADS, ROUNDS, TOKENS must be > 0"
(( CONNS >= THREADS && H2_CONNS >= THREADS && RATE_CONNS >= THREADS )) \
    || die "CONNS, H2_CONNS and RATE_CONNS must be >= THREADS ($THREADS)"
(( RATE >= RATE_CONNS )) || die "RATE ($RATE) must be >= RATE_CONNS ($RATE_CONNS)"
for m in $MODES; do [[ $m =~ ^(h1|h1-10k|h2|rate)$ ]] || die "unknown mode '$m'"; done
[[ $CACHE_SIM != 1 || $CALLGRIND == 1 ]] || die "CACHE_SIM=1 needs CALLGRIND=1"
[[ -z $CACHE_LL || $CACHE_SIM == 1 ]] || die "CACHE_LL needs CACHE_SIM=1"
[[ -z $CACHE_LL || $CACHE_LL =~ ^[0-9]+,[0-9]+,[0-9]+$ ]] || die "CACHE_LL is size,assoc,line (got '$CACHE_LL')"
[[ -z $ORDER_FILE || $CALLGRIND == 1 ]] || die "ORDER_FILE needs CALLGRIND=1"
for p in $PEERS; do [[ $p =~ ^(nginx|nginx-b|nginx-id|haproxy|portcullis)$ ]] || die "unknown peer '$p'"; done
[[ " $PEERS " == *" nginx "* ]] || die "PEERS must include nginx (the ratios are to nginx)"

# ---------------------------------------------------------------- cleanup ---
TMP=$(mktemp -d /tmp/portcullis-load.XXXXXX)
STARTED_PIDS=()   # every background process we started, stopped in reverse order

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    local i pid
    for (( i=${#STARTED_PIDS[@]}-1; i>=0; i-- )); do
        pid=${STARTED_PIDS[i]}
        kill -0 "$pid" 2>/dev/null || continue
        kill -TERM "$pid" 2>/dev/null || true
    done
    for (( i=${#STARTED_PIDS[@]}-1; i>=0; i-- )); do
        pid=${STARTED_PIDS[i]}
        local n=0
        while kill -0 "$pid" 2>/dev/null && (( n < 50 )); do sleep 0.1; n=$((n+1)); done
        if kill -0 "$pid" 2>/dev/null; then
            log "pid $pid did not stop on SIGTERM; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    done
    if [[ $KEEP_TMP == 1 || $rc -ne 0 ]]; then
        log "scratch directory kept: $TMP"
    else
        rm -rf "$TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ------------------------------------------------------------ dependencies ---
# Every tool the run needs, from Debian (bookworm: nginx 1.22, HAProxy 2.6,
# nghttp2-client 1.52 for h2load).
need=()
command -v nginx   >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]]   || need+=(nginx)
command -v haproxy >/dev/null 2>&1 || [[ -x /usr/sbin/haproxy ]] || need+=(haproxy)
command -v wrk     >/dev/null 2>&1 || need+=(wrk)
command -v h2load  >/dev/null 2>&1 || need+=(nghttp2-client)
command -v curl    >/dev/null 2>&1 || need+=(curl)
command -v jq      >/dev/null 2>&1 || need+=(jq)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
if (( ${#need[@]} )); then
    log "installing: ${need[*]}"
    SUDO=()
    if (( EUID != 0 )); then
        command -v sudo >/dev/null 2>&1 || die "need root (or sudo) to apt-get install ${need[*]}"
        SUDO=(sudo)
    fi
    export DEBIAN_FRONTEND=noninteractive
    if ! "${SUDO[@]}" apt-get install -y --no-install-recommends "${need[@]}"; then
        "${SUDO[@]}" apt-get update
        "${SUDO[@]}" apt-get install -y --no-install-recommends "${need[@]}"
    fi
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)
[[ -x $NGINX ]] || die "nginx not found after install"
[[ -x $HAPROXY ]] || die "haproxy not found after install"
for t in wrk h2load curl jq openssl; do command -v "$t" >/dev/null || die "$t not found after install"; done
if [[ $CALLGRIND == 1 ]]; then
    for t in valgrind callgrind_control; do
        command -v "$t" >/dev/null 2>&1 || die "CALLGRIND=1 needs $t (Debian: apt-get install valgrind)"
    done
fi
if [[ -n $SCHED_DIR ]]; then
    command -v bpftrace >/dev/null 2>&1 || die "SCHED_DIR needs bpftrace (Debian: apt-get install bpftrace)"
    [[ $(id -u) == 0 ]] || die "SCHED_DIR needs root (bpftrace)"
    mkdir -p "$SCHED_DIR"
    SCHED_DIR=$(cd "$SCHED_DIR" && pwd)
fi
if [[ -n $PROFILE_DIR ]]; then
    command -v perf >/dev/null 2>&1 || die "PROFILE_DIR needs perf (Debian: apt-get install linux-perf)"
    mkdir -p "$PROFILE_DIR"
    PROFILE_DIR=$(cd "$PROFILE_DIR" && pwd)
fi

# -------------------------------------------------------------- portcullis ---
if [[ -n ${PORTCULLIS_BIN:-} ]]; then
    BIN=$PORTCULLIS_BIN
else
    log "building portcullis (scripts/release-build.sh: the release build, with its optimisation profile)"
    "$REPO_ROOT/scripts/release-build.sh" --quiet
    target_dir=${CARGO_TARGET_DIR:-target}
    [[ $target_dir = /* ]] || target_dir=$REPO_ROOT/$target_dir
    BIN=$target_dir/release/portcullis
fi
[[ -x $BIN ]] || die "portcullis binary not found or not executable: $BIN"
log "portcullis: $BIN"
log "worker pinning (PIN=$PIN): $([[ $PIN == 1 ]] && echo "every proxy one worker per CPU" || echo "none")"

# ------------------------------------------------------------------ helpers ---
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

NEXT_PORT=$BASE_PORT
pick_port() {   # prints a loopback port nobody is listening on
    while port_in_use "$NEXT_PORT"; do NEXT_PORT=$((NEXT_PORT+1)); done
    echo "$NEXT_PORT"
    NEXT_PORT=$((NEXT_PORT+1))
}

wait_for_port() {   # port, name, pid[, seconds]: wait (10 s), fail if the process died
    local port=$1 name=$2 pid=$3 secs=${4:-10} n=0
    until port_in_use "$port"; do
        kill -0 "$pid" 2>/dev/null || die "$name exited before listening on 127.0.0.1:$port"
        (( n++ < secs * 10 )) || die "$name not listening on 127.0.0.1:$port after $secs s"
        sleep 0.1
    done
}

CLK_TCK=$(getconf CLK_TCK)

proc_pids() {   # root pid -> the root and its direct children (nginx master + workers)
    echo "$1"
    pgrep -P "$1" || true
}

check_status() {   # name, expected code, url, [curl args...]
    local name=$1 want=$2 url=$3; shift 3
    local got
    got=$(curl -sS -o "$TMP/check.body" -w '%{http_code}' --max-time 5 \
        --cacert "$PKI/ca.pem" "$@" "$url") || die "$name: curl $url failed"
    if [[ $got != "$want" ]]; then
        log "$name: body: $(head -c 300 "$TMP/check.body")"
        die "$name: $url returned $got, expected $want"
    fi
    log "$name: $url -> $got (as expected)"
}

# ------------------------------------- PKI and tokens via portcullis demo ---
# The demo writes a dev CA, a server certificate for 127.0.0.1, an ES256
# issuer key and JWKS; its dev issuer's /token endpoint mints the TOKENS
# tokens (one subject and device each, valid for an hour), then it stops.
PKI=$TMP/pki
mkdir -p "$PKI"
log "generating dev CA, server certificate, issuer key (portcullis demo)"
"$BIN" demo --data-dir "$PKI" --proxy-port 0 --admin-port 0 >"$TMP/demo.log" 2>&1 &
DEMO_PID=$!
STARTED_PIDS+=("$DEMO_PID")
n=0
until [[ -s $PKI/demo.env ]]; do
    kill -0 "$DEMO_PID" 2>/dev/null || { cat "$TMP/demo.log" >&2; die "portcullis demo exited early"; }
    (( n++ < 300 )) || die "demo.env not written after 30 s"
    sleep 0.1
done
sleep 0.2   # demo.env is written in one go, but be generous
# shellcheck disable=SC1091
source "$PKI/demo.env"
for v in PORTCULLIS_ISSUER PORTCULLIS_AUDIENCE PORTCULLIS_DEVICE_CLAIM; do
    [[ -n ${!v:-} ]] || die "$v missing from demo.env"
done
for f in ca.pem server.pem server-key.pem issuer-key.pem issuer-jwks.json; do
    [[ -s $PKI/$f ]] || die "demo did not write $f"
done
[[ $PORTCULLIS_ISSUER == http://127.0.0.1:* ]] || die "demo issuer is not on 127.0.0.1: $PORTCULLIS_ISSUER"

log "minting $TOKENS tokens (sub user-N@load.example, device dev-N) from the demo issuer"
TOKENS_FILE=$TMP/tokens.txt
DEVICES_FILE=$TMP/devices.txt
awk -v n="$TOKENS" 'BEGIN { for (i = 0; i < n; i++) printf "dev-%05d\n", i }' > "$DEVICES_FILE"
awk -v n="$TOKENS" -v iss="$PORTCULLIS_ISSUER" 'BEGIN {
    for (i = 0; i < n; i++) printf "url = \"%s/token?sub=user-%05d@load.example&device_id=dev-%05d\"\n", iss, i, i }' \
    > "$TMP/mint.curl"
timeout 300 curl -sS --fail --max-time 280 -K "$TMP/mint.curl" | jq -r '.access_token' > "$TOKENS_FILE" \
    || die "minting tokens from the demo issuer failed"
(( $(wc -l < "$TOKENS_FILE") == TOKENS )) || die "minted $(wc -l < "$TOKENS_FILE") tokens, wanted $TOKENS"
kill -TERM "$DEMO_PID" 2>/dev/null || true
wait "$DEMO_PID" 2>/dev/null || true
TOKEN=$(head -n 1 "$TOKENS_FILE")

# HAProxy 2.6's jwt_verify reads the issuer's public key as a PEM file
# (PEM_read_bio_PUBKEY; a certificate is refused as "file not found").
openssl pkey -in "$PKI/issuer-key.pem" -pubout -out "$PKI/issuer-pub.pem" 2>/dev/null \
    || die "cannot write the issuer public key for HAProxy"

# ------------------------------------------------------ shared upstream ---
UP_PORT=$(pick_port)
UP=$TMP/upstream
mkdir -p "$UP/logs"
cat > "$UP/nginx.conf" <<EOF
worker_processes 1;
pid $UP/nginx.pid;
error_log $UP/logs/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $UP/client_body;
    proxy_temp_path $UP/proxy;
    fastcgi_temp_path $UP/fastcgi;
    uwsgi_temp_path $UP/uwsgi;
    scgi_temp_path $UP/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    server {
        listen 127.0.0.1:$UP_PORT;
        default_type text/plain;
        location / { return 200 "ok\n"; }
        # Diagnostics for the script: connections accepted / requests served.
        location = /__stub_status { stub_status; }
    }
}
EOF
"$NGINX" -t -q -p "$UP" -e "$UP/logs/error.log" -c "$UP/nginx.conf" || die "upstream nginx config invalid"
"$NGINX" -p "$UP" -e "$UP/logs/error.log" -c "$UP/nginx.conf" -g 'daemon off;' 2>>"$UP/logs/stderr.log" &
UP_PID=$!
STARTED_PIDS+=("$UP_PID")
wait_for_port "$UP_PORT" "upstream nginx" "$UP_PID"
body=$(curl -sS --max-time 5 "http://127.0.0.1:$UP_PORT/") || die "upstream not answering"
[[ $body == ok ]] || die "upstream returned unexpected body: $body"
log "upstream nginx (pid $UP_PID, 1 worker) on 127.0.0.1:$UP_PORT"

declare -A URL ROOT

# ------------------------------------------------------------- portcullis ---
if [[ " $PEERS " == *" portcullis "* ]]; then
PC=$TMP/portcullis
mkdir -p "$PC/policies"
cp "$PKI/server.pem" "$PKI/server-key.pem" "$PKI/issuer-jwks.json" "$PC/"
cp "$REPO_ROOT"/config/policies/*.cedar "$REPO_ROOT"/config/policies/*.cedarschema "$PC/policies/"
MDM_SECRET=$(openssl rand -hex 24)
cat > "$PC/portcullis.toml" <<EOF
[proxy]
listen = "127.0.0.1:0"
${PORTCULLIS_PROXY:-}

[admin]
listen = "127.0.0.1:0"

$PC_PIN

[log]
level = "warn"

[store]
path = "portcullis.db"

[policy]
dir = "policies"
${PORTCULLIS_POLICY:-}

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
${PORTCULLIS_EXTRA:-}
EOF
"$BIN" check --config "$PC/portcullis.toml" >&2 || die "portcullis check rejected the config"
WRAP=()
if [[ $CALLGRIND == 1 ]]; then
    WRAP=(valgrind --tool=callgrind --callgrind-out-file="$PC/callgrind.out" --log-file="$PC/valgrind.log")
    if [[ $CACHE_SIM == 1 ]]; then WRAP+=(--cache-sim=yes ${CACHE_LL:+--LL=$CACHE_LL}); fi
    # Symbol names as the linker sees them, for the order file.
    if [[ -n $ORDER_FILE ]]; then WRAP+=(--demangle=no); fi
fi
(cd "$PC" && exec "${WRAP[@]}" "$BIN" serve --config "$PC/portcullis.toml" --addr-file "$PC/addr.json" \
    >"$PC/stdout.log" 2>"$PC/stderr.log") &
PC_PID=$!
STARTED_PIDS+=("$PC_PID")
n=0
until [[ -s $PC/addr.json ]]; do
    kill -0 "$PC_PID" 2>/dev/null || { cat "$PC/stderr.log" >&2; die "portcullis serve exited early"; }
    (( n++ < 600 )) || die "portcullis did not write its addr file after 60 s"
    sleep 0.1
done
addr_json=$(< "$PC/addr.json")
PC_ADDR=$(sed -n 's/.*"proxy":"\([^"]*\)".*/\1/p' <<< "$addr_json")
PC_ADMIN=$(sed -n 's/.*"admin":"\([^"]*\)".*/\1/p' <<< "$addr_json")
[[ -n $PC_ADDR && -n $PC_ADMIN ]] || die "cannot parse $PC/addr.json: $addr_json"
URL[portcullis]=https://$PC_ADDR/
ROOT[portcullis]=$PC_PID
log "portcullis (pid $PC_PID) on ${URL[portcullis]}, admin http://$PC_ADMIN"

# Seed the TOKENS devices through the generic MDM feed: managed, compliant,
# corporate, patched, checked in now; one owner each. 500 per request.
log "seeding $TOKENS devices through the MDM feed"
now_ms=$(( $(date +%s) * 1000 ))
split -l 500 -d -a 4 "$DEVICES_FILE" "$TMP/devices.part."
for part in "$TMP"/devices.part.*; do
    jq -R -s -c --argjson now "$now_ms" '
        split("\n") | map(select(length > 0)) | map({
            event_id: ("load-seed-" + .), device_id: ., occurred_at: $now,
            lifecycle: "enrolled", compliance: "compliant", compromised: false,
            patch_behind: false, ownership: "corporate", platform: "macos",
            os_version: "15.3.2", last_check_in: $now,
            subjects: [ "user-" + ltrimstr("dev-") + "@load.example" ] })' "$part" > "$part.json"
    code=$(curl -sS -o "$TMP/seed.body" -w '%{http_code}' --max-time 30 -X POST \
        -H "Authorization: Bearer $MDM_SECRET" -H 'Content-Type: application/json' \
        --data-binary "@$part.json" "http://$PC_ADMIN/mdm/v1/load/events") || die "seeding: curl failed"
    [[ $code == 2* ]] || die "seeding: MDM feed answered $code: $(head -c 300 "$TMP/seed.body")"
done
fi

# ------------------------------------------------------ nginx TLS proxy ---
# start_nginx_proxy PEER: one nginx TLS reverse proxy (no auth) in front of
# the upstream. PEER nginx is the floor every ratio is taken to; nginx-b,
# when in PEERS, is a second instance of the very same config: the A/A
# control, whose rounds against nginx show how far two identical peers'
# p99 and CPU move apart within one run on this machine. nginx-id, when
# in PEERS, is the same config plus the 13 lines portcullis adds to each
# request it forwards (its names, values of the lengths portcullis sends
# in the h1-10k mode), without the client's Authorization line, which
# portcullis keeps by default (`forward_authorization`): the request the
# upstream reads behind portcullis, from a proxy that checks nothing.
ID_LINES='proxy_set_header Authorization "";
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Forwarded-Proto https;
            proxy_set_header X-Forwarded-Host $http_host;
            proxy_set_header X-Request-Id "d6b660229045-0000000000000001";
            proxy_set_header X-Portcullis-Route app;
            proxy_set_header X-Portcullis-Subject "user-00000@load.example";
            proxy_set_header X-Portcullis-Issuer demo;
            proxy_set_header X-Portcullis-Device dev-00000;
            proxy_set_header X-Portcullis-Binding none;
            proxy_set_header X-Portcullis-Device-Compliance compliant;
            proxy_set_header X-Portcullis-Device-Lifecycle enrolled;
            proxy_set_header X-Portcullis-Snapshot 10000;
            proxy_set_header X-Portcullis-Decision allow;'
start_nginx_proxy() {
    local peer=$1 extra=${2:-} port dir pid
    port=$(pick_port)
    dir=$TMP/$peer-proxy
    mkdir -p "$dir/logs"
    cp "$PKI/server.pem" "$PKI/server-key.pem" "$dir/"
    cat > "$dir/nginx.conf" <<EOF
worker_processes 2;
$NG_PIN
pid $dir/nginx.pid;
error_log $dir/logs/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $dir/client_body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    upstream backend {
        server 127.0.0.1:$UP_PORT;
        keepalive 256;
        keepalive_requests 10000000;
        keepalive_timeout 120s;
    }
    server {
        listen 127.0.0.1:$port ssl http2;
        ssl_certificate $dir/server.pem;
        ssl_certificate_key $dir/server-key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            $extra
        }
    }
}
EOF
    "$NGINX" -t -q -p "$dir" -e "$dir/logs/error.log" -c "$dir/nginx.conf" || die "$peer proxy config invalid"
    local wrap=() global='daemon off;'
    if [[ $CALLGRIND == 1 && $peer == nginx ]]; then
        # One process (no master): callgrind_control did not find the forked
        # workers (no vgdb FIFO for them; they run as another user). Under
        # valgrind a process runs one thread at a time anyway, and instructions
        # per request do not depend on the worker count.
        wrap=(valgrind --tool=callgrind --callgrind-out-file="$dir/callgrind.out" --log-file="$dir/valgrind.log")
        if [[ $CACHE_SIM == 1 ]]; then wrap+=(--cache-sim=yes ${CACHE_LL:+--LL=$CACHE_LL}); fi
        global='daemon off; master_process off;'
    fi
    "${wrap[@]}" "$NGINX" -p "$dir" -e "$dir/logs/error.log" -c "$dir/nginx.conf" -g "$global" 2>>"$dir/logs/stderr.log" &
    pid=$!
    STARTED_PIDS+=("$pid")
    wait_for_port "$port" "$peer proxy" "$pid" $(( CALLGRIND == 1 ? 60 : 10 ))
    URL[$peer]=https://127.0.0.1:$port/
    ROOT[$peer]=$pid
    log "$peer TLS proxy (pid $pid, $( (( ${#wrap[@]} )) && echo "one process under callgrind" || echo "2 workers")) on ${URL[$peer]}"
}
start_nginx_proxy nginx
if [[ " $PEERS " == *" nginx-b "* ]]; then start_nginx_proxy nginx-b; fi
if [[ " $PEERS " == *" nginx-id "* ]]; then start_nginx_proxy nginx-id "$ID_LINES"; fi

# ---------------------------------------------------------------- HAProxy ---
if [[ " $PEERS " == *" haproxy "* ]]; then
HA_PORT=$(pick_port)
HA=$TMP/haproxy
mkdir -p "$HA"
cat "$PKI/server.pem" "$PKI/server-key.pem" > "$HA/server.pem"
cp "$PKI/issuer-pub.pem" "$HA/"
awk '{ print $1, "allow" }' "$DEVICES_FILE" > "$HA/devices.map"
cat > "$HA/haproxy.cfg" <<EOF
global
    nbthread 2
    $HA_PIN
    maxconn 8192
    pidfile $HA/haproxy.pid
    tune.ssl.default-dh-param 2048

defaults
    mode http
    timeout connect 5s
    timeout client 120s
    timeout server 120s
    timeout http-keep-alive 120s
    http-reuse always

frontend fe
    bind 127.0.0.1:$HA_PORT ssl crt $HA/server.pem alpn h2,http/1.1
    # The bearer token: ES256 signature (jwt_verify), expiry, issuer and
    # audience, then the device claim looked up in a map.
    http-request set-var(txn.bearer) http_auth_bearer
    http-request set-var(txn.alg) var(txn.bearer),jwt_header_query('\$.alg')
    http-request deny deny_status 401 unless { var(txn.alg) -m str ES256 }
    http-request deny deny_status 401 unless { var(txn.bearer),jwt_verify(txn.alg,"$HA/issuer-pub.pem") -m int 1 }
    http-request set-var(txn.now) date
    http-request set-var(txn.exp) var(txn.bearer),jwt_payload_query('\$.exp','int')
    http-request deny deny_status 401 if { var(txn.exp),sub(txn.now) -m int lt 0 }
    http-request deny deny_status 401 unless { var(txn.bearer),jwt_payload_query('\$.iss') -m str $PORTCULLIS_ISSUER }
    http-request deny deny_status 401 unless { var(txn.bearer),jwt_payload_query('\$.aud') -m str $PORTCULLIS_AUDIENCE }
    http-request set-var(txn.device) var(txn.bearer),jwt_payload_query('\$.$PORTCULLIS_DEVICE_CLAIM')
    http-request deny deny_status 403 unless { var(txn.device),map($HA/devices.map) -m str allow }
    default_backend app

backend app
    server up 127.0.0.1:$UP_PORT
EOF
"$HAPROXY" -c -q -f "$HA/haproxy.cfg" || die "haproxy config invalid"
"$HAPROXY" -db -f "$HA/haproxy.cfg" >"$HA/stdout.log" 2>"$HA/stderr.log" &
HA_PID=$!
STARTED_PIDS+=("$HA_PID")
wait_for_port "$HA_PORT" "haproxy" "$HA_PID"
URL[haproxy]=https://127.0.0.1:$HA_PORT/
ROOT[haproxy]=$HA_PID
log "HAProxy $("$HAPROXY" -v | awk 'NR == 1 { print $3 }') (pid $HA_PID, 2 threads) on ${URL[haproxy]}"
fi

# ---------------------------------------------------------- sanity checks ---
AUTH=(-H "Authorization: Bearer $TOKEN")
LAST_TOKEN=$(tail -n 1 "$TOKENS_FILE")
# The same token with one signature character changed (not the last: its low
# bits are padding).
c=${TOKEN: -10:1}
if [[ $c == A ]]; then r=B; else r=A; fi
TAMPERED=${TOKEN:0:${#TOKEN}-10}$r${TOKEN: -9}
for p in $PEERS; do
    check_status "$p" 200 "${URL[$p]}" "${AUTH[@]}"
    [[ $(< "$TMP/check.body") == ok ]] || die "$p: unexpected body: $(head -c 300 "$TMP/check.body")"
    check_status "$p" 200 "${URL[$p]}" --http2 "${AUTH[@]}"
    if [[ $p != nginx* ]]; then
        check_status "$p" 401 "${URL[$p]}"
        check_status "$p" 200 "${URL[$p]}" -H "Authorization: Bearer $LAST_TOKEN"
        check_status "$p" 401 "${URL[$p]}" -H "Authorization: Bearer $TAMPERED"
    fi
done

# ------------------------------------------------------------------- load ---
metric() {   # sum of a metric's samples on the portcullis admin endpoint
    curl -sS --max-time 5 "http://$PC_ADMIN/metrics" 2>/dev/null \
        | awk -v m="$1" '$1 == m || index($1, m "{") == 1 { s += $NF } END { printf "%d", s }'
}

opened_by_reason() {   # "none_idle all_busy closed": portcullis's new upstream connections so far
    local r out=""
    for r in none_idle all_busy closed; do
        out+="$(metric "portcullis_upstream_connections_opened_total{reason=\"$r\"}") "
    done
    echo "$out"
}

upstream_stub() {   # "accepted_connections requests" of the upstream nginx
    curl -sS --max-time 5 "http://127.0.0.1:$UP_PORT/__stub_status" \
        | awk '/^ *[0-9]+ +[0-9]+ +[0-9]+ *$/ { print $1, $3; exit }'
}

cat > "$TMP/rotate.lua" <<'EOF'
-- Rotates the Authorization header over the tokens file (one token a line).
-- Arguments: tokens file, wrk thread count (each thread starts at its own
-- share of the file). No response() callback: with one, wrk would copy
-- every response's headers and body and call into Lua for each, client CPU
-- on the cores the peers share. (The cache-filling pass is curl's, below.)
local tokens = {}
local idx = 0
local next_tid = 0
function setup(thread)
  thread:set("tid", next_tid)
  next_tid = next_tid + 1
end
function init(args)
  for line in io.lines(args[1]) do
    if #line > 0 then tokens[#tokens + 1] = "Bearer " .. line end
  end
  local n = tonumber(args[2]) or 1
  idx = ((tid or 0) * math.ceil(#tokens / n)) % #tokens
end
function request()
  idx = idx % #tokens + 1
  return wrk.format(nil, nil, { ["Authorization"] = tokens[idx] })
end
EOF

# cg_events EVENT PID...: the running callgrinds' count of EVENT, summed
# over their threads ("Totals:" then one "Th N <count>" line per thread).
cg_events() {
    local ev=$1 p
    shift
    for p in "$@"; do
        callgrind_control -e "$ev" "$p"
    done | awk '$1 == "Th" { gsub(/,/, "", $NF); s += $NF } END { printf "%.0f", s }'
}

# run_load mode, duration, url, output: one bounded load run; the output is
# either wrk's or h2load's (with a per-request log in output.log).
run_load() {
    local mode=$1 d=$2 url=$3 out=$4
    local limit=$(( d + 30 ))
    case $mode in
        h1)
            timeout --kill-after=5 "$limit" wrk -t"$THREADS" -c"$CONNS" -d"$d"s --latency \
                "${AUTH[@]}" "$url" > "$out" 2>&1 ;;
        h1-10k)
            timeout --kill-after=5 "$limit" wrk -t"$THREADS" -c"$CONNS" -d"$d"s --latency \
                -s "$TMP/rotate.lua" "$url" -- "$TOKENS_FILE" "$THREADS" > "$out" 2>&1 ;;
        h1-10k-fill)   # every token once, 8 keep-alive connections (bounded by FILL_TIMEOUT)
            awk -v u="$url" -v ca="$PKI/ca.pem" 'NR > 1 { print "next" } { printf "url = \"%s\"\nheader = \"Authorization: Bearer %s\"\ncacert = \"%s\"\noutput = \"/dev/null\"\n", u, $0, ca }' \
                "$TOKENS_FILE" > "$TMP/fill.curl"
            timeout --kill-after=5 "$FILL_TIMEOUT" curl -sS --parallel --parallel-max 8 \
                -K "$TMP/fill.curl" > "$out" 2>&1 ;;
        h2)
            timeout --kill-after=5 "$limit" h2load -t"$THREADS" -c"$H2_CONNS" -m"$H2_STREAMS" \
                -D"$d" "${AUTH[@]}" --log-file="$out.log" "$url" > "$out" 2>&1 ;;
        rate)
            # With a ramp, h2load's rate mode (-r, exclusive with -D): each
            # client sends its share of -n at --rps, so the run lasts d
            # seconds plus the ramp.
            local per=$(( RATE / RATE_CONNS )) span=(-D"$d")
            (( RATE_RAMP_MS == 0 )) \
                || span=(-r"$THREADS" --rate-period="${RATE_RAMP_MS}ms" -n $(( per * RATE_CONNS * d )))
            timeout --kill-after=5 "$limit" h2load --h1 -t"$THREADS" -c"$RATE_CONNS" \
                --rps="$per" "${span[@]}" "${AUTH[@]}" --log-file="$out.log" \
                "$url" > "$out" 2>&1 ;;
    esac || { tail -n 20 "$out" >&2; die "$mode load against $url failed"; }
}

# parse_load mode, output -> "requests seconds req/s p50_ms p99_ms errors"
parse_load() {   # mode, output[, window start in µs since the epoch: h2load latencies from then]
    local mode=$1 out=$2 from=${3:-0}
    case $mode in
        h1|h1-10k)
            local reqs secs rps p50 p99 non2xx sockerr
            reqs=$(awk '/requests in/ { print $1; exit }' "$out")
            secs=$(awk '/requests in/ { sub(/,$/, "", $4); print $4; exit }' "$out")
            rps=$(awk '/^Requests\/sec:/ { print $2; exit }' "$out")
            p50=$(awk '$1 == "50%" { print $2; exit }' "$out")
            p99=$(awk '$1 == "99%" { print $2; exit }' "$out")
            non2xx=$(awk '/Non-2xx or 3xx responses:/ { print $NF; exit }' "$out")
            sockerr=$(sed -n 's/.*Socket errors: *//p' "$out" | tr -d ' ')
            [[ -n $reqs && -n $secs && -n $rps && -n $p50 && -n $p99 ]] || { cat "$out" >&2; die "cannot parse wrk output $out"; }
            echo "$reqs $(awk -v ms="$(to_ms "$secs")" 'BEGIN { print ms / 1000 }') $rps $(to_ms "$p50") $(to_ms "$p99") ${non2xx:-0}${sockerr:+/sock:$sockerr}"
            ;;
        h2|rate)
            # "finished in 15.00s, 12345.67 req/s, ..."; "requests: N total, N started,
            # N done, N succeeded, F failed, E errored, T timeout"; the log file has
            # one line per request: start (µs), status, duration (µs).
            local secs rps done ok
            secs=$(awk '/^finished in/ { v = $3; sub(/s,$/, "", v); print v; exit }' "$out")
            rps=$(awk '/^finished in/ { print $4; exit }' "$out")
            done=$(awk '/^requests:/ { print $6; exit }' "$out")
            ok=$(awk '/^requests:/ { print $8; exit }' "$out")
            [[ -n $secs && -n $rps && -n $done && -s $out.log ]] || { cat "$out" >&2; die "cannot parse h2load output $out"; }
            local p50 p99 non2xx
            non2xx=$(awk '$2 < 200 || $2 > 399 { bad++ } END { print bad + 0 }' "$out.log")
            read -r p50 p99 < <(h2load_percentiles "$out.log" "$from")
            echo "$done $secs $rps $p50 $p99 $(( non2xx + done - ok ))"
            ;;
    esac
}

declare -A TOT_REQS TOT_TICKS TOT_SECS BAD P50_L P99_L UPC TOT_IR
NOTES=()
measure() {   # round, mode, peer
    local round=$1 mode=$2 name=$3 url=${URL[$3]} root=${ROOT[$3]}
    local key="$mode/$name" out=$TMP/load-$2-$3-$1.txt
    local -a pids
    if [[ $mode == h1-10k ]]; then
        log "round $round, $mode, $name: sending each of the $TOKENS tokens once (fills the caches)"
        run_load h1-10k-fill 0 "$url" "$TMP/load-fill-$name-$round.txt"
    fi
    # One load run of WARMUP + DURATION seconds on the same client
    # connections: the measured window is its last DURATION seconds, so it
    # sees the steady state (no reconnects; every peer's upstream pool as
    # the warm-up left it).
    mapfile -t pids < <(proc_pids "$root")
    log "round $round, $mode, $name: ${WARMUP}s warm-up, then measuring ${DURATION}s (one run)"
    run_load "$mode" $(( WARMUP + DURATION )) "$url" "$out" &
    local load_pid=$!
    sleep "$WARMUP"
    local t0 t1 u0 u1 s0 s1 h0=0 h1=0 m0=0 m1=0 ph0=0 ph1=0 pm0=0 pm1=0 w0 w1
    # The window opens: wall clock, upstream counters and CPU ticks together.
    w0=$(date +%s%6N)
    s0=$(upstream_stub)
    t0=$(cpu_split "${pids[@]}"); u0=$(cpu_ticks $(proc_pids "$UP_PID"))
    local op0="" op1=""
    if [[ $name == portcullis ]]; then
        h0=$(metric portcullis_token_cache_hits_total); m0=$(metric portcullis_token_cache_misses_total)
        ph0=$(metric portcullis_policy_cache_hits_total); pm0=$(metric portcullis_policy_cache_misses_total)
        op0=$(opened_by_reason)
    fi
    local perf_pid=""
    if [[ -n $PROFILE_DIR && $name == portcullis ]]; then
        # Sampling (cpu-clock: no hardware counters needed), call graphs.
        timeout --kill-after=5 $(( DURATION + 30 )) perf record -q -e cpu-clock ${PERF_CALLGRAPH:--g} \
            -p "$root" -o "$PROFILE_DIR/perf-$mode-$round.data" -- sleep "$DURATION" \
            2>"$PROFILE_DIR/perf-$mode-$round.log" &
        perf_pid=$!
    fi
    local strace_pid=""
    if [[ -n $STRACE_DIR ]]; then
        mkdir -p "$STRACE_DIR"
        local sargs=()
        for p in "${pids[@]}"; do sargs+=(-p "$p"); done
        timeout -s INT --kill-after=5 $(( DURATION + 1 )) strace -q -c -f "${sargs[@]}" \
            -o "$STRACE_DIR/strace-$mode-$name-$round.raw" &
        strace_pid=$!
        sleep 0.5
    fi
    local sched_pid=""
    if [[ -n $SCHED_DIR ]]; then
        # The window's last DURATION - 1 seconds (the probes attach in
        # about half a second), never past the load run.
        timeout --kill-after=5 $(( DURATION + 30 )) bpftrace "$SCRIPT_DIR/sched.bt" $(( DURATION > 2 ? DURATION - 1 : 1 )) "$(nproc --all)" \
            > "$SCHED_DIR/sched-$mode-$name-$round.txt" 2>&1 &
        sched_pid=$!
    fi
    local cg=0
    if [[ $CALLGRIND == 1 && ( $name == portcullis || $name == nginx ) ]]; then
        cg=1
        for p in "${pids[@]}"; do
            callgrind_control -z "$p" >/dev/null || die "callgrind_control -z $p failed"
        done
    fi
    wait "$load_pid" || die "$key: the load run failed"
    t1=$(cpu_split "${pids[@]}"); u1=$(cpu_ticks $(proc_pids "$UP_PID"))
    w1=$(date +%s%6N)
    local ir="" d1=0 ll=0 i1=0
    if (( cg )); then
        # "Totals: Ir" then one "Th N <count>" line per thread.
        ir=$(cg_events Ir "${pids[@]}")
        if [[ $CACHE_SIM == 1 ]]; then
            d1=$(( $(cg_events D1mr "${pids[@]}") + $(cg_events D1mw "${pids[@]}") ))
            ll=$(( $(cg_events DLmr "${pids[@]}") + $(cg_events DLmw "${pids[@]}") ))
            i1=$(cg_events I1mr "${pids[@]}")
        fi
        # The window's profile as a part of its own (callgrind.out.N), for ORDER_FILE.
        if [[ -n $ORDER_FILE && $name == portcullis ]]; then
            for p in "${pids[@]}"; do
                callgrind_control -d "$p" >/dev/null || die "callgrind_control -d $p failed"
            done
        fi
    fi
    if [[ -n $strace_pid ]]; then
        wait "$strace_pid" || true
    fi
    if [[ -n $sched_pid ]]; then
        wait "$sched_pid" || log "bpftrace (sched.bt) exited with $?"
    fi
    if [[ -n $perf_pid ]]; then
        wait "$perf_pid" || log "perf record exited with $?"
        perf report -i "$PROFILE_DIR/perf-$mode-$round.data" --stdio --no-children \
            --sort symbol -g none --percent-limit 0.3 2>/dev/null \
            | grep -v '^$' | grep -v '^# *\.' | sed -e 's/ *- *- *$//' | cut -c1-140 \
            | head -n 80 > "$PROFILE_DIR/perf-$mode-$round.txt" || true
        log "profile: $PROFILE_DIR/perf-$mode-$round.txt"
    fi
    if [[ $name == portcullis ]]; then
        h1=$(metric portcullis_token_cache_hits_total); m1=$(metric portcullis_token_cache_misses_total)
        ph1=$(metric portcullis_policy_cache_hits_total); pm1=$(metric portcullis_policy_cache_misses_total)
        op1=$(opened_by_reason)
    fi
    s1=$(upstream_stub)

    # Requests and seconds of the window: the upstream's request count
    # (every proxied request reaches it once), and the wall clock. Latency:
    # h2load's per-request log from the window's start; wrk's distribution
    # covers its whole run (warm-up included).
    local reqs secs rps p50 p99 bad
    read -r _ _ _ p50 p99 bad < <(parse_load "$mode" "$out" "$w0")
    reqs=$(( ${s1#* } - ${s0#* } - 1 ))   # minus the stub_status request itself
    secs=$(awk -v a="$w0" -v b="$w1" 'BEGIN { printf "%.3f", (b - a) / 1e6 }')
    rps=$(awk -v n="$reqs" -v s="$secs" 'BEGIN { printf "%.0f", n / s }')
    (( reqs > 0 )) || die "$key: no requests completed"
    [[ $bad == 0 ]] || log "$key: WARNING: non-2xx / errors: $bad"

    # User and kernel time apart: the kernel's share (loopback TCP) is one
    # every peer pays alike; the user share is the proxy's own code.
    local user_t=$(( ${t1% *} - ${t0% *} )) sys_t=$(( ${t1#* } - ${t0#* } ))
    local ticks=$(( user_t + sys_t )) cpu_us user_us sys_us up_us up_conns up_reqs
    cpu_us=$(awk -v t="$ticks" -v hz="$CLK_TCK" -v n="$reqs" 'BEGIN { printf "%.1f", t / hz * 1e6 / n }')
    user_us=$(awk -v t="$user_t" -v hz="$CLK_TCK" -v n="$reqs" 'BEGIN { printf "%.1f", t / hz * 1e6 / n }')
    sys_us=$(awk -v t="$sys_t" -v hz="$CLK_TCK" -v n="$reqs" 'BEGIN { printf "%.1f", t / hz * 1e6 / n }')
    up_us=$(awk -v t=$(( u1 - u0 )) -v hz="$CLK_TCK" -v n="$reqs" 'BEGIN { printf "%.1f", t / hz * 1e6 / n }')
    up_conns=$(( ${s1% *} - ${s0% *} ))
    up_reqs=$reqs

    TOT_REQS[$key]=$(( ${TOT_REQS[$key]:-0} + reqs ))
    TOT_TICKS[$key]=$(( ${TOT_TICKS[$key]:-0} + ticks ))
    TOT_SECS[$key]=$(awk -v a="${TOT_SECS[$key]:-0}" -v b="$secs" 'BEGIN { print a + b }')
    [[ $bad == 0 ]] || BAD[$key]="${BAD[$key]:-}${BAD[$key]:+,}$bad"
    P50_L[$key]+="$p50 "
    P99_L[$key]+="$p99 "
    UPC[$key]=$(( ${UPC[$key]:-0} + up_conns - 1 ))   # minus the stub_status connection
    local note="round $round, $key: $reqs req, $rps req/s, p50 $p50 ms, p99 $p99 ms, $cpu_us CPU-us/req (user $user_us, kernel $sys_us); upstream: $up_reqs req on $(( up_conns - 1 )) new connections, $up_us CPU-us/req"
    if [[ $mode == rate ]]; then
        note+="; phase: busiest tenth of the period holds $(h2load_phase "$out.log" $(( 1000000 * RATE_CONNS / RATE )) "$w0")% of the requests"
    fi
    if [[ $name == portcullis ]]; then
        note+="; token cache +$(( h1 - h0 )) hits +$(( m1 - m0 )) misses; decision cache +$(( ph1 - ph0 )) hits +$(( pm1 - pm0 )) misses"
        local a0 b0 c0 a1 b1 c1
        read -r a0 b0 c0 <<< "$op0"; read -r a1 b1 c1 <<< "$op1"
        note+="; upstream conns opened: none idle +$(( a1 - a0 )), all busy +$(( b1 - b0 )), closed +$(( c1 - c0 ))"
    fi
    if [[ -n $strace_pid ]]; then
        local sf="$STRACE_DIR/strace-$mode-$name-$round"
        awk -v n="$reqs" '$1 ~ /^[0-9.]+$/ && NF >= 5 { c = $4; name = $NF; if (name != "total") printf "%-20s %8.3f per request\n", name, c / n }' \
            "$sf.raw" | sort -k2 -nr > "$sf.txt" || true
        note+="; syscalls/req $(awk '{ s += $2 } END { printf "%.2f", s }' "$sf.txt") ($sf.txt)"
    fi
    if [[ -n $sched_pid ]]; then
        note+="; $(sched_summary "$SCHED_DIR/sched-$mode-$name-$round.txt" $(( DURATION > 2 ? DURATION - 1 : 1 )) "${pids[*]}" "$(proc_pids "$UP_PID")")"
    fi
    if [[ -n $ir ]]; then
        TOT_IR[$key]=$(( ${TOT_IR[$key]:-0} + ir ))   # every round of this key has a count
        note+="; callgrind: $ir Ir = $(awk -v i="$ir" -v n="$reqs" 'BEGIN { printf "%.0f", i / n }') Ir/req"
        if [[ $CACHE_SIM == 1 ]]; then
            note+=", $(awk -v i="$i1" -v d="$d1" -v l="$ll" -v n="$reqs" 'BEGIN { printf "%.1f I1 misses/req, %.1f D1 misses/req, %.2f LL misses/req", i / n, d / n, l / n }')"
        fi
    fi
    NOTES+=("$note")
    log "$note"
}

read -r -a PEER_LIST <<< "$PEERS"
for (( r=1; r<=ROUNDS; r++ )); do
    m=0
    for mode in $MODES; do
        # Rotate the peer order every round, for every mode, so that each
        # peer takes each place in the order (first after the previous
        # mode, ..., last) once every k rounds: drift on the machine and
        # the place's own effect hit every peer alike. (The offset once
        # counted modes across rounds too, which with 2 modes and 3 peers
        # gave every round the same order.)
        k=${#PEER_LIST[@]}
        off=$(( (r - 1 + m) % k ))
        for (( j=0; j<k; j++ )); do
            measure "$r" "$mode" "${PEER_LIST[(j + off) % k]}"
        done
        m=$(( m + 1 ))
    done
done

for p in $PEERS; do
    kill -0 "${ROOT[$p]}" 2>/dev/null || die "$p died during the run"
done
if [[ -n ${PC:-} && -s $PC/stderr.log ]]; then
    log "portcullis wrote $(wc -l < "$PC/stderr.log") log lines at warn+ (distinct messages, timestamps stripped):"
    sed -e 's/\x1b\[[0-9;]*m//g' -e 's/^[0-9TZ:.-]* *//' "$PC/stderr.log" \
        | sort | uniq -c | sort -rn | head -n 10 >&2
fi

# ------------------------------------------------------------------ report ---
median() { tr ' ' '\n' | awk 'NF' | sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

echo
echo "Same-run table: ${ROUNDS} round(s) of ${DURATION}s (warm-up ${WARMUP}s) per mode and peer, $(nproc) CPUs, load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "  h1: wrk -t$THREADS -c$CONNS, one token; h1-10k: the same over $TOKENS tokens/devices; h2: h2load -t$THREADS -c$H2_CONNS -m$H2_STREAMS; rate: h2load --h1 -c$RATE_CONNS at $RATE req/s, connections opened $( (( RATE_RAMP_MS )) && echo "one per ${RATE_RAMP_MS} ms per thread" || echo "all at once")"
for n in "${NOTES[@]}"; do echo "  $n"; done
echo
echo "req/s = total requests / total seconds; p50, p99 = median over rounds; CPU-us/req = total CPU / total requests;"
echo "x nginx = CPU-us/req / nginx's in the same mode; up-conns = new upstream connections during the measured runs;"
echo "p99 <= nginx = rounds in which the peer's p99 was at or under nginx's in the same round, then the median over rounds of"
echo "  the peer's p99 / nginx's in the same round"
echo
printf '| %-7s | %-10s | %10s | %8s | %8s | %10s | %8s | %13s | %8s | %s\n' mode peer req/s p50_ms p99_ms CPU-us/req 'x nginx' 'p99 <= nginx' up-conns errors
printf '|%s|\n' "---------|------------|------------|----------|----------|------------|----------|---------------|----------|-------"
for mode in $MODES; do
    ng="$mode/nginx"
    ng_cpu=$(awk -v t="${TOT_TICKS[$ng]}" -v hz="$CLK_TCK" -v n="${TOT_REQS[$ng]}" 'BEGIN { printf "%.2f", t / hz * 1e6 / n }')
    for p in $PEERS; do
        key="$mode/$p"
        cpu=$(awk -v t="${TOT_TICKS[$key]}" -v hz="$CLK_TCK" -v n="${TOT_REQS[$key]}" 'BEGIN { printf "%.1f", t / hz * 1e6 / n }')
        under=-
        if [[ $p != nginx ]]; then
            # P99_L lists one p99 a round, in round order, for every peer.
            # The rounds at or under ("k/n"), then each round's ratio.
            read -r under ratios < <(awk -v a="${P99_L[$key]}" -v b="${P99_L[$ng]}" 'BEGIN {
                n = split(a, x, " "); split(b, y, " "); k = 0; r = ""
                for (i = 1; i <= n; i++) {
                    if (x[i] + 0 <= y[i] + 0) k++
                    if (y[i] + 0 > 0) r = r " " x[i] / y[i]
                }
                print k "/" n r }')
            under+=" $(median <<< "$ratios" | awk '{ printf "%.2fx", $1 }')"
        fi
        printf '| %-7s | %-10s | %10s | %8s | %8s | %10s | %8s | %13s | %8s | %s\n' "$mode" "$p" \
            "$(awk -v n="${TOT_REQS[$key]}" -v s="${TOT_SECS[$key]}" 'BEGIN { printf "%.0f", n / s }')" \
            "$(median <<< "${P50_L[$key]}")" "$(median <<< "${P99_L[$key]}")" "$cpu" \
            "$(awk -v a="$cpu" -v b="$ng_cpu" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "n/a" }')" \
            "$under" "${UPC[$key]}" "${BAD[$key]:-0}"
    done
done
if [[ -n $ORDER_FILE ]]; then
    # Own instructions per function over every measured window's part.
    # Names are compressed in callgrind's format: "fn=(id) name" defines an
    # id, "fn=(id)" refers to it (per file); the cost line after "calls="
    # is the callee's inclusive cost, not the caller's own. Recursion
    # levels (the name, a quote, the level) are one function.
    shopt -s nullglob
    parts=("$PC"/callgrind.out.*)
    shopt -u nullglob
    (( ${#parts[@]} > 0 )) || die "ORDER_FILE: no callgrind part was dumped"
    awk '
        FNR == 1 { delete nm; call = 0 }
        function name(s,   id, rest) {
            if (s !~ /^\(/) return s
            id = substr(s, 2, index(s, ")") - 2); rest = substr(s, index(s, ")") + 2)
            if (rest != "") nm[id] = rest
            return nm[id]
        }
        /^fn=/ { cur = name(substr($0, 4)); next }
        /^cfn=/ { name(substr($0, 5)); next }
        /^calls=/ { call = 1; next }
        /^[0-9+*-]/ { if (call) { call = 0; next } if (cur != "" && NF > 1) ir[cur] += $2; next }
        END {
            q = sprintf("%c", 39)
            for (f in ir) {
                if (ir[f] <= 0 || f ~ /^0x/) continue
                g = f
                if (match(g, /.[0-9]+$/) && substr(g, RSTART, 1) == q) g = substr(g, 1, RSTART - 1)
                t[g] += ir[f]
            }
            for (g in t) printf "%d %s\n", t[g], g
        }
    ' "${parts[@]}" | sort -k1,1nr -k2,2 | awk '{ print $2 }' > "$ORDER_FILE"
    log "order file: $(wc -l < "$ORDER_FILE") functions in $ORDER_FILE (from ${#parts[@]} profile parts)"
fi
if [[ $CALLGRIND == 1 ]]; then
    echo
    echo "callgrind: user-space instructions per request (all rounds), portcullis over nginx in the same mode"
    for mode in $MODES; do
        ng="$mode/nginx" pc="$mode/portcullis"
        [[ -n ${TOT_IR[$ng]:-} && -n ${TOT_IR[$pc]:-} ]] || continue
        awk -v m="$mode" -v a="${TOT_IR[$pc]}" -v an="${TOT_REQS[$pc]}" -v b="${TOT_IR[$ng]}" -v bn="${TOT_REQS[$ng]}" \
            'BEGIN { x = a / an; y = b / bn; printf "  %-7s portcullis %.0f Ir/req, nginx %.0f Ir/req: %.2fx\n", m, x, y, x / y }'
    done
fi
