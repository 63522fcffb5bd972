# The in-database workers (0.2.0) against the local stand-in provider
# (regress/upstream/upstream.py): every kind of answer ends its task in the
# right state with a readable error, the workers keep serving other tasks,
# every transfer is logged with its secrets redacted, pickup is woken (not
# polled), pause / drain / alter_flow(workers) act without a restart, and a
# worker really keeps several transfers in flight.
#
# The upstream is started by BeatUpstream.pm (next to this file).

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use BeatNode;
use BeatUpstream;
use JSON::PP;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep gettimeofday tv_interval);

my $json = JSON::PP->new->canonical;

# ---------------------------------------------------------------- upstream
my $up   = BeatUpstream->start;
my $BASE = $up->base;

# ---------------------------------------------------------------- node
my $node = BeatNode::start('workers', q{
beat.reaper_interval = '200ms'
# small, so that size=50000 is over it (the echo answers are < 2 kB)
beat.max_response_size = '10kB'
});

sub sql { return $node->safe_psql('postgres', $_[0]); }
sub wait_for { return BeatNode::wait_for($node, @_); }

# On a failed wait: what the tasks and the workers look like.
sub dump_state
{
    my ($where) = @_;
    my ($ret, $out, $err) = $node->psql(
        'postgres', qq{
        SELECT id, flow, state, attempts, lease_owner, run_at, last_error
        FROM beat.task WHERE $where AND state NOT IN ('succeeded', 'dead') ORDER BY id;
        SELECT * FROM beat.worker_status;});
    diag "unfinished tasks ($where), then beat.worker_status:\n" . ($out // '') . ($err // '');
    return;
}

# The flow's worker pids by slot, "pid,pid".
sub worker_pids
{
    my ($flow) = @_;
    return sql(qq{SELECT coalesce(string_agg(pid::text, ',' ORDER BY slot), '')
                FROM beat.worker_status WHERE flow = '$flow'});
}

# Wait until $flow has $n workers, all started and running (idle or busy).
sub wait_workers { return BeatNode::wait_workers($node, @_); }

# ---------------------------------------------------------------- flows
# Flow f serves every kind of answer with one template: the path and up to
# three upstream options (name and value) come from the task's params.  An
# option a task does not need is passed as x=0, which the upstream ignores.
sql(qq{SELECT beat.create_flow('f',
        request => '{"url": "$BASE/{{path}}?key={{k}}&{{o1}}={{v1}}&{{o2}}={{v2}}&{{o3}}={{v3}}"}',
        workers => 2, concurrency => 16, timeout => '1 s', max_attempts => 3,
        backoff_base => '100 ms', backoff_cap => '200 ms')});

# Params of a flow-f task: key, path and options.
sub fparams
{
    my ($k, $path, @opts) = @_;
    my %p = (k => $k, path => $path);
    for my $i (1 .. 3)
    {
        my ($o, $v) = splice(@opts, 0, 2);
        $p{"o$i"} = $o // 'x';
        $p{"v$i"} = $v // '0';
    }
    return \%p;
}

# Enqueue one task; returns its id.
sub enqueue
{
    my ($flow, $params, $max_attempts) = @_;
    my $p = $json->encode($params);
    my $ma = defined $max_attempts ? ", max_attempts => $max_attempts" : '';
    return sql(qq{SELECT beat.enqueue('$flow', \$j\$$p\$j\$::jsonb$ma)});
}

ok(defined wait_workers('f', 2, 20), 'flow f: the launcher starts its 2 workers');
my $launchers = sql(q{SELECT count(*) FROM beat.worker_status WHERE state = 'launcher'});
is($launchers, '1', 'worker_status shows the launcher');
my $f_pids = worker_pids('f');
note "flow f workers: $f_pids";

# ---------------------------------------------------------------- pickup
# A commit that enqueues wakes an idle worker at once; without the wake-up it
# would wait for its 30 s safety timer.
{
    my @lat;
    for my $i (1 .. 3)
    {
        # idle for a while: the worker sleeps on its latch
        wait_for(q{SELECT bool_and(state = 'idle') FROM beat.worker_status WHERE flow = 'f'}, 10);
        usleep(500_000);
        my $w0  = sql('SELECT beat.wakeups()');
        my $t0  = [gettimeofday];
        my $id  = enqueue('f', fparams("pickup-$i", 'json'));
        my $waited = wait_for(
            "SELECT state = 'succeeded' FROM beat.task WHERE id = $id", 5);
        my $wall = tv_interval($t0);
        my $server = sql(qq{SELECT round(extract(epoch FROM finished_at - created_at) * 1000)
                          FROM beat.task WHERE id = $id});
        my $w1 = sql('SELECT beat.wakeups()');
        note sprintf('pickup %d: succeeded %.0f ms after enqueue (server: %s ms), wakeups %d -> %d',
            $i, $wall * 1000, $server, $w0, $w1);
        ok(defined $waited && $wall < 3,
            "pickup $i: a task enqueued while idle is succeeded within 3 s (no polling)");
        push @lat, $server;
    }
    note 'pickup latencies (ms, created_at to finished_at): ' . join(', ', @lat);
}

# ---------------------------------------------------------------- answers
$up->reset;
sql(qq{SELECT beat.create_flow('f404',
        request => '{"url": "$BASE/{{path}}?key={{k}}"}',
        workers => 1, ok_statuses => '{[200,300),[404,405)}')});

my %id;
$id{ok}      = enqueue('f', fparams('ok',      'json'));
$id{slow_ok} = enqueue('f', fparams('slow_ok', 'json', delay_ms => 300));
$id{timeout_retry} =
  enqueue('f', fparams('timeout_retry', 'json', delay_ms => 2500), 2);
$id{timeout_dead} =
  enqueue('f', fparams('timeout_dead', 'json', delay_ms => 2500), 1);
$id{reset} = enqueue('f', fparams('reset', 'json', reset => 1));
$id{r429} =
  enqueue('f', fparams('r429', 'json', status => 429, retry_after => 2), 2);
# two tasks against a rate limit of 1 per 2 s: one is answered 429 with
# Retry-After, waits for it, and then gets in
$id{rl_a} = enqueue('f',
    fparams('rl_a', 'json', ratelimit => 1, window_s => 2, bucket => 'rl004'), 5);
$id{rl_b} = enqueue('f',
    fparams('rl_b', 'json', ratelimit => 1, window_s => 2, bucket => 'rl004'), 5);
$id{s500}    = enqueue('f', fparams('s500',    'json', status => 500));
$id{badjson} = enqueue('f', fparams('badjson', 'json', body => 'badjson'));
$id{big}     = enqueue('f', fparams('big',     'json', size => 50000));
$id{loop}    = enqueue('f', fparams('loop',    'redirect_loop'));
{
    my $p = fparams('missing', 'json');
    delete $p->{v3};    # {{v3}} has no value
    $id{missing} = enqueue('f', $p);
}
$id{s404}    = enqueue('f',    fparams('s404', 'no_such_route'));
$id{ok404}   = enqueue('f404', { k => 'ok404', path => 'no_such_route' });

# The 429 with Retry-After: 2 leaves its task failed until at least 2 s on.
ok( defined wait_for(
        "SELECT state = 'failed' AND attempts = 1 FROM beat.task WHERE id = $id{r429}", 10),
    '429 with Retry-After: the task is failed after its first attempt');
{
    my $r = sql(qq{SELECT run_at - updated_at >= interval '2 s', run_at - updated_at, last_error
                 FROM beat.task WHERE id = $id{r429}});
    my ($ge, $gap, $err) = split /\|/, $r;
    note "429: retry scheduled $gap after the failure, last_error: $err";
    is($ge, 't', '429 with Retry-After: 2: run_at is at least 2 s after updated_at');
    is($err, 'HTTP 429', '429: last_error is "HTTP 429"');
}

my $all_ids = join(',', values %id);
ok( defined wait_for(
        "SELECT bool_and(state IN ('succeeded', 'dead')) FROM beat.task WHERE id IN ($all_ids)",
        60),
    'every task of the batch reaches succeeded or dead')
  or dump_state("id IN ($all_ids)");

# one row per task: state|attempts|last_error
my %t;
for my $name (sort keys %id)
{
    my $r = sql(qq{SELECT state, attempts, coalesce(last_error, '')
                 FROM beat.task WHERE id = $id{$name}});
    my ($state, $attempts, $err) = split /\|/, $r, 3;
    $t{$name} = { state => $state, attempts => $attempts, error => $err };
    note sprintf('%-14s %-9s attempts=%d %s', $name, $state, $attempts, $err);
}

# rows of beat.http_log of a task, in order: "attempt:status:outcome"
sub log_rows
{
    my ($name) = @_;
    return sql(qq{SELECT coalesce(string_agg(attempt || ':' || coalesce(status::text, '-')
                                           || ':' || outcome, ' ' ORDER BY id), '')
                FROM beat.http_log WHERE task_id = $id{$name}});
}

# 200 JSON
is($t{ok}{state}, 'succeeded', '200 JSON: succeeded');
is( sql(qq{SELECT result->>'status', jsonb_typeof(result->'body'),
                result->'body'->'query'->>'key', result->'body'->>'path'
         FROM beat.task WHERE id = $id{ok}}),
    '200|object|ok|/json',
    '200 JSON: result has status 200 and the JSON body as an object');
is(log_rows('ok'), '1:200:ok', '200 JSON: one http_log row, 200, ok');

# slow, under the timeout
is($t{slow_ok}{state}, 'succeeded', 'slow answer (300 ms) under the 1 s timeout: succeeded');
is( sql(qq{SELECT total_ms >= 300 FROM beat.http_log WHERE task_id = $id{slow_ok}}),
    't', 'slow answer: its http_log total_ms is at least the 300 ms delay');

# slow, over the timeout
is($t{timeout_retry}{state},    'dead', 'answer over the flow timeout, 2 attempts: dead in the end');
is($t{timeout_retry}{attempts}, '2',    'answer over the timeout: retried (2 attempts)');
like($t{timeout_retry}{error}, qr/timed? ?out/i, 'answer over the timeout: last_error names the timeout');
is(log_rows('timeout_retry'), '1:-:retry 2:-:retry',
    'answer over the timeout: each attempt logged as retry, no status');
is($t{timeout_dead}{state},    'dead', 'answer over the timeout with max_attempts 1: dead');
is($t{timeout_dead}{attempts}, '1',    'answer over the timeout with max_attempts 1: one attempt');
like($t{timeout_dead}{error}, qr/timed? ?out/i, 'max_attempts 1: last_error names the timeout');

# connection reset
is($t{reset}{state},    'dead', 'connection reset: dead after its attempts');
is($t{reset}{attempts}, '3',    'connection reset: retried up to max_attempts (3)');
like($t{reset}{error}, qr/reset|recv|receiv|empty reply/i,
    'connection reset: readable last_error');
is(log_rows('reset'), '1:-:retry 2:-:retry 3:-:retry', 'connection reset: 3 transfers logged as retry');

# 429 with Retry-After, then out of attempts
is($t{r429}{state}, 'dead', '429 twice with max_attempts 2: dead');
is(log_rows('r429'), '1:429:retry 2:429:retry', '429: both transfers logged as 429 retry');
{
    my $gap = sql(qq{SELECT extract(epoch FROM max(created_at) - min(created_at))
                   FROM beat.http_log WHERE task_id = $id{r429}});
    note "429: the second attempt came ${gap} s after the first";
    cmp_ok($gap, '>=', 2, '429: the retry waited for Retry-After (2 s)');
}

# rate limit: 429 + Retry-After, then 200
is($t{rl_a}{state} . '|' . $t{rl_b}{state}, 'succeeded|succeeded',
    'rate limit 1 per 2 s: both tasks succeed in the end');
is( sql(qq{SELECT count(*) FILTER (WHERE status = 429 AND outcome = 'retry') >= 1
                AND count(*) FILTER (WHERE status = 200 AND outcome = 'ok') = 2
         FROM beat.http_log WHERE task_id IN ($id{rl_a}, $id{rl_b})}),
    't', 'rate limit: a 429 retried after Retry-After, then two 200s');
note 'rate limit: rl_a ' . log_rows('rl_a') . ', rl_b ' . log_rows('rl_b');

# 500
is($t{s500}{state},    'dead',     '500: dead');
is($t{s500}{attempts}, '3',        '500: retried with backoff up to max_attempts (3)');
is($t{s500}{error},    'HTTP 500', '500: last_error is "HTTP 500"');
is(log_rows('s500'), '1:500:retry 2:500:retry 3:500:retry', '500: 3 transfers logged as 500 retry');

# bad JSON in a 200
is($t{badjson}{state}, 'succeeded', 'bad JSON body with 200: succeeded (not an error)');
is( sql(qq{SELECT jsonb_typeof(t.result->'body'),
                t.result->>'status',
                left(t.result->>'body', 6),
                octet_length(t.result->>'body') = h.bytes,
                h.bytes > 0
         FROM beat.task t JOIN beat.http_log h ON h.task_id = t.id
         WHERE t.id = $id{badjson}}),
    'string|200|{"n": |t|t',
    'bad JSON body: result->body is a JSON string holding the text as received');

# too large
is($t{big}{state},    'dead', 'body over beat.max_response_size: dead');
is($t{big}{attempts}, '1',    'body over beat.max_response_size: not retried');
like($t{big}{error}, qr/beat\.max_response_size/, 'too large: last_error names beat.max_response_size');
is(log_rows('big'), '1:-:permanent', 'too large: logged as permanent');

# redirect loop
is($t{loop}{state},    'dead', 'redirect loop: dead');
is($t{loop}{attempts}, '1',    'redirect loop: not retried');
like($t{loop}{error}, qr/redirects/, 'redirect loop: last_error mentions redirects');
is(log_rows('loop'), '1:-:permanent', 'redirect loop: logged as permanent');

# missing parameter
is($t{missing}{state},    'dead', 'missing {{v3}}: dead');
is($t{missing}{attempts}, '1',    'missing parameter: not retried');
like($t{missing}{error}, qr/missing parameter "v3"/, 'missing parameter: last_error names it');
is(log_rows('missing'), '1:-:permanent', 'missing parameter: logged as permanent, no status');

# 404
is($t{s404}{state},    'dead',     '404: dead (permanent)');
is($t{s404}{attempts}, '1',        '404: not retried');
is($t{s404}{error},    'HTTP 404', '404: last_error is "HTTP 404"');
is(log_rows('s404'), '1:404:permanent', '404: logged as 404 permanent');

# 404 in ok_statuses
is($t{ok404}{state}, 'succeeded', 'ok_statuses including 404: a 404 succeeds');
is( sql(qq{SELECT result->>'status', result->'body'->>'error'
         FROM beat.task WHERE id = $id{ok404}}),
    '404|no such route', 'ok_statuses including 404: result holds the 404 answer');

# What the upstream saw, per key
{
    my $st = $up->stats;
    my $bk = $st->{by_key};
    note 'upstream by_key: ' . $json->encode($bk);
    ok(!exists $bk->{missing}, 'missing parameter: no request reached the upstream');
    is($bk->{loop}, 6, 'redirect loop: the first request and 5 redirects (max_redirects 5)');
    # libcurl sends a request again, once, on a fresh connection when a
    # reused keep-alive connection dies before any answer: so a reset may
    # reach the upstream twice in one transfer.
    my @bad;
    for my $name (sort keys %id)
    {
        next if $name eq 'missing' || $name eq 'loop';
        my $rows = sql(qq{SELECT count(*) FROM beat.http_log WHERE task_id = $id{$name}});
        my $seen = $bk->{$name} // 0;
        my $seen_ok = $name eq 'reset'
          ? ($seen >= $rows && $seen <= 2 * $rows)
          : $seen == $rows;
        push @bad, "$name: attempts $t{$name}{attempts}, log rows $rows, upstream $seen"
          unless $rows == $t{$name}{attempts} && $seen_ok;
    }
    is(join('; ', @bad), '',
        'every transfer has one http_log row and reached the upstream (per task: attempts = rows = requests)');
    note "reset: 3 transfers, $st->{dropped}{reset} requests dropped by the upstream";
    cmp_ok($st->{dropped}{reset}, '>=', 3, 'the upstream reset every request of the reset task');
    {
        my $gaps = sql(qq{SELECT string_agg(round(extract(epoch FROM g) * 1000)::text, ', ')
                          FROM (SELECT created_at - lag(created_at) OVER (ORDER BY id) g
                                FROM beat.http_log WHERE task_id = $id{s500}) s
                          WHERE g IS NOT NULL});
        note "500: ms between the recorded attempts: $gaps";
    }
}

# A retry is due at its run_at even when nothing else wakes the workers:
# one task answered 500, alone in the flow (backoff at most 200 ms, so its
# three attempts take well under a second; the workers' safety timer that
# would otherwise pick it up is 30 s).
{
    my $id = enqueue('f', fparams('s500_alone', 'json', status => 500));
    my $s = wait_for("SELECT state = 'dead' FROM beat.task WHERE id = $id", 10);
    ok(defined $s, 'a lone task answered 500 is retried at its backoff: dead after 3 attempts within 10 s')
      or dump_state("id = $id");
    note sprintf('lone 500: %s; attempts recorded at: %s',
        defined $s ? sprintf('dead after %.0f ms', $s * 1000) : 'not dead within 10 s',
        sql(qq{SELECT string_agg(to_char(created_at, 'HH24:MI:SS.MS'), ', ' ORDER BY id)
               FROM beat.http_log WHERE task_id = $id}));
}

# The same worker processes served all of it, and still serve.
is(worker_pids('f'), $f_pids, 'flow f: the same 2 worker processes throughout (none crashed)');
{
    my $id = enqueue('f', fparams('after_errors', 'json'));
    ok(defined wait_for("SELECT state = 'succeeded' FROM beat.task WHERE id = $id", 10),
        'after all the failures, the workers still serve a new task');
}

# ---------------------------------------------------------------- secrets
{
    my $secret = sprintf('S3cr3t%08x%08x', int(rand(2**32)), int(rand(2**32)));
    sql(qq{SELECT beat.create_flow('sec',
        request => '{"url": "$BASE/{{path}}?token={{t}}&key={{k}}&{{o1}}={{v1}}"}',
        workers => 1, timeout => '1 s', max_attempts => 2,
        backoff_base => '100 ms', backoff_cap => '200 ms')});
    ok(defined wait_workers('sec', 1, 20), 'flow sec: its worker starts');
    my @sid;
    for my $c (
        [ 'sec_ok',      'json',          'x',        '0' ],
        [ 'sec_500',     'json',          'status',   '500' ],
        [ 'sec_timeout', 'json',          'delay_ms', '2500' ],
        [ 'sec_reset',   'json',          'reset',    '1' ],
        [ 'sec_loop',    'redirect_loop', 'x',        '0' ],
        [ 'sec_404',     'no_such_route', 'x',        '0' ])
    {
        push @sid, enqueue('sec',
            { t => $secret, k => $c->[0], path => $c->[1], o1 => $c->[2], v1 => $c->[3] });
    }
    my $sids = join(',', @sid);
    ok( defined wait_for(
            "SELECT bool_and(state IN ('succeeded', 'dead')) FROM beat.task WHERE id IN ($sids)",
            20),
        'secrets: every task of flow sec is finished')
      or dump_state("id IN ($sids)");
    note "secrets: http_log urls:\n"
      . sql(qq{SELECT string_agg(DISTINCT url, E'\n') FROM beat.http_log WHERE flow = 'sec'});
    is( sql(qq{SELECT count(*), count(*) FILTER (WHERE url LIKE '%token=***%')
             FROM beat.http_log WHERE flow = 'sec'}),
        '9|9', 'secrets: every transfer is logged (1+2+2+2+1+1) with token=*** in its URL');
    is( sql(qq{SELECT count(*) FROM beat.http_log h WHERE strpos(h::text, '$secret') > 0}),
        '0', 'secrets: the token value appears nowhere in beat.http_log');
    is( sql(qq{SELECT count(*) FROM beat.task
             WHERE strpos(coalesce(last_error, ''), '$secret') > 0}),
        '0', 'secrets: the token value appears in no beat.task.last_error');
    is( sql(qq{SELECT result->'body'->'query'->>'token' = '$secret'
             FROM beat.task WHERE id = $sid[0]}),
        't', 'secrets: the real request did carry the token (the upstream echoed it)');
}

# ---------------------------------------------------------------- pause
{
    sql(q{SELECT beat.pause('f')});
    my $id = enqueue('f', fparams('paused', 'json'));
    usleep(1_000_000);
    is(sql("SELECT state || '|' || attempts FROM beat.task WHERE id = $id"), 'pending|0',
        'pause: a task enqueued into a paused flow stays pending for 1 s');
    ok(!exists $up->stats->{by_key}{paused}, 'pause: no request was sent');
    sql(q{SELECT beat.resume('f')});
    my $s = wait_for("SELECT state = 'succeeded' FROM beat.task WHERE id = $id", 10);
    ok(defined $s, 'resume: the waiting task is done');
    note sprintf('resume: task succeeded %.0f ms after beat.resume', ($s // 0) * 1000);
}

# ---------------------------------------------------------------- drain
{
    my @ids = map { enqueue('f', fparams("drain-$_", 'json', delay_ms => 500)) } 1 .. 20;
    my $ids = join(',', @ids);
    ok(defined wait_for("SELECT count(*) > 0 FROM beat.task WHERE id IN ($ids) AND state = 'running'", 10),
        'drain: transfers are in flight');
    my $t0 = [gettimeofday];
    my $left = sql(q{SELECT count(*) FROM beat.drain('10 s')});
    my $running = sql(q{SELECT count(*) FROM beat.task WHERE flow = 'f' AND state = 'running'});
    note sprintf('drain: returned after %.0f ms', tv_interval($t0) * 1000);
    is($left,    '0', 'beat.drain() returns no worker with transfers in flight');
    is($running, '0', 'after beat.drain(), no task of the flow is running');
    note 'drain: states of the 20: '
      . sql("SELECT string_agg(state || '=' || n, ' ') FROM (SELECT state, count(*) n FROM beat.task WHERE id IN ($ids) GROUP BY 1) s");

    my @more = map { enqueue('f', fparams("drained-$_", 'json')) } 1 .. 3;
    my $more = join(',', @more);
    usleep(1_000_000);
    is(sql("SELECT count(*) FROM beat.task WHERE id IN ($more) AND state = 'pending' AND attempts = 0"),
        '3', 'while drained: new tasks stay pending (1 s)');
    sql(q{SELECT beat.undrain()});
    ok( defined wait_for(
            "SELECT bool_and(state = 'succeeded') FROM beat.task WHERE id IN ($ids,$more)", 15),
        'after beat.undrain(): all 23 tasks succeed');
}

# beat.drain() right after a commit that woke the workers: it must also wait
# for a claim that is under way when it starts.  50 tries in one session.
{
    my $script = '';
    for my $i (1 .. 50)
    {
        my $p = $json->encode(fparams("drainrace-$i", 'json', delay_ms => 100));
        $script .= qq{SELECT 'id:' || beat.enqueue('f', '$p'::jsonb);
SELECT 'drain:' || count(*) FROM beat.drain('5 s');
SELECT 'running:' || count(*) FROM beat.task WHERE flow = 'f' AND state = 'running';
SELECT beat.undrain();
SELECT pg_sleep(0.15);
};
    }
    my $out     = sql($script);
    my @ids     = $out =~ /^id:(\d+)$/mg;
    my @drain   = $out =~ /^drain:(\d+)$/mg;
    my @running = $out =~ /^running:(\d+)$/mg;
    my $raced   = grep { $drain[$_] == 0 && $running[$_] > 0 } 0 .. $#drain;
    note "drain right after a wake-up: 50 tries, $raced returned nothing in flight while a task was running";
    is(scalar(@running), 50, 'drain after a wake-up: 50 tries ran');
    is($raced, 0, 'drain after a wake-up: never returns while a task is running');
    my $ids = join(',', @ids);
    ok( defined wait_for(
            "SELECT bool_and(state = 'succeeded') FROM beat.task WHERE id IN ($ids)", 15),
        'drain after a wake-up: the 50 tasks succeed');
}

# ---------------------------------------------------------------- status
{
    is(worker_pids('f'), $f_pids, 'worker_status: still the same 2 workers of flow f');
    is( sql(q{SELECT count(*), string_agg(slot::text, ',' ORDER BY slot),
                   bool_and(pid IS NOT NULL AND state IN ('idle', 'busy'))
            FROM beat.worker_status WHERE flow = 'f'}),
        '2|0,1|t', 'worker_status: flow f has workers in slots 0 and 1, running');
    # wait until both are idle so that their counters are published
    wait_for(q{SELECT bool_and(state = 'idle' AND in_flight = 0) FROM beat.worker_status WHERE flow = 'f'}, 10);
    my ($done, $failed, $succ, $notok) = split /\|/, sql(q{
        SELECT (SELECT sum(done) FROM beat.worker_status WHERE flow = 'f'),
               (SELECT sum(failed) FROM beat.worker_status WHERE flow = 'f'),
               (SELECT count(*) FROM beat.task WHERE flow = 'f' AND state = 'succeeded'),
               (SELECT count(*) FROM beat.http_log WHERE flow = 'f' AND outcome IN ('retry', 'permanent'))});
    note "worker_status of f: done $done, failed $failed; tasks succeeded $succ, failed transfers logged $notok";
    is($done,   $succ,  'worker_status: the done counts add up to the succeeded tasks of the flow');
    is($failed, $notok, 'worker_status: the failed counts add up to the failed transfers logged');
}

# ---------------------------------------------------------------- concurrency
{
    sql(qq{SELECT beat.create_flow('conc',
        request => '{"url": "$BASE/json?key={{k}}&delay_ms={{d}}"}',
        workers => 2, concurrency => 8, timeout => '10 s')});
    ok(defined wait_workers('conc', 2, 20), 'flow conc: 2 workers');
    wait_for(q{SELECT bool_and(state = 'idle') FROM beat.worker_status WHERE flow <> ''}, 10);
    $up->reset;
    my $t0 = [gettimeofday];
    sql(q{SELECT count(*) FROM beat.enqueue_batch('conc',
          (SELECT array_agg(jsonb_build_object('k', 'conc-' || g, 'd', 300) ORDER BY g)
           FROM generate_series(1, 40) g))});
    my $max_worker_in_flight = 0;
    my $done;
    my $deadline = time + 60;
    while (time < $deadline)
    {
        my ($n, $wmax) = split /\|/, sql(q{
            SELECT (SELECT count(*) FROM beat.task WHERE flow = 'conc' AND state = 'succeeded'),
                   (SELECT coalesce(max(in_flight), 0) FROM beat.worker_status WHERE flow = 'conc')});
        $max_worker_in_flight = $wmax if $wmax > $max_worker_in_flight;
        if ($n == 40) { $done = tv_interval($t0); last; }
        usleep(20_000);
    }
    my $st = $up->stats;
    note sprintf('concurrency: 40 tasks of 300 ms in %.2f s; upstream max_in_flight %d; '
          . 'largest in_flight of one worker seen %d', $done // -1, $st->{max_in_flight},
        $max_worker_in_flight);
    ok(defined $done, 'concurrency: all 40 tasks succeed');
    is(sql(q{SELECT count(*) FROM beat.task WHERE flow = 'conc' AND state = 'succeeded' AND attempts = 1}),
        '40', 'concurrency: each in one attempt');
    cmp_ok($st->{max_in_flight}, '>', 2,
        'concurrency: more than 1 transfer in flight per worker (upstream max_in_flight > 2)');
    cmp_ok($st->{max_in_flight}, '<=', 16,
        'concurrency: never more than workers x concurrency (16) in flight');
    cmp_ok($max_worker_in_flight, '<=', 8, 'concurrency: no worker reports more than 8 in flight');
}

# Every transfer of every flow has its log row: the attempts of each task
# not running now equal its rows in beat.http_log (no task was handed back
# so far).
is( sql(q{SELECT count(*) FROM beat.task t
        WHERE state <> 'running'
          AND attempts <> (SELECT count(*) FROM beat.http_log h WHERE h.task_id = t.id)}),
    '0', 'every task: attempts = its rows in beat.http_log');

# ---------------------------------------------------------------- workers
{
    my $start    = sql('SELECT pg_postmaster_start_time()');
    my $launcher = sql(q{SELECT pid FROM beat.worker_status WHERE state = 'launcher'});
    sql(q{SELECT beat.alter_flow('f', workers => 1)});
    my $s = wait_for(q{SELECT count(*) = 1 AND min(slot) = 0 FROM beat.worker_status WHERE flow = 'f'}, 15);
    ok(defined $s, 'alter_flow workers 2 -> 1: one worker left (slot 0)');
    note sprintf('workers 2 -> 1 took %.0f ms', ($s // 0) * 1000);

    sql(q{SELECT beat.alter_flow('f', workers => 0)});
    $s = wait_for(q{SELECT count(*) = 0 FROM beat.worker_status WHERE flow = 'f'}, 15);
    ok(defined $s, 'alter_flow workers 1 -> 0: no worker left');
    note sprintf('workers 1 -> 0 took %.0f ms', ($s // 0) * 1000);

    my $id = enqueue('f', fparams('no_workers', 'json'));
    usleep(500_000);
    is(sql("SELECT state FROM beat.task WHERE id = $id"), 'pending',
        'with workers 0, a new task stays pending');

    sql(q{SELECT beat.alter_flow('f', workers => 2)});
    $s = wait_workers('f', 2, 30);
    ok(defined $s, 'alter_flow workers 0 -> 2: two workers run again');
    note sprintf('workers 0 -> 2 took %.0f ms', ($s // 0) * 1000);
    ok(defined wait_for("SELECT state = 'succeeded' FROM beat.task WHERE id = $id", 10),
        'the new workers take the waiting task');
    is(sql('SELECT pg_postmaster_start_time()'), $start, 'all without a server restart');
    is(sql(q{SELECT pid FROM beat.worker_status WHERE state = 'launcher'}), $launcher,
        'the launcher ran throughout (same pid): it stopped and started the workers itself');
}

# A worker told to stop says so while it waits for its transfers in flight
# (beat.shutdown_grace, 2 s), and then hands the task back.
{
    sql(qq{SELECT beat.create_flow('stopper', request => '{"url": "$BASE/json?delay_ms=30000"}',
            workers => 1, timeout => '60 s')});
    my $id = sql(q{SELECT beat.enqueue('stopper', '{}')});
    ok( defined wait_for(q{SELECT state = 'busy' FROM beat.worker_status WHERE flow = 'stopper'}, 10),
        'stopping: the worker is busy with a 30 s transfer');
    my $t0 = [gettimeofday];
    sql(q{SELECT beat.alter_flow('stopper', workers => 0)});
    ok( defined wait_for(q{SELECT state = 'stopping' FROM beat.worker_status WHERE flow = 'stopper'}, 10),
        'stopping: beat.worker_status shows it stopping during the grace period');
    ok( defined wait_for(qq{SELECT state = 'pending' FROM beat.task WHERE id = $id}, 10),
        'stopping: the task is handed back');
    # the grace starts when the worker sees the change, after $t0; the
    # transfer would take 30 s
    my $took = tv_interval($t0);
    cmp_ok($took, '>=', 1.9, sprintf('stopping: it waited the grace period (%.2f s) first', $took));
    cmp_ok($took, '<', 5, 'stopping: and no longer: it did not wait for the transfer');
    is(sql(qq{SELECT attempts FROM beat.task WHERE id = $id}), '0',
        'stopping: handing back did not count the attempt');
}

# A call that never goes out (its request cannot be built) gives back what
# the flow's limits charged for it: three such tasks against a limit of 3
# a day leave all of it to the three good tasks after them.  (A rate of 3 a
# day with a burst of 2, not a day quota: no midnight can fall in between.)
{
    sql(q{SELECT (beat.set_limit('refund:day', 3, per => '1 day', burst => 2)).name});
    sql(qq{SELECT count(*) FROM beat.create_flow('rf',
            request => '{"url": "$BASE/json?key={{k}}&v={{v}}"}',
            workers => 1, max_attempts => 1, limits => '{refund:day}')});
    ok(defined wait_workers('rf', 1, 30), 'refund: flow rf has its worker');
    sql(q{SELECT count(*) FROM beat.enqueue_batch('rf',
            '[{"k": "rf-bad-1"}, {"k": "rf-bad-2"}, {"k": "rf-bad-3"}]'::jsonb)});
    ok(BeatNode::settle($node, 'rf', 20), 'refund: the three tasks without {{v}} end');
    is(sql(q{SELECT count(*) FROM beat.task WHERE flow = 'rf' AND state = 'dead'
             AND last_error LIKE '%missing parameter "v"%'}),
        '3', 'refund: they are dead for the missing parameter');
    is(sql(q{SELECT remaining FROM beat.limiter_status WHERE key = 'refund:day'}), '3',
        'refund: the limit is whole again (nothing was sent)');
    sql(q{SELECT count(*) FROM beat.enqueue_batch('rf',
            '[{"k": "rf-1", "v": 1}, {"k": "rf-2", "v": 2}, {"k": "rf-3", "v": 3}]'::jsonb)});
    ok(BeatNode::settle($node, 'rf', 20), 'refund: the three good tasks end');
    is(sql(q{SELECT count(*) FROM beat.task WHERE flow = 'rf' AND state = 'succeeded'}), '3',
        'refund: all three good tasks got in and succeeded');
    is(sql(q{SELECT remaining FROM beat.limiter_status WHERE key = 'refund:day'}), '0',
        'refund: the limit is spent on the calls that went out');
}

# beat.wait sleeps until the commit that finishes the task wakes it: the
# worker's (a 300 ms answer), and beat.cancel's from another session.  A
# wait woken only by its look each second would take about 1 s.
{
    sql(qq{SELECT beat.create_flow('waited', request => '{"url": "$BASE/json?delay_ms=300"}',
            workers => 1)});
    ok(defined wait_workers('waited', 1, 30), 'wait: flow waited has its worker');
    my @took;
    for my $k (1 .. 3)
    {
        # one session: the wait starts as soon as the enqueue has committed
        my ($state, $ms) = split /\|/, sql(q{
            SELECT beat.enqueue('waited', '{}') AS id \gset
            SELECT beat.wait(:id, '20 s'),
                   round(extract(epoch FROM clock_timestamp() - statement_timestamp()) * 1000)});
        is($state, 'succeeded', "wait $k: beat.wait returns succeeded");
        push @took, $ms;
    }
    @took = sort { $a <=> $b } @took;
    note("wait: took @took ms");
    cmp_ok($took[1], '<', 800, 'wait: the worker\'s commit woke it (median well under the 1 s look)');

    # The trigger task_finished sees every path, a plain UPDATE too.
    sql(q{SELECT beat.pause('waited')});
    my $s = $node->background_psql('postgres');
    my $waiter = $s->query_safe('SELECT pg_backend_pid()');
    chomp $waiter;
    for my $how ([ 'beat.cancel', 'SELECT beat.cancel(%d)', 'cancelled' ],
                 [ 'an UPDATE by hand', q{UPDATE beat.task SET state = 'dead', finished_at = now() WHERE id = %d}, 'dead' ])
    {
        my ($what, $stmt, $state) = @$how;
        my $id = sql(q{SELECT beat.enqueue('waited', '{}')});
        $s->query_until(qr/go/, qq{\\echo go\nSELECT 'waited:' || beat.wait($id, '20 s') || ':'
            || (clock_timestamp() - statement_timestamp() < '800 ms');\n});
        # asleep in beat.wait (on its latch), not still looking
        ok(defined wait_for(qq{SELECT wait_event_type = 'Extension' FROM pg_stat_activity
                               WHERE pid = $waiter}, 10), "wait: the waiter sleeps ($what)");
        sql(sprintf($stmt, $id));
        my $out = $s->query_until(qr/waited:\w+:\w/, '');
        like($out, qr/waited:$state:t/, "wait: $what in another session wakes the waiter at once");
    }
    $s->quit;
    sql(q{SELECT beat.resume('waited')});
}

# SIGHUP: a worker reloads the configuration without restarting.  A body
# of 50,000 bytes is over beat.max_response_size (10kB here); raised to
# 100kB and reloaded, the same worker (same pid) accepts it.
{
    sql(qq{SELECT count(*) FROM beat.create_flow('hup',
            request => '{"url": "$BASE/{{path}}?key={{k}}&{{o1}}={{v1}}&{{o2}}={{v2}}&{{o3}}={{v3}}"}',
            workers => 1, max_attempts => 1)});
    ok(defined wait_workers('hup', 1, 30), 'reload: flow hup has its worker');
    my $pid = worker_pids('hup');
    my $before = enqueue('hup', fparams('hup-1', 'json', size => 50000));
    ok(BeatNode::settle($node, 'hup', 20), 'reload: the large answer ends');
    is(sql(qq{SELECT state FROM beat.task WHERE id = $before}), 'dead',
        'reload: over 10kB it is dead');
    sql(q{ALTER SYSTEM SET beat.max_response_size = '100kB'});
    sql(q{SELECT pg_reload_conf()});
    ok(defined wait_for(q{SELECT current_setting('beat.max_response_size') = '100kB'}, 10),
        'reload: the server has the new setting');
    select(undef, undef, undef, 0.5);    # the worker's SIGHUP sets its latch
    my $after = enqueue('hup', fparams('hup-2', 'json', size => 50000));
    ok(BeatNode::settle($node, 'hup', 20), 'reload: the second large answer ends');
    is(sql(qq{SELECT state FROM beat.task WHERE id = $after}), 'succeeded',
        'reload: under the new 100kB it succeeds');
    is(worker_pids('hup'), $pid, 'reload: the same worker served it (reloaded, not restarted)');
    sql(q{ALTER SYSTEM RESET beat.max_response_size});
    sql(q{SELECT pg_reload_conf()});
    sql(q{SELECT beat.drop_flow('hup', force => true)});
}

# No process of the server crashed (a crash would have restarted them all).
{
    my @crashes = grep { /terminated by signal|all server processes terminated/ }
      split /^/, PostgreSQL::Test::Utils::slurp_file($node->logfile);
    is(join('', @crashes), '', 'no server process crashed during the test');
}

$node->stop;
done_testing();
