#!/usr/bin/env bash
# bench/queue.sh -- pg_beat queue throughput benchmark (not a test).
#
# Run as root (or as the postgres OS user) after `make install`:
#
#     bench/queue.sh
#
# It creates a throwaway PostgreSQL 15 cluster in a mktemp directory (unix
# socket only, port 55432, default durability), measures enqueue and drain
# throughput with pgbench, prints a markdown report, then stops the cluster
# and removes the directory.  See bench/README.md for what each figure means.
#
# Knobs (environment), all optional:
#   PGBIN            PostgreSQL binaries        (/usr/lib/postgresql/15/bin)
#   BENCH_PORT       server port                (55432)
#   BENCH_DURATION   seconds of the SELECT 1 run  (10)
#   BENCH_ROUNDS     rounds of measurement 1 and its baselines  (5)
#   BENCH_ROUND_SECONDS  seconds of each run in those rounds  (4)
#   BENCH_SHARED_BUFFERS  the server's shared_buffers  (128MB, PostgreSQL's
#                    default; see bench/README.md for why not more)
#   BENCH_SYNCHRONOUS_COMMIT  on (the default durability), or off for a
#                    diagnosis: with no wait for the disk, measurement 1
#                    and its baselines show what each costs in CPU
#   BENCH_TIMEOUT    hard limit per pgbench run (150 s)
#   BENCH_DIAG=1     also load pg_stat_statements (track = all) and sample
#                    wait events during the drains; prints a diagnostics
#                    section.  Adds overhead: not for the headline figures.
#   BENCH_KEEP=1     keep the cluster directory at the end (it is printed).
#   BENCH_FILLFACTOR a fillfactor for beat.task, set after CREATE EXTENSION
#                    (a trial: pg_beat leaves the default, 100)
#   BENCH_REPEAT     runs of measurements 2 and 4, which take about a
#                    second each; the report gives their median  (3)

set -euo pipefail
. "$(dirname "$0")/lib.sh"

PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
PORT=${BENCH_PORT:-55432}
DURATION=${BENCH_DURATION:-10}
ROUNDS=${BENCH_ROUNDS:-5}
ROUND_SECONDS=${BENCH_ROUND_SECONDS:-4}
SHARED_BUFFERS=${BENCH_SHARED_BUFFERS:-128MB}
SYNC_COMMIT=${BENCH_SYNCHRONOUS_COMMIT:-on}
PGBENCH_TIMEOUT=${BENCH_TIMEOUT:-150}
DIAG=${BENCH_DIAG:-0}
KEEP=${BENCH_KEEP:-0}
FILLFACTOR=${BENCH_FILLFACTOR:-}
EXTENSION=${BENCH_EXTENSION:-pg_beat}     # for harness self-checks only
PRELOAD=${BENCH_PRELOAD-pg_beat}          # shared_preload_libraries

DRAIN_TASKS=50000
BATCH_SIZE=1000
BATCH_XACTS=100
REPEAT=${BENCH_REPEAT:-3}	# runs of the two short measurements (2 and 4)
CLIENTS=4
THREADS=2

# The best Postgres queues measured on this same kind of machine (tasks/s).
REF_ENQUEUE=2500
REF_BATCH_ENQUEUE=180000
REF_DRAIN_ONE=1700
REF_DRAIN_BATCH=43000

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
T0=$(date +%s)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

log() { printf '# [%3ds] %s\n' "$(( $(date +%s) - T0 ))" "$*" >&2; }
die() { printf '\n*** BENCHMARK FAILED: %s ***\n' "$*" >&2; exit 1; }

for bin in initdb pg_ctl psql pgbench; do
    [ -x "$PGBIN/$bin" ] || die "$PGBIN/$bin not found (set PGBIN)"
done

if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || die "no 'postgres' OS user to run the server as"
    as_pg() { runuser -u postgres -- "$@"; }
    OWNER=postgres
else
    as_pg() { "$@"; }
    OWNER=$(id -un)
fi

PGLIB=$("$PGBIN/pg_config" --pkglibdir)
PGSHARE=$("$PGBIN/pg_config" --sharedir)
if [ -n "$PRELOAD" ] && [ "$EXTENSION" = pg_beat ]; then
    [ -f "$PGLIB/pg_beat.so" ] || die "$PGLIB/pg_beat.so is missing: run 'make -C $REPO install' first"
    require_plain_build "$PGLIB/pg_beat.so"
fi
[ -f "$PGSHARE/extension/$EXTENSION.control" ] \
    || die "$PGSHARE/extension/$EXTENSION.control is missing: run 'make -C $REPO install' first"

DIR=$(mktemp -d /tmp/pg_beat_bench.XXXXXX)
chown "$OWNER" "$DIR"
chmod 700 "$DIR"
DATA=$DIR/data
SERVER_LOG=$DIR/server.log
STARTED=0
SAMPLER_PID=

