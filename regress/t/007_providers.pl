# Providers, routes and credentials (0.4.0) against the local upstream,
# which plays several providers and fails chosen API keys on request
# (POST /_faults): a key that gets 429 rests and another serves; all keys
# limited at once is the provider's limit and the task waits for it; a dead
# provider falls back to the next in the chain and its breaker opens,
# half-opens and closes; a 401 disables a key until a person re-enables it;
# weights hold; a cursor walk stays on one provider; hosts outside the
# allowlist and private addresses are refused; secrets appear nowhere a
# beat_user can read nor in the server log.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use BeatNode;
use BeatUpstream;
use HTTP::Tiny;
use JSON::PP;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep gettimeofday tv_interval);

my $up   = BeatUpstream->start;
my $BASE = $up->base;
my $http = HTTP::Tiny->new(timeout => 10);

# Set per-key faults on the upstream (undef: clear them all).
sub faults { return $up->faults(@_); }

my $node = BeatNode::start('providers', q{
beat.reaper_interval = '200ms'
});

sub sql { return $node->safe_psql('postgres', $_[0]); }

# Run $q until it prints $expected; on a timeout, show the unfinished tasks.
sub wait_for
{
	my $took = BeatNode::wait_for($node, @_);
	diag sql(q{SELECT id, state, attempts, provider, last_error FROM beat.task
	           WHERE state <> 'succeeded' ORDER BY id DESC LIMIT 10})
	  unless defined $took;
	return $took;
}

