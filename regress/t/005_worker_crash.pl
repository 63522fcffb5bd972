# Crash safety of the in-database workers in the middle of a drain of 2,000
# tasks (delay_ms=20 each, a unique key per task):
#
#   (a) kill -9 of a flow worker: the postmaster restarts everything, the
#       launcher hands back the orphaned leases (and counts the attempts of
#       claims the crash undid), the drain completes; a task
#       whose completion was lost in the crash may have been fetched twice
#       (at-least-once), but never more than were in flight;
#   (b) SIGTERM to a flow worker: it hands back what it holds without
#       counting the attempt, the launcher starts a new one, the drain
#       completes;
#   (c) a fast restart of the server: same;
#   (d), (e) a crash while a worker records an answer whose claim the
#       crash undid: the attempt still counts (the claim journal).
#
# After each: every task exists exactly once, all succeeded, none running,
# every result is the answer to the task's own request.
#
# The upstream is started by BeatUpstream.pm (next to this file).

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use BeatNode;
use BeatUpstream;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep gettimeofday tv_interval);

# psql may lose its server in the middle of a query here.
$SIG{PIPE} = 'IGNORE';

my $N           = 2000;    # tasks per part
my $WORKERS     = 2;
my $CONCURRENCY = 16;

# ---------------------------------------------------------------- upstream
my $up   = BeatUpstream->start;
my $BASE = $up->base;

# ---------------------------------------------------------------- node
# part (a) is about restart_after_crash, which BeatNode turns on
my $node = BeatNode::start('worker_crash', q{
beat.reaper_interval = '200ms'
# a stopping worker hands back at once what it has in flight
beat.shutdown_grace = 0
});

sub sql { return $node->safe_psql('postgres', $_[0]); }
sub wait_for { return BeatNode::wait_for($node, @_); }

# Wait up to $timeout s for $re in the server log after $offset; returns
# the match's first group (or 1), undef on timeout.
sub wait_log
{
    my ($re, $offset, $timeout) = @_;
    my $deadline = time + $timeout;
    while (1)
    {
        my $log = PostgreSQL::Test::Utils::slurp_file($node->logfile, $offset);
        if ($log =~ $re)
        {
            return defined $1 ? $1 : 1;
        }
        return undef if time > $deadline;
        usleep(100_000);
    }
}

sub log_since
{
    my ($offset) = @_;
    return PostgreSQL::Test::Utils::slurp_file($node->logfile, $offset);
}

# Wait until flow c has $n workers, all started and running.
sub wait_workers { return BeatNode::wait_workers($node, 'c', @_); }

sql(qq{SELECT beat.create_flow('c',
        request => '{"url": "$BASE/json?key={{k}}&delay_ms={{d}}"}',
        workers => $WORKERS, concurrency => $CONCURRENCY, timeout => '10 s',
        max_attempts => 3, backoff_base => '100 ms', backoff_cap => '200 ms')});
ok(defined wait_workers($WORKERS, 30), "the launcher starts $WORKERS workers for flow c");

