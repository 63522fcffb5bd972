# Tasks survive a clean restart and crash recovery exactly once, and
# beat.reap() returns expired leases to pending.
#
# What is checked is what a user of the queue would check: the number of
# tasks in each state, that every id is there once, the sum of the ids, and
# a digest of (id, state, lease owner, attempts) over the whole table.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use BeatQueue;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

my $N       = 2000;    # tasks enqueued
my $CLAIMED = 300;     # leased to worker w1
my $DONE    = 100;     # of those, completed

my $node = PostgreSQL::Test::Cluster->new('restart');
$node->init;
$node->append_conf(
    'postgresql.conf', q{
shared_preload_libraries = 'pg_beat,pg_cron'
cron.database_name = 'postgres'
beat.database_name = 'postgres'
max_worker_processes = 16
# this test calls beat.reap() itself: keep the launcher's reaper out of it
beat.reaper_interval = '1h'
});
$node->start;

$node->safe_psql('postgres', 'CREATE EXTENSION pg_beat');
# workers => 0: no in-database worker takes tasks of this flow, so every
# state change in this test is one the test made.
$node->safe_psql('postgres', q{SELECT beat.create_flow('t', workers => 0)});

# One row summarising the queue; compared whole across restarts (BeatQueue.pm).
sub snapshot { return BeatQueue::snapshot($node, @_); }

# ---------------------------------------------------------------- setup
is( $node->safe_psql(
        'postgres', qq{
        SELECT count(*) FROM beat.enqueue_batch('t',
            (SELECT array_agg(jsonb_build_object('i', g) ORDER BY g)
             FROM generate_series(1, $N) g))}),
    $N,
    "enqueue_batch returns $N ids");

# Claim and complete in one transaction, committed at the end.
my $held = $node->safe_psql(
    'postgres', qq{
    BEGIN;
    CREATE TEMP TABLE held AS SELECT id FROM beat.claim('t', 'w1', $CLAIMED);
    SELECT count(beat.complete(id, 'w1', '{"ok": true}'))
    FROM (SELECT id FROM held ORDER BY id LIMIT $DONE) d;
    SELECT count(*) FROM held;
    COMMIT;});
is($held, "$DONE\n$CLAIMED", "claimed $CLAIMED and completed $DONE of them");

my $before = snapshot('before restart');
is($before->{total},     $N,                  "$N tasks");
is($before->{distinct},  $N,                  'every task once (distinct params)');
is($before->{sum},       $N * ($N + 1) / 2,   'ids are 1..N');
is($before->{pending},   $N - $CLAIMED,       'pending count');
is($before->{running},   $CLAIMED - $DONE,    'running count');
is($before->{succeeded}, $DONE,               'succeeded count');
is($before->{other},     0,                   'no task in another state');

# ---------------------------------------------------------------- restart
$node->restart;
is_deeply(snapshot('after fast restart'), $before,
    'after a fast restart: same tasks, states, leases and attempts');

# ---------------------------------------------------------------- crash
$node->stop('immediate');
$node->start;
my $after_crash = snapshot('after crash recovery');
is_deeply($after_crash, $before,
    'after crash recovery (immediate stop): same tasks, states, leases and attempts');

# The id sequence recovered too: a new task gets a fresh id.
my $max_id = $node->safe_psql('postgres', 'SELECT max(id) FROM beat.task');
my $new_id = $node->safe_psql('postgres', q{SELECT beat.enqueue('t', '{"i": "new"}')});
cmp_ok($new_id, '>', $max_id, 'a task enqueued after recovery gets a new id');
$node->safe_psql('postgres', "DELETE FROM beat.task WHERE id = $new_id");

# ---------------------------------------------------------------- reap
# Lease 50 more tasks for one second, let the leases expire, reap them.
my $short = $node->safe_psql(
    'postgres', q{
    SELECT string_agg(id::text, ',' ORDER BY id)
    FROM beat.claim('t', 'w2', 50, '1 second')});
my @short = split /,/, $short;
is(scalar(@short), 50, 'claimed 50 tasks with a one-second lease');

usleep(1_500_000);
# Guard against a slow machine: wait until the server sees them expired.
ok( $node->poll_query_until(
        'postgres', qq{
        SELECT bool_and(lease_expires_at < statement_timestamp())
        FROM beat.task WHERE id IN ($short) AND state = 'running'}),
    'the one-second leases have expired');

# Count what is still expired just before the call: should pg_beat ever run
# a reaper of its own, it may have taken some already (then fewer than 50).
my ($still, $reaped) = split /\n/, $node->safe_psql(
    'postgres', qq{
    SELECT count(*) FROM beat.task WHERE id IN ($short) AND state = 'running';
    SELECT requeued || '|' || dead FROM beat.reap();});
note "expired leases before beat.reap(): $still";
is($reaped, "$still|0",
    'beat.reap() requeues every expired lease (50 unless a reaper ran), none dead');

is( $node->safe_psql(
        'postgres', qq{
        SELECT count(*) FILTER (WHERE state = 'pending'
                                  AND lease_owner IS NULL
                                  AND lease_expires_at IS NULL),
               count(*)
        FROM beat.task WHERE id IN ($short)}),
    '50|50',
    'the reaped tasks are pending with no lease');

is($node->safe_psql('postgres', 'SELECT requeued, dead FROM beat.reap()'),
    '0|0', 'a second beat.reap() finds nothing');

my $final = snapshot('after reap');
is($final->{total},     $N,                 "still $N tasks");
is($final->{distinct},  $N,                 'still every task once');
is($final->{sum},       $before->{sum},     'same id sum');
is($final->{running},   $CLAIMED - $DONE,   'live leases were not reaped');
is($final->{pending},   $N - $CLAIMED,      'pending count back where it was');
is($final->{succeeded}, $DONE,              'succeeded untouched');

# Every pending task can be claimed, once, and no task held by w1 is handed
# out again.
is( $node->safe_psql(
        'postgres', q{
        WITH c AS (SELECT id FROM beat.claim('t', 'w3', 10000))
        SELECT count(*), count(DISTINCT id),
               count(*) FILTER (WHERE id IN (SELECT id FROM beat.task
                                             WHERE lease_owner = 'w1'))
        FROM c}),
    ($N - $CLAIMED) . '|' . ($N - $CLAIMED) . '|0',
    'the pending tasks are claimed exactly once, none of w1\'s');

$node->stop;
done_testing();
