# kill -9 of a backend in the middle of queue work: the postmaster restarts
# every backend (crash recovery), nothing committed is lost, nothing
# uncommitted survives, no task is leased by the dead session.
#
#   1. a claim of 50 tasks, uncommitted;
#   2. an enqueue_batch of 10,000 tasks, uncommitted, with a statement still
#      running in the same transaction;
#   3. an enqueue_batch of 10,000 tasks killed as soon as the server shows
#      it running (it may or may not have finished the statement; its
#      transaction is uncommitted either way).

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use BeatQueue;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

# psql dies with the backend; never let a write to its closed pipe kill us.
$SIG{PIPE} = 'IGNORE';

my $node = PostgreSQL::Test::Cluster->new('crash');
$node->init;
$node->append_conf(
    'postgresql.conf', q{
shared_preload_libraries = 'pg_beat,pg_cron'
cron.database_name = 'postgres'
beat.database_name = 'postgres'
max_worker_processes = 16
# PostgreSQL::Test::Cluster turns this off; the test is about it.
restart_after_crash = on
});
$node->start;

$node->safe_psql('postgres', 'CREATE EXTENSION pg_beat');
# workers => 0: no in-database worker takes tasks of this flow.
$node->safe_psql('postgres', q{SELECT beat.create_flow('t', workers => 0)});

# Committed before any crash: 1,000 tasks, 100 of them claimed and completed.
$node->safe_psql(
    'postgres', q{
    SELECT count(*) FROM beat.enqueue_batch('t',
        (SELECT array_agg(jsonb_build_object('i', g) ORDER BY g)
         FROM generate_series(1, 1000) g))});
$node->safe_psql(
    'postgres', q{
    SELECT count(beat.complete(id, 'w0', '{}'))
    FROM beat.claim('t', 'w0', 100)});

# One row summarising the queue; compared whole across crashes (BeatQueue.pm).
sub snapshot { return BeatQueue::snapshot($node, @_); }

my $committed = snapshot('committed');
is($committed->{total},     1000, '1000 tasks committed');
is($committed->{distinct},  1000, 'every task once (distinct params)');
is($committed->{pending},   900,  '900 pending');
is($committed->{succeeded}, 100,  '100 succeeded');
is($committed->{running},   0,    'none running');

# SIGKILL one backend and wait until the postmaster has restarted everything
# and accepts connections again.
sub crash_backend
{
    my ($session, $pid, $what) = @_;
    my $offset = -s $node->logfile;

    ok(kill('KILL', $pid), "$what: kill -9 backend $pid");
    $node->wait_for_log(
        qr/server process \(PID $pid\) was terminated by signal 9/, $offset);
    $node->wait_for_log(qr/all server processes terminated; reinitializing/,
        $offset);
    ok($node->poll_query_until('postgres', 'SELECT true'),
        "$what: server accepts connections after crash recovery");

    # The session's psql lost its server; reap it.
    eval { $session->quit; };
    return;
}

# Wait until backend $pid shows $cond in pg_stat_activity.
sub wait_backend
{
    my ($pid, $cond, $what) = @_;
    ok( $node->poll_query_until(
            'postgres', qq{
            SELECT count(*) = 1 FROM pg_stat_activity
            WHERE pid = $pid AND $cond}),
        $what);
    return;
}

# ---------------------------------------------------------------- 1. claim
{
    my $s = $node->background_psql('postgres', on_error_stop => 0);
    my $pid = $s->query_safe('SELECT pg_backend_pid()');
    $s->query_safe('BEGIN');
    my $ids = $s->query_safe(
        q{SELECT string_agg(id::text, ',' ORDER BY id) FROM beat.claim('t', 'w', 50)});
    my @ids = split /,/, $ids;
    is(scalar(@ids), 50, 'claim: 50 tasks claimed in an open transaction');
    wait_backend($pid, q{state = 'idle in transaction'},
        'claim: the claiming transaction is open');

    crash_backend($s, $pid, 'claim');

    is_deeply(snapshot('after claim crash'), $committed,
        'claim: every committed task is there once, unchanged');
    is( $node->safe_psql(
            'postgres', qq{
            SELECT count(*) FILTER (WHERE state = 'pending'
                                      AND lease_owner IS NULL
                                      AND attempts = 0),
                   count(*)
            FROM beat.task WHERE id IN ($ids)}),
        '50|50',
        'claim: the 50 claimed tasks are pending again, unleased, no attempt spent');
    is( $node->safe_psql(
            'postgres', q{
            SELECT count(*) FROM beat.task
            WHERE state = 'running' OR lease_owner IS NOT NULL}),
        '0', 'claim: nothing is running or leased');

    # And they can be claimed again, by someone else, exactly once.
    is( $node->safe_psql(
            'postgres', qq{
            BEGIN;
            SELECT count(*) FILTER (WHERE id IN ($ids)), count(*)
            FROM beat.claim('t', 'w2', 900);
            ROLLBACK;}),
        '50|900',
        'claim: after recovery a new claim gets all 900 pending, the 50 among them');
}

