#!/usr/bin/env bash
# bench/http.sh -- pg_beat HTTP worker benchmark (not a test).
#
# Run as root on Debian 12 after `make install`:
#
#     bench/http.sh
#
# Everything runs on 127.0.0.1 and is bounded in count and time:
#   1. installs nginx-light and wrk if missing, and starts an nginx of its own
#      (generated config, its own prefix and pid file, 1 worker process) that
#      serves a fixed ~1 KB JSON body at /x.json with keepalive;
#   2. measures the HTTP ceiling of this machine with wrk;
#   3. creates a throwaway PostgreSQL 15 cluster (default durability) that
#      preloads pg_beat;
#   4. end-to-end throughput: for each (workers, concurrency) of a small sweep,
#      50,000 tasks enqueued in one transaction, timed from the COMMIT until
#      all are succeeded; between runs drop_flow, TRUNCATE beat.http_log,
#      VACUUM;
#   5. pickup latency of one task at a time, idle and under a steady trickle,
#      measured server-side (finished_at - created_at) and client-side (a
#      tight poll of the task's state), the latter from the enqueue sent and
#      from the enqueue returned (committed); and a client that waits in
#      beat.wait(id) instead of polling;
#   6. worker memory: VmRSS, RssAnon and Pss of each worker every second, and
#      PostgreSQL's own count of its memory contexts before and after a run;
#   7. prints a markdown table (also, with what was measured, on a failure).
# A trap stops Postgres and nginx and removes the temporary directories.
# See bench/README.md ("HTTP workers") for what each figure means.
#
# Knobs (environment), all optional:
#   PGBIN              PostgreSQL binaries           (/usr/lib/postgresql/15/bin)
#   BENCH_PORT         Postgres port                  (55433)
#   BENCH_SWEEP        workers:concurrency runs       ("1:64 2:64 4:64 2:32 2:128";
#                      empty: no throughput run)
#   BENCH_TASKS        tasks per throughput run       (50000)
#   BENCH_RUN_TIMEOUT  cap per throughput run, s      (100)
#   BENCH_SAMPLES      pickup samples per series      (200)
#   BENCH_WRK_SECONDS  duration of each wrk run       (10)
#   BENCH_PERF=1       during the first run of the sweep, also record
#                      `perf record -a` (CPU by process) and `perf record
#                      --call-graph dwarf -p <workers>` (where the workers
#                      spend it) and print both; adds overhead to that run
#                      only; needs perf (linux-perf)
#   BENCH_FRESH_CLUSTER=1  run each throughput run, and the latency series,
#                      on a new cluster (initdb) instead of one cluster with
#                      drop_flow + TRUNCATE beat.http_log + VACUUM between
#                      runs; see bench/README.md for why this knob exists
#   BENCH_Q_TIMEOUT    cap on any one statement of the script, s (120)
#   BENCH_KEEP=1       keep the temporary directories at the end
#   BENCH_PG_CONF      lines added to postgresql.conf after the defaults,
#                      for diagnosis only (for example
#                      "synchronous_commit = off" shows what the disk's
#                      flushes cost); the report prints them, and its
#                      figures are then not the benchmark's

set -euo pipefail
. "$(dirname "$0")/lib.sh"

PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
PORT=${BENCH_PORT:-55433}
SWEEP=${BENCH_SWEEP-"1:64 2:64 4:64 2:32 2:128"}
TASKS=${BENCH_TASKS:-50000}
RUN_TIMEOUT=${BENCH_RUN_TIMEOUT:-100}
STALL_SECONDS=20
SAMPLES=${BENCH_SAMPLES:-200}
WRK_SECONDS=${BENCH_WRK_SECONDS:-10}
PERF=${BENCH_PERF:-0}
KEEP=${BENCH_KEEP:-0}
FRESH=${BENCH_FRESH_CLUSTER:-0}
EXTRA_CONF=${BENCH_PG_CONF:-}
Q_TIMEOUT=${BENCH_Q_TIMEOUT:-120}   # seconds any one statement of ours may take

