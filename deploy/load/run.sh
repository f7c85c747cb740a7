#!/usr/bin/env bash
# deploy/load/run.sh: compare portcullis with a plain nginx TLS reverse proxy.
#
# One run: one shared plain-HTTP nginx upstream on 127.0.0.1, portcullis (cached
# bearer token) and an nginx TLS proxy in front of it, a warm-up and a timed wrk
# run against each, CPU time of each proxy read from /proc, and a table of
# req/s, p50, p99 and CPU-µs per request. See deploy/load/README.md.
#
# Knobs (environment):
#   DURATION=15        seconds of each measured wrk run
#   WARMUP=3           seconds of the warm-up wrk run before each measured run
#   CONNS=32           wrk connections (-c)
#   THREADS=2          wrk threads (-t)
#   ROUNDS=1           measure each proxy this many times, alternating the order;
#                      the table then shows every round plus totals
#   PORTCULLIS_BIN     prebuilt binary; default: cargo build --release into
#                      ${CARGO_TARGET_DIR:-<repo>/target} and use release/portcullis
#   BASE_PORT=18080    first port tried when picking free loopback ports
#   KEEP_TMP=1         keep the scratch directory (configs, logs) after the run
#
# Only 127.0.0.1 is ever used as a target. Every load loop is a bounded wrk run
# (wrk -d, wrapped in timeout). Every process started here is stopped on exit.

set -euo pipefail

DURATION=${DURATION:-15}
WARMUP=${WARMUP:-3}
CONNS=${CONNS:-32}
THREADS=${THREADS:-2}
ROUNDS=${ROUNDS:-1}
BASE_PORT=${BASE_PORT:-18080}
KEEP_TMP=${KEEP_TMP:-0}

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)

log() { printf '[load] %s\n' "$*" >&2; }
die() { printf '[load] FAIL: %s\n' "$*" >&2; exit 1; }

for v in DURATION WARMUP CONNS THREADS ROUNDS BASE_PORT; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a positive integer (got '${!v}')"
done
(( DURATION > 0 && CONNS > 0 && THREADS > 0 && ROUNDS > 0 )) || die "DURATION, CONNS, THREADS, ROUNDS must be > 0"
(( CONNS >= THREADS )) || die "CONNS ($CONNS) must be >= THREADS ($THREADS) for wrk"

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
need=()
command -v nginx >/dev/null 2>&1 || need+=(nginx)
command -v wrk   >/dev/null 2>&1 || need+=(wrk)
command -v curl  >/dev/null 2>&1 || need+=(curl)
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
[[ -x $NGINX ]] || die "nginx not found after install"
command -v wrk >/dev/null || die "wrk not found after install"

# -------------------------------------------------------------- portcullis ---
if [[ -n ${PORTCULLIS_BIN:-} ]]; then
    BIN=$PORTCULLIS_BIN