# ------------------------------------------- 2. enqueue_batch, uncommitted
{
    my $s = $node->background_psql('postgres', on_error_stop => 0);
    my $pid = $s->query_safe('SELECT pg_backend_pid()');
    $s->query_safe('BEGIN');
    is( $s->query_safe(
            q{SELECT count(*) FROM beat.enqueue_batch('t',
                (SELECT array_agg(jsonb_build_object('crash', 2, 'i', g))
                 FROM generate_series(1, 10000) g))}),
        '10000',
        'enqueue_batch: 10000 tasks enqueued in an open transaction');
    # Keep a statement running in that transaction while it is killed.
    $s->query_until(qr/sleeping/, "\\echo sleeping\nSELECT pg_sleep(300);\n");
    wait_backend($pid, q{state = 'active' AND wait_event = 'PgSleep'},
        'enqueue_batch: the transaction is running a statement');

    crash_backend($s, $pid, 'enqueue_batch');

    is_deeply(snapshot('after enqueue_batch crash'), $committed,
        'enqueue_batch: the uncommitted 10000 are absent, the committed tasks unchanged');
    is( $node->safe_psql(
            'postgres', q{SELECT count(*) FROM beat.task WHERE params ? 'crash'}),
        '0', 'enqueue_batch: no task of the killed transaction is visible');
}

# --------------------------------------- 3. enqueue_batch, statement in flight
{
    my $s = $node->background_psql('postgres', on_error_stop => 0);
    my $pid = $s->query_safe('SELECT pg_backend_pid()');
    $s->query_safe('BEGIN');
    $s->query_until(
        qr/sending/, q{\echo sending
SELECT count(*) FROM beat.enqueue_batch('t',
    (SELECT array_agg(jsonb_build_object('crash', 3, 'i', g))
     FROM generate_series(1, 10000) g));
});
    # Kill as soon as the server has the statement (running or just done).
    wait_backend($pid, q{query LIKE '%enqueue_batch%'},
        'enqueue_batch in flight: the server has the statement');
    my $state = $node->safe_psql('postgres',
        "SELECT state FROM pg_stat_activity WHERE pid = $pid");
    note "backend state when killed: $state";

    crash_backend($s, $pid, 'enqueue_batch in flight');

    is_deeply(snapshot('after in-flight enqueue_batch crash'), $committed,
        'enqueue_batch in flight: nothing of it is there, the committed tasks unchanged');
    is( $node->safe_psql(
            'postgres', q{SELECT count(*) FROM beat.task WHERE params ? 'crash'}),
        '0', 'enqueue_batch in flight: no task of the killed transaction is visible');
}

# ---------------------------------------------------------------- after all
# The queue still works, and new ids do not collide with any before.
my $max_id = $node->safe_psql('postgres', 'SELECT max(id) FROM beat.task');
is( $node->safe_psql(
        'postgres', qq{
        SELECT count(*), count(*) FILTER (WHERE id > $max_id)
        FROM beat.enqueue_batch('t',
            (SELECT array_agg(jsonb_build_object('after', g))
             FROM generate_series(1, 100) g)) AS e(id)}),
    '100|100',
    'after the crashes: enqueue_batch works and hands out new ids');
is( $node->safe_psql(
        'postgres', q{SELECT count(*), count(DISTINCT params) FROM beat.task}),
    '1100|1100', 'after the crashes: 1100 tasks, every task once');

$node->stop;
done_testing();
