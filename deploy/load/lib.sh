# Helpers shared by run.sh and pair.sh (sourced, not run). The caller
# defines `die MESSAGE`.

cpu_ticks() {   # sum of utime+stime (fields 14, 15 of /proc/PID/stat) over the given pids
    local t
    t=$(cpu_split "$@")
    echo $(( ${t% *} + ${t#* } ))
}

cpu_split() {   # "utime stime": each summed over the given pids (fields 14, 15)
    local user=0 sys=0 pid stat rest
    local -a f
    for pid in "$@"; do
        stat=$(< "/proc/$pid/stat") || die "pid $pid vanished"
        rest=${stat##*) }            # drop "pid (comm) ": field 3 becomes index 0
        read -r -a f <<< "$rest"
        user=$(( user + f[11] )); sys=$(( sys + f[12] ))   # utime=field 14, stime=field 15
    done
    echo "$user $sys"
}

to_ms() {   # wrk duration ("812.00us", "1.23ms", "1.05s", "2.00m") -> milliseconds
    awk -v v="$1" 'BEGIN {
        n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
        if (u == "us") n /= 1000; else if (u == "s") n *= 1000; else if (u == "m") n *= 60000
        else if (u != "ms") { print "?"; exit }
        printf "%.3f", n }'
}

h2load_percentiles() {   # h2load --log-file[, start in µs since the epoch] -> "p50 p99" in ms
    # One line per request: start (µs), status, duration (µs); only the
    # requests started at or after the given start count.
    awk -v from="${2:-0}" '$1 >= from { print $3 }' "$1" | sort -n | awk '{ d[NR] = $1 }
        END { printf "%.3f %.3f\n", d[int(NR * 0.50) + 1] / 1000, d[int(NR * 0.99) + 1] / 1000 }'
}

h2load_phase() {   # h2load --log-file, period in µs[, start in µs since the epoch] -> a percentage
    # How evenly the requests start within one rate period: the share (%) of
    # requests whose start falls in the busiest tenth of the period. 10 is
    # perfectly even; 100 means every connection sends at the same moment.
    awk -v p="$2" -v from="${3:-0}" '$1 >= from { c[int(($1 % p) * 10 / p)]++; n++ }
        END { m = 0; for (i in c) if (c[i] > m) m = c[i]; printf "%.0f", n ? m * 100 / n : 0 }' "$1"
}

split_table() {   # bpftrace output of split.bt, name of side 0, name of side 1 -> one
                  # line per (part, side): count and percentiles from its 10-us buckets
    awk -v a="$2" -v b="$3" '
        /^@[a-z_]+\[[01]\]:/ {
            split(substr($1, 2), f, /[][]/); key = f[1] SUBSEP f[2]
            next
        }
        /^\[[0-9]+, / && key != "" {
            lo = $1; gsub(/[^0-9]/, "", lo); n = $3 + 0
            c[key, ++m[key]] = lo; w[key, m[key]] = n; tot[key] += n
        }
        END {
            order = "c_pick req_proc u_svc u_pick resp_proc c_total"
            np = split(order, parts, " ")
            printf "  %-10s %-11s %9s %6s %6s %6s %6s %7s   (us; 10-us buckets, lower edges)\n", "part", "side", "count", "p50", "p90", "p99", "p99.9", "mean"
            for (i = 1; i <= np; i++) for (s = 0; s <= 1; s++) {
                key = parts[i] SUBSEP s
                if (!(key in tot) || tot[key] == 0) continue
                split("0.5 0.9 0.99 0.999", qs, " "); acc = 0; j = 1; sum = 0
                for (k = 1; k <= m[key]; k++) {
                    acc += w[key, k]; sum += (c[key, k] + 5) * w[key, k]
                    while (j <= 4 && acc >= qs[j] * tot[key]) { q[j] = c[key, k]; j++ }
                }
                printf "  %-10s %-11s %9d %6d %6d %6d %6d %7.1f\n", parts[i], (s ? b : a), tot[key], q[1], q[2], q[3], q[4], sum / tot[key]
            }
        }' "$1"
}

sched_summary() {   # sched.bt output, its seconds, the proxy's pids, the upstream's pids -> one line
    awk -v secs="$2" -v proxy="$3" -v up="$4" '
        function pct(a, b) { return b > 0 ? 100 * a / b : 0 }
        BEGIN {
            n = split(proxy, a, " "); for (i = 1; i <= n; i++) grp[a[i]] = "proxy"
            n = split(up, a, " "); for (i = 1; i <= n; i++) grp[a[i]] = "upstream"
        }
        match($0, /^@[a-z]+\[[0-9]+\]: /) {
            m = substr($0, 2, RLENGTH - 3); split(m, kv, "["); k = kv[1]; t = kv[2] + 0
            v = substr($0, RLENGTH + 1)
            if (k == "comm") comm[t] = v; else val[k, t] = v + 0
            seen[t] = 1
        }
        END {
            for (t in seen) {
                g = (t in grp) ? grp[t] : (comm[t] == "wrk" || comm[t] == "h2load") ? "load" : (t == 0) ? "idle" : "other"
                on[g] += val["on", t]; slow[g] += val["slow", t]
                wakes[g] += val["wakes", t]; busy[g] += val["busy", t]
                if (val["wmax", t] > wmax[g]) wmax[g] = val["wmax", t]
            }
            printf "sched: CPUs idle %.0f ms/s; waits > 0.5 ms for a CPU a second (longest, ms): proxy %.0f (%.1f), load %.0f (%.1f), upstream %.0f (%.1f)", \
                on["idle"] / 1000 / secs, slow["proxy"] / secs, wmax["proxy"] / 1000, \
                slow["load"] / secs, wmax["load"] / 1000, slow["upstream"] / secs, wmax["upstream"] / 1000
            printf "; woken onto a busy CPU while another idled (%% of wake-ups): proxy %.1f, load %.1f, upstream %.1f", \
                pct(busy["proxy"], wakes["proxy"]), pct(busy["load"], wakes["load"]), pct(busy["upstream"], wakes["upstream"])
        }' "$1"
}
