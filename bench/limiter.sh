#!/usr/bin/env bash
# bench/limiter.sh — how fast pg_beat's shared-memory limiter answers, in one
# run, beside what the same check costs through Redis on the same machine.
#
#   1. the C path a flow worker calls (beat.bench_acquire: a loop inside one
#      backend), 3 stacked keys: checks/s, p50 and p99 of one check; then two
#      backends at once;
#   2. SQL: pgbench running SELECT beat.acquire('{3 keys}') against SELECT 1,
#      1 and 8 clients, alternating, 11 runs of 5 s each: the median tps
#      ratio, and the CPU each transaction cost (backend and pgbench).
#      A third statement in each round, SELECT bench_acquire_unchecked(),
#      is acquire without its limiter: the same arguments read the same
#      way, the same result built and printed, no limit checked (a C
#      function of pg_beat.so that only this script declares).  What it
#      costs over SELECT 1 is what any function of acquire's arguments and
#      result costs; what acquire costs over it is the limiter's share;
#   3. Redis: the same stacked check (3 GCRA keys, all or nothing) as a Lua
#      script, EVALSHA through redis-benchmark, 1 and 8 clients.
#   4. With BENCH_PERF=1 only: one more run of each at 1 and at 8 clients
#      under `perf record -a -g`, and where the backends' CPU went, in
#      microseconds per call (inclusive): the limiter's check, printing
#      the result, and the whole of each backend.  perf's own overhead is in
#      these runs: read the rows against each other, not against 1-3.
#
# Run as root after `make install` (it installs redis-server if missing,
# and linux-perf with BENCH_PERF=1).
# Everything runs on this machine: a throwaway cluster on a unix socket and
# a redis-server on 127.0.0.1; both are stopped at the end.
set -uo pipefail
. "$(dirname "$0")/lib.sh"

PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
PGBIN=$("$PG_CONFIG" --bindir)
require_plain_build "$("$PG_CONFIG" --pkglibdir)/pg_beat.so"
PORT=${BENCH_PORT:-55434}
SECONDS_EACH=${BENCH_SECONDS:-5}
PERF=${BENCH_PERF:-0}

if ! command -v redis-server >/dev/null || ! command -v redis-benchmark >/dev/null; then
    apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server >/dev/null
fi
if [ "$PERF" = 1 ] && ! command -v perf >/dev/null; then
    apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q linux-perf >/dev/null
fi

DIR=$(mktemp -d /tmp/pg_beat_limiter.XXXXXX)
chown postgres "$DIR"
as_pg() { runuser -u postgres -- "$@"; }
cleanup() {
    as_pg "$PGBIN/pg_ctl" -D "$DIR/data" -m immediate stop >/dev/null 2>&1 || true
    [ -n "${REDIS_PID:-}" ] && kill "$REDIS_PID" 2>/dev/null || true
    rm -rf "$DIR"
}
trap cleanup EXIT

as_pg "$PGBIN/initdb" -D "$DIR/data" -A trust >/dev/null
cat >> "$DIR/data/postgresql.conf" <<CONF
port = $PORT
listen_addresses = ''
unix_socket_directories = '$DIR'
shared_preload_libraries = 'pg_beat'
shared_buffers = 256MB
CONF
as_pg "$PGBIN/pg_ctl" -D "$DIR/data" -l "$DIR/log" -w start >/dev/null
psql() { as_pg "$PGBIN/psql" -h "$DIR" -p "$PORT" -X -q -At "$@" postgres; }
psql -c 'CREATE EXTENSION pg_beat'
# Three stacked limits as a worker would pass them: a daily quota, a rate
# per minute, a rate per handle.  (No ':' in the names: pgbench would read
# ":name" in its script as a variable.)
psql -c "SELECT (beat.set_limit('global_day', 1000000000, quota => 'day')).name" >/dev/null
psql -c "SELECT (beat.set_limit('global_minute', 1000000000, per => '1 minute', burst => 1000000)).name" >/dev/null
for h in alice bob carol; do
    psql -c "SELECT (beat.set_limit('handle_$h', 1000000, per => '1 second', burst => 1000)).name" >/dev/null
done
KEYS="{global_day,global_minute,handle_alice}"
psql -c "CREATE FUNCTION bench_acquire_unchecked(keys text[], cost integer DEFAULT 1,
    OUT allowed boolean, OUT retry_after interval, OUT blocking_key text,
    OUT remaining bigint, OUT reset_after interval) RETURNS record
    AS '\$libdir/pg_beat', 'beat_bench_acquire_unchecked' LANGUAGE C VOLATILE"

echo "## pg_beat limiter, $(date -u +%F), $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GB", $2/1048576}' /proc/meminfo), $(uname -r), $("$PGBIN/postgres" --version)"
echo
echo "| measurement | figure |"
echo "|---|---|"

