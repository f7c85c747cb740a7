#!/usr/bin/env bash
# Paired A/B of two portcullis builds: both serve at the same time, each
# under its own identical load, so whatever slows the machine slows both.
# On a shared 2-core VM, back-to-back rounds of one build move by ±15% and a
# sequential A/B cannot see a change of a few percent; side by side, one
# build against itself reads within ±4% per 15-second round.
#
#   KEEP_TMP=1 PEERS="nginx portcullis" MODES=h1 TOKENS=20 DURATION=2 \
#       deploy/load/run.sh              # prints "scratch directory kept: DIR"
#   deploy/load/pair.sh DIR BIN_A BIN_B [MODE] [SECONDS] [ROUNDS]
#   deploy/load/pair.sh DIR BIN nginx [MODE] [SECONDS] [ROUNDS]   (or nginx BIN)
#
# With `nginx` as one side, that side is the scratch directory's own nginx
# TLS proxy (its nginx-proxy config, default two workers), so portcullis
# and nginx serve at once under identical loads: a host stall that lands
# in a round lands on both, and their p99s can be compared round by round
# (sequential rounds on this kind of VM differ by more than the two do).
#
# SPLIT=1 (root, bpftrace) also traces the sockets of both sides over the
# measured rounds (split.bt) and prints, per side, where a request's time
# went: waiting to be read, the proxy's work before the upstream, the
# upstream's answer, waiting to be read again, the work after, and the
# whole. The probes slow every traced call by about a microsecond, alike
# for both sides: read the split side by side, and the rounds' CPU and p99
# as traced ones.
#
# DIR is a scratch directory the load script kept: its portcullis config,
# store (the seeded devices), certificates, tokens and upstream nginx are
# reused; each build gets a copy of the portcullis directory (default
# workers). MODE: h1 (wrk -t1 -cCONNS each, saturating), 10k (the same with
# the load script's Lua script rotating over every token in DIR, from the
# same offset for both; the 3-second warm-up verifies them) or rate
# (h2load --h1 -cCONNS at 2,500 req/s each, connections opened one a millisecond); SECONDS per round (default 15), ROUNDS
# (default 8); CONNS (environment, default 25) connections per side. Prints each build's CPU-µs per request and its p99 (wrk's,
# or from h2load's per-request log) per round and B over A; run it both ways round (A, B then B, A) so neither position is
# favoured. Loopback only, every load run bounded by timeout, every
# process stopped on exit.

set -euo pipefail

S=${1:?scratch directory kept by run.sh}
BIN_A=${2:?first portcullis binary (or nginx)}
BIN_B=${3:?second portcullis binary (or nginx)}
MODE=${4:-h1}
SECS=${5:-15}
ROUNDS=${6:-8}

die() { printf '[pair] FAIL: %s\n' "$*" >&2; exit 1; }
# shellcheck source=deploy/load/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"   # cpu_ticks, to_ms, h2load_percentiles, split_table
[[ -f $S/portcullis/portcullis.toml && -f $S/upstream/nginx.conf && -s $S/tokens.txt ]] \
    || die "$S is not a scratch directory kept by deploy/load/run.sh"
side_bin() { if [[ $1 == A ]]; then echo "$BIN_A"; else echo "$BIN_B"; fi; }
is_nginx() { [[ $(side_bin "$1") == nginx ]]; }
for v in A B; do
    is_nginx "$v" || [[ -x $(side_bin "$v") ]] || die "$(side_bin "$v") is not executable (a portcullis binary, or nginx)"
done
[[ $BIN_A != nginx || $BIN_B != nginx ]] || die "at most one side is nginx"
[[ ( $BIN_A != nginx && $BIN_B != nginx ) || -f $S/nginx-proxy/nginx.conf ]] || die "$S has no nginx-proxy (keep a scratch with PEERS including nginx)"
CONNS=${CONNS:-25}
[[ $CONNS =~ ^[0-9]+$ ]] && (( CONNS > 0 && CONNS <= 2500 )) || die "CONNS must be an integer from 1 to 2500"
[[ $MODE =~ ^(h1|10k|rate)$ ]] || die "MODE is h1, 10k or rate (got '$MODE')"
[[ $MODE != 10k || -f $S/rotate.lua ]] || die "$S has no rotate.lua (keep a scratch from the current run.sh)"
[[ $SECS =~ ^[0-9]+$ && $ROUNDS =~ ^[0-9]+$ ]] && (( SECS > 0 && ROUNDS > 0 )) \
    || die "SECONDS and ROUNDS must be positive integers"