cleanup() {
    local rc=$?
    if [ -n "$SAMPLER_PID" ]; then kill "$SAMPLER_PID" 2>/dev/null || true; fi
    if [ "$STARTED" = 1 ]; then
        as_pg "$PGBIN/pg_ctl" -D "$DATA" -m fast -w -t 60 stop >/dev/null 2>&1 \
            || as_pg "$PGBIN/pg_ctl" -D "$DATA" -m immediate -w stop >/dev/null 2>&1 || true
    fi
    if [ "$rc" != 0 ] && [ -f "$SERVER_LOG" ]; then
        echo "--- last 40 lines of the server log ($SERVER_LOG) ---" >&2
        tail -n 40 "$SERVER_LOG" >&2 || true
    fi
    if [ "$KEEP" = 1 ]; then
        echo "# cluster directory kept: $DIR" >&2
    else
        rm -rf "$DIR"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cd "$DIR"   # the postgres user may not be able to read the caller's cwd

# --- the cluster ------------------------------------------------------------

log "initdb in $DATA"
as_pg "$PGBIN/initdb" -D "$DATA" -U postgres --auth=trust -E UTF8 --locale=C -N \
    >"$DIR/initdb.log" 2>&1 || { cat "$DIR/initdb.log" >&2; die "initdb failed"; }

if [ "$DIAG" = 1 ]; then
    PRELOAD=${PRELOAD:+$PRELOAD,}pg_stat_statements
fi

cat >>"$DATA/postgresql.conf" <<EOF

# --- pg_beat bench ---
port = $PORT
listen_addresses = ''
unix_socket_directories = '$DIR'
shared_preload_libraries = '$PRELOAD'
shared_buffers = $SHARED_BUFFERS
max_wal_size = 4GB
max_connections = 30
# default durability, stated explicitly
fsync = on
synchronous_commit = $SYNC_COMMIT
full_page_writes = on
EOF
if [ "$DIAG" = 1 ]; then
    cat >>"$DATA/postgresql.conf" <<EOF
pg_stat_statements.track = all
pg_stat_statements.max = 1000
EOF
fi

log "starting the server (port $PORT, socket in $DIR)"
as_pg "$PGBIN/pg_ctl" -D "$DATA" -l "$SERVER_LOG" -w -t 60 start >/dev/null \
    || die "the server did not start (shared_preload_libraries = '$PRELOAD')"
STARTED=1

# psql: unaligned, tuples only, stop on the first error.
sql() { as_pg "$PGBIN/psql" -X -q -A -t -v ON_ERROR_STOP=1 -h "$DIR" -p "$PORT" -d postgres "$@"; }

sql -c "CREATE EXTENSION $EXTENSION" || die "CREATE EXTENSION $EXTENSION failed"
if [ -n "$FILLFACTOR" ]; then
    sql -c "ALTER TABLE beat.task SET (fillfactor = $FILLFACTOR)" || die "could not set fillfactor $FILLFACTOR"
fi
sql -c "CREATE TABLE bench_insert (x integer)"
if [ "$DIAG" = 1 ]; then sql -c "CREATE EXTENSION pg_stat_statements"; fi

# --- helpers ----------------------------------------------------------------

# Thousands separators for an integer.
commas() { echo "$1" | sed -e ':a' -e 's/\([0-9]\)\([0-9]\{3\}\)\($\|,\)/\1,\2\3/' -e 'ta'; }
# Round a float to an integer.
round() { awk -v x="$1" 'BEGIN { printf "%d", x + 0.5 }'; }
# a / b to two places.
div() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
median() { printf '%s\n' "$@" | sort -n | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }
# The arguments as "a, b, c".
listing() { local IFS=,; echo "$*" | sed 's/,/, /g'; }

# Write a pgbench script file readable by the server user.
script() {  # name, body
    printf '%s\n' "$2" >"$DIR/$1.sql"
    chmod 644 "$DIR/$1.sql"
    echo "$DIR/$1.sql"
}

# Settle the server before a measurement: no checkpoint inherited from the
# previous one, statistics fresh.
settle() {
    sql -c "CHECKPOINT" >/dev/null
}

# Page faults on the whole machine (/proc/vmstat), to print per measurement:
# memory the kernel hands a process for the first time costs a fault each
# 4 kB page, which bench/README.md explains.
faults() { awk '$1 == "pgfault" { print $2 }' /proc/vmstat; }

# WAL and statement counters, to print per measurement.
wal_mark() { sql -c "SELECT wal_records || ' ' || wal_bytes || ' ' || wal_sync FROM pg_stat_wal"; }

diag_reset() {
    [ "$DIAG" = 1 ] || return 0
    sql -c "SELECT pg_stat_statements_reset()" >/dev/null
}
DIAG_OUT=$DIR/diag.md
: >"$DIAG_OUT"
diag_report() {  # title
    [ "$DIAG" = 1 ] || return 0
    {
        echo
        echo "#### $1: top statements (pg_stat_statements, track = all)"
        echo
        echo "| calls | total ms | mean ms | rows | query |"
        echo "| ---: | ---: | ---: | ---: | --- |"
        sql -F ' | ' -c "
            SELECT '| ' || calls, round(total_exec_time::numeric, 1),
                   round(mean_exec_time::numeric, 3), rows,
                   left(regexp_replace(query, '\s+', ' ', 'g'), 140) || ' |'
            FROM pg_stat_statements
            WHERE query NOT LIKE '%pg_stat_statements%'
            ORDER BY total_exec_time DESC LIMIT 8"
    } >>"$DIAG_OUT"
}
sampler_start() {  # file
    [ "$DIAG" = 1 ] || return 0
    local out=$1
    (
        while :; do
            sql -c "SELECT coalesce(wait_event_type || ':' || wait_event, 'on CPU')
                    FROM pg_stat_activity
                    WHERE application_name = 'pgbench' AND state = 'active'" >>"$out" 2>/dev/null || true
            sleep 0.2
        done
    ) &
    SAMPLER_PID=$!
}
sampler_stop() {  # file, title
    [ "$DIAG" = 1 ] || return 0
    kill "$SAMPLER_PID" 2>/dev/null || true
    wait "$SAMPLER_PID" 2>/dev/null || true
    SAMPLER_PID=
    {
        echo
        echo "#### $2: wait events of the pgbench backends (samples every 0.2 s)"
        echo
        echo '```'
        sort "$1" | uniq -c | sort -rn | head -n 12
        echo '```'
    } >>"$DIAG_OUT"
}

# run_pgbench NAME SCRIPT [pgbench args...]
# Sets TPS, XACTS, WALL (s) and the WAL deltas; returns non-zero on failure.
run_pgbench() {
    local name=$1 file=$2
    shift 2
    local out=$DIR/pgbench_$name.out rc=0 start end w0 w1 f0
    w0=$(wal_mark)
    f0=$(faults)
    start=$(date +%s.%N)
    as_pg timeout --kill-after=10 "$PGBENCH_TIMEOUT" \
        "$PGBIN/pgbench" -n -P 5 -h "$DIR" -p "$PORT" -f "$file" "$@" postgres >"$out" 2>&1 || rc=$?
    end=$(date +%s.%N)
    FAULTS=$(( $(faults) - f0 ))
    w1=$(wal_mark)
    WALL=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.2f", b - a }')
    TPS=$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time)$/\1/p' "$out")
    XACTS=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$out")
    LAT=$(sed -n 's/^latency average = \([0-9.]*\) ms$/\1/p' "$out")
    read -r WREC0 WBYTES0 WSYNC0 <<<"$w0"
    read -r WREC1 WBYTES1 WSYNC1 <<<"$w1"
    WAL_RECORDS=$((WREC1 - WREC0))
    WAL_BYTES=$((WBYTES1 - WBYTES0))
    WAL_SYNCS=$((WSYNC1 - WSYNC0))
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        FAIL_REASON="pgbench did not finish within ${PGBENCH_TIMEOUT}s"
    elif [ "$rc" != 0 ]; then
        FAIL_REASON="pgbench exited with status $rc: $(grep -m 3 -E 'ERROR|FATAL|aborted|error' "$out" | tr '\n' ' ')"
    elif [ -z "$TPS" ] || [ -z "$XACTS" ]; then
        FAIL_REASON="could not read tps from pgbench output"
    else
        FAIL_REASON=
    fi
    if [ -n "$FAIL_REASON" ]; then
        echo "--- pgbench output ($name) ---" >&2
        cat "$out" >&2
        return 1
    fi
    return 0
}