# 1. in-process
one=$(psql -c "SELECT round(checks_per_second), round(p50_ns), round(p99_ns) FROM beat.bench_acquire('$KEYS', 2000000)")
IFS='|' read -r rate p50 p99 <<<"$one"
echo "| C path, 3 stacked keys, 1 backend | $rate checks/s, p50 ${p50} ns, p99 ${p99} ns |"
psql -c "SELECT round(checks_per_second) FROM beat.bench_acquire('{global_day,global_minute,handle_bob}', 2000000)" >"$DIR/a" &
psql -c "SELECT round(checks_per_second) FROM beat.bench_acquire('{global_day,global_minute,handle_carol}', 2000000)" >"$DIR/b" &
wait
a=$(cat "$DIR/a"); b=$(cat "$DIR/b")
echo "| C path, 2 backends at once (shared global keys) | $a + $b = $((a + b)) checks/s ($(awk -v s=$((a + b)) -v o="$rate" 'BEGIN {printf "%.2f", s / o}')x one backend) |"

# 2. SQL through pgbench
echo "SELECT beat.acquire('$KEYS');" >"$DIR/acquire.sql"
echo "SELECT 1;" >"$DIR/one.sql"
echo "SELECT bench_acquire_unchecked('$KEYS');" >"$DIR/unchecked.sql"
chown postgres "$DIR"/*.sql
PM=$(head -1 "$DIR/data/postmaster.pid")
TICK=$(getconf CLK_TCK)
# CPU ticks of the postmaster's exited children: the backends of a pgbench
# run, once it has ended.
reaped() { awk '{print $16 + $17}' "/proc/$PM/stat"; }
# pgb FILE CLIENTS [WRAPPER...]: one pgbench run, under WRAPPER if given
# (part 4's perf record); prints "tps transactions cpu_seconds
# backend_seconds", the CPU being that of its backends and of what ran it
# (pgbench, and the wrapper), then that of its backends alone.
pgb() {
    local file=$1 clients=$2 before after times
    shift 2
    before=$(reaped)
    times=$( { TIMEFORMAT='%3U %3S'; time "$@" runuser -u postgres -- "$PGBIN/pgbench" -n \
        -h "$DIR" -p "$PORT" -T "$SECONDS_EACH" -M prepared -c "$clients" \
        -j "$((clients < 2 ? 1 : 2))" -f "$file" postgres \
        >"$DIR/pgbench.out" 2>"$DIR/pgbench.err"; } 2>&1 )
    sleep 0.3
    after=$(reaped)
    awk -v t="$times" -v b="$before" -v a="$after" -v tick="$TICK" '
        /^tps/ {tps = $3} /actually processed/ {n = $NF; sub(/\/.*/, "", n)}
        END {split(t, u, " "); if (tps != "") printf "%.0f %d %.3f %.3f", tps, n,
             (a - b) / tick + u[1] + u[2], (a - b) / tick}' "$DIR/pgbench.out"
}
# Alternate the two, eleven times each, and take the median of the eleven
# tps ratios: this machine drifts by more than the difference being
# measured, and one pair of runs is off by up to 25% either way (at five
# pairs of 10 s, the median of seven whole runs ranged 83-97%).
# The CPU each transaction cost (its backend and pgbench, summed over the
# runs) does not drift with the machine's other load: its ratio is what the
# tps ratio would be on a machine doing nothing else.
ROUNDS=${BENCH_ROUNDS:-11}
# median of the tps ratios a/b over the rounds, in percent
median_pct() {
    local -n a=$1 b=$2
    for r in $(seq 0 $((ROUNDS - 1))); do
        awk -v x="${a[$r]}" -v y="${b[$r]}" 'BEGIN {printf "%.1f\n", 100 * x / y}'
    done | sort -n | sed -n "$(( (ROUNDS + 1) / 2 ))p"
}
# CPU per transaction of statement $1 in microseconds, from cpu and n
us() { awk -v c="${cpu[$1]}" -v n="${n[$1]}" 'BEGIN {printf "%.1f", 1e6 * c / n}'; }
for c in 1 8; do
    acq=(); one=(); unc=(); pairs=""
    declare -A cpu=([one]=0 [unchecked]=0 [acquire]=0) n=([one]=0 [unchecked]=0 [acquire]=0)
    for round in $(seq "$ROUNDS"); do
        for f in one unchecked acquire; do
            read -r tps calls used _ <<<"$(pgb "$DIR/$f.sql" "$c")"
            [ -n "$tps" ] || { echo "pgbench failed:"; head -3 "$DIR/pgbench.err"; exit 1; }
            case $f in one) one+=("$tps") ;; unchecked) unc+=("$tps") ;; acquire) acq+=("$tps") ;; esac
            cpu[$f]=$(awk -v x="${cpu[$f]}" -v y="$used" 'BEGIN {print x + y}'); n[$f]=$((n[$f] + calls))
        done
        pairs="$pairs ${acq[-1]}/${unc[-1]}/${one[-1]}"
    done
    echo "| SQL, $c client(s): SELECT beat.acquire(3 keys), the same unchecked, SELECT 1, $ROUNDS alternating rounds of ${SECONDS_EACH} s (tps acquire/unchecked/one) |$pairs |"
    echo "| SQL, $c client(s): median tps ratio | acquire **$(median_pct acq one)%** of SELECT 1; unchecked $(median_pct unc one)% of SELECT 1; acquire $(median_pct acq unc)% of unchecked |"
    echo "| SQL, $c client(s): CPU per transaction (backends and pgbench, all runs) | $(us acquire) us acquire, $(us unchecked) us unchecked, $(us one) us SELECT 1: acquire $(awk -v a="$(us acquire)" -v o="$(us one)" 'BEGIN {printf "%.1f", 100 * o / a}')% of SELECT 1, $(awk -v a="$(us acquire)" -v o="$(us unchecked)" 'BEGIN {printf "%.1f", 100 * o / a}')% of unchecked |"
    unset cpu n