for t in nginx wrk h2load curl; do command -v "$t" >/dev/null || die "$t not found"; done
SPLIT=${SPLIT:-0}
[[ $SPLIT =~ ^[01]$ ]] || die "SPLIT is 0 or 1 (got '$SPLIT')"
if [[ $SPLIT == 1 ]]; then
    command -v bpftrace >/dev/null || die "SPLIT=1 needs bpftrace (Debian: apt-get install bpftrace)"
    [[ $(id -u) == 0 ]] || die "SPLIT=1 needs root (bpftrace)"
fi

W=$(mktemp -d /tmp/portcullis-pair.XXXXXX)
PIDS=()
cleanup() {
    local rc=$? p
    trap - EXIT INT TERM
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$W"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

TOKEN=$(head -n 1 "$S/tokens.txt")
nginx -p "$S/upstream" -e "$S/upstream/logs/error.log" -c "$S/upstream/nginx.conf" \
    -g 'daemon off;' 2>>"$W/upstream.log" &
PIDS+=($!)

declare -A PORT PID
for v in A B; do
    if is_nginx "$v"; then
        nginx -p "$S/nginx-proxy" -e "$S/nginx-proxy/logs/error.log" -c "$S/nginx-proxy/nginx.conf" \
            -g 'daemon off;' 2>>"$W/nginx-proxy.log" &
        PID[$v]=$!
        PIDS+=("${PID[$v]}")
        continue
    fi
    mkdir -p "$W/$v"
    cp -r "$S/portcullis/." "$W/$v/"
    rm -f "$W/$v/addr.json" "$W/$v"/callgrind.out*
    # The kept config may pin one worker (a callgrind run): defaults here.
    sed -i '/^\[listener\]/,$d' "$W/$v/portcullis.toml"
    bin=$(side_bin "$v")
    (cd "$W/$v" && exec "$bin" serve --config "$W/$v/portcullis.toml" --addr-file "$W/$v/addr.json" \
        >"$W/$v/stdout.log" 2>"$W/$v/stderr.log") &
    PID[$v]=$!
    PIDS+=("${PID[$v]}")
done
for v in A B; do
    n=0
    if is_nginx "$v"; then
        PORT[$v]=$(sed -n 's/^ *listen 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$S/nginx-proxy/nginx.conf" | head -n 1)
        until curl -s -o /dev/null --max-time 1 --cacert "$S/pki/ca.pem" "https://127.0.0.1:${PORT[$v]}/"; do
            kill -0 "${PID[$v]}" 2>/dev/null || { cat "$W/nginx-proxy.log" >&2; die "nginx proxy exited"; }
            (( n++ < 100 )) || die "nginx proxy did not start within 10 s"
            sleep 0.1
        done
        continue
    fi
    until [[ -s $W/$v/addr.json ]]; do
        kill -0 "${PID[$v]}" 2>/dev/null || { cat "$W/$v/stderr.log" >&2; die "build $v exited"; }
        (( n++ < 100 )) || die "build $v did not start within 10 s"
        sleep 0.1
    done
    addr=$(sed -n 's/.*"proxy":"\([^"]*\)".*/\1/p' "$W/$v/addr.json")
    PORT[$v]=${addr##*:}
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 --cacert "$S/pki/ca.pem" \
        -H "Authorization: Bearer $TOKEN" "https://127.0.0.1:${PORT[$v]}/") || true
    [[ $code == 200 ]] || die "build $v answered $code, not 200 (tokens expired? keep a fresh scratch)"
done

load() {    # port, seconds, output
    local limit=$(( $2 + 30 ))
    case $MODE in
        h1) timeout --kill-after=5 "$limit" wrk -t1 -c"$CONNS" -d"$2"s --latency \
                -H "Authorization: Bearer $TOKEN" "https://127.0.0.1:$1/" > "$3" 2>&1 ;;
        10k) timeout --kill-after=5 "$limit" wrk -t1 -c"$CONNS" -d"$2"s --latency \
                -s "$S/rotate.lua" "https://127.0.0.1:$1/" -- "$S/tokens.txt" 1 > "$3" 2>&1 ;;
        rate) rm -f "$3.log"
            # Connections opened one a millisecond (see run.sh, RATE_RAMP_MS).
            timeout --kill-after=5 "$limit" h2load --h1 -t1 -c"$CONNS" --rps=$(( 2500 / CONNS )) \
                -r1 --rate-period=1ms -n $(( 2500 / CONNS * CONNS * $2 )) \
                -H "Authorization: Bearer $TOKEN" --log-file="$3.log" "https://127.0.0.1:$1/" > "$3" 2>&1 ;;
    esac
}
p99_ms() {   # wrk's 99th percentile ("--latency" table) in ms; for h2load, from its
             # per-request log (third column: microseconds from request to response)
    if [[ $MODE != rate ]]; then
        to_ms "$(awk '$1 == "99%" { print $2; exit }' "$1")"
    elif [[ -s $1.log ]]; then
        local p50 p99
        read -r p50 p99 < <(h2load_percentiles "$1.log")
        echo "$p99"
    else
        echo "-"
    fi
}
done_reqs() {   # requests answered, from wrk's or h2load's summary
    if [[ $MODE != rate ]]; then
        awk '/requests in/ { print $1 }' "$1"
    else
        awk '/^requests:/ { print $8 }' "$1"
    fi
}