FAILURES=()
declare -A RATE DETAIL
fail() {  # key, reason
    RATE[$1]=FAILED
    DETAIL[$1]="FAILED: $2"
    FAILURES+=("$1: $2")
    printf '\n*** FAILURE in %s: %s ***\n\n' "$1" "$2" >&2
}
per_task() {  # total, tasks -> "N B/task"
    awk -v t="$1" -v n="$2" 'BEGIN { if (n > 0) printf "%.0f", t / n; else printf "-" }'
}
wal_detail() {  # tasks
    echo "WAL $(per_task "$WAL_BYTES" "$1") B/task, $(per_task "$WAL_RECORDS" "$1") records/task, $WAL_SYNCS WAL fsyncs, $FAULTS page faults"
}

# --- machine and settings -----------------------------------------------------

PG_VERSION=$(sql -c "SELECT version()")
EXT_VERSION=$(sql -c "SELECT extversion FROM pg_extension WHERE extname = '$EXTENSION'")
SETTINGS=$(sql -F ' = ' -c "
    SELECT name, current_setting(name)
    FROM pg_settings
    WHERE name IN ('shared_buffers', 'max_wal_size', 'synchronous_commit', 'fsync',
                   'full_page_writes', 'wal_sync_method', 'wal_level', 'checkpoint_timeout',
                   'shared_preload_libraries', 'autovacuum', 'max_connections',
                   'listen_addresses', 'port')
    ORDER BY name")
CPU_MODEL=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)
MEM=$(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)
DISK=$(df -PT "$DIR" | awk 'NR == 2 { print $2 " (" $1 ")" }')
REV=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo "no commit")
if [ -n "$(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null)" ]; then REV="$REV (work tree modified)"; fi
if [ -f "$PGLIB/$EXTENSION.so" ]; then
    SO_INFO="$EXTENSION.so installed $(date -u -r "$PGLIB/$EXTENSION.so" '+%Y-%m-%d %H:%M:%S UTC'), sha256 $(sha256sum "$PGLIB/$EXTENSION.so" | cut -c1-12)"