done

# 3. Redis: the same stacked check as a Lua script (GCRA per key, all or nothing)
redis-server --port 56379 --bind 127.0.0.1 --save '' --appendonly no --daemonize no >/dev/null 2>&1 &
REDIS_PID=$!
for _ in $(seq 50); do redis-cli -p 56379 ping >/dev/null 2>&1 && break; sleep 0.1; done
LUA='local now = redis.call("TIME") local t = now[1] * 1000000 + now[2]
local T = tonumber(ARGV[1]) local tau = tonumber(ARGV[2])
local tats = {} local allowed = true
for i, k in ipairs(KEYS) do
  local tat = tonumber(redis.call("GET", k) or t) if tat < t then tat = t end
  if tat + T - t > tau + T then allowed = false end
  tats[i] = tat + T
end
if allowed then for i, k in ipairs(KEYS) do redis.call("SET", k, tats[i], "PX", 60000) end end
return allowed and 1 or 0'
SHA=$(redis-cli -p 56379 SCRIPT LOAD "$LUA")
for c in 1 8; do
    out=$(redis-benchmark -p 56379 -c "$c" -n 200000 -q EVALSHA "$SHA" 3 k:day k:minute k:handle 1 1000000000 2>/dev/null | tr '\r' '\n' | grep -E 'requests per second' | tail -1)
    rps=$(echo "$out" | grep -oE '[0-9.]+ requests per second' | awk '{printf "%.0f", $1}')
    rp50=$(echo "$out" | grep -oE 'p50=[0-9.]+' | cut -d= -f2)
    echo "| Redis Lua stacked check (EVALSHA, 3 keys), $c client(s) | $rps checks/s, p50 ${rp50:-?} ms per round trip |"
    [ "$c" = 1 ] && redis_p50_ns=$(awk -v ms="${rp50:-0}" 'BEGIN {printf "%.0f", ms * 1000000}')
done
echo
echo "One check, one client: pg_beat's C path ${p50} ns (p50); the same check through Redis ${redis_p50_ns} ns per round trip: $(awk -v r="$redis_p50_ns" -v p="$p50" 'BEGIN {printf "%.0fx", r / p}') faster in shared memory."

# 4. Where an acquire's CPU goes (BENCH_PERF=1)
# perf's samples say which share of the backends' CPU went where; the CPU
# itself comes from the kernel's accounting of the exited backends, as in
# 2 (perf changes its sampling rate under load, so counting samples, or
# summing their periods, gives no reliable time on this machine).
if [ "$PERF" = 1 ]; then
    PERF_HZ=3999
    echo
    echo "Where the backends' CPU went (BENCH_PERF=1: one more ${SECONDS_EACH} s run of each under perf record -a -g -F $PERF_HZ; the backends' CPU per call from the kernel, its shares from perf's stack samples, inclusive):"
    echo
    echo "| statement | clients | calls | backend CPU per call | limiter check (beat_limiter_apply) | printing the result (record_out) | of which the intervals (interval_out) |"
    echo "|---|---:|---:|---:|---:|---:|---:|"
    for run in "acquire 1" "one 1" "acquire 8" "one 8"; do
        read -r f c <<<"$run"
        read -r tps calls _ backend <<<"$(pgb "$DIR/$f.sql" "$c" perf record -q -a -g -F "$PERF_HZ" -o "$DIR/perf.data" --)"
        [ -n "$tps" ] || { echo "perf record or pgbench failed:"; tail -3 "$DIR/pgbench.err"; exit 1; }
        # each sample of a postgres process: its frames, joined
        perf script -i "$DIR/perf.data" -F comm,ip,sym --comm postgres 2>/dev/null |
            awk -v n="$calls" -v c="$c" -v f="$f" -v cpu="$backend" '
                function flush() { if (inside) { all++; if (s ~ / beat_limiter_apply /) lim++;
                                   if (s ~ / record_out /) rec++; if (s ~ / interval_out /) itv++ } }
                /^postgres/ { flush(); inside = 1; s = " "; next }
                NF >= 2 { s = s $2 " " }
                END { flush(); us = 1e6 * cpu / n; if (all == 0) all = 1;
                      printf "| %s | %d | %d | %.1f us | %.2f us (%.1f%%) | %.2f us (%.1f%%) | %.2f us |\n",
                             f == "one" ? "SELECT 1" : "SELECT beat.acquire(3 keys)", c, n, us,
                             us * lim / all, 100 * lim / all, us * rec / all, 100 * rec / all, us * itv / all }'
    done
fi