# Enqueue $N tasks with keys "$part-1" .. "$part-$N" (the workers start at
# once), wait until $min of them are done, and return what is in flight
# then: (succeeded, running tasks, in_flight of the workers, pid of a busy
# worker, its slot).
sub start_drain
{
    my ($part, $min) = @_;
    $up->reset;
    my $t0 = [gettimeofday];
    sql(qq{SELECT count(*) FROM beat.enqueue_batch('c',
             (SELECT array_agg(jsonb_build_object('k', '$part-' || g, 'd', 20) ORDER BY g)
              FROM generate_series(1, $N) g))});
    my @row;
    my $deadline = time + 60;
    while (time < $deadline)
    {
        @row = split /\|/, sql(qq{
            SELECT (SELECT count(*) FROM beat.task
                    WHERE params->>'k' LIKE '$part-%' AND state = 'succeeded'),
                   (SELECT count(*) FROM beat.task
                    WHERE params->>'k' LIKE '$part-%' AND state = 'running'),
                   (SELECT coalesce(sum(in_flight), 0) FROM beat.worker_status WHERE flow = 'c'),
                   (SELECT pid FROM beat.worker_status
                    WHERE flow = 'c' AND state = 'busy' AND in_flight > 0
                    ORDER BY in_flight DESC LIMIT 1),
                   (SELECT slot FROM beat.worker_status
                    WHERE flow = 'c' AND state = 'busy' AND in_flight > 0
                    ORDER BY in_flight DESC LIMIT 1)});
        last if $row[0] >= $min && $row[3];
        usleep(10_000);
    }
    note sprintf('(%s) %.2f s after enqueue: %d succeeded, %d running, workers in flight %d, '
          . 'busy worker pid %s (slot %s)', $part, tv_interval($t0), @row[0 .. 2],
        $row[3] // '-', $row[4] // '-');
    return @row;
}

# The checks after each part.  $max_attempts_1: no task may have spent more
# than one attempt.
sub check_part
{
    my ($part, $what) = @_;
    my $t0 = [gettimeofday];
    my $s = wait_for(
        qq{SELECT count(*) FILTER (WHERE state = 'succeeded') = $N
           FROM beat.task WHERE params->>'k' LIKE '$part-%'}, 60);
    ok(defined $s, "($part) $what: all $N tasks succeed in the end");
    note sprintf('(%s) drain completed %.1f s after the event', $part, $s // -1);
    if (!defined $s)
    {
        diag "($part) states: " . sql(qq{SELECT string_agg(state || '=' || n, ' ')
            FROM (SELECT state, count(*) n FROM beat.task
                  WHERE params->>'k' LIKE '$part-%' GROUP BY 1) s});
        diag "($part) worker_status:\n" . sql('SELECT * FROM beat.worker_status');
    }

    is( sql(qq{SELECT count(*), count(DISTINCT params->>'k')
               FROM beat.task WHERE params->>'k' LIKE '$part-%'}),
        "$N|$N", "($part) every task exists exactly once");
    is(sql(q{SELECT count(*) FROM beat.task WHERE flow = 'c' AND state = 'running'}),
        '0', "($part) no task is running");
    is( sql(qq{SELECT count(*) FROM beat.task
               WHERE params->>'k' LIKE '$part-%'
                 AND (result->>'status' IS DISTINCT FROM '200'
                      OR result->'body'->'query'->>'key' IS DISTINCT FROM params->>'k')}),
        '0', "($part) every task has its result: status 200 and the echo of its own key");

    my $st = $up->stats;
    my $bk = $st->{by_key};
    my @missing = grep { !$bk->{"$part-$_"} } 1 .. $N;
    is(scalar(@missing), 0, "($part) the upstream saw every key");
    my @twice = sort grep { $bk->{$_} > 1 } keys %$bk;
    my ($a2) = sql(qq{SELECT count(*) FROM beat.task
                      WHERE params->>'k' LIKE '$part-%' AND attempts > 1});
    note sprintf('(%s) upstream: %d requests for %d keys; fetched more than once: %d%s; '
          . 'tasks with more than one attempt: %d', $part, $st->{total}, scalar(keys %$bk),
        scalar(@twice), (@twice ? ' (' . join(', ', @twice[0 .. ($#twice < 9 ? $#twice : 9)]) . ')' : ''),
        $a2);
    return (scalar(@twice), \@twice, $a2);
}

# ---------------------------------------------------------------- (a) kill -9
{
    my ($done, $running, $inflight, $pid, $slot) = start_drain('a', 200);
    cmp_ok($done, '<', $N, '(a) the drain is under way when the worker is killed');
    ok($pid, '(a) a busy worker is found in beat.worker_status');
    my $offset = -s $node->logfile;
    ok(kill('KILL', $pid), "(a) kill -9 worker $pid (slot $slot, $inflight in flight over all workers)");
    $node->wait_for_log(qr/all server processes terminated; reinitializing/, $offset);
    ok(defined wait_for('SELECT true', 60), '(a) the server accepts connections after crash recovery');
    # The tasks in flight come back one of two ways: a claim that reached
    # the WAL leaves a lease the launcher hands back; one the crash undid
    # has its attempt counted from the claim journal instead (see (d)).
    ok( defined wait_log(
            qr/handed back \d+ tasks held by workers of a previous run|counted the attempts of \d+ tasks whose claims the crash undid/,
            $offset, 30),
        '(a) the launcher hands back the leases of the killed run or counts their attempts');
    if (log_since($offset) =~ /(starting workers in \d+ s)/)
    {
        note "(a) launcher: $1";
    }

    my ($twice, $twice_keys, $a2) = check_part('a', 'after kill -9 of a worker');
    # both lines, if any, are written by now: the launcher's first pass is long over
    my $log = log_since($offset);
    my $handed = $log =~ /handed back (\d+) tasks held by workers of a previous run/ ? $1 : 0;
    my $counted = $log =~ /counted the attempts of (\d+) tasks whose claims the crash undid/ ? $1 : 0;
    note "(a) leases handed back at launcher start: $handed; attempts counted from the claim journals: $counted";
    cmp_ok($handed + $counted, '>', 0, '(a) the tasks in flight came back, one way or the other');
    cmp_ok($handed + $counted, '<=', $WORKERS * $CONCURRENCY,
        '(a) no more leases handed back or attempts counted than workers x concurrency');
    cmp_ok($twice, '<=', $WORKERS * $CONCURRENCY,
        "(a) fetched twice (at-least-once): $twice, at most workers x concurrency in flight");
    # A task fetched twice is one whose lease was handed back, or whose
    # attempt was counted from the journal, so it was claimed again:
    # attempts 2 (the crash counts the attempt).
    my $keys = join(',', map { "'$_'" } @$twice_keys) || "''";
    is( sql(qq{SELECT count(*) FROM beat.task WHERE params->>'k' IN ($keys) AND attempts = 2}),
        $twice, '(a) every task fetched twice had its attempt counted (attempts 2)');
    is($a2, $handed + $counted,
        '(a) the tasks with 2 attempts are the leases handed back and the attempts counted');
    is(sql(q{SELECT max(attempts) FROM beat.task WHERE params->>'k' LIKE 'a-%'}),
        ($handed + $counted ? '2' : '1'), '(a) no task spent more than 2 attempts');
}

# ---------------------------------------------------------------- (b) SIGTERM
{
    ok(defined wait_workers($WORKERS, 30), '(b) flow c has its workers');
    my ($done, $running, $inflight, $pid, $slot) = start_drain('b', 200);
    cmp_ok($done, '<', $N, '(b) the drain is under way when the worker is terminated');
    my $offset = -s $node->logfile;
    is(sql("SELECT pg_terminate_backend($pid)"), 't',
        "(b) pg_terminate_backend(worker $pid, slot $slot; $inflight in flight over all workers)");
    my $handed = wait_log(
        qr/pg_beat: worker for flow "c" stopping; handed back (\d+) tasks in flight/, $offset, 10);
    ok(defined $handed, '(b) the worker logs that it handed back its tasks in flight');
    $handed //= 0;
    note "(b) handed back by the stopping worker: $handed";
    my $s = wait_for(
        qq{SELECT count(*) = $WORKERS AND bool_and(pid IS NOT NULL AND pid <> $pid)
           FROM beat.worker_status WHERE flow = 'c'}, 30);
    ok(defined $s, '(b) the launcher starts a new worker in its place');
    note sprintf('(b) new worker running %.1f s after the SIGTERM', $s // -1);

    my ($twice, $twice_keys, $a2) = check_part('b', 'after SIGTERM to a worker');
    is($a2, '0', '(b) handing back did not count the attempt: no task has more than 1');
    is(sql(q{SELECT max(attempts) FROM beat.task WHERE params->>'k' LIKE 'b-%'}),
        '1', '(b) max(attempts) is 1');
    cmp_ok($twice, '<=', $handed,
        '(b) fetched twice: at most the tasks handed back in flight');
    my $log = log_since($offset);
    unlike($log, qr/terminated by signal|reinitializing/,
        '(b) no server process crashed (no crash restart)');
}

# ---------------------------------------------------------------- (c) restart
{
    ok(defined wait_workers($WORKERS, 30), '(c) flow c has its workers');
    my ($done, $running, $inflight) = start_drain('c', 200);
    cmp_ok($done, '<', $N, '(c) the drain is under way when the server restarts');
    my $offset = -s $node->logfile;
    $node->restart;
    my $log = log_since($offset);
    my @handed = $log =~ /handed back (\d+) tasks in flight/g;
    my $handed = 0;
    $handed += $_ for @handed;
    note "(c) handed back at shutdown by the stopping workers: "
      . (@handed ? join(' + ', @handed) . " = $handed" : 'none');
    if ($log =~ /handed back (\d+) tasks held by workers of a previous run/)
    {
        note "(c) handed back by the launcher after the restart: $1";
    }

    my ($twice, $twice_keys, $a2) = check_part('c', 'after a fast restart');
    is($a2, '0', '(c) no task spent more than one attempt (handed back at shutdown, not counted)');
    cmp_ok($twice, '<=', $handed, '(c) fetched twice: at most the tasks handed back in flight');
}

# ---------------------------------------------------------------- (d), (e) a claim's attempt
# The attempt a claim counts must survive a crash once the answer is being
# read, or a task whose answer crashes the worker would never run out of
# attempts.  The claim commits without waiting for the disk; before its
# transfers start, the worker writes the attempts it has under way to its
# claim journal (bgworker/journal.c), and the first launcher after the
# crash counts those the crash undid.  The WAL writer is stopped, so that
# nothing writes the claim's commit out of shared memory: the crash undoes
# it.  A row lock on the task holds the worker in its record pass, with the
# answer read, and it is killed there.
#
#   (d) max_attempts 5: the task succeeds on its second attempt;
#   (e) max_attempts 1: the attempt the crash undid was its last: dead.
sub killed_in_record_pass
{
    my ($part, $max_attempts) = @_;
    sql(qq{SELECT beat.create_flow('$part',
            request => '{"url": "$BASE/json?key={{k}}&delay_ms=5000"}',
            workers => 1, concurrency => 1, timeout => '10 s', max_attempts => $max_attempts)});
    ok(defined BeatNode::wait_workers($node, $part, 1, 30), "($part) flow $part has its worker");
    my $worker = sql(qq{SELECT pid FROM beat.worker_status WHERE flow = '$part'});
    my $ww = sql(q{SELECT pid FROM pg_stat_activity WHERE backend_type = 'walwriter'});
    ok(kill('STOP', $ww), "($part) the WAL writer ($ww) is stopped");
    my $id = sql(qq{SELECT beat.enqueue('$part', '{"k": "$part-1"}')});
    ok(defined wait_for(qq{SELECT state = 'running' FROM beat.task WHERE id = $id}, 10),
        "($part) the worker claims the task");
    my $s = $node->background_psql('postgres', on_error_stop => 0);
    $s->query_safe('BEGIN');
    $s->query_safe(qq{SELECT FROM beat.task WHERE id = $id FOR UPDATE});
    ok( defined wait_for(qq{SELECT wait_event_type = 'Lock' FROM pg_stat_activity
                            WHERE pid = $worker}, 10),
        "($part) the worker has the answer and waits for the row to record it");
    my $offset = -s $node->logfile;
    ok(kill('KILL', $worker), "($part) kill -9 of the worker ($worker)");
    $node->wait_for_log(qr/terminating any other active server processes/, $offset);
    # the postmaster has sent it SIGQUIT; let it take it
    sleep 1;
    kill('CONT', $ww);
    $node->wait_for_log(qr/all server processes terminated; reinitializing/, $offset);
    eval { $s->quit; };
    ok(defined wait_for('SELECT true', 60), "($part) the server accepts connections after crash recovery");
    ok(defined wait_log(qr/counted the attempts of 1 tasks whose claims the crash undid/, $offset, 30),
        "($part) the launcher counts the attempt the crash undid");
    return $id;
}

# Nothing but the claim's commit may write the WAL out before the kill:
# an autovacuum of beat.task in the window would.
sql(q{ALTER TABLE beat.task SET (autovacuum_enabled = false)});
{
    my $id = killed_in_record_pass('d', 5);
    ok(BeatNode::settle($node, 'd', 30), '(d) the task ends');
    is(sql(qq{SELECT state || ' ' || attempts FROM beat.task WHERE id = $id}), 'succeeded 2',
        '(d) it succeeded on its second attempt: the first outlived the crash');
    is($up->stats->{by_key}{'d-1'}, 2, '(d) the upstream was called twice');
}
{
    my $id = killed_in_record_pass('e', 1);
    # the launcher logs the count before its pass commits
    ok(defined wait_for(qq{SELECT state = 'dead' FROM beat.task WHERE id = $id}, 30),
        '(e) the launcher\'s pass commits');
    is( sql(qq{SELECT state || ' ' || attempts || ' ' || (finished_at IS NOT NULL)
                      || ' ' || (lease_owner IS NULL)
               FROM beat.task WHERE id = $id}),
        'dead 1 true true', '(e) its only attempt ended in the crash: the task is dead');
    like(sql(qq{SELECT last_error FROM beat.task WHERE id = $id}),
        qr/^the server crashed while worker pg_beat:e:0:\d+ held the task \(attempt 1\)$/,
        '(e) last_error says why');
    sleep 1;
    is($up->stats->{by_key}{'e-1'}, 1, '(e) the upstream was called once');
}

# Every task of the three parts, once.
is(sql(q{SELECT count(*), count(DISTINCT params->>'k') FROM beat.task WHERE flow = 'c'}),
    (3 * $N) . '|' . (3 * $N), 'in all: every task of the three parts exists once');

# A worker that exits flushes its claims and removes its journal; the
# launcher removed those the crashes left.  None is left to count, at the
# next start, an attempt given back since.  (The workers run again first:
# after the crash of (e) the launcher waits before it starts them.)
ok(defined wait_workers($WORKERS, 60), 'flow c has its workers again before the shutdown');
$node->stop;
opendir(my $dh, $node->data_dir . '/pg_stat') or die "pg_stat: $!";
my @journals = grep { /^pg_beat_claims\./ } readdir($dh);
closedir($dh);
is(scalar(@journals), 0, 'no claim journal is left after a clean shutdown')
  or diag "left: @journals";
done_testing();