else
    log "building portcullis (cargo build --release)"
    (cd "$REPO_ROOT" && cargo build --release --quiet --bin portcullis)
    target_dir=${CARGO_TARGET_DIR:-target}
    [[ $target_dir = /* ]] || target_dir=$REPO_ROOT/$target_dir
    BIN=$target_dir/release/portcullis
fi
[[ -x $BIN ]] || die "portcullis binary not found or not executable: $BIN"
log "portcullis: $BIN"

# ------------------------------------------------------------------ helpers ---
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

NEXT_PORT=$BASE_PORT
pick_port() {   # prints a loopback port nobody is listening on
    while port_in_use "$NEXT_PORT"; do NEXT_PORT=$((NEXT_PORT+1)); done
    echo "$NEXT_PORT"
    NEXT_PORT=$((NEXT_PORT+1))
}

wait_for_port() {   # port, name, pid: wait up to 10 s, fail if the process died
    local port=$1 name=$2 pid=$3 n=0
    until port_in_use "$port"; do
        kill -0 "$pid" 2>/dev/null || die "$name exited before listening on 127.0.0.1:$port"
        (( n++ < 100 )) || die "$name not listening on 127.0.0.1:$port after 10 s"
        sleep 0.1
    done
}

CLK_TCK=$(getconf CLK_TCK)

proc_pids() {   # root pid -> the root and its direct children (nginx master + workers)
    echo "$1"
    pgrep -P "$1" || true
}

cpu_ticks() {   # sum of utime+stime (fields 14, 15 of /proc/PID/stat) over the given pids
    local total=0 pid stat rest
    local -a f
    for pid in "$@"; do
        stat=$(< "/proc/$pid/stat") || die "pid $pid vanished"
        rest=${stat##*) }            # drop "pid (comm) ": field 3 becomes index 0
        read -r -a f <<< "$rest"
        total=$(( total + f[11] + f[12] ))   # utime=field 14, stime=field 15
    done
    echo "$total"
}

to_ms() {   # wrk duration ("812.00us", "1.23ms", "1.05s", "2.00m") -> milliseconds
    awk -v v="$1" 'BEGIN {
        n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
        if (u == "us") n /= 1000; else if (u == "s") n *= 1000; else if (u == "m") n *= 60000
        else if (u != "ms") { print "?"; exit }
        printf "%.3f", n }'
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

# ------------------------------------------------- PKI and token via demo ---
PKI=$TMP/pki
mkdir -p "$PKI"
log "generating dev CA, server certificate, issuer key and token (portcullis demo)"
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
kill -TERM "$DEMO_PID" 2>/dev/null || true
wait "$DEMO_PID" 2>/dev/null || true
for v in PORTCULLIS_TOKEN PORTCULLIS_ISSUER PORTCULLIS_AUDIENCE; do
    [[ -n ${!v:-} ]] || die "$v missing from demo.env"
done
for f in ca.pem server.pem server-key.pem issuer-jwks.json; do
    [[ -s $PKI/$f ]] || die "demo did not write $f"
done
TOKEN=$PORTCULLIS_TOKEN

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

# ------------------------------------------------------------- portcullis ---
PC=$TMP/portcullis
mkdir -p "$PC"
cp "$PKI/server.pem" "$PKI/server-key.pem" "$PKI/issuer-jwks.json" "$PC/"
cat > "$PC/portcullis.toml" <<EOF
[proxy]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"

[log]
level = "warn"

[[tls.certificates]]
cert = "server.pem"
key = "server-key.pem"

[[issuers]]
name = "demo"
issuer = "$PORTCULLIS_ISSUER"
audiences = ["$PORTCULLIS_AUDIENCE"]
algorithms = ["ES256"]
jwks_file = "issuer-jwks.json"

[[routes]]
name = "app"
path_prefix = "/"
upstream = "http://127.0.0.1:$UP_PORT"
auth = "bearer"
EOF
"$BIN" check --config "$PC/portcullis.toml" >&2 || die "portcullis check rejected the config"
"$BIN" serve --config "$PC/portcullis.toml" --addr-file "$PC/addr.json" \
    >"$PC/stdout.log" 2>"$PC/stderr.log" &
PC_PID=$!
STARTED_PIDS+=("$PC_PID")
n=0
until [[ -s $PC/addr.json ]]; do
    kill -0 "$PC_PID" 2>/dev/null || { cat "$PC/stderr.log" >&2; die "portcullis serve exited early"; }
    (( n++ < 100 )) || die "portcullis did not write its addr file after 10 s"
    sleep 0.1
done
addr_json=$(< "$PC/addr.json")
PC_ADDR=$(sed -n 's/.*"proxy":"\([^"]*\)".*/\1/p' <<< "$addr_json")
PC_ADMIN=$(sed -n 's/.*"admin":"\([^"]*\)".*/\1/p' <<< "$addr_json")
[[ -n $PC_ADDR && -n $PC_ADMIN ]] || die "cannot parse $PC/addr.json: $addr_json"
PC_URL=https://$PC_ADDR/
log "portcullis (pid $PC_PID) on $PC_URL, admin http://$PC_ADMIN"

# ------------------------------------------------------ nginx TLS proxy ---
NG_PORT=$(pick_port)
NG=$TMP/nginx-proxy
mkdir -p "$NG/logs"
cp "$PKI/server.pem" "$PKI/server-key.pem" "$NG/"
cat > "$NG/nginx.conf" <<EOF
worker_processes 2;
pid $NG/nginx.pid;
error_log $NG/logs/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $NG/client_body;
    proxy_temp_path $NG/proxy;
    fastcgi_temp_path $NG/fastcgi;
    uwsgi_temp_path $NG/uwsgi;
    scgi_temp_path $NG/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    upstream backend {
        server 127.0.0.1:$UP_PORT;
        keepalive 64;
        keepalive_requests 10000000;
        keepalive_timeout 120s;
    }
    server {
        listen 127.0.0.1:$NG_PORT ssl;
        ssl_certificate $NG/server.pem;
        ssl_certificate_key $NG/server-key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
"$NGINX" -t -q -p "$NG" -e "$NG/logs/error.log" -c "$NG/nginx.conf" || die "nginx proxy config invalid"
"$NGINX" -p "$NG" -e "$NG/logs/error.log" -c "$NG/nginx.conf" -g 'daemon off;' 2>>"$NG/logs/stderr.log" &
NG_PID=$!
STARTED_PIDS+=("$NG_PID")
wait_for_port "$NG_PORT" "nginx proxy" "$NG_PID"
NG_URL=https://127.0.0.1:$NG_PORT/
log "nginx TLS proxy (pid $NG_PID, 2 workers) on $NG_URL"

# ---------------------------------------------------------- sanity checks ---
AUTH=(-H "Authorization: Bearer $TOKEN")
check_status portcullis 200 "$PC_URL" "${AUTH[@]}"
[[ $(< "$TMP/check.body") == ok ]] || die "portcullis: unexpected body: $(head -c 300 "$TMP/check.body")"
check_status portcullis 401 "$PC_URL"
check_status nginx 200 "$NG_URL" "${AUTH[@]}"
[[ $(< "$TMP/check.body") == ok ]] || die "nginx: unexpected body: $(head -c 300 "$TMP/check.body")"

# ------------------------------------------------------------------- load ---
metric() {   # sum of a metric's samples on the portcullis admin endpoint
    curl -sS --max-time 5 "http://$PC_ADMIN/metrics" 2>/dev/null \
        | awk -v m="$1" '$1 == m || index($1, m "{") == 1 { s += $NF } END { printf "%d", s }'
}

upstream_stub() {   # "accepted_connections requests" of the upstream nginx
    curl -sS --max-time 5 "http://127.0.0.1:$UP_PORT/__stub_status" \
        | awk '/^ *[0-9]+ +[0-9]+ +[0-9]+ *$/ { print $1, $3; exit }'
}

run_wrk() {   # duration, url, output file
    timeout --kill-after=5 "$(( $1 + 30 ))" \
        wrk -t"$THREADS" -c"$CONNS" -d"$1"s --latency "${AUTH[@]}" "$2" > "$3" 2>&1 \
        || { cat "$3" >&2; die "wrk against $2 failed"; }
}

# Per proxy, accumulated over rounds: requests, CPU ticks, wrk seconds; and
# space-separated per-round lists of req/s, p50, p99 and CPU-us/req.
declare -A TOT_REQS TOT_TICKS TOT_SECS BAD RPS_L P50_L P99_L CPU_L
ROWS=()     # per-round table rows
NOTES=()    # per-round diagnostics
measure() {   # round, name, url, root pid
    local round=$1 name=$2 url=$3 root=$4 out=$TMP/wrk-$2-$1.txt
    local -a pids
    log "round $round, $name: warm-up ${WARMUP}s"
    if (( WARMUP > 0 )); then run_wrk "$WARMUP" "$url" "$TMP/wrk-$name-$round-warmup.txt"; fi
    mapfile -t pids < <(proc_pids "$root")
    log "round $round, $name: measuring ${DURATION}s, -t$THREADS -c$CONNS (pids: ${pids[*]})"
    local t0 t1 u0 u1 s0 s1 h0=0 h1=0 m0=0 m1=0
    s0=$(upstream_stub)
    if [[ $name == portcullis ]]; then
        h0=$(metric portcullis_token_cache_hits_total); m0=$(metric portcullis_token_cache_misses_total)
    fi
    t0=$(cpu_ticks "${pids[@]}"); u0=$(cpu_ticks $(proc_pids "$UP_PID"))
    run_wrk "$DURATION" "$url" "$out"
    t1=$(cpu_ticks "${pids[@]}"); u1=$(cpu_ticks $(proc_pids "$UP_PID"))
    if [[ $name == portcullis ]]; then
        h1=$(metric portcullis_token_cache_hits_total); m1=$(metric portcullis_token_cache_misses_total)
    fi
    s1=$(upstream_stub)
    local now; now=$(proc_pids "$root" | sort | tr '\n' ' ')
    [[ $now == "$(printf '%s\n' "${pids[@]}" | sort | tr '\n' ' ')" ]] \
        || log "$name: WARNING: process set changed during the run (${pids[*]} -> $now)"

    local reqs secs rps p50 p99 non2xx sockerr
    reqs=$(awk '/requests in/ { print $1; exit }' "$out")
    secs=$(awk '/requests in/ { sub(/,$/, "", $4); print $4; exit }' "$out")
    secs=$(awk -v ms="$(to_ms "$secs")" 'BEGIN { print ms / 1000 }')
    rps=$(awk '/^Requests\/sec:/ { print $2; exit }' "$out")
    p50=$(awk '$1 == "50%" { print $2; exit }' "$out")
    p99=$(awk '$1 == "99%" { print $2; exit }' "$out")
    non2xx=$(awk '/Non-2xx or 3xx responses:/ { print $NF; exit }' "$out")
    sockerr=$(sed -n 's/.*Socket errors: *//p' "$out")
    [[ -n $reqs && -n $secs && -n $rps && -n $p50 && -n $p99 ]] || { cat "$out" >&2; die "$name: cannot parse wrk output"; }
    (( reqs > 0 )) || die "$name: wrk completed no requests"
    [[ -z $non2xx ]] || log "$name: WARNING: $non2xx non-2xx/3xx responses"
    [[ -z $sockerr ]] || log "$name: WARNING: socket errors: $sockerr"

    local ticks=$(( t1 - t0 )) cpu_us cpu_s up_us up_conns up_reqs
    cpu_us=$(awk -v t="$ticks" -v hz="$CLK_TCK" -v n="$reqs" 'BEGIN { printf "%.1f", t / hz * 1e6 / n }')
    cpu_s=$(awk -v t="$ticks" -v hz="$CLK_TCK" 'BEGIN { printf "%.2f", t / hz }')
    up_us=$(awk -v t=$(( u1 - u0 )) -v hz="$CLK_TCK" -v n="$reqs" 'BEGIN { printf "%.1f", t / hz * 1e6 / n }')
    up_conns=$(( ${s1% *} - ${s0% *} ))
    up_reqs=$(( ${s1#* } - ${s0#* } - 1 ))   # minus the stub_status request itself

    TOT_REQS[$name]=$(( ${TOT_REQS[$name]:-0} + reqs ))
    TOT_TICKS[$name]=$(( ${TOT_TICKS[$name]:-0} + ticks ))
    TOT_SECS[$name]=$(awk -v a="${TOT_SECS[$name]:-0}" -v b="$secs" 'BEGIN { print a + b }')
    BAD[$name]=$(( ${BAD[$name]:-0} + ${non2xx:-0} ))
    [[ -z $sockerr ]] || BAD[$name]="${BAD[$name]}+sock"
    RPS_L[$name]+="$rps "
    P50_L[$name]+="$(to_ms "$p50") "
    P99_L[$name]+="$(to_ms "$p99") "
    CPU_L[$name]+="$cpu_us "
    ROWS+=("$(printf '%-11s %5s %11s %10s %10s %12s %10s' "$name" "$round" "$rps" "$(to_ms "$p50")" "$(to_ms "$p99")" "$cpu_us" "${non2xx:-0}${sockerr:++sock}")")
    local note="round $round, $name: $reqs requests, proxy CPU ${cpu_s}s; upstream: ${up_reqs} requests on ${up_conns} new connections, ${up_us} CPU-us/req"
    if [[ $name == portcullis ]]; then
        note+="; token cache: hits +$(( h1 - h0 )), misses +$(( m1 - m0 ))"
    fi
    NOTES+=("$note")
    log "$note"
}

# Alternate the order each round so slow drift on the machine hits both alike.
for (( r=1; r<=ROUNDS; r++ )); do
    if (( r % 2 )); then
        measure "$r" portcullis "$PC_URL" "$PC_PID"
        measure "$r" nginx "$NG_URL" "$NG_PID"
    else
        measure "$r" nginx "$NG_URL" "$NG_PID"
        measure "$r" portcullis "$PC_URL" "$PC_PID"
    fi
done

kill -0 "$PC_PID" 2>/dev/null || die "portcullis died during the run"
if [[ -s $PC/stderr.log ]]; then
    log "portcullis wrote $(wc -l < "$PC/stderr.log") log lines at warn+ (distinct messages, timestamps stripped):"
    sed -e 's/\x1b\[[0-9;]*m//g' -e 's/^[0-9TZ:.-]* *//' "$PC/stderr.log" \
        | sort | uniq -c | sort -rn | head -n 10 >&2
fi

# ------------------------------------------------------------------ report ---
median() { tr ' ' '\n' | awk 'NF' | sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

echo
echo "portcullis vs nginx TLS reverse proxy: wrk -t$THREADS -c$CONNS -d${DURATION}s (warm-up ${WARMUP}s), ${ROUNDS} round(s), $(nproc) CPUs"
for n in "${NOTES[@]}"; do echo "  $n"; done
if (( ROUNDS > 1 )); then
    echo
    printf '%-11s %5s %11s %10s %10s %12s %10s\n' proxy round req/s p50_ms p99_ms CPU-us/req non2xx/err
    for row in "${ROWS[@]}"; do echo "$row"; done
    echo
    echo "overall (req/s = total requests / total seconds; p50, p99 = median over rounds;"
    echo "CPU-us/req = total CPU / total requests):"
fi
echo
declare -A CPU_US
printf '%-11s %11s %10s %10s %12s %10s\n' proxy req/s p50_ms p99_ms CPU-us/req non2xx/err
for p in portcullis nginx; do
    CPU_US[$p]=$(awk -v t="${TOT_TICKS[$p]}" -v hz="$CLK_TCK" -v n="${TOT_REQS[$p]}" 'BEGIN { printf "%.1f", t / hz * 1e6 / n }')
    printf '%-11s %11s %10s %10s %12s %10s\n' "$p" \
        "$(awk -v n="${TOT_REQS[$p]}" -v s="${TOT_SECS[$p]}" 'BEGIN { printf "%.2f", n / s }')" \
        "$(median <<< "${P50_L[$p]}")" "$(median <<< "${P99_L[$p]}")" "${CPU_US[$p]}" "${BAD[$p]}"
done
ratio=$(awk -v a="${CPU_US[portcullis]}" -v b="${CPU_US[nginx]}" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }')
verdict=$(awk -v r="$ratio" 'BEGIN { if (r == "n/a") print "n/a"; else if (r <= 1.5) print "within"; else print "OVER" }')
echo
echo "CPU-us/req ratio portcullis/nginx: ${ratio}x (target <= 1.5x: $verdict)"
if (( ROUNDS > 1 )); then
    read -r -a pc <<< "${CPU_L[portcullis]}"; read -r -a ng <<< "${CPU_L[nginx]}"
    per=""
    for (( i=0; i<ROUNDS; i++ )); do
        per+="$(awk -v a="${pc[i]}" -v b="${ng[i]}" 'BEGIN { printf "%.2f", a / b }')x "
    done
    echo "per-round ratios: $per"
fi