# References from the issue (this kind of machine).
REF_PGNET_DEFAULT=199          # pg_net requests/s at defaults
REF_PGNET_BEST=2800            # pg_net requests/s at best tuning
REF_PGNET_TRICKLE_MS=800       # pg_net: one request under a steady trickle
TARGET_RATE=5000               # pg_beat: at least, end-to-end
AIM_RATE=20000                 # pg_beat: aim
TARGET_P50_MS=2
TARGET_P95_MS=10

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
T0=$(date +%s)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
IDLE_BEFORE=$( { head -n 1 /proc/stat; sleep 2; head -n 1 /proc/stat; } | awk -v n="$(nproc)" '
    { t = 0; for (i = 2; i <= NF; i++) t += $i; b = t - $5 - $6
      if (NR == 1) { t0 = t; b0 = b } else printf "%.0f%% of %d cores", 100 * (b - b0) / (t - t0), n }')

log() { printf '# [%3ds] %s\n' "$(( $(date +%s) - T0 ))" "$*" >&2; }
die() {
    printf '\n*** BENCHMARK FAILED: %s ***\n' "$*" >&2
    if [ "$(type -t report)" = function ] && [ "${REPORTED:-0}" = 0 ]; then report "$*" || true; fi
    exit 1
}

[ "$(id -u)" = 0 ] || die "run as root (it installs packages, starts nginx and runs initdb as postgres)"
for bin in initdb pg_ctl psql pg_config; do
    [ -x "$PGBIN/$bin" ] || die "$PGBIN/$bin not found (set PGBIN)"
done
id postgres >/dev/null 2>&1 || die "no 'postgres' OS user to run the server as"
as_pg() { runuser -u postgres -- "$@"; }
PGLIB=$("$PGBIN/pg_config" --pkglibdir)
PGSHARE=$("$PGBIN/pg_config" --sharedir)
[ -f "$PGLIB/pg_beat.so" ] || die "$PGLIB/pg_beat.so is missing: run 'make -C $REPO install' first"
require_plain_build "$PGLIB/pg_beat.so"
[ -f "$PGSHARE/extension/pg_beat.control" ] || die "pg_beat.control is missing: run 'make -C $REPO install' first"

# --- 1. nginx and wrk -----------------------------------------------------------

missing=()
command -v nginx >/dev/null 2>&1 || missing+=(nginx-light)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
if [ "$PERF" = 1 ] && ! command -v perf >/dev/null 2>&1; then missing+=(linux-perf); fi
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
        || die "apt-get install ${missing[*]} failed"
fi
NGINX=$(command -v nginx)

DIR=$(mktemp -d /tmp/pg_beat_http.XXXXXX)      # Postgres: owned by postgres, 700
NGX=$(mktemp -d /tmp/pg_beat_nginx.XXXXXX)     # nginx: readable by its worker
chown postgres "$DIR"
chmod 700 "$DIR"
chmod 755 "$NGX"
DATA=
SERVER_LOG=
PSQ_CHILD=
OUT=$DIR/out                                   # our own files (root)
mkdir -p "$OUT" "$NGX/logs" "$NGX/tmp"
STARTED=0
NGINX_PID=
TRICKLE_PID=
PERF_PID=
PERF_PID2=

cleanup() {
    local rc=$?
    set +e
    trap - ERR
    [ -n "$PERF_PID" ] && kill -INT "$PERF_PID" $PERF_PID2 2>/dev/null
    if [ -n "$TRICKLE_PID" ]; then
        touch "$OUT/trickle.stop"
        kill "$TRICKLE_PID" 2>/dev/null
    fi
    if [ -n "$PSQ_CHILD" ]; then
        { exec {PSQ_IN}>&-; } 2>/dev/null
        kill "$PSQ_CHILD" 2>/dev/null
    fi
    if [ "$STARTED" = 1 ]; then
        if [ "$rc" != 0 ] && [ -f "$SERVER_LOG" ]; then
            echo "--- last 60 lines of the server log ($SERVER_LOG), without memory context dumps ---" >&2
            grep -Ev 'LOG:  (level: [0-9]+;|Grand total:|logging memory contexts)' "$SERVER_LOG" | tail -n 60 >&2
        fi
        as_pg "$PGBIN/pg_ctl" -D "$DATA" -m fast -w -t 60 stop >/dev/null 2>&1 \
            || as_pg "$PGBIN/pg_ctl" -D "$DATA" -m immediate -w stop >/dev/null 2>&1
    fi
    if [ -n "$NGINX_PID" ]; then
        kill -QUIT "$NGINX_PID" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$NGINX_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$NGINX_PID" 2>/dev/null
    fi
    if [ "$KEEP" = 1 ]; then
        echo "# kept: $DIR $NGX" >&2
    else
        rm -rf "$DIR" "$NGX"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# set -e stops at any command that fails unexpectedly: say which.
set -E
trap 'err_rc=$?; [ "$BASHPID" != "$$" ] || printf "\n*** BENCHMARK FAILED: unexpected status %s at line %s: %s ***\n" "$err_rc" "$LINENO" "$BASH_COMMAND" >&2' ERR

cd "$DIR"   # the postgres user may not be able to read the caller's cwd

port_free() { ! ss -Hltn "sport = :$1" 2>/dev/null | grep -q .; }
HTTP_PORT=
for p in $(seq 18080 18180); do
    if port_free "$p"; then HTTP_PORT=$p; break; fi
done
[ -n "$HTTP_PORT" ] || die "no free TCP port in 18080-18180 for nginx"
port_free "$PORT" || die "port $PORT is taken (set BENCH_PORT)"

# A fixed JSON body of about 1 KB.
{
    printf '{"id": 4711, "name": "pg_beat benchmark", "ok": true, "items": ['
    for i in $(seq 1 15); do
        [ "$i" -gt 1 ] && printf ', '
        printf '{"n": %d, "label": "item-%02d", "score": %d.5}' "$i" "$i" "$((i * 37 % 100))"
    done
    printf '], "note": "%s"}\n' "$(printf 'x%.0s' $(seq 1 200))"
} >"$NGX/x.json"
chmod 644 "$NGX/x.json"
BODY_BYTES=$(stat -c %s "$NGX/x.json")

cat >"$NGX/nginx.conf" <<EOF
# generated by pg_beat bench/http.sh
worker_processes 1;
daemon off;
master_process on;
pid $NGX/nginx.pid;
error_log $NGX/logs/error.log warn;
events {
    worker_connections 4096;
}
http {
    access_log off;
    client_body_temp_path $NGX/tmp/body;
    proxy_temp_path $NGX/tmp/proxy;
    fastcgi_temp_path $NGX/tmp/fastcgi;
    uwsgi_temp_path $NGX/tmp/uwsgi;
    scgi_temp_path $NGX/tmp/scgi;
    keepalive_requests 100000;
    keepalive_timeout 120s;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    open_file_cache max=16;
    server {
        listen 127.0.0.1:$HTTP_PORT backlog=4096;
        location = /x.json {
            default_type application/json;
            alias $NGX/x.json;
        }
    }
}
EOF
log "starting nginx on 127.0.0.1:$HTTP_PORT (prefix $NGX)"
"$NGINX" -t -q -c "$NGX/nginx.conf" -p "$NGX/" 2>"$OUT/nginx_t.log" \
    || { cat "$OUT/nginx_t.log" >&2; die "nginx rejected its configuration"; }
"$NGINX" -c "$NGX/nginx.conf" -p "$NGX/" >"$NGX/logs/stdout.log" 2>&1 &
NGINX_PID=$!
URL=http://127.0.0.1:$HTTP_PORT/x.json
for _ in $(seq 50); do
    if curl -fsS -o /dev/null "$URL" 2>/dev/null; then break; fi
    kill -0 "$NGINX_PID" 2>/dev/null || { cat "$NGX/logs/error.log" >&2; die "nginx exited"; }
    sleep 0.1
done
curl -fsS -o "$OUT/probe.json" "$URL" || die "nginx does not answer at $URL"
cmp -s "$OUT/probe.json" "$NGX/x.json" || die "nginx answered another body at $URL"
NGINX_WORKER=$(pgrep -P "$NGINX_PID" | head -n 1 || true)

# --- 2. the HTTP ceiling --------------------------------------------------------

declare -A WRK RUN RUNDETAIL MEMROW LAT LATDETAIL
RUN_KEYS=()
LOGS_DONE=()
run_wrk() {  # key threads connections
    local out=$OUT/wrk_$1.txt rps non2xx errs
    log "wrk -t$2 -c$3 -d${WRK_SECONDS}s $URL"
    wrk -t"$2" -c"$3" -d"${WRK_SECONDS}s" "$URL" >"$out" 2>&1 || { cat "$out" >&2; die "wrk failed"; }
    rps=$(sed -n 's/^Requests\/sec:[[:space:]]*\([0-9.]*\).*/\1/p' "$out")
    non2xx=$(sed -n 's/^[[:space:]]*Non-2xx or 3xx responses: \([0-9]*\).*/\1/p' "$out")
    errs=$(sed -n 's/^[[:space:]]*Socket errors: \(.*\)/\1/p' "$out")
    [ -n "$rps" ] || { cat "$out" >&2; die "could not read Requests/sec from wrk"; }
    [ -z "$non2xx" ] || { cat "$out" >&2; die "wrk got $non2xx non-2xx responses"; }
    WRK[$1]=$rps
    WRK[$1_detail]="$(sed -n 's/^[[:space:]]*\([0-9]* requests in [^,]*\), .*/\1/p' "$out"); latency avg $(awk '$1 == "Latency" { print $2 }' "$out")${errs:+; socket errors: $errs}"
}
run_wrk t1c64 1 64
run_wrk t2c128 2 128
CEILING=$(awk -v a="${WRK[t1c64]}" -v b="${WRK[t2c128]}" 'BEGIN { printf "%.0f", (a > b ? a : b) }')

# --- 3. the cluster ---------------------------------------------------------------

sql() { as_pg "$PGBIN/psql" -X -q -A -t -v ON_ERROR_STOP=1 -h "$DIR" -p "$PORT" -d postgres "$@"; }

# One long psql session as a coprocess, for everything that is timed.
# q SQL: runs it, leaves its output lines in R (array) and R0 (first line).
# A statement that does not return within Q_TIMEOUT prints who waits on whom.
q() {
    local line
    R=()
    printf '%s;\n\\echo @@END@@\n' "$1" >&"$PSQ_IN" || die "psql session is gone (sending: $1)"
    while IFS= read -r -t "$Q_TIMEOUT" -u "$PSQ_OUT" line; do
        if [ "$line" = "@@END@@" ]; then R0=${R[0]:-}; return 0; fi
        R+=("$line")
    done
    {
        echo "--- the statement that did not return within ${Q_TIMEOUT}s: $1"
        echo "--- pg_stat_activity: pid | backend_type | application_name | state | wait_event_type | wait_event | transaction age s | blocked by | query"
        sql -F ' | ' -c "SELECT pid, backend_type, application_name, state, wait_event_type, wait_event,
                                 round(extract(epoch FROM now() - xact_start)::numeric, 1) AS xact_s,
                                 pg_blocking_pids(pid), left(regexp_replace(query, '\s+', ' ', 'g'), 120)
                          FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND backend_type <> 'walsender'
                          ORDER BY pid" 2>&1
        echo "--- relation locks on beat tables: pid | relation | mode | granted"
        sql -F ' | ' -c "SELECT l.pid, l.relation::regclass, l.mode, l.granted
                          FROM pg_locks l WHERE l.locktype = 'relation'
                            AND l.relation IN (SELECT oid FROM pg_class WHERE relnamespace = 'beat'::regnamespace)
                          ORDER BY l.granted, l.pid" 2>&1
        echo "--- beat.worker_status"
        sql -F ' | ' -c "SELECT * FROM beat.worker_status" 2>&1
        echo "--- CPU time of the server's processes (ps)"
        ps -o pid=,time=,args= --ppid "$(head -n 1 "$DATA/postmaster.pid")" 2>&1
    } >&2 || true
    die "psql session ended or timed out after ${Q_TIMEOUT}s on: $1 -- output: ${R[*]:-none}"
}

CLUSTERS=0
start_cluster() {
    CLUSTERS=$((CLUSTERS + 1))
    DATA=$DIR/data$CLUSTERS
    SERVER_LOG=$DIR/server$CLUSTERS.log
    log "initdb in $DATA"
    as_pg "$PGBIN/initdb" -D "$DATA" -U postgres --auth=trust -E UTF8 --locale=C -N \
        >"$OUT/initdb.log" 2>&1 || { cat "$OUT/initdb.log" >&2; die "initdb failed"; }
    cat >>"$DATA/postgresql.conf" <<EOF

# --- pg_beat bench/http.sh ---
port = $PORT
listen_addresses = ''
unix_socket_directories = '$DIR'
shared_preload_libraries = 'pg_beat'
# the upstream (nginx) is on loopback
beat.allow_private_addresses = on
shared_buffers = 1GB
max_wal_size = 4GB
max_worker_processes = 32
max_connections = 30
# default durability, stated explicitly
fsync = on
synchronous_commit = on
full_page_writes = on
# beat.http_log_retention left at its default
EOF
    [ -z "$EXTRA_CONF" ] || printf '# BENCH_PG_CONF (diagnosis only)\n%s\n' "$EXTRA_CONF" >>"$DATA/postgresql.conf"
    log "starting the server (port $PORT, socket in $DIR)"
    as_pg "$PGBIN/pg_ctl" -D "$DATA" -l "$SERVER_LOG" -w -t 60 start >/dev/null \
        || die "the server did not start"
    STARTED=1
    sql -c "CREATE EXTENSION pg_beat" >/dev/null || die "CREATE EXTENSION pg_beat failed"
    coproc PSQ { as_pg "$PGBIN/psql" -X -q -A -t -v ON_ERROR_STOP=1 -h "$DIR" -p "$PORT" -d postgres 2>&1; }
    PSQ_IN=${PSQ[1]}
    PSQ_OUT=${PSQ[0]}
    PSQ_CHILD=$PSQ_PID
    q "SELECT 1"
    [ "$R0" = 1 ] || die "psql session is not answering: ${R[*]}"
    local i
    for i in $(seq 50); do
        q "SELECT pid FROM beat.worker_status WHERE state = 'launcher'"
        LAUNCHER_PID=$R0
        q "SELECT pg_backend_pid()"
        SESSION_PID=$R0
        [ -n "$LAUNCHER_PID" ] && break
        sleep 0.1
    done
    [ -n "$LAUNCHER_PID" ] || die "the pg_beat launcher is not running"
}
stop_cluster() {
    exec {PSQ_IN}>&-
    wait "$PSQ_CHILD" 2>/dev/null || true
    PSQ_CHILD=
    as_pg "$PGBIN/pg_ctl" -D "$DATA" -m fast -w -t 60 stop >/dev/null || die "the server did not stop"
    STARTED=0
    LOGS_DONE+=("$SERVER_LOG")
    rm -rf "$DATA"
}
LOGS_DONE=()

now() { echo "$EPOCHREALTIME"; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }
commas() { echo "$1" | sed -e ':a' -e 's/\([0-9]\)\([0-9]\{3\}\)\($\|,\)/\1,\2\3/' -e 'ta'; }
round() { awk -v x="$1" 'BEGIN { printf "%d", x + 0.5 }'; }

# Wait until FLOW has N workers running; sets PIDS.
wait_workers() {  # flow n
    local i
    for i in $(seq 100); do
        q "SELECT string_agg(pid::text, ' ' ORDER BY slot) FROM beat.worker_status
           WHERE flow = '$1' AND pid IS NOT NULL AND pid > 0 AND state IN ('idle', 'busy')"
        PIDS=$R0
        if [ -n "$PIDS" ] && [ "$(wc -w <<<"$PIDS")" = "$2" ]; then return 0; fi
        sleep 0.1
    done
    q "SELECT * FROM beat.worker_status"
    die "flow $1: expected $2 running workers within 10 s; beat.worker_status: ${R[*]:-empty}"
}

# Memory of a process: "VmRSS RssAnon Pss" in kB (Pss from smaps_rollup).
mem_of() {
    local pid=$1 rss anon pss
    read -r rss anon < <(awk '/^VmRSS:/ { r = $2 } /^RssAnon:/ { a = $2 } END { print r + 0, a + 0 }' "/proc/$pid/status" 2>/dev/null || echo "0 0")
    pss=$(awk '/^Pss:/ { print $2; exit }' "/proc/$pid/smaps_rollup" 2>/dev/null || echo 0)
    echo "$rss $anon ${pss:-0}"
}
cpu_ticks() {  # pid -> utime+stime in clock ticks
    awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat" 2>/dev/null || echo 0
}
# Memory contexts of backends, as PostgreSQL itself counts them: asks each pid
# to log them (pg_log_backend_memory_contexts), then reads the server log.
# Prints, per pid, "pid TopMemoryContext-used grand-total-used" in bytes.
memctx() {  # pids...
    local p n0 i
    n0=$(wc -l <"$SERVER_LOG")
    for p in "$@"; do q "SELECT pg_log_backend_memory_contexts($p)"; done
    for i in $(seq 30); do
        sleep 0.1
        [ "$(tail -n +"$((n0 + 1))" "$SERVER_LOG" | grep -c 'Grand total:')" -ge "$#" ] && break
    done
    for p in "$@"; do
        tail -n +"$((n0 + 1))" "$SERVER_LOG" | awk -v p="[$p]" '
            index($0, p) && /level: 0; TopMemoryContext:/ { for (i = 1; i <= NF; i++) if ($i == "used") top = $(i - 1) }
            index($0, p) && /Grand total:/ { for (i = 1; i <= NF; i++) if ($i == "used") tot = $(i - 1) }
            END { print "'"$p"'", top + 0, tot + 0 }'
    done
}

proc_snapshot() {  # every process: pid ticks name
    { cat /proc/[0-9]*/stat 2>/dev/null || true; } | awk '{
        l = $0; i = index(l, "("); j = 0
        for (k = length(l); k > 0; k--) if (substr(l, k, 1) == ")") { j = k; break }
        name = substr(l, i + 1, j - i - 1); gsub(/ /, "_", name)
        split(substr(l, j + 2), f, " ")
        print $1, f[12] + f[13], name }'
}
proc_top() {  # before after -> the 8 processes that used most CPU in between, "name (pid) s"
    local hz; hz=$(getconf CLK_TCK)
    awk -v hz="$hz" 'NR == FNR { t[$1] = $2; next }
                     { d = $2 - ($1 in t ? t[$1] : 0); if (d > 0) print d, $1, $3 }' "$1" "$2" \
        | sort -rn | awk 'NR <= 8' | while read -r d pid name; do
            if [ "$name" = postgres ] && [ -r "/proc/$pid/cmdline" ]; then
                name=$(tr '\0' ' ' <"/proc/$pid/cmdline" | sed 's/^postgres: //; s/ *$//' | cut -c1-60)
            fi
            awk -v d="$d" -v hz="$hz" -v n="$name" -v p="$pid" 'BEGIN { printf "%s (%s) %.1f s\n", n, p, d / hz }'
        done | paste -sd';' | sed 's/;/; /g'
}
busy_ticks() {  # whole machine: busy and total ticks
    awk '/^cpu / { t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t }' /proc/stat
}
wal_mark() { q "SELECT wal_bytes || ' ' || wal_sync || ' ' || wal_write FROM pg_stat_wal"; WAL=$R0; }

TROUBLE_RE='ERROR|FATAL|PANIC|WARNING|terminated by signal|exited with exit code|server process|was terminated'
server_trouble() {  # lines of the server log that tell of errors or crashes since line $1
    tail -n +"$(( $1 + 1 ))" "$SERVER_LOG" | grep -E "$TROUBLE_RE" || true
}

start_cluster

PG_VERSION=$(sql -c "SELECT version()")
EXT_VERSION=$(sql -c "SELECT extversion FROM pg_extension WHERE extname = 'pg_beat'")
SETTINGS=$(sql -F ' = ' -c "
    SELECT name, current_setting(name) FROM pg_settings
    WHERE name IN ('shared_buffers', 'max_wal_size', 'synchronous_commit', 'fsync',
                   'full_page_writes', 'wal_sync_method', 'max_worker_processes',
                   'shared_preload_libraries', 'beat.http_log_retention', 'beat.max_workers',
                   'beat.reaper_interval', 'autovacuum', 'listen_addresses', 'port')
    ORDER BY name")

# --- report (also printed, with what was measured, when the benchmark fails) --------

fmt_lat() {  # "p50 p95 p99 max n"
    local p50 p95 p99 max
    read -r p50 p95 p99 max _ <<<"$1"
    echo "p50 $p50 / p95 $p95 / p99 $p99 ms (max $max)"
}
pct_of() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.0f%%", 100 * a / b }'; }
verdict_rate() { awk -v r="$1" -v t="$TARGET_RATE" -v a="$AIM_RATE" 'BEGIN { print (r >= a ? "meets the aim" : (r >= t ? "meets the target" : "below the target")) }'; }
verdict_lat() {
    local p50 p95
    read -r p50 p95 _ <<<"$1"
    awk -v a="$p50" -v b="$p95" -v x="$TARGET_P50_MS" -v y="$TARGET_P95_MS" \
        'BEGIN { print ((a < x && b < y) ? "meets the target" : "misses the target") }'
}
perf_reports() {
    [ "$PERF" = 1 ] || return 0
    if [ -f "$OUT/perf_all.data" ]; then
        perf report -i "$OUT/perf_all.data" --sort comm,pid --stdio 2>/dev/null \
            | grep -v '^#' | grep -v '^$' | head -n 15 >"$OUT/perf_pid.txt" || true
    fi
    if [ -f "$OUT/perf_workers.data" ]; then
        perf report -i "$OUT/perf_workers.data" --no-children --sort dso --stdio -g none 2>/dev/null \
            | grep -v '^#' | grep -v '^$' | head -n 10 >"$OUT/perf_worker_dso.txt" || true
        perf report -i "$OUT/perf_workers.data" --children --sort sym --stdio -g none 2>/dev/null \
            | grep -v '^#' | grep -v '^$' | grep -v ' 0x0000' \
            | grep -Ev '\] (beat_worker_main|StartBackgroundWorker|PostmasterMain|main|_start|__libc_start|__GI___select|entry_SYSCALL|do_syscall_64)' \
            | head -n 45 >"$OUT/perf_worker.txt" || true
    fi
}

REPORTED=0
report() {  # [failure message]
    [ "$REPORTED" = 0 ] || return 0
    REPORTED=1
    local key w c r0 a0 p0 r1 a1 p1 trouble=
    if [ -n "${SERVER_LOG:-}" ] && [ -f "$SERVER_LOG" ]; then
        trouble=$(for f in "${LOGS_DONE[@]}" "$SERVER_LOG"; do
                      awk '/received fast shutdown request/ { exit } { print }' "$f"
                  done | grep -E "$TROUBLE_RE" || true)
    fi
    perf_reports
    echo
    echo "## pg_beat HTTP workers benchmark"
    echo
    if [ -n "${1:-}" ]; then
        echo "**BENCHMARK FAILED: $1**"
        echo
        echo "(what was measured before the failure follows)"
        echo
    fi
    echo "- machine: $(nproc) cores ($(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)), $(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo) memory, kernel $(uname -r)"
    echo "- ${PG_VERSION:-PostgreSQL: not reached}"
    echo "- pg_beat ${EXT_VERSION:-?} (pg_beat.so sha256 $(sha256sum "$PGLIB/pg_beat.so" | cut -c1-12)); $(dpkg-query -W -f '${Package} ${Version}' libcurl4 2>/dev/null); $("$NGINX" -v 2>&1 | sed 's/^nginx version: //'); $(dpkg-query -W -f '${Package} ${Version}' wrk 2>/dev/null)"
    echo "- nginx: 1 worker process, keepalive_requests 100000, access_log off, body $BODY_BYTES bytes at $URL"
    echo "- nginx, Postgres (with pg_beat's workers), wrk and this script's psql share the same $(nproc) cores"
    [ -z "$EXTRA_CONF" ] || echo "- **BENCH_PG_CONF, for diagnosis only; not the benchmark's settings:** $(echo "$EXTRA_CONF" | tr '\n' ';')"
    if [ "$FRESH" = 1 ]; then
        echo "- BENCH_FRESH_CLUSTER=1: each throughput run and the latency series on a new cluster (initdb)"
    else
        echo "- one cluster; between throughput runs: beat.drop_flow(force => true), TRUNCATE beat.http_log, VACUUM, CHECKPOINT"
    fi
    echo "- machine busy before the start (2 s sample): $IDLE_BEFORE; load average (1/5/15 min) at start: $LOAD_START; at end: $(cut -d' ' -f1-3 /proc/loadavg)"
    if [ -n "${SETTINGS:-}" ]; then
        echo
        echo "Settings:"
        echo
        echo '```'
        echo "$SETTINGS"
        echo '```'
    fi
    echo
    echo "| measurement | figure | reference | note |"
    echo "| --- | ---: | --- | --- |"
    if [ -n "${WRK[t1c64]:-}" ]; then
        echo "| HTTP ceiling: wrk -t1 -c64 -d${WRK_SECONDS}s | $(commas "$(round "${WRK[t1c64]}")") req/s | - | nginx alone, no Postgres running |"
    fi
    if [ -n "${WRK[t2c128]:-}" ]; then
        echo "| HTTP ceiling: wrk -t2 -c128 -d${WRK_SECONDS}s | $(commas "$(round "${WRK[t2c128]}")") req/s | - | nginx alone, no Postgres running |"
    fi
    for key in "${RUN_KEYS[@]}"; do
        [ -n "${RUN[$key]:-}" ] || continue
        w=${key#w}; w=${w%%c*}; c=${key##*c}
        echo "| end-to-end, workers $w, concurrency $c | $(commas "${RUN[$key]}") tasks/s | pg_net $REF_PGNET_DEFAULT/s default, ~$(commas $REF_PGNET_BEST)/s best; target $(commas $TARGET_RATE)/s, aim $(commas $AIM_RATE)/s | $(pct_of "${RUN[$key]}" "$CEILING") of the wrk ceiling; $(commas "$TASKS") in ${RUN[${key}_secs]} s; launcher CPU ${RUN[${key}_launcher]} s; $(verdict_rate "${RUN[$key]}") |"
    done
    if [ -n "${COMMIT_RTT:-}" ]; then
        echo "| baseline: one durable commit (autocommit one-row INSERT), client round trip | $(fmt_lat "$COMMIT_RTT") | - | a pickup waits for two: the enqueue's and the result's (the claim's commit does not wait) |"
    fi
    if [ -n "${LAT[srv_idle]:-}" ]; then
        echo "| pickup, idle, server-side | $(fmt_lat "${LAT[srv_idle]}") | target p50 < $TARGET_P50_MS ms, p95 < $TARGET_P95_MS ms | finished_at - created_at, $SAMPLES samples; $(verdict_lat "${LAT[srv_idle]}") |"
    fi
    if [ -n "${LAT[cli_idle]:-}" ]; then
        echo "| pickup, idle, client-side | $(fmt_lat "${LAT[cli_idle]}") | target p50 < $TARGET_P50_MS ms, p95 < $TARGET_P95_MS ms | enqueue sent to succeeded seen, tight poll (round trip $POLL_RTT ms); $(verdict_lat "${LAT[cli_idle]}") |"
    fi
    if [ -n "${LAT[after_idle]:-}" ]; then
        echo "| pickup, idle, client-side from the enqueue's return | $(fmt_lat "${LAT[after_idle]}") | target p50 < $TARGET_P50_MS ms, p95 < $TARGET_P95_MS ms | the same samples: enqueue committed and returned to succeeded seen (the result's durable commit and a poll included); $(verdict_lat "${LAT[after_idle]}") |"
    fi
    if [ -n "${LAT[wait_idle]:-}" ]; then
        echo "| pickup, idle, client waiting in beat.wait, from the enqueue's return | $(fmt_lat "${LAT[wait_idle]}") | target p50 < $TARGET_P50_MS ms, p95 < $TARGET_P95_MS ms | enqueue committed and returned to beat.wait returning succeeded (the result's durable commit included), $SAMPLES samples; $(verdict_lat "${LAT[wait_idle]}") |"
    fi
    if [ -n "${LAT[srv_trickle]:-}" ]; then
        echo "| pickup, trickle 5/s, server-side | $(fmt_lat "${LAT[srv_trickle]}") | pg_net ~$REF_PGNET_TRICKLE_MS ms; target p50 < $TARGET_P50_MS ms, p95 < $TARGET_P95_MS ms | $SAMPLES samples; $(verdict_lat "${LAT[srv_trickle]}") |"
    fi
    if [ -n "${LAT[cli_trickle]:-}" ]; then
        echo "| pickup, trickle 5/s, client-side | $(fmt_lat "${LAT[cli_trickle]}") | pg_net ~$REF_PGNET_TRICKLE_MS ms; target p50 < $TARGET_P50_MS ms, p95 < $TARGET_P95_MS ms | $SAMPLES samples; $(verdict_lat "${LAT[cli_trickle]}") |"
    fi
    if [ -n "${LAT[wait_trickle]:-}" ]; then
        echo "| pickup, trickle 5/s, client waiting in beat.wait, from the enqueue's return | $(fmt_lat "${LAT[wait_trickle]}") | target p50 < $TARGET_P50_MS ms, p95 < $TARGET_P95_MS ms | $SAMPLES samples; $(verdict_lat "${LAT[wait_trickle]}") |"
    fi
    if [ -n "${LAT[after_trickle]:-}" ]; then
        echo "| pickup, trickle 5/s, client-side from the enqueue's return | $(fmt_lat "${LAT[after_trickle]}") | target p50 < $TARGET_P50_MS ms, p95 < $TARGET_P95_MS ms | the same samples, from the enqueue's return; $(verdict_lat "${LAT[after_trickle]}") |"
    fi
    for key in "${RUN_KEYS[@]}"; do
        [ -n "${MEMROW[${key}_worst]:-}" ] || continue
        w=${key#w}; w=${w%%c*}; c=${key##*c}
        echo "| worker memory, workers $w, concurrency $c (start / max / end) | ${MEMROW[${key}_worst]} | flat | the worker whose private (anon) memory grew most; sampled every 1 s |"
    done
    if [ -n "${LAT_MEM1:-}" ]; then
        read -r r0 a0 p0 <<<"$LAT_MEM0"
        read -r r1 a1 p1 <<<"$LAT_MEM1"
        echo "| worker memory, latency flow, before / after its $(commas "$LAT_TASKS") tasks | $(awk -v a="$a0" -v b="$a1" -v r="$r0" -v s="$r1" 'BEGIN { printf "anon %.1f / %.1f MB, RSS %.1f / %.1f MB", a / 1024, b / 1024, r / 1024, s / 1024 }') | flat | one worker, one task at a time |"
    fi
    echo
    echo "Details:"
    echo
    [ -z "${WRK[t1c64_detail]:-}" ] || echo "- wrk -t1 -c64: ${WRK[t1c64_detail]}"
    [ -z "${WRK[t2c128_detail]:-}" ] || echo "- wrk -t2 -c128: ${WRK[t2c128_detail]}"
    for key in "${RUN_KEYS[@]}"; do
        [ -n "${RUNDETAIL[$key]:-}" ] || continue
        echo "- $key: ${RUNDETAIL[$key]}"
        echo "  - memory MB start/max/end: ${MEMROW[$key]}"
        echo "  - private (anon) MB of each worker at 0/20/40/60/80/100% of the run: ${MEMROW[${key}_series]}"
        echo "  - PostgreSQL memory contexts of each worker (pg_log_backend_memory_contexts), before the enqueue -> after the run: ${MEMROW[${key}_ctx]}"
        echo "  - processes that used most CPU during the run (whole machine): ${RUN[${key}_top]}"
    done
    [ -z "${COMMIT_RTT:-}" ] || echo "- baseline, this session: a round trip (EXECUTE of the poll statement) $POLL_RTT ms on average; an autocommit one-row INSERT (one durable commit) p50/p95/p99/max $(cut -d' ' -f1-4 <<<"$COMMIT_RTT") ms"
    [ -z "${LATDETAIL[srv_idle]:-}" ] || echo "- pickup idle, server-side: ${LATDETAIL[srv_idle]}"
    [ -z "${LATDETAIL[cli_idle]:-}" ] || echo "- pickup idle, client-side: ${LATDETAIL[cli_idle]}"
    [ -z "${LATDETAIL[wait_idle]:-}" ] || echo "- pickup idle, beat.wait: ${LATDETAIL[wait_idle]}"
    [ -z "${LATDETAIL[wait_trickle]:-}" ] || echo "- pickup trickle, beat.wait: ${LATDETAIL[wait_trickle]}"
    [ -z "${LATDETAIL[srv_trickle]:-}" ] || echo "- pickup trickle, server-side: ${LATDETAIL[srv_trickle]}"
    [ -z "${LATDETAIL[cli_trickle]:-}" ] || echo "- pickup trickle, client-side: ${LATDETAIL[cli_trickle]}"
    [ -z "${LATDETAIL[top_idle]:-}" ] || echo "- processes that used most CPU during the idle series (both ways, whole machine): ${LATDETAIL[top_idle]}"
    [ -z "${LATDETAIL[top_trickle]:-}" ] || echo "- processes that used most CPU during the trickle series (both ways, whole machine): ${LATDETAIL[top_trickle]}"
    [ -z "${LAT_LEFT:-}" ] || echo "- trickle: $TRICKLED tasks enqueued by the trickle during the trickle series; tasks of the latency flow not succeeded at the end: $LAT_LEFT"
    if [ -n "$trouble" ]; then
        echo "- server log lines with WARNING/ERROR/FATAL/PANIC or crashes (before any shutdown the script asked for):"
        echo '```'
        echo "$trouble" | sed -n 1,40p
        echo '```'
    else
        echo "- server log: no WARNING, ERROR, FATAL, PANIC or crash line"
    fi
    if [ "$PERF" = 1 ] && [ -s "$OUT/perf_worker.txt" ]; then
        echo
        echo "### perf during run $PERF_RUN (BENCH_PERF=1; that run's figure carries the overhead)"
        echo
        echo "Whole machine, \`perf record -a -F 499\`, by command and pid:"
        echo '```'
        cat "$OUT/perf_pid.txt"
        echo '```'
        echo "The pg_beat workers ($PERF_WORKERS), \`perf record --call-graph dwarf -F 199 -p\`, by object (self):"
        echo '```'
        cat "$OUT/perf_worker_dso.txt"
        echo '```'
        echo "The pg_beat workers, by function including callees (children):"
        echo '```'
        cat "$OUT/perf_worker.txt"
        echo '```'
    fi
    echo
    echo "Total time: $(( $(date +%s) - T0 ))s"
}

# --- 4. end-to-end throughput (and 6. worker memory) -------------------------

PERF_DONE=0

throughput_run() {  # workers concurrency
    local w=$1 c=$2 flow="http_w${1}_c${2}" key="w${1}c${2}"
    local log_line0 t_commit t_acked t_done t_last_progress last_succ=0 i=0
    local succ dead failed pending running cpu0 cpu1 wal0 wal1 ng0 ng1 busy0 busy1
    local memfile=$OUT/mem_$key.txt progress=$OUT/progress_$key.txt
    RUN_KEYS+=("$key")
    log "throughput: flow $flow, workers $w, concurrency $c, $TASKS tasks in one transaction"
    log_line0=$(wc -l <"$SERVER_LOG")

    q "SELECT name FROM beat.create_flow('$flow', request => '{\"url\": \"$URL\"}',
                                         workers => $w, concurrency => $c)"
    wait_workers "$flow" "$w"
    local pids=$PIDS
    : >"$memfile"; : >"$progress"
    cpu0=$(for p in $pids; do cpu_ticks "$p"; done | awk '{ s += $1 } END { print s + 0 }')
    local la0 la1 la_max=0 my0 my1
    ng0=$([ -n "$NGINX_WORKER" ] && cpu_ticks "$NGINX_WORKER" || echo 0)
    for p in $pids; do echo "0 $p $(mem_of "$p")" >>"$memfile"; done
    memctx $pids >"$OUT/memctx0_$key"

    q "BEGIN"
    q "SELECT count(*) FROM beat.enqueue_batch('$flow',
           (SELECT array_agg('{}'::jsonb) FROM generate_series(1, $TASKS)))"
    [ "$R0" = "$TASKS" ] || die "enqueue_batch returned ${R[*]} instead of $TASKS"
    wal_mark; wal0=$WAL
    read -r busy0 _ < <(busy_ticks)
    local busytot0; busytot0=$(busy_ticks | cut -d' ' -f2)

    if [ "$PERF" = 1 ] && [ "$PERF_DONE" = 0 ]; then
        perf record -a -F 499 -o "$OUT/perf_all.data" >"$OUT/perf_all.log" 2>&1 &
        PERF_PID=$!
        perf record --call-graph dwarf,8192 -F 199 -p "${pids// /,}" -o "$OUT/perf_workers.data" >"$OUT/perf_workers.log" 2>&1 &
        PERF_PID2=$!
        PERF_WORKERS=$pids
        sleep 1
    fi

    la0=$(cpu_ticks "$LAUNCHER_PID")
    my0=$(cpu_ticks "$SESSION_PID")
    proc_snapshot >"$OUT/procs0_$key"
    t_commit=$EPOCHREALTIME
    q "COMMIT"
    t_acked=$EPOCHREALTIME
    t_last_progress=$t_acked
    while :; do
        sleep 0.1
        i=$((i + 1))
        q "SELECT succeeded || ' ' || dead || ' ' || failed || ' ' || pending || ' ' || running
                  || ' ' || coalesce((SELECT round(extract(epoch FROM now() - xact_start)::numeric, 1)
                                      FROM pg_stat_activity WHERE pid = $LAUNCHER_PID), 0)
           FROM beat.queue_stats WHERE flow = '$flow'"
        read -r succ dead failed pending running la_xact <<<"$R0"
        la_max=$(awk -v a="$la_max" -v b="$la_xact" 'BEGIN { print (b > a ? b : a) }')
        t_done=$EPOCHREALTIME
        echo "$(elapsed "$t_commit" "$t_done") $R0" >>"$progress"
        if [ $((i % 10)) = 0 ]; then
            for p in $pids; do echo "$(elapsed "$t_commit" "$t_done") $p $(mem_of "$p")" >>"$memfile"; done
        fi
        if [ $((succ + dead)) -ge "$TASKS" ]; then break; fi
        if [ "$succ" != "$last_succ" ]; then last_succ=$succ; t_last_progress=$t_done; fi
        if awk -v a="$t_last_progress" -v b="$t_done" -v s="$STALL_SECONDS" 'BEGIN { exit !(b - a > s) }'; then
            q "SELECT * FROM beat.worker_status"
            die "flow $flow: no task finished for ${STALL_SECONDS}s (succeeded $succ, dead $dead, failed $failed, pending $pending, running $running); worker_status: ${R[*]}; server log: $(server_trouble "$log_line0" | tail -n 20)"
        fi
        if awk -v a="$t_commit" -v b="$t_done" -v s="$RUN_TIMEOUT" 'BEGIN { exit !(b - a > s) }'; then
            die "flow $flow: not done after ${RUN_TIMEOUT}s (succeeded $succ of $TASKS, dead $dead, failed $failed, pending $pending, running $running)"
        fi
    done

    if [ -n "$PERF_PID" ]; then
        kill -INT "$PERF_PID" "$PERF_PID2" 2>/dev/null || true
        wait "$PERF_PID" "$PERF_PID2" 2>/dev/null || true
        PERF_PID= PERF_PID2=
        PERF_DONE=1
        PERF_RUN=$key
    fi

    read -r busy1 _ < <(busy_ticks)
    local busytot1; busytot1=$(busy_ticks | cut -d' ' -f2)
    wal_mark; wal1=$WAL
    cpu1=$(for p in $pids; do cpu_ticks "$p"; done | awk '{ s += $1 } END { print s + 0 }')
    la1=$(cpu_ticks "$LAUNCHER_PID")
    my1=$(cpu_ticks "$SESSION_PID")
    proc_snapshot >"$OUT/procs1_$key"
    RUN[${key}_top]=$(proc_top "$OUT/procs0_$key" "$OUT/procs1_$key")
    ng1=$([ -n "$NGINX_WORKER" ] && cpu_ticks "$NGINX_WORKER" || echo 0)
    for p in $pids; do echo "$(elapsed "$t_commit" "$t_done") $p $(mem_of "$p")" >>"$memfile"; done

    # verify: all succeeded, one log row each, the same worker processes
    q "SELECT count(*) FILTER (WHERE state = 'succeeded') || ' ' || count(*) FROM beat.task WHERE flow = '$flow'"
    local nsucc ntot nlog nlogok
    read -r nsucc ntot <<<"$R0"
    q "SELECT count(*) || ' ' || count(*) FILTER (WHERE outcome = 'ok' AND status = 200 AND bytes = $BODY_BYTES)
       FROM beat.http_log WHERE flow = '$flow'"
    read -r nlog nlogok <<<"$R0"
    if [ "$nsucc" != "$TASKS" ] || [ "$ntot" != "$TASKS" ] || [ "$nlog" != "$TASKS" ] || [ "$nlogok" != "$TASKS" ]; then
        q "SELECT state || '=' || count(*) FROM beat.task WHERE flow = '$flow' GROUP BY state"
        local states="${R[*]}"
        q "SELECT coalesce(outcome, '?') || '/' || coalesce(status::text, '-') || '/' || coalesce(error, '') || ' x' || count(*)
           FROM beat.http_log WHERE flow = '$flow' GROUP BY 1 ORDER BY count(*) DESC LIMIT 5"
        die "flow $flow: expected $TASKS succeeded tasks and $TASKS ok log rows; tasks: $states ($ntot in all); http_log: $nlog rows, $nlogok ok with status 200 and $BODY_BYTES bytes; top log outcomes: ${R[*]}; server log: $(server_trouble "$log_line0" | tail -n 20)"
    fi
    memctx $pids >"$OUT/memctx1_$key"
    MEMROW[${key}_ctx]=$(awk 'NR == FNR { t[$1] = $2; g[$1] = $3; next }
        { printf "%spid %s: TopMemoryContext %.1f -> %.1f MB, all contexts %.1f -> %.1f MB", (n++ ? "; " : ""), $1,
                 t[$1] / 1048576, $2 / 1048576, g[$1] / 1048576, $3 / 1048576 }' "$OUT/memctx0_$key" "$OUT/memctx1_$key")
    wait_workers "$flow" "$w"
    [ "$PIDS" = "$pids" ] || die "flow $flow: the worker processes changed during the run ($pids -> $PIDS); server log: $(server_trouble "$log_line0" | tail -n 20)"
    local trouble; trouble=$(server_trouble "$log_line0")
    [ -z "$trouble" ] || die "flow $flow: the server log has errors during the run: $trouble"

    # what one poll of queue_stats costs with the run's tasks still in beat.task
    local tq0 tq1
    tq0=$EPOCHREALTIME; for _ in 1 2 3 4 5 6 7 8 9 10; do q "SELECT succeeded FROM beat.queue_stats WHERE flow = '$flow'"; done; tq1=$EPOCHREALTIME
    local poll_ms; poll_ms=$(awk -v a="$tq0" -v b="$tq1" 'BEGIN { printf "%.1f", (b - a) * 100 }')

    # figures
    local secs rate acked_secs
    secs=$(elapsed "$t_commit" "$t_done")
    acked_secs=$(elapsed "$t_commit" "$t_acked")
    rate=$(awk -v n="$TASKS" -v s="$secs" 'BEGIN { printf "%.0f", n / s }')
    q "SELECT round(extract(epoch FROM max(finished_at) - min(started_at))::numeric, 3)
              || ' ' || count(DISTINCT started_at)
       FROM beat.task WHERE flow = '$flow'"
    local server_span claims
    read -r server_span claims <<<"$R0"
    q "SELECT count(DISTINCT (worker, created_at)) || ' ' || round(avg(total_ms)::numeric, 2)
              || ' ' || round((percentile_disc(0.99) WITHIN GROUP (ORDER BY total_ms))::numeric, 2)
       FROM beat.http_log WHERE flow = '$flow'"
    local records avg_ms p99_ms
    read -r records avg_ms p99_ms <<<"$R0"
    local wb0 ws0 wb1 ws1
    read -r wb0 ws0 _ <<<"$wal0"
    read -r wb1 ws1 _ <<<"$wal1"
    local hz; hz=$(getconf CLK_TCK)
    RUN[$key]=$rate
    RUN[${key}_secs]=$secs
    RUN[${key}_launcher]=$(awk -v t=$((la1 - la0)) -v h="$hz" 'BEGIN { printf "%.1f", t / h }')
    RUNDETAIL[$key]="$TASKS succeeded in ${secs}s from COMMIT (commit itself ${acked_secs}s; first claim to last result ${server_span}s server-side); $claims claim transactions, $records result transactions ($(awk -v n="$TASKS" -v r="$records" 'BEGIN { printf "%.1f", n / r }') transfers each); curl total_ms avg $avg_ms, p99 $p99_ms; WAL $(awk -v b=$((wb1 - wb0)) -v n="$TASKS" 'BEGIN { printf "%.0f", b / n }') B/task, $((ws1 - ws0)) WAL fsyncs; CPU: workers $(awk -v t=$((cpu1 - cpu0)) -v h="$hz" 'BEGIN { printf "%.1f", t / h }') s, nginx $(awk -v t=$((ng1 - ng0)) -v h="$hz" 'BEGIN { printf "%.1f", t / h }') s, pg_beat launcher $(awk -v t=$((la1 - la0)) -v h="$hz" 'BEGIN { printf "%.1f", t / h }') s (its longest transaction seen: ${la_max} s), this script's backend (queue_stats polls) $(awk -v t=$((my1 - my0)) -v h="$hz" 'BEGIN { printf "%.1f", t / h }') s, machine busy $(awk -v b=$((busy1 - busy0)) -v t=$((busytot1 - busytot0)) 'BEGIN { printf "%.0f%%", 100 * b / t }') of $(nproc) cores; one queue_stats poll at the end took $poll_ms ms"

    # memory: per worker, start / max / end of VmRSS, RssAnon, Pss (MB)
    MEMROW[$key]=$(awk '
        { pid = $2; if (!(pid in n)) { order[++np] = pid; r0[pid] = $3; a0[pid] = $4; p0[pid] = $5 }
          n[pid]++; r1[pid] = $3; a1[pid] = $4; p1[pid] = $5
          if ($3 > rm[pid]) rm[pid] = $3; if ($4 > am[pid]) am[pid] = $4; if ($5 > pm[pid]) pm[pid] = $5 }
        END { for (i = 1; i <= np; i++) { p = order[i]
                printf "%spid %s: RSS %.1f/%.1f/%.1f, anon %.1f/%.1f/%.1f, PSS %.1f/%.1f/%.1f", (i > 1 ? "; " : ""), p,
                    r0[p]/1024, rm[p]/1024, r1[p]/1024, a0[p]/1024, am[p]/1024, a1[p]/1024, p0[p]/1024, pm[p]/1024, p1[p]/1024 } }' "$memfile")
    MEMROW[${key}_worst]=$(awk '
        { pid = $2; if (!(pid in s)) s[pid] = $4; e[pid] = $4; if ($4 > m[pid]) m[pid] = $4
          if (!(pid in rs)) rs[pid] = $3; re[pid] = $3; if ($3 > rm[pid]) rm[pid] = $3 }
        END { best = -1e18; for (p in s) { if (m[p] - s[p] > best) { best = m[p] - s[p]; w = p } }
              printf "anon %.1f / %.1f / %.1f MB, RSS %.1f / %.1f / %.1f MB", s[w]/1024, m[w]/1024, e[w]/1024, rs[w]/1024, rm[w]/1024, re[w]/1024 }' "$memfile")
    MEMROW[${key}_series]=$(awk -v T="$secs" '
        { pid = $2; if (!(pid in seen)) { seen[pid] = 1; order[++np] = pid }
          for (k = 0; k <= 5; k++) if (!((pid, k) in v) && $1 >= T * k / 5 - 0.001) v[pid, k] = $4 }
        END { for (i = 1; i <= np; i++) { p = order[i]; s = ""
                for (k = 0; k <= 5; k++) s = s sprintf("%s%.1f", (k ? "/" : ""), ((p, k) in v ? v[p, k] : 0) / 1024)
                printf "%spid %s: %s", (i > 1 ? "; " : ""), p, s } }' "$memfile")
    log "  $rate tasks/s ($secs s); ${MEMROW[${key}_worst]}"

    # tidy up for the next run
    q "SELECT beat.drop_flow('$flow', force => true)"
    q "TRUNCATE beat.http_log"
    q "VACUUM beat.task"
    q "VACUUM beat.http_log"
    q "CHECKPOINT"
}

first=1
for wc in $SWEEP; do
    if [ "$FRESH" = 1 ] && [ "$first" = 0 ]; then stop_cluster; start_cluster; fi
    throughput_run "${wc%%:*}" "${wc##*:}"
    first=0
done

# --- 5. pickup latency ---------------------------------------------------------------

if [ "$FRESH" = 1 ]; then stop_cluster; start_cluster; fi
LAT_FLOW=latency
q "SELECT name FROM beat.create_flow('$LAT_FLOW', request => '{\"url\": \"$URL\"}', workers => 1)"
wait_workers "$LAT_FLOW" 1
LAT_PID=$PIDS
LAT_MEM0=$(mem_of "$LAT_PID")
q "PREPARE st(bigint) AS SELECT state FROM beat.task WHERE id = \$1"

# Percentiles (nearest rank) of a file of numbers: "p50 p95 p99 max n".
pcts() {
    sort -g "$1" | awk '
        { v[NR] = $1 }
        function at(p,   k) { k = int(p * NR / 100); if (k < p * NR / 100) k++; if (k < 1) k = 1; return v[k] }
        END { printf "%.2f %.2f %.2f %.2f %d", at(50), at(95), at(99), v[NR], NR }'
}

# Server-side: autocommit enqueue, then wait (without hammering) until done.
# Writes the task ids to $1.
pickup_server() {  # idsfile tag
    local ids=$1 tag=$2 k id st tries
    : >"$ids"
    for k in $(seq "$SAMPLES"); do
        q "SELECT beat.enqueue('$LAT_FLOW', '{\"probe\": \"$tag\", \"n\": $k}')"
        id=$R0
        echo "$id" >>"$ids"
        tries=0
        while :; do
            sleep 0.05
            q "EXECUTE st($id)"
            st=$R0
            [ "$st" = succeeded ] && break
            case "$st" in pending|running|scheduled) ;; *) die "pickup: task $id is '$st'";; esac
            tries=$((tries + 1))
            [ "$tries" -lt 400 ] || die "pickup: task $id not succeeded after 20 s (state $st); server log: $(server_trouble 0 | tail -n 20)"
        done
        sleep 0.05
    done
}
server_figures() {  # idsfile -> lines "total claim http" in ms, one per task
    q "SELECT round((extract(epoch FROM finished_at - created_at) * 1000)::numeric, 3)
              || ' ' || round((extract(epoch FROM started_at - created_at) * 1000)::numeric, 3)
              || ' ' || round((extract(epoch FROM finished_at - started_at) * 1000)::numeric, 3)
       FROM beat.task WHERE id IN ($(paste -sd, "$1")) AND state = 'succeeded'"
    printf '%s\n' "${R[@]}"
}

# Client-side: timestamp before the enqueue, then poll the state in a tight
# loop over the same connection until succeeded.  Writes ms to $1.
pickup_client() {  # msfile tag
    local out=$1 tag=$2 k id t0 ta t1 polls
    : >"$out"; : >"$out.enqueue"; : >"$out.after"
    for k in $(seq "$SAMPLES"); do
        t0=$EPOCHREALTIME
        q "SELECT beat.enqueue('$LAT_FLOW', '{\"probe\": \"$tag\", \"n\": $k}')"
        ta=$EPOCHREALTIME
        id=$R0
        polls=0
        while :; do
            q "EXECUTE st($id)"
            [ "$R0" = succeeded ] && break
            polls=$((polls + 1))
            [ "$polls" -lt 200000 ] || die "pickup: task $id not succeeded after $polls polls (state $R0)"
        done
        t1=$EPOCHREALTIME
        awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f\n", (b - a) * 1000 }' >>"$out"
        awk -v a="$t0" -v b="$ta" 'BEGIN { printf "%.3f\n", (b - a) * 1000 }' >>"$out.enqueue"
        awk -v a="$ta" -v b="$t1" 'BEGIN { printf "%.3f\n", (b - a) * 1000 }' >>"$out.after"
        echo "$polls" >>"$out.polls"
        sleep 0.1
    done
}

# Client-side, waiting as a program would: autocommit enqueue, then
# SELECT beat.wait(id), which sleeps until the worker's commit wakes it.
# Unlike the tight poll, the waiting client takes no CPU from the worker
# on this 2-core machine.  Writes ms from the enqueue's return to $1, and
# from the enqueue sent to $1.sent.
pickup_wait() {  # msfile tag
    local out=$1 tag=$2 k id t0 ta t1
    : >"$out"; : >"$out.sent"
    for k in $(seq "$SAMPLES"); do
        t0=$EPOCHREALTIME
        q "SELECT beat.enqueue('$LAT_FLOW', '{\"probe\": \"$tag wait\", \"n\": $k}')"
        ta=$EPOCHREALTIME
        id=$R0
        q "SELECT beat.wait($id, '20 s')"
        t1=$EPOCHREALTIME
        [ "$R0" = succeeded ] || die "pickup: beat.wait($id) returned '$R0'"
        awk -v a="$ta" -v b="$t1" 'BEGIN { printf "%.3f\n", (b - a) * 1000 }' >>"$out"
        awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f\n", (b - a) * 1000 }' >>"$out.sent"
        sleep 0.1
    done
}

# A steady trickle: one enqueue every 200 ms, from another connection.
trickle_start() {
    rm -f "$OUT/trickle.stop"
    (
        while [ ! -e "$OUT/trickle.stop" ]; do
            echo "SELECT beat.enqueue('$LAT_FLOW', '{\"trickle\": true}');"
            sleep 0.2
        done
    ) | as_pg "$PGBIN/psql" -X -q -A -t -v ON_ERROR_STOP=1 -h "$DIR" -p "$PORT" -d postgres >"$OUT/trickle.out" 2>&1 &
    TRICKLE_PID=$!
    sleep 1
}
trickle_stop() {
    touch "$OUT/trickle.stop"
    wait "$TRICKLE_PID" || die "the trickle's psql failed: $(tail -n 5 "$OUT/trickle.out")"
    TRICKLE_PID=
}

lat_series() {  # key tag
    local key=$1 tag=$2 log_line0
    log_line0=$(wc -l <"$SERVER_LOG")
    proc_snapshot >"$OUT/procs0_lat_$key"
    log "pickup latency, $tag: $SAMPLES samples server-side (finished_at - created_at)"
    pickup_server "$OUT/ids_$key" "$tag"
    server_figures "$OUT/ids_$key" >"$OUT/srv_$key"
    [ "$(wc -l <"$OUT/srv_$key")" = "$SAMPLES" ] || die "pickup $tag: expected $SAMPLES succeeded probe tasks"
    awk '{ print $1 }' "$OUT/srv_$key" >"$OUT/srv_total_$key"
    awk '{ print $2 }' "$OUT/srv_$key" >"$OUT/srv_claim_$key"
    awk '{ print $3 }' "$OUT/srv_$key" >"$OUT/srv_http_$key"
    LAT[srv_$key]=$(pcts "$OUT/srv_total_$key")
    LATDETAIL[srv_$key]="claim part (started_at - created_at) p50/p95/p99/max $(pcts "$OUT/srv_claim_$key" | cut -d' ' -f1-4); transfer part (finished_at - started_at) $(pcts "$OUT/srv_http_$key" | cut -d' ' -f1-4)"
    log "  server-side p50/p95/p99/max ms: ${LAT[srv_$key]}"
    log "pickup latency, $tag: $SAMPLES samples client-side (tight poll)"
    : >"$OUT/cli_$key.polls"
    pickup_client "$OUT/cli_$key" "$tag"
    LAT[cli_$key]=$(pcts "$OUT/cli_$key")
    LAT[after_$key]=$(pcts "$OUT/cli_$key.after")
    log "pickup latency, $tag: $SAMPLES samples client-side (beat.wait)"
    pickup_wait "$OUT/wait_$key" "$tag"
    LAT[wait_$key]=$(pcts "$OUT/wait_$key")
    LATDETAIL[wait_$key]="from the enqueue sent p50/p95/p99/max $(pcts "$OUT/wait_$key.sent" | cut -d' ' -f1-4) ms"
    log "  beat.wait p50/p95/p99/max ms: ${LAT[wait_$key]}"
    LATDETAIL[cli_$key]="of which the enqueue statement (autocommit, durable commit) p50/p95/p99/max $(pcts "$OUT/cli_$key.enqueue" | cut -d' ' -f1-4) ms; polls per sample p50 $(pcts "$OUT/cli_$key.polls" | cut -d' ' -f1)"
    log "  client-side p50/p95/p99/max ms: ${LAT[cli_$key]}"
    proc_snapshot >"$OUT/procs1_lat_$key"
    LATDETAIL[top_$key]=$(proc_top "$OUT/procs0_lat_$key" "$OUT/procs1_lat_$key")
    local trouble; trouble=$(server_trouble "$log_line0")
    [ -z "$trouble" ] || die "pickup $tag: the server log has errors: $trouble"
}

# A round trip of this session, and a durable one-row commit, to read the
# client-side figures against.
t0=$EPOCHREALTIME; for _ in $(seq 200); do q "EXECUTE st(0)"; done; t1=$EPOCHREALTIME
POLL_RTT=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", (b - a) * 1000 / 200 }')
q "CREATE TABLE bench_commit (x integer)"
: >"$OUT/commit_ms"
for _ in $(seq "$SAMPLES"); do
    t0=$EPOCHREALTIME; q "INSERT INTO bench_commit VALUES (1)"; t1=$EPOCHREALTIME
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f\n", (b - a) * 1000 }' >>"$OUT/commit_ms"
done
COMMIT_RTT=$(pcts "$OUT/commit_ms")

lat_series idle idle
trickle_start
lat_series trickle trickle
trickle_stop
q "SELECT count(*) FROM beat.task WHERE flow = '$LAT_FLOW' AND params ? 'trickle'"
TRICKLED=$R0
q "SELECT count(*) FROM beat.task WHERE flow = '$LAT_FLOW'"
LAT_TASKS=$R0
wait_workers "$LAT_FLOW" 1
[ "$PIDS" = "$LAT_PID" ] || die "the latency flow's worker changed during the series ($LAT_PID -> $PIDS)"
LAT_MEM1=$(mem_of "$LAT_PID")
q "SELECT count(*) FROM beat.task WHERE flow = '$LAT_FLOW' AND state <> 'succeeded'"
LAT_LEFT=$R0

# --- 7. report -------------------------------------------------------------------------

report