else
    SO_INFO="no $EXTENSION.so"
fi

# --- 0. references on this machine: a round trip, and a single-row commit ----

log "reference: SELECT 1, 1 client, ${DURATION}s"
settle
if run_pgbench select1 "$(script select1 'SELECT 1;')" -c 1 -T "$DURATION"; then
    RATE[select1]=$(round "$TPS")
    DETAIL[select1]="$XACTS transactions in ${DURATION}s, latency $LAT ms"
else
    fail select1 "$FAIL_REASON"
fi

# --- 1. single enqueue, between two baselines ----------------------------------

# workers => 0: no in-database HTTP worker may pick these no-op tasks up.
new_flow() { sql -c "SELECT name FROM beat.create_flow('$1', workers => 0)" >/dev/null; }

# One client, one commit per transaction, so each figure is mostly the
# disk's flush latency, and this disk's flush rate drifts by half within a
# minute.  So the three run in turns, ROUNDS times ROUND_SECONDS each, and
# the report gives each one's median and the median of the per-round
# ratios.  The baselines: the cheapest durable commit (one integer into a
# table without indexes), and the same row enqueue writes, INSERTed by
# plain SQL into a copy of beat.task with its indexes and constraints.
sql -c "CREATE TABLE bench_task (LIKE beat.task INCLUDING ALL)"
declare -A FILE1=(
    [insert]=$(script insert 'INSERT INTO bench_insert VALUES (1);')
    [insert_task]=$(script insert_task "INSERT INTO bench_task (flow, params, max_attempts, correlation_id) VALUES ('bench_1', '{\"n\":1}', 5, gen_random_uuid());")
    [enqueue]=$(script enqueue "SELECT beat.enqueue('bench_1', '{\"n\":1}');")
)
declare -A RUNS1 XACTS1 WAL1
RATIO_INSERT=() RATIO_TASK=()
if new_flow bench_1 && sql -c "TRUNCATE beat.task"; then
    diag_reset
    for round in $(seq "$ROUNDS"); do
        declare -A tps=()
        for k in insert insert_task enqueue; do
            log "1. single enqueue and its baselines, round $round of $ROUNDS: $k, ${ROUND_SECONDS}s"
            settle
            if run_pgbench "$k" "${FILE1[$k]}" -c 1 -T "$ROUND_SECONDS"; then
                tps[$k]=$TPS
                RUNS1[$k]+="$(round "$TPS") "
                XACTS1[$k]=$(( ${XACTS1[$k]:-0} + XACTS ))
                WAL1[$k]="$(wal_detail "$XACTS")"
            else
                fail "$k" "$FAIL_REASON"
                break 2
            fi
        done
        RATIO_INSERT+=("$(div "${tps[enqueue]}" "${tps[insert]}")")
        RATIO_TASK+=("$(div "${tps[enqueue]}" "${tps[insert_task]}")")
    done
    diag_report "1. single enqueue and its two baselines"
    if [ "${#RATIO_INSERT[@]}" = "$ROUNDS" ]; then
        n=$(sql -c "SELECT count(*) FROM beat.task WHERE flow = 'bench_1' AND state = 'pending'")
        if [ "$n" = "${XACTS1[enqueue]}" ]; then
            for k in insert insert_task enqueue; do
                # shellcheck disable=SC2086
                RATE[$k]=$(median ${RUNS1[$k]})
                DETAIL[$k]="runs (per s): $(listing ${RUNS1[$k]}), median ${RATE[$k]}; last run: ${WAL1[$k]}"
            done
        else
            fail enqueue "pgbench committed ${XACTS1[enqueue]} enqueues but $n pending tasks are in bench_1"
        fi
    fi