load "${PORT[A]}" 3 /dev/null & a=$!
load "${PORT[B]}" 3 /dev/null & b=$!
wait "$a" "$b"
hz=$(getconf CLK_TCK)
procs() {   # the processes whose CPU counts for side $1: nginx's master and its workers
    if is_nginx "$1"; then
        echo "${PID[$1]}" $(pgrep -P "${PID[$1]}")
    else
        echo "${PID[$1]}"
    fi
}
if [[ $SPLIT == 1 ]]; then
    UP_PORT=$(sed -n 's/^ *listen 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$S/upstream/nginx.conf" | head -n 1)
    [[ -n $UP_PORT ]] || die "no upstream port in $S/upstream/nginx.conf"
    bpftrace "$(dirname "${BASH_SOURCE[0]}")/split.bt" "${PORT[A]}" "${PORT[B]}" "$UP_PORT" \
        > "$W/split.txt" 2> "$W/split.err" &
    BT=$!
    PIDS+=("$BT")
    n=0
    until grep -q '^Attaching' "$W/split.txt" 2>/dev/null; do
        kill -0 "$BT" 2>/dev/null || die "bpftrace exited: $(grep -v RLIMIT_MEMLOCK "$W/split.err" | head -n 3)"
        (( n++ < 300 )) || die "bpftrace did not attach within 30 s"
        sleep 0.1
    done
fi
for r in $(seq 1 "$ROUNDS"); do
    # shellcheck disable=SC2046 # one pid per word
    a0=$(cpu_ticks $(procs A)); b0=$(cpu_ticks $(procs B))
    load "${PORT[A]}" "$SECS" "$W/a.txt" & a=$!
    load "${PORT[B]}" "$SECS" "$W/b.txt" & b=$!
    wait "$a" || die "load on A failed: $(tail -n 3 "$W/a.txt")"
    wait "$b" || die "load on B failed: $(tail -n 3 "$W/b.txt")"
    # shellcheck disable=SC2046
    a1=$(cpu_ticks $(procs A)); b1=$(cpu_ticks $(procs B))
    na=$(done_reqs "$W/a.txt"); nb=$(done_reqs "$W/b.txt")
    [[ $na =~ ^[0-9]+$ && $nb =~ ^[0-9]+$ ]] && (( na > 0 && nb > 0 )) || die "no requests counted"
    awk -v a=$(( a1 - a0 )) -v b=$(( b1 - b0 )) -v na="$na" -v nb="$nb" -v hz="$hz" -v r="$r" \
        -v pa="$(p99_ms "$W/a.txt")" -v pb="$(p99_ms "$W/b.txt")" 'BEGIN {
        ca = a / hz * 1e6 / na; cb = b / hz * 1e6 / nb
        printf "round %d: A %d req %.1f CPU-us/req p99 %s ms | B %d req %.1f CPU-us/req p99 %s ms | B/A %.3f\n", r, na, ca, pa, nb, cb, pb, cb / ca
    }'
done
if [[ $SPLIT == 1 ]]; then
    kill -INT "$BT"
    wait "$BT" 2>/dev/null || true
    echo "split over the measured rounds (split.bt; side A = $BIN_A, B = $BIN_B):"
    split_table "$W/split.txt" A B
fi
