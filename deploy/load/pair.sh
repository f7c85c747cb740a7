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
#
# DIR is a scratch directory the load script kept: its portcullis config,
# store (the seeded devices), certificates, tokens and upstream nginx are
# reused; each build gets a copy of the portcullis directory (default
# workers). MODE: h1 (wrk -t1 -c25 each, saturating), 10k (the same with
# the load script's Lua script rotating over every token in DIR, from the
# same offset for both; the 3-second warm-up verifies them) or rate
# (h2load --h1 -c25 at 2,500 req/s each); SECONDS per round (default 15), ROUNDS
# (default 8). Prints each build's CPU-µs per request and its p99 (wrk's,
# or from h2load's per-request log) per round and B over A; run it both ways round (A, B then B, A) so neither position is
# favoured. Loopback only, every load run bounded by timeout, every
# process stopped on exit.

set -euo pipefail

S=${1:?scratch directory kept by run.sh}
BIN_A=${2:?first portcullis binary}
BIN_B=${3:?second portcullis binary}
MODE=${4:-h1}
SECS=${5:-15}
ROUNDS=${6:-8}

die() { printf '[pair] FAIL: %s\n' "$*" >&2; exit 1; }
# shellcheck source=deploy/load/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"   # cpu_ticks, to_ms, h2load_percentiles
[[ -f $S/portcullis/portcullis.toml && -f $S/upstream/nginx.conf && -s $S/tokens.txt ]] \
    || die "$S is not a scratch directory kept by deploy/load/run.sh"
[[ -x $BIN_A && -x $BIN_B ]] || die "both binaries must be executable"
[[ $MODE =~ ^(h1|10k|rate)$ ]] || die "MODE is h1, 10k or rate (got '$MODE')"
[[ $MODE != 10k || -f $S/rotate.lua ]] || die "$S has no rotate.lua (keep a scratch from the current run.sh)"
[[ $SECS =~ ^[0-9]+$ && $ROUNDS =~ ^[0-9]+$ ]] && (( SECS > 0 && ROUNDS > 0 )) \
    || die "SECONDS and ROUNDS must be positive integers"
for t in nginx wrk h2load curl; do command -v "$t" >/dev/null || die "$t not found"; done

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
    mkdir -p "$W/$v"
    cp -r "$S/portcullis/." "$W/$v/"
    rm -f "$W/$v/addr.json" "$W/$v"/callgrind.out*
    # The kept config may pin one worker (a callgrind run): defaults here.
    sed -i '/^\[listener\]/,$d' "$W/$v/portcullis.toml"
    bin=$BIN_A; [[ $v == B ]] && bin=$BIN_B
    (cd "$W/$v" && exec "$bin" serve --config "$W/$v/portcullis.toml" --addr-file "$W/$v/addr.json" \
        >"$W/$v/stdout.log" 2>"$W/$v/stderr.log") &
    PID[$v]=$!
    PIDS+=("${PID[$v]}")
done
for v in A B; do
    n=0
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
        h1) timeout --kill-after=5 "$limit" wrk -t1 -c25 -d"$2"s --latency \
                -H "Authorization: Bearer $TOKEN" "https://127.0.0.1:$1/" > "$3" 2>&1 ;;
        10k) timeout --kill-after=5 "$limit" wrk -t1 -c25 -d"$2"s --latency \
                -s "$S/rotate.lua" "https://127.0.0.1:$1/" -- "$S/tokens.txt" 1 > "$3" 2>&1 ;;
        rate) rm -f "$3.log"
            timeout --kill-after=5 "$limit" h2load --h1 -t1 -c25 --rps=100 -D"$2" \
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
for r in $(seq 1 "$ROUNDS"); do
    a0=$(cpu_ticks "${PID[A]}"); b0=$(cpu_ticks "${PID[B]}")
    load "${PORT[A]}" "$SECS" "$W/a.txt" & a=$!
    load "${PORT[B]}" "$SECS" "$W/b.txt" & b=$!
    wait "$a" || die "load on A failed: $(tail -n 3 "$W/a.txt")"
    wait "$b" || die "load on B failed: $(tail -n 3 "$W/b.txt")"
    a1=$(cpu_ticks "${PID[A]}"); b1=$(cpu_ticks "${PID[B]}")
    na=$(done_reqs "$W/a.txt"); nb=$(done_reqs "$W/b.txt")
    [[ $na =~ ^[0-9]+$ && $nb =~ ^[0-9]+$ ]] && (( na > 0 && nb > 0 )) || die "no requests counted"
    awk -v a=$(( a1 - a0 )) -v b=$(( b1 - b0 )) -v na="$na" -v nb="$nb" -v hz="$hz" -v r="$r" \
        -v pa="$(p99_ms "$W/a.txt")" -v pb="$(p99_ms "$W/b.txt")" 'BEGIN {
        ca = a / hz * 1e6 / na; cb = b / hz * 1e6 / nb
        printf "round %d: A %d req %.1f CPU-us/req p99 %s ms | B %d req %.1f CPU-us/req p99 %s ms | B/A %.3f\n", r, na, ca, pa, nb, cb, pb, cb / ca
    }'
done