# Wait until every task of flow has ended (succeeded, dead or cancelled).
sub settle { return BeatNode::settle($node, $_[0], $_[1] // 30); }

my $SECRET_A = 'sk_live_AAAA_1f9c2e7d';
my $SECRET_B = 'sk_live_BBBB_7a3b9e01';
my $SECRET_C = 'tok_CCCC_55e8d0b2';
my $SECRET_Q = 'qsecret_DDDD_9e1';

# acme: the profile of a handle, key in a header.  Its breaker opens after
# 3 failures in a row and cools down for 2 s.
sql(qq{SELECT beat.set_provider('acme', base_url => '$BASE/acme/v1',
        operations => '{"profile": {"url": "/profiles/{{handle}}"},
                        "posts": {"url": "/profiles/{{handle}}/posts",
                                  "query": {"limit": "4", "cursor": "{{cursor?}}"},
                                  "cursor": {"path": "\$.paging.next_cursor",
                                             "more": "\$.paging.has_more", "param": "cursor"}}}',
        timeout => '2 s', breaker_failures => 3, breaker_cooldown => '2 s')});
# Statement logging would record the calls that add keys (the README says
# so): add them with it off, as an administrator should.
sub add_key { return sql("SET log_statement = 'none'; $_[0]"); }
my $A = add_key(qq{SELECT beat.add_credential('acme', '{"headers": {"X-Api-Key": "$SECRET_A"}}', 'a')});
my $B = add_key(qq{SELECT beat.add_credential('acme', '{"headers": {"X-Api-Key": "$SECRET_B"}}', 'b')});
# bravo: the fallback for profiles, key as a query parameter
sql(qq{SELECT beat.set_provider('bravo', base_url => '$BASE/bravo/api',
        operations => '{"profile": {"url": "/user", "query": {"username": "{{handle}}"}}}')});
my $Q = add_key(qq{SELECT beat.add_credential('bravo', '{"query": {"api_key": "$SECRET_Q"}}')});
sql(q{SELECT beat.set_route('profile', 'acme', rank => 1)});
sql(q{SELECT beat.set_route('profile', 'bravo', rank => 2)});
sql(q{SELECT beat.create_flow('profiles', operation => 'profile', workers => 1,
        concurrency => 1, max_attempts => 3, backoff_base => '100 ms', backoff_cap => '200 ms')});

# The credential labels of the flow's transfers since id $since, in order.
sub calls
{
	my ($since) = @_;
	return sql(qq{SELECT string_agg(coalesce(c.label, l.provider) || ':' || l.outcome, ' ' ORDER BY l.id)
	              FROM beat.http_log l LEFT JOIN beat.credential c ON c.id = l.credential_id
	              WHERE l.id > $since AND l.flow = 'profiles'});
}
sub last_log { return sql(q{SELECT coalesce(max(id), 0) FROM beat.http_log}); }

# ------------------------------------------------ a 429 on one key
faults({ $SECRET_A => { status => 429, retry_after => 2, count => 1 } });
my $mark = last_log();
my $t1 = sql(q{SELECT beat.enqueue('profiles', '{"handle": "jane_doe"}')});
ok(settle('profiles'), 'the task of a 429 completes');
is(sql(qq{SELECT state || ' ' || attempts || ' ' || credential_id FROM beat.task WHERE id = $t1}),
	"succeeded 1 $B", 'A got 429, B served it in the same attempt');
is(calls($mark), 'a:rate_limited b:ok', 'the log shows the rate limit, then the other key');
ok(sql(qq{SELECT disabled_until > now() + '1 s' AND failure_streak = 1
          FROM beat.credential WHERE id = $A}) eq 't', 'A rests about Retry-After');
$mark = last_log();
sql(q{SELECT beat.enqueue_batch('profiles', ARRAY['{"handle": "u1"}', '{"handle": "u2"}',
        '{"handle": "u3"}']::jsonb[])});
ok(settle('profiles'), 'more tasks complete');
is(calls($mark), 'b:ok b:ok b:ok', 'while A rests, B serves every call');
my $rest = sql(qq{SELECT greatest(extract(epoch FROM disabled_until - now()), 0)
                  FROM beat.credential WHERE id = $A});
usleep(int(($rest + 0.3) * 1e6));
$mark = last_log();
sql(q{SELECT beat.enqueue('profiles', '{"handle": "u4"}')});
ok(settle('profiles'), 'a task after the rest completes');
is(calls($mark), 'a:ok', 'A is back after its rest, as the least recently used key');

# ------------------------------------------------ every key limited at once
faults({ $SECRET_A => { status => 429, retry_after => 2, count => 1 },
		 $SECRET_B => { status => 429, retry_after => 2, count => 1 } });
sql(q{SELECT beat.drop_route('profile', 'bravo')});
$mark = last_log();
my $t0 = [gettimeofday];
my $t2 = sql(q{SELECT beat.enqueue('profiles', '{"handle": "u5"}')});
ok(defined wait_for(qq{SELECT state = 'scheduled' FROM beat.task WHERE id = $t2}, 10),
	'all keys limited: the task waits');
like(sql(q{SELECT reason FROM beat.provider_health WHERE provider = 'acme'}),
	qr/every credential got 429/, 'provider_health says why');
like(sql(qq{SELECT last_error FROM beat.task WHERE id = $t2}), qr/waiting: acme: /,
	'the task says why it waits');
ok(settle('profiles'), 'the waiting task completes');
my $took = tv_interval($t0);
ok($took >= 1.8, "it waited for the provider's limit (${took}s)");
is(sql(qq{SELECT state || ' ' || attempts FROM beat.task WHERE id = $t2}), 'succeeded 1',
	'the wait cost no attempt');
like(calls($mark), qr/^(a:rate_limited b:rate_limited|b:rate_limited a:rate_limited) [ab]:ok$/,
	'both keys got 429, then one served');
is(sql(qq{SELECT count(*) FROM beat.credential WHERE provider = 'acme' AND disabled_until > now()}),
	'0', 'the keys are not blamed for the provider limit');
sql(q{SELECT beat.set_route('profile', 'bravo', rank => 2)});

# ------------------------------------------------ a dead provider: fallback and breaker
faults({ $SECRET_A => { status => 503 }, $SECRET_B => { status => 503 } });
$mark = last_log();
sql(qq{SELECT beat.enqueue('profiles', jsonb_build_object('handle', 'f' || i)) FROM generate_series(1, 5) i});
ok(settle('profiles'), 'every task completes while acme is down');
is(sql(q{SELECT count(*) FROM beat.task WHERE flow = 'profiles' AND params->>'handle' LIKE 'f%'
         AND state = 'succeeded' AND provider = 'bravo' AND attempts = 1}),
	'5', 'each fell back to bravo within its first attempt');
is(sql(qq{SELECT count(*) FILTER (WHERE outcome = 'fallback') || ' ' || count(*) FILTER (WHERE provider = 'bravo')
          FROM beat.http_log WHERE id > $mark}),
	'3 5', 'three calls to acme failed over, then its breaker stopped the calls');
is(sql(q{SELECT breaker FROM beat.provider_health WHERE provider = 'acme'}), 'open',
	'the breaker is open');
faults(undef);
usleep(2_200_000);
is(sql(q{SELECT breaker FROM beat.provider_health WHERE provider = 'acme'}), 'half-open',
	'after the cool-down it is half-open');
my $t3 = sql(q{SELECT beat.enqueue('profiles', '{"handle": "probe"}')});
ok(settle('profiles'), 'the probe task completes');
is(sql(qq{SELECT provider FROM beat.task WHERE id = $t3}), 'acme', 'the probe went to acme');
is(sql(q{SELECT breaker FROM beat.provider_health WHERE provider = 'acme'}), 'closed',
	'a successful probe closes the breaker');

# ------------------------------------------------ 401 disables a key
faults({ $SECRET_A => { status => 401 } });
$mark = last_log();
sql(q{SELECT beat.enqueue_batch('profiles', ARRAY['{"handle": "v1"}', '{"handle": "v2"}',
        '{"handle": "v3"}', '{"handle": "v4"}']::jsonb[])});
ok(settle('profiles'), 'tasks complete with a revoked key');
like(calls($mark), qr/^(b:ok )*a:auth_failed b:ok( b:ok)*$/, 'A failed once, then only B');
is(sql(qq{SELECT enabled::text || ' ' || (disabled_reason LIKE 'HTTP 401%') FROM beat.credential WHERE id = $A}),
	'false true', 'the key is disabled, saying why');
faults(undef);
usleep(300_000);
$mark = last_log();
sql(q{SELECT beat.enqueue_batch('profiles', ARRAY['{"handle": "w1"}', '{"handle": "w2"}']::jsonb[])});
ok(settle('profiles'), 'more tasks complete');
is(calls($mark), 'b:ok b:ok', 'a disabled key stays out');
sql(qq{SELECT beat.enable_credential($A)});
$mark = last_log();
sql(q{SELECT beat.enqueue_batch('profiles', ARRAY['{"handle": "x1"}', '{"handle": "x2"}']::jsonb[])});
ok(settle('profiles'), 'tasks after re-enabling complete');
is(calls($mark), 'a:ok b:ok', 'a re-enabled key serves again');

# ------------------------------------------------ weights
sql(qq{SELECT beat.set_provider('w70', base_url => '$BASE', operations => '{"echo": {"url": "/json"}}')});
sql(qq{SELECT beat.set_provider('w30', base_url => '$BASE', operations => '{"echo": {"url": "/json"}}')});
sql(q{SELECT beat.set_route('echo', 'w70', weight => 70)});
sql(q{SELECT beat.set_route('echo', 'w30', weight => 30)});
sql(q{SELECT beat.create_flow('weighted', operation => 'echo', workers => 2, concurrency => 32)});
sql(q{SELECT beat.enqueue_batch('weighted', array_agg('{}'::jsonb)) FROM generate_series(1, 2000)});
ok(settle('weighted', 120), '2,000 weighted tasks complete');
my $share = sql(q{SELECT round(100.0 * count(*) FILTER (WHERE provider = 'w70') / count(*), 1)
                  FROM beat.task WHERE flow = 'weighted' AND state = 'succeeded'});
ok(abs($share - 70) <= 5, "weights 70/30 hold: w70 served $share%");

# ------------------------------------------------ a provider limit nobody defined
# A provider may name a limit that is not defined (yet): its calls wait and
# say why, and the worker goes on; once the limit is defined they go out.
sql(qq{SELECT beat.set_provider('undef', base_url => '$BASE',
        operations => '{"undef": {"url": "/json"}}', limits => ARRAY['undef:day'])});
sql(q{SELECT beat.set_route('undef', 'undef')});
sql(q{SELECT beat.create_flow('undef', operation => 'undef', workers => 1)});
ok(defined BeatNode::wait_workers($node, 'undef', 1, 30), 'flow undef has its worker');
my $upid = sql(q{SELECT pid FROM beat.worker_status WHERE flow = 'undef'});
my $uid = sql(q{SELECT beat.enqueue('undef', '{}')});
ok( defined BeatNode::wait_for($node, qq{SELECT state = 'scheduled'
        AND last_error LIKE '%no rate limit matches key "undef:day"%' FROM beat.task WHERE id = $uid}, 10),
    'an undefined provider limit: the call waits, and says why');
is(sql(q{SELECT pid FROM beat.worker_status WHERE flow = 'undef'}), $upid,
    'the worker goes on (same pid)');
sql(q{SELECT (beat.set_limit('undef:day', 1000, quota => 'day')).name});
sql(qq{UPDATE beat.task SET run_at = now() WHERE id = $uid});	# not the 60 s it waits
ok(settle('undef'), 'once the limit is defined, the call goes out');
is(sql(qq{SELECT state FROM beat.task WHERE id = $uid}), 'succeeded', 'and succeeds');

# ------------------------------------------------ a cursor walk stays on its provider
sql(qq{SELECT beat.set_provider('charlie', base_url => '$BASE/charlie',
        operations => '{"posts": {"url": "/graph/posts",
                                  "query": {"id": "{{handle}}", "limit": "4", "after": "{{cursor?}}"},
                                  "cursor": {"link": "after", "param": "cursor"}}}')});
sql(q{SELECT beat.set_route('posts', 'acme')});
sql(q{SELECT beat.create_flow('posts', operation => 'posts', workers => 1, concurrency => 4)});
# handles with 17 to 20 posts: five pages of 4
my @handles;
for my $i (1 .. 400)
{
	my $r = $http->get("$BASE/posts/user$i");
	my $n = scalar @{ decode_json($r->{content})->{posts} };
	push @handles, ["user$i", $n] if $n >= 17 && $n <= 20;
	last if @handles == 6;
}
is(scalar @handles, 6, 'found handles with five pages of posts');
# three walks on acme (cursor in the body), then three on charlie (Link)
sql(qq{SELECT beat.enqueue('posts', jsonb_build_object('handle', '$_->[0]'))}) for @handles[0 .. 2];
ok(settle('posts', 60), 'the walks on acme complete');
sql(q{SELECT beat.drop_route('posts')});
sql(q{SELECT beat.set_route('posts', 'charlie')});
sql(qq{SELECT beat.enqueue('posts', jsonb_build_object('handle', '$_->[0]'))}) for @handles[3 .. 5];
ok(settle('posts', 60), 'the walks on charlie complete');
for my $h (@handles)
{
	my ($name, $n) = @$h;
	is(sql(qq{SELECT count(*) || ' ' || count(DISTINCT provider) || ' ' || max((params->>'page')::int)
	           || ' ' || sum(jsonb_array_length(coalesce(result->'body'->'data', result->'body'->'result')))
	           FROM beat.task WHERE flow = 'posts' AND params->>'handle' = '$name'}),
		"5 1 5 $n", "$name: 5 pages, one provider, all $n posts");
}
is(sql(q{SELECT string_agg(DISTINCT provider, ' ') FROM beat.task WHERE flow = 'posts'}),
	'acme charlie', 'both pagination styles walked');
# a continuation whose provider left: it fails naming the provider
sql(q{SELECT beat.pause('posts')});
my $orphan = sql(q{SELECT beat.enqueue('posts', '{"handle": "user1", "cursor": "c1.x", "page": 2}')});
sql(qq{UPDATE beat.task SET provider = 'ghost' WHERE id = $orphan});
sql(q{SELECT beat.resume('posts')});
ok(defined wait_for(qq{SELECT state = 'dead' FROM beat.task WHERE id = $orphan}, 10),
	'a page whose provider left dies');
like(sql(qq{SELECT last_error FROM beat.task WHERE id = $orphan}),
	qr/cursor belongs to provider "ghost"/, 'saying the cursor belongs to that provider');

# ------------------------------------------------ allowlist and private addresses
sql(qq{SELECT beat.set_provider('fenced', base_url => '$BASE', allowed_hosts => ARRAY['api.example.com'],
        operations => '{"hop": {"url": "/json", "query": {"key": "fenced"}}}')});
sql(q{SELECT (beat.set_limit('hopper-day', 10, per => '1 day', burst => 9)).name});
sql(qq{SELECT beat.set_provider('hopper', base_url => '$BASE', limits => ARRAY['hopper-day'],
        operations => '{"hop": {"url": "/redirect", "query": {"to": "http://localhost:@{[ $BASE =~ /:(\d+)$/ ]}/json?key=leak"}}}')});
sql(q{SELECT beat.create_flow('fenced', operation => 'hop', workers => 1)});
sql(q{SELECT beat.set_route('hop', 'fenced')});
$up->reset;
my $f1 = sql(q{SELECT beat.enqueue('fenced', '{}')});
ok(settle('fenced'), 'the fenced task ends');
is(sql(qq{SELECT state || ': ' || last_error FROM beat.task WHERE id = $f1}),
	'dead: request refused: host 127.0.0.1 is not in the allowed hosts of provider "fenced"',
	'a host outside the allowlist is refused');
sql(q{SELECT beat.drop_route('hop')});
sql(q{SELECT beat.set_route('hop', 'hopper')});
my $f2 = sql(q{SELECT beat.enqueue('fenced', '{}')});
ok(settle('fenced'), 'the redirected task ends');
like(sql(qq{SELECT state || ': ' || last_error FROM beat.task WHERE id = $f2}),
	qr/^dead: request refused: host localhost is not in the allowed hosts/,
	'a redirect to a host outside the allowlist is refused');
is(sql(q{SELECT remaining FROM beat.limiter_status WHERE key = 'hopper-day'}), '9',
	'the redirected call went out: its charge to the provider stays');
my $st = $up->stats;
is(($st->{by_key}{fenced} // 0) + ($st->{by_key}{leak} // 0), 0,
	'the refused requests never reached the upstream');
$node->append_conf('postgresql.conf', 'beat.allow_private_addresses = off');
$node->reload;
sql(q{SELECT (beat.set_limit('plain-day', 10, per => '1 day', burst => 9)).name});
sql(qq{SELECT beat.create_flow('plain', request => '{"url": "$BASE/json?key=private"}', workers => 1,
        limits => '{plain-day}')});
my $f3 = sql(q{SELECT beat.enqueue('plain', '{}')});
ok(settle('plain'), 'the private task ends');
like(sql(qq{SELECT state || ': ' || last_error FROM beat.task WHERE id = $f3}),
	qr/^dead: request refused: address 127\.0\.0\.1 is loopback or private/,
	'a loopback address is refused unless beat.allow_private_addresses');
is($up->stats->{by_key}{private} // 0, 0, 'nothing was sent to it');
is(sql(q{SELECT outcome FROM beat.http_log WHERE flow = 'plain'}), 'refused', 'logged as refused');
is(sql(q{SELECT remaining FROM beat.limiter_status WHERE key = 'plain-day'}), '10',
	'a call refused before it went out gives the flow its charge back');
$node->append_conf('postgresql.conf', 'beat.allow_private_addresses = on');
$node->reload;

# ------------------------------------------------ a long hop keeps its lease
# three providers, each 0.7 s; the first two answer 503: one attempt of
# 2.1 s, twice the flow's 1 s lease.  Each call that goes on renews it, so
# the reaper leaves the task alone and it is called three times, not more.
for my $h ([ 'hop1', 1, '503' ], [ 'hop2', 2, '503' ], [ 'hop3', 3, '200' ])
{
	my ($name, $rank, $status) = @$h;
	sql(qq{SELECT beat.set_provider('$name', base_url => '$BASE',
	        operations => '{"slow": {"url": "/json", "query": {"delay_ms": "700", "status": "$status",
	                                                          "key": "$name"}}}')});
	sql(qq{SELECT beat.set_route('slow', '$name', rank => $rank)});
}
sql(q{SELECT beat.create_flow('slow', operation => 'slow', workers => 1, lease => '1 second')});
my $slow = sql(q{SELECT beat.enqueue('slow', '{}')});
ok(settle('slow'), 'a task that falls back twice, each call 0.7 s');
is(sql(qq{SELECT state || ' ' || attempts FROM beat.task WHERE id = $slow}), 'succeeded 1',
	'succeeds in its one attempt, past its 1 s lease');
is(sql(qq{SELECT string_agg(provider || ':' || outcome, ' ' ORDER BY id) FROM beat.http_log
          WHERE task_id = $slow}), 'hop1:fallback hop2:fallback hop3:ok',
	'three calls, none lost to the reaper');

# ------------------------------------------------ the provider's own limit backs off
# one key, 429 without Retry-After four times: each 429 is the provider's
# limit, and the waits double from rest_base (0.2 s): at least 0.2 + 0.2 +
# 0.4 + 0.8 s with jitter, where a flat wait would take 0.8 s.
sql(qq{SELECT beat.set_provider('lone', base_url => '$BASE', rest_base => '200 ms',
        operations => '{"ping": {"url": "/json", "query": {"key": "lone"}}}')});
add_key(q{SELECT beat.add_credential('lone', '{"headers": {"X-Api-Key": "lone-key"}}')});
sql(q{SELECT beat.set_route('ping', 'lone')});
sql(q{SELECT beat.create_flow('lone', operation => 'ping', workers => 1)});
faults({ 'lone-key' => { status => 429, count => 4 } });
my $lone = sql(q{SELECT beat.enqueue('lone', '{}')});
ok(settle('lone'), 'a task whose only key gets 429 four times');
is(sql(qq{SELECT string_agg(outcome, ' ' ORDER BY id) FROM beat.http_log WHERE task_id = $lone}),
	'rate_limited rate_limited rate_limited rate_limited ok', 'waits four times, then succeeds');
cmp_ok(sql(qq{SELECT extract(epoch FROM finished_at - created_at) FROM beat.task WHERE id = $lone}),
	'>=', 1.5, 'the waits doubled (at least 1.6 s in all, not 0.8 s)');
faults(undef);

# ------------------------------------------------ a probe that was never sent is given back
# the breaker opens (one 503, cool-down 6 s) and half-opens; its one probe
# goes to a task whose request cannot be built.  That call was never made,
# so the next task probes at once instead of after the rest of the
# cool-down (at least 4 s: the unsent task and its settle take far less
# than 2 s).
sql(qq{SELECT beat.set_provider('probed', base_url => '$BASE', breaker_failures => 1,
        breaker_cooldown => '6 seconds', breaker_probes => 1,
        operations => '{"probe": {"url": "/json", "query": {"key": "probed", "id": "{{id}}"}}}')});
add_key(q{SELECT beat.add_credential('probed', '{"headers": {"X-Api-Key": "probed-key"}}')});
sql(q{SELECT beat.set_route('probe', 'probed')});
sql(q{SELECT beat.create_flow('probe', operation => 'probe', workers => 1, max_attempts => 1)});
faults({ 'probed-key' => { status => 503, count => 1 } });
sql(q{SELECT beat.enqueue('probe', '{"id": 1}')});
ok(settle('probe'), 'a 503 opens the breaker');
ok( wait_for(q{SELECT breaker = 'half-open' OR (breaker = 'open' AND open_until <= now())
               FROM beat.provider_health WHERE provider = 'probed'}, 10),
	'which half-opens after its cool-down');
my $unbuilt = sql(q{SELECT beat.enqueue('probe', '{"no_id": 1}')});
ok(settle('probe'), 'a task whose request cannot be built takes the probe');
like(sql(qq{SELECT last_error FROM beat.task WHERE id = $unbuilt}), qr/request not sent/, 'and is not sent');
my $next = sql(q{SELECT beat.enqueue('probe', '{"id": 2}')});
ok(settle('probe'), 'the next task');
cmp_ok(sql(qq{SELECT extract(epoch FROM finished_at - created_at) FROM beat.task WHERE id = $next}),
	'<', 2.5, 'probes at once (not after the rest of the 6 s cool-down)');
is(sql(q{SELECT breaker FROM beat.provider_health WHERE provider = 'probed'}), 'closed',
	'and closes the breaker');
faults(undef);

# ------------------------------------------------ a charge for a call never sent is given back
# the provider's limits are charged when a key is chosen, before the
# request is built; a task whose request cannot be built (no {{id}}) was
# never sent, so its provider and per-key limits are whole again after it.
sql(qq{SELECT beat.set_provider('unsent', base_url => '$BASE',
        operations => '{"unsent": {"url": "/json", "query": {"id": "{{id}}"}}}',
        limits => ARRAY['unsent:day', 'unsent-key:{{credential}}'])});
my $U = add_key(q{SELECT beat.add_credential('unsent', '{"headers": {"X-Api-Key": "unsent-key"}}')});
# (rates of 3 a day with a burst of 2: unlike a day quota, no midnight can
# fall between the charges and the checks)
sql(q{SELECT (beat.set_limit('unsent:day', 3, per => '1 day', burst => 2)).name});
sql(q{SELECT (beat.set_limit('unsent-key:{{credential}}', 3, per => '1 day', burst => 2)).name});
sql(q{SELECT beat.set_route('unsent', 'unsent')});
sql(q{SELECT beat.create_flow('unsent', operation => 'unsent', workers => 1, max_attempts => 1)});
sql(q{SELECT beat.enqueue_batch('unsent', array_agg('{"no_id": 1}'::jsonb)) FROM generate_series(1, 3)});
ok(settle('unsent'), 'three tasks whose request cannot be built end');
is(sql(q{SELECT count(*) FROM beat.task WHERE flow = 'unsent' AND state = 'dead'
         AND last_error LIKE '%request not sent%'}), '3', 'dead, not sent');
is(sql(qq{SELECT string_agg(key || '=' || remaining, ' ' ORDER BY key) FROM beat.limiter_status
          WHERE key IN ('unsent:day', 'unsent-key:$U')}),
	"unsent-key:$U=3 unsent:day=3", 'both limits are whole again');
sql(q{SELECT beat.enqueue_batch('unsent', array_agg(jsonb_build_object('id', i))) FROM generate_series(1, 3) i});
ok(settle('unsent'), 'three good tasks end');
is(sql(q{SELECT count(*) FROM beat.task WHERE flow = 'unsent' AND state = 'succeeded'}), '3',
	'all three got in and succeeded');
is(sql(qq{SELECT string_agg(key || '=' || remaining, ' ' ORDER BY key) FROM beat.limiter_status
          WHERE key IN ('unsent:day', 'unsent-key:$U')}),
	"unsent-key:$U=0 unsent:day=0", 'the limits are spent on the calls that went out');

# ------------------------------------------------ a datetime rule across time zones
# a rule whose path compares a timestamp without a time zone with one that
# has one: the worker evaluates it with the session's time zone (the _tz
# JSONPath functions) instead of raising, which would kill it.
sql(qq{SELECT beat.set_provider('dated', base_url => '$BASE',
        operations => '{"dated": {"url": "/json", "query": {"t": "2024-01-01T00:00:00"}}}',
        rules => '[{"status": 200, "path": "\$.query.t ? (@.datetime() < \\"2030-01-01T00:00:00+00:00\\".datetime())",
                    "outcome": "permanent"}]')});
sql(q{SELECT beat.set_route('dated', 'dated')});
sql(q{SELECT beat.create_flow('dated', operation => 'dated', workers => 1, max_attempts => 2)});
my $dated = sql(q{SELECT beat.enqueue('dated', '{}')});
ok(settle('dated'), 'a task whose answer a datetime rule judges');
is(sql(qq{SELECT state || ' ' || attempts FROM beat.task WHERE id = $dated}), 'dead 1',
	'is judged by the rule (permanent) in its first attempt');
is(sql(q{SELECT count(*) FROM beat.http_log WHERE flow = 'dated'}), '1', 'with one call');

# ------------------------------------------------ secrets
# an upstream that echoes the key back: the result must not keep it
sql(qq{SELECT beat.set_provider('echoer', base_url => '$BASE',
        operations => '{"echo2": {"url": "/json", "query": {"q": "1"}}}')});
my $C = add_key(qq{SELECT beat.add_credential('echoer', '{"headers": {"Authorization": "Bearer $SECRET_C"},
                                                      "query": {"token": "$SECRET_Q"}}')});
sql(q{SELECT beat.create_flow('echoes', operation => 'echo2', workers => 1)});
sql(q{SELECT beat.set_route('echo2', 'echoer')});
sql(q{SELECT beat.enqueue('echoes', '{}')});
ok(settle('echoes'), 'the echo task completes');
like(sql(q{SELECT result->'body'->'headers'->>'authorization' FROM beat.task WHERE flow = 'echoes'}),
	qr/^\*{20,}$/, 'a secret echoed in the body is overwritten in the result');
like(sql(q{SELECT url FROM beat.http_log WHERE flow = 'echoes'}), qr/token=\*\*\*/,
	'a secret query parameter is hidden in the log');
sql(q{CREATE ROLE reader LOGIN IN ROLE beat_user});
my @leaks;
for my $rel (split /\n/, sql(q{
	SELECT c.oid::regclass::text || '|' || string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum)
	FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
	WHERE c.relnamespace = 'beat'::regnamespace AND c.relkind IN ('r', 'v')
	  AND has_column_privilege('beat_user', c.oid, a.attnum, 'SELECT')
	GROUP BY c.oid}))
{
	my ($name, $cols) = split /\|/, $rel;
	my $dump = $node->safe_psql('postgres', "SELECT ($cols) FROM $name", extra_params => [ '-U', 'reader' ]);
	push @leaks, $name if grep { index($dump, $_) >= 0 } ($SECRET_A, $SECRET_B, $SECRET_C, $SECRET_Q);
}
is("@leaks", '', 'no secret in anything beat_user can read');
my ($ret, $out, $err) = $node->psql('postgres', 'SELECT secret FROM beat.credential', extra_params => [ '-U', 'reader' ]);
like($err, qr/permission denied/, 'beat_user cannot read the secrets');
my $log = slurp_file($node->logfile);
is(scalar(grep { index($log, $_) >= 0 } ($SECRET_A, $SECRET_B, $SECRET_C, $SECRET_Q)), 0,
	'no secret in the server log');

$node->stop;
done_testing();