else
    fail enqueue "could not create flow bench_1 / truncate beat.task"
fi

# --- 2. batch enqueue, against the same rows by plain INSERT ---------------

BATCH_TASKS=$((BATCH_SIZE * BATCH_XACTS))
# It takes about a second: run it REPEAT times, each on an empty table
# after a checkpoint, and report the median.  Before each run, its
# baseline: the rows enqueue_batch writes, INSERTed by plain SQL from the
# same array into bench_task (the copy of beat.task from measurement 1),
# without pg_beat's argument checks; the report gives the per-run ratios
# and their median.
BATCH_ARRAY="(SELECT array_agg(jsonb_build_object('n', g)) FROM generate_series(1, $BATCH_SIZE) g)"
runs=() runs_sql=() RATIO_BATCH=()
new_flow bench_2 || fail enqueue_batch "could not create flow bench_2"
for rep in $(seq "$REPEAT"); do
    [ "${RATE[enqueue_batch]:-}" != FAILED ] || break
    log "2. batch enqueue baseline, plain INSERT of $BATCH_TASKS rows into bench_task (run $rep of $REPEAT)"
    if ! { sql -c "TRUNCATE beat.task, bench_task" && settle; }; then
        fail batch_sql "could not truncate bench_task"
        break
    fi
    f=$(script batch_sql "INSERT INTO bench_task (flow, params, max_attempts, correlation_id) SELECT 'bench_2', p, 5, gen_random_uuid() FROM unnest($BATCH_ARRAY) p;")
    if ! run_pgbench batch_sql "$f" -c 1 -t "$BATCH_XACTS"; then
        fail batch_sql "$FAIL_REASON"
        break
    fi
    n=$(sql -c "SELECT count(*) FROM bench_task WHERE flow = 'bench_2' AND state = 'pending'")
    if [ "$n" != "$BATCH_TASKS" ]; then
        fail batch_sql "expected $BATCH_TASKS pending rows in bench_task, found $n"
        break
    fi
    base=$(awk -v t="$TPS" -v b="$BATCH_SIZE" 'BEGIN { print t * b }')
    runs_sql+=("$(round "$base")")
    DETAIL[batch_sql]="last run: $(wal_detail "$BATCH_TASKS")"

    log "2. batch enqueue, $BATCH_TASKS tasks in $BATCH_XACTS batches of $BATCH_SIZE, 1 client (run $rep of $REPEAT)"
    if sql -c "TRUNCATE bench_task" && settle; then
        diag_reset
        f=$(script enqueue_batch "SELECT count(*) FROM beat.enqueue_batch('bench_2', $BATCH_ARRAY);")
        if run_pgbench enqueue_batch "$f" -c 1 -t "$BATCH_XACTS"; then
            n=$(sql -c "SELECT count(*) FROM beat.task WHERE flow = 'bench_2' AND state = 'pending'")
            if [ "$n" = "$BATCH_TASKS" ]; then
                rate=$(awk -v t="$TPS" -v b="$BATCH_SIZE" 'BEGIN { print t * b }')
                runs+=("$(round "$rate")")
                RATIO_BATCH+=("$(div "$rate" "$base")")
                DETAIL[enqueue_batch]="$BATCH_TASKS tasks, pgbench tps $TPS x $BATCH_SIZE; wall ${WALL}s incl. connection ($(round "$(awk -v n="$BATCH_TASKS" -v w="$WALL" 'BEGIN { print n / w }')") tasks/s), $(wal_detail "$BATCH_TASKS")"
            else
                fail enqueue_batch "expected $BATCH_TASKS pending tasks in bench_2, found $n"
                break
            fi
        else
            fail enqueue_batch "$FAIL_REASON"
            break
        fi
        diag_report "2. batch enqueue"
    else
        fail enqueue_batch "could not truncate bench_task"
        break
    fi
done
if [ "${#runs[@]}" = "$REPEAT" ]; then
    RATE[enqueue_batch]=$(median "${runs[@]}")
    DETAIL[enqueue_batch]="runs (tasks/s): $(listing "${runs[@]}"), median ${RATE[enqueue_batch]}; last run: ${DETAIL[enqueue_batch]}"
    RATE[batch_sql]=$(median "${runs_sql[@]}")
    DETAIL[batch_sql]="runs (rows/s): $(listing "${runs_sql[@]}"), median ${RATE[batch_sql]}; ${DETAIL[batch_sql]}"
elif [ "${RATE[batch_sql]:-}" != FAILED ]; then
    fail batch_sql "no median: measurement 2 stopped after ${#runs[@]} of $REPEAT runs"
fi

# --- 3 and 4. drains ----------------------------------------------------------

# prepare_drain FLOW: an empty beat.task holding exactly DRAIN_TASKS pending
# tasks of FLOW, vacuumed and analyzed, after a checkpoint.
prepare_drain() {
    new_flow "$1" || return 1
    sql -c "TRUNCATE beat.task, bench_task" || return 1
    sql -c "DO \$\$
            BEGIN
                FOR b IN 0 .. $((DRAIN_TASKS / BATCH_SIZE - 1)) LOOP
                    PERFORM count(*) FROM beat.enqueue_batch('$1',
                        (SELECT array_agg(jsonb_build_object('n', b * $BATCH_SIZE + g))
                         FROM generate_series(1, $BATCH_SIZE) g));
                END LOOP;
            END
            \$\$" || return 1
    local n
    n=$(sql -c "SELECT count(*) FROM beat.task WHERE flow = '$1' AND state = 'pending'") || return 1
    if [ "$n" != "$DRAIN_TASKS" ]; then
        echo "expected $DRAIN_TASKS pending tasks in $1 after enqueueing, found $n" >&2
        return 1
    fi
    sql -c "VACUUM ANALYZE beat.task" || return 1
    settle
}

# verify_drain FLOW: every task succeeded.  Sets VERIFY_MSG on failure.
verify_drain() {
    local ok
    ok=$(sql -c "SELECT count(*) FILTER (WHERE state = 'succeeded') = $DRAIN_TASKS
                        AND count(*) = $DRAIN_TASKS
                 FROM beat.task WHERE flow = '$1'")
    if [ "$ok" = t ]; then
        VERIFY_MSG=
        return 0
    fi
    VERIFY_MSG="not all $DRAIN_TASKS tasks of $1 succeeded: $(sql -F '=' -c "SELECT state, count(*) FROM beat.task WHERE flow = '$1' GROUP BY state ORDER BY state" | tr '\n' ' ')"
    return 1
}

drain() {  # key flow per_call title
    local key=$1 flow=$2 per=$3 title=$4 body xacts
    xacts=$((DRAIN_TASKS / CLIENTS / per))
    if [ "$per" = 1 ]; then
        body="SELECT beat.complete(c.id, 'w' || :client_id, NULL) FROM beat.claim('$flow', 'w' || :client_id, 1) c;"
    else
        body="SELECT beat.complete_batch(array_agg(c.id), 'w' || :client_id) FROM beat.claim('$flow', 'w' || :client_id, $per) c;"
    fi
    log "$title: $DRAIN_TASKS tasks, $CLIENTS clients x $xacts transactions, $per per claim"
    if ! prepare_drain "$flow"; then
        fail "$key" "could not prepare $DRAIN_TASKS pending tasks in $flow"
        return
    fi
    diag_reset
    sampler_start "$DIR/waits_$key.txt"
    if run_pgbench "$key" "$(script "$key" "$body")" -c "$CLIENTS" -j "$THREADS" -t "$xacts"; then
        sampler_stop "$DIR/waits_$key.txt" "$title"
        if verify_drain "$flow"; then
            RATE[$key]=$(round "$(awk -v t="$TPS" -v p="$per" 'BEGIN { print t * p }')")
            DETAIL[$key]="$DRAIN_TASKS tasks all succeeded; pgbench tps $TPS x $per, latency $LAT ms; wall ${WALL}s incl. connections ($(round "$(awk -v n="$DRAIN_TASKS" -v w="$WALL" 'BEGIN { print n / w }')") tasks/s), $(wal_detail "$DRAIN_TASKS")"
        else
            fail "$key" "$VERIFY_MSG"
        fi
    else
        sampler_stop "$DIR/waits_$key.txt" "$title"
        fail "$key" "$FAIL_REASON"
    fi
    diag_report "$title"
}

# Each run of measurements 2 and 4 starts on two empty tables, so that no
# autovacuum of the rows the other one left runs beside it.
#
# The baseline of the batched drain: the same drain in plain SQL on
# bench_task, the copy of beat.task (its indexes, checks and defaults, not
# its trigger task_finished).  One PL/pgSQL call per transaction claims
# 100 rows the way beat.claim's statement does (FOR UPDATE SKIP LOCKED,
# in claim order, a lease) and completes them; no checks, no flow settings, no
# wake-up of beat.wait.
sql -c "CREATE FUNCTION bench_drain_sql(w text, n integer) RETURNS integer
        LANGUAGE plpgsql AS \$\$
        DECLARE ids bigint[];
        BEGIN
            WITH u AS (
                UPDATE bench_task t SET state = 'running', attempts = t.attempts + 1,
                    lease_owner = w, lease_expires_at = statement_timestamp() + interval '5 min',
                    started_at = statement_timestamp(), updated_at = statement_timestamp()
                WHERE t.id = ANY (ARRAY(
                    SELECT c.id FROM bench_task c
                    WHERE c.flow = 'bench_sql' AND c.state = 'pending'
                    ORDER BY c.priority, c.run_at, c.id
                    LIMIT n FOR UPDATE SKIP LOCKED))
                RETURNING t.id)
            SELECT array_agg(id) INTO ids FROM u;
            UPDATE bench_task SET state = 'succeeded', finished_at = statement_timestamp(),
                updated_at = statement_timestamp(), lease_owner = NULL, lease_expires_at = NULL
            WHERE id = ANY (ids) AND lease_owner = w;
            RETURN cardinality(ids);
        END \$\$" >/dev/null

drain_sql() {  # title
    local xacts=$((DRAIN_TASKS / CLIENTS / 100)) ok
    log "$1: $DRAIN_TASKS rows of bench_task in plain SQL, $CLIENTS clients x $xacts transactions, 100 per claim"
    if ! { sql -c "TRUNCATE beat.task, bench_task" \
           && sql -c "INSERT INTO bench_task (flow, params, max_attempts, correlation_id)
                      SELECT 'bench_sql', jsonb_build_object('n', g), 5, gen_random_uuid()
                      FROM generate_series(1, $DRAIN_TASKS) g" \
           && sql -c "VACUUM ANALYZE bench_task" && settle; }; then
        fail drain_sql "could not prepare $DRAIN_TASKS pending rows in bench_task"
        return
    fi
    if run_pgbench drain_sql "$(script drain_sql "SELECT bench_drain_sql('w' || :client_id, 100);")" \
            -c "$CLIENTS" -j "$THREADS" -t "$xacts"; then
        ok=$(sql -c "SELECT count(*) FILTER (WHERE state = 'succeeded') = $DRAIN_TASKS FROM bench_task")
        if [ "$ok" = t ]; then
            RATE[drain_sql]=$(round "$(awk -v t="$TPS" 'BEGIN { print t * 100 }')")
            DETAIL[drain_sql]="last run: $DRAIN_TASKS rows all succeeded; pgbench tps $TPS x 100, latency $LAT ms; $(wal_detail "$DRAIN_TASKS")"
        else
            fail drain_sql "not all $DRAIN_TASKS rows of bench_task succeeded"
        fi
    else
        fail drain_sql "$FAIL_REASON"
    fi
}

drain drain_one bench_3 1 "3. drain one by one"
# The batched drain takes about a second: REPEAT runs, the median, each
# after a run of its baseline.
runs=() runs_sql=() RATIO_DRAIN=()
for rep in $(seq "$REPEAT"); do
    unset 'RATE[drain_sql]' 'RATE[drain_batch]'
    drain_sql "4. batched drain baseline in plain SQL (run $rep of $REPEAT)"
    [ "${RATE[drain_sql]:-FAILED}" != FAILED ] || break
    drain drain_batch "bench_4_$rep" 100 "4. batched drain (run $rep of $REPEAT)"
    [ "${RATE[drain_batch]:-FAILED}" != FAILED ] || break
    runs+=("${RATE[drain_batch]}")
    runs_sql+=("${RATE[drain_sql]}")
    RATIO_DRAIN+=("$(div "${RATE[drain_batch]}" "${RATE[drain_sql]}")")
    last=${DETAIL[drain_batch]}
    last_sql=${DETAIL[drain_sql]}
done
if [ "${#runs[@]}" = "$REPEAT" ]; then
    RATE[drain_batch]=$(median "${runs[@]}")
    DETAIL[drain_batch]="runs (tasks/s): $(listing "${runs[@]}"), median ${RATE[drain_batch]}; last run: $last"
    RATE[drain_sql]=$(median "${runs_sql[@]}")
    DETAIL[drain_sql]="runs (rows/s): $(listing "${runs_sql[@]}"), median ${RATE[drain_sql]}; $last_sql"
elif [ "${RATE[drain_sql]:-FAILED}" != FAILED ]; then
    fail drain_sql "no median: measurement 4 stopped after ${#runs[@]} of $REPEAT runs"
fi

# --- report -------------------------------------------------------------------

fmt_rate() { if [ "${RATE[$1]:-FAILED}" = FAILED ]; then echo "**FAILED**"; else commas "${RATE[$1]}"; fi; }
ratio() {  # key ref
    if [ "${RATE[$1]:-FAILED}" = FAILED ]; then echo "-"; return; fi
    div "${RATE[$1]}" "$2"
}
row() {  # label key ref
    printf '| %s | %s | %s | %s |\n' "$1" "$(fmt_rate "$2")" "$(commas "$3")" "$(ratio "$2" "$3")"
}

{
    echo
    echo "## pg_beat queue benchmark"
    echo
    echo "- machine: $(nproc) cores ($CPU_MODEL), $MEM memory, kernel $(uname -r)"
    echo "- disk under the cluster: $DISK"
    echo "- $PG_VERSION"
    echo "- pg_beat $EXT_VERSION ($SO_INFO); repo $REPO at $REV; run $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "- pgbench: simple protocol, unix socket; SELECT 1 for ${DURATION}s, measurement 1 and its baselines $ROUNDS rounds of ${ROUND_SECONDS}s each"
    if [ -n "$FILLFACTOR" ]; then echo "- beat.task fillfactor $FILLFACTOR (BENCH_FILLFACTOR)"; fi
    if [ "$SYNC_COMMIT" != on ]; then echo "- **synchronous_commit = $SYNC_COMMIT (BENCH_SYNCHRONOUS_COMMIT), a diagnosis: not the default durability the references were measured with**"; fi
    echo "- load average (1/5/15 min) at start: $LOAD_START; at end: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo
    echo "Settings:"
    echo
    echo '```'
    echo "$SETTINGS"
    echo '```'
    echo
    echo "| measurement | pg_beat (tasks/s) | reference on this kind of machine | ratio |"
    echo "| --- | ---: | ---: | ---: |"
    row "1. single enqueue (1 client, 1 task/transaction)" enqueue "$REF_ENQUEUE"
    row "2. batch enqueue (100 x 1,000 tasks, 1 client)" enqueue_batch "$REF_BATCH_ENQUEUE"
    row "3. drain one by one (4 clients, claim 1 + complete 1)" drain_one "$REF_DRAIN_ONE"
    row "4. batched drain (4 clients, claim 100 + complete_batch)" drain_batch "$REF_DRAIN_BATCH"
    echo
    echo "Baselines on this machine (transactions/s, 1 client):"
    echo
    echo "| baseline | transactions/s |"
    echo "| --- | ---: |"
    echo "| SELECT 1 (round trip, no commit) | $(fmt_rate select1) |"
    echo "| INSERT one integer into a table without indexes (the cheapest durable commit), median of $ROUNDS | $(fmt_rate insert) |"
    echo "| INSERT the row enqueue writes into a copy of beat.task (LIKE ... INCLUDING ALL), median of $ROUNDS | $(fmt_rate insert_task) |"
    echo
    echo "Baselines of measurements 2 and 4, on the same copy of beat.task (rows/s; each run just before its pg_beat run):"
    echo
    echo "| baseline | rows/s |"
    echo "| --- | ---: |"
    echo "| 2. the rows of enqueue_batch by plain INSERT ... SELECT FROM unnest(the same array), 1 client, median of $REPEAT | $(fmt_rate batch_sql) |"
    echo "| 4. the batched drain in plain SQL (one PL/pgSQL call: claim 100 FOR UPDATE SKIP LOCKED, complete them), 4 clients, median of $REPEAT | $(fmt_rate drain_sql) |"
    echo
    if [ "${#RATIO_INSERT[@]}" = "$ROUNDS" ]; then
        echo "Single enqueue / cheapest commit, per round: ${RATIO_INSERT[*]}; median $(median "${RATIO_INSERT[@]}")."
        echo "Single enqueue / the same row by plain INSERT, per round: ${RATIO_TASK[*]}; median $(median "${RATIO_TASK[@]}")" \
             "(1.00 = the function costs nothing over the INSERT it makes)."
    fi
    if [ "${#RATIO_BATCH[@]}" = "$REPEAT" ]; then
        echo "Batch enqueue / the same rows by plain INSERT, per run: ${RATIO_BATCH[*]}; median $(median "${RATIO_BATCH[@]}")."
    fi
    if [ "${#RATIO_DRAIN[@]}" = "$REPEAT" ]; then
        echo "Batched drain / the same drain in plain SQL, per run: ${RATIO_DRAIN[*]}; median $(median "${RATIO_DRAIN[@]}")."
    fi
    echo
    echo "Details:"
    echo
    for k in select1 insert insert_task enqueue batch_sql enqueue_batch drain_one drain_sql drain_batch; do
        echo "- $k: ${DETAIL[$k]:-not run}"
    done
    if [ "$DIAG" = 1 ]; then
        echo
        echo "### Diagnostics (BENCH_DIAG=1: pg_stat_statements loaded, figures above carry its overhead)"
        cat "$DIAG_OUT"
    fi
    echo
    echo "Total time: $(( $(date +%s) - T0 ))s"
}

if [ "${#FAILURES[@]}" -gt 0 ]; then
    echo
    echo "*** ${#FAILURES[@]} MEASUREMENT(S) FAILED ***"
    for f in "${FAILURES[@]}"; do echo "*** $f"; done
    exit 1
fi
