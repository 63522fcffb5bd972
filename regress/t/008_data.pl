# From response to data (0.5.0) against the local upstream: three
# providers' JSON shapes land as the same entity model; a changed metric
# shows its delta in an event; a LISTEN client gets every event of a run and
# a consumer that goes away midway catches up with no gap and no duplicate;
# an answer that does not match its mapping writes nothing and says why;
# pg_cron runs beat.refresh, and overlapping runs enqueue each stale entity
# once.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use BeatNode;
use BeatUpstream;
use Digest::SHA qw(sha256);
use HTTP::Tiny;
use IPC::Run;
use List::Util;
use JSON::PP;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

my $up   = BeatUpstream->start;
my $BASE = $up->base;
my $http = HTTP::Tiny->new(timeout => 10);

my $listen = $ENV{PG_BEAT_LISTEN} // "$FindBin::RealBin/../demo/listen";
die "no LISTEN client at $listen (make builds demo/listen)\n" unless -x $listen;

my $node = BeatNode::start('data', q{
shared_preload_libraries = 'pg_beat,pg_cron'
cron.database_name = 'postgres'
cron.use_background_workers = on
beat.reaper_interval = '200ms'
});

sub sql { return $node->safe_psql('postgres', $_[0]); }

sub wait_for
{
	my $took = BeatNode::wait_for($node, @_);
	diag sql(q{SELECT id, flow, state, attempts, provider, last_error FROM beat.task
	           WHERE state <> 'succeeded' ORDER BY id DESC LIMIT 10})
	  unless defined $took;
	return $took;
}

# Every task of flow ended.
sub settle { return BeatNode::settle($node, @_); }

# ------------------------------------------------ providers, mappings, flows
sql(qq{SELECT beat.set_provider('acme', base_url => '$BASE/acme/v1',
    operations => '{"profile": {"url": "/profiles/{{handle}}"},
                    "posts": {"url": "/profiles/{{handle}}/posts",
                              "query": {"limit": "10", "cursor": "{{cursor?}}"},
                              "cursor": {"path": "\$.paging.next_cursor",
                                         "more": "\$.paging.has_more", "param": "cursor"},
                              "max_pages": 1}}')});
sql(qq{SELECT beat.set_provider('bravo', base_url => '$BASE/bravo/api',
    operations => '{"profile": {"url": "/user", "query": {"username": "{{handle}}"}}}')});
sql(qq{SELECT beat.set_provider('charlie', base_url => '$BASE/charlie',
    operations => '{"profile": {"url": "/graph", "query": {"fields": "profile", "id": "{{handle}}"}}}')});

# One model (platform social, kind profile) from three shapes: acme nests
# under data, bravo sends numbers and booleans as strings and sometimes no
# bio, charlie puts the profile in a list of typed results.
my %spec = (
	acme => q{{"key": "$.data.username",
		"dimensions": {"bio": {"path": "$.data.biography", "optional": true},
		               "verified": {"path": "$.data.is_verified", "type": "boolean"},
		               "avatar": "$.data.profile_pic"},
		"metrics": {"followers": {"path": "$.data.follower_count", "type": "integer"},
		            "following": {"path": "$.data.following_count", "type": "integer"},
		            "posts": {"path": "$.data.media_count", "type": "integer"},
		            "engagement": "$.data.engagement"}}},
	bravo => q{{"key": "$.user.handle",
		"dimensions": {"bio": {"path": "$.user.bio", "optional": true},
		               "verified": {"path": "$.user.verified", "type": "boolean"},
		               "avatar": "$.user.avatar"},
		"metrics": {"followers": {"path": "$.user.stats.followers", "type": "integer"},
		            "following": {"path": "$.user.stats.following", "type": "integer"},
		            "posts": {"path": "$.user.stats.posts", "type": "integer"},
		            "engagement": "$.user.engagement_rate"}}},
	charlie => q{{"key": "$.result[*] ? (@.type == \"profile\").attributes.screen_name",
		"dimensions": {"bio": {"path": "$.result[*] ? (@.type == \"profile\").attributes.description", "optional": true},
		               "verified": {"path": "$.result[*] ? (@.type == \"profile\").attributes.verified", "type": "boolean"},
		               "avatar": "$.result[*] ? (@.type == \"profile\").attributes.image"},
		"metrics": {"followers": {"path": "$.result[*] ? (@.type == \"profile\").attributes.counts.followers", "type": "integer"},
		            "following": {"path": "$.result[*] ? (@.type == \"profile\").attributes.counts.friends", "type": "integer"},
		            "posts": {"path": "$.result[*] ? (@.type == \"profile\").attributes.counts.statuses", "type": "integer"},
		            "engagement": "$.result[*] ? (@.type == \"profile\").attributes.er"}}},
);
for my $p (sort keys %spec)
{
	(my $s = $spec{$p}) =~ s/'/''/g;
	sql(qq{SELECT beat.set_mapping('$p', 'profile', 'social', 'profile', '$s')});
}
sql(q{SELECT beat.set_mapping('acme', 'posts', 'social', 'profile', '{"key": "$params.handle",
    "items": {"path": "$.data[*]", "kind": "post", "key": "$.id",
              "dimensions": {"caption": "$.caption", "taken_at": "$.taken_at"},
              "metrics": {"likes": {"path": "$.like_count", "type": "integer"},
                          "comments": {"path": "$.comment_count", "type": "integer"}}}}')});
sql(q{SELECT beat.create_flow('profiles', operation => 'profile', workers => 1, concurrency => 16,
                              max_attempts => 1)});
sql(q{SELECT beat.create_flow('posts', operation => 'posts', workers => 1, concurrency => 16)});

# handles bravo gives a bio (it leaves it out for ~1 in 10)
sub bravo_has_bio { return ord(substr(sha256($_[0]), 24, 1)) % 10 != 0; }
my @handles = grep { bravo_has_bio($_) } map { "shape$_" } 1 .. 30;
@handles = @handles[ 0 .. 19 ];
my $list = join(',', map { "'$_'" } @handles);

sub enqueue_profiles
{
	my ($flow, @h) = @_;
	sql(qq{SELECT count(*) FROM beat.enqueue_batch('$flow',
	       ARRAY[@{[ join(',', map { "'{\"handle\": \"$_\"}'::jsonb" } @h) ]}])});
}

# The model each answer of provider $p gave (its stored result, parsed
# again): one line per handle, independent of what other providers merged
# into the entity rows.
sub models
{
	my ($p) = @_;
	return sql(qq{SELECT string_agg(format('%s %s %s', m->>'key', m->'dimensions', m->'metrics'),
	                                E'\\n' ORDER BY m->>'key')
	              FROM (SELECT beat.parse(t.provider, 'profile', t.result, t.params) AS m
	                    FROM beat.task t WHERE t.flow = 'profiles' AND t.provider = '$p'
	                      AND t.state = 'succeeded' AND t.params->>'handle' IN ($list)) x});
}

# The entity rows of @handles, as text.
sub snapshot
{
	return sql(qq{SELECT string_agg(format('%s %s %s', key, dimensions, metrics), E'\\n' ORDER BY key)
	              FROM beat.entity WHERE platform = 'social' AND kind = 'profile' AND key IN ($list)});
}

# ------------------------------------------------ each shape, one model
my %snap;
my $events_before = sql(q{SELECT count(*) FROM beat.event});
for my $p (qw(acme bravo charlie))
{
	sql(q{DELETE FROM beat.route WHERE operation = 'profile'});
	sql(qq{SELECT beat.set_route('profile', '$p')});
	enqueue_profiles('profiles', @handles);
	ok(settle('profiles'), "$p: 20 profiles fetched");
	is(sql(qq{SELECT count(*) FROM beat.entity WHERE kind = 'profile' AND key IN ($list)
	          AND provider = '$p'}), '20', "$p: wrote all 20 entities");
	$snap{$p} = snapshot();
}
my %model = map { $_ => models($_) } qw(acme bravo charlie);
is(scalar(() = $model{acme} =~ /^/mg), 20, 'acme\'s answers give 20 models');
is($model{bravo},   $model{acme}, 'bravo\'s shape gives the same model as acme\'s, answer by answer');
is($model{charlie}, $model{acme}, 'charlie\'s shape gives the same model as acme\'s, answer by answer');
is($snap{charlie}, $snap{acme}, 'and the entities stay as acme\'s answers left them');
is(sql(qq{SELECT count(*) FROM beat.event WHERE id > 0 AND topic = 'entity.updated'
          AND key IN ($list)}), '0', 'so the second and third provider changed nothing: no entity.updated');
is(sql(qq{SELECT count(*) FROM beat.event WHERE topic = 'entity.created' AND key IN ($list)}),
	'20', 'one entity.created per profile');
is(sql(qq{SELECT count(*) FROM beat.observation o JOIN beat.entity e ON e.id = o.entity_id
          WHERE e.key IN ($list)}), '60', 'an observation per fetch (3 per profile)');

# and the model holds the provider's numbers (the canonical /profile/<h>)
my $canon = decode_json($http->get("$BASE/profile/$handles[0]")->{content});
is( sql(qq{SELECT format('%s %s %s %s %s', m->'metrics'->'followers', m->'metrics'->'following',
                         m->'metrics'->'posts', m->'metrics'->'engagement', m->'dimensions'->'verified')
           FROM (SELECT beat.parse('bravo', 'profile', result, params) AS m FROM beat.task
                 WHERE flow = 'profiles' AND provider = 'bravo' AND params->>'handle' = '$handles[0]') x}),
	join(' ', $canon->{followers}, $canon->{following}, $canon->{posts},
		$canon->{engagement_rate}, $canon->{verified} ? 'true' : 'false'),
	'numbers and booleans are the provider\'s, typed (bravo sent them as strings)');

# ------------------------------------------------ a changed metric: its delta
sql(qq{UPDATE beat.entity SET metrics = metrics || '{"followers": 5}' WHERE kind = 'profile'
       AND key = '$handles[0]'});
enqueue_profiles('profiles', $handles[0]);
ok(settle('profiles'), 'a profile fetched again');
is( sql(qq{SELECT changes->'metrics'->'followers' = jsonb_build_object('old', 5, 'new', $canon->{followers},
                                                'delta', $canon->{followers} - 5)
           FROM beat.event WHERE topic = 'entity.updated' AND key = '$handles[0]'}),
	't',
'entity.updated carries old, new and delta of the changed metric');
is(sql(qq{SELECT correlation_id = (SELECT correlation_id FROM beat.task WHERE id = e.task_id)
          FROM beat.event e WHERE topic = 'entity.updated' AND key = '$handles[0]'}),
	't', 'and the correlation id of the task that saw it');

# ------------------------------------------------ a bad answer writes nothing
my ($nobio) = grep { !bravo_has_bio($_) } map { "nobio$_" } 1 .. 100;
sql(q{DELETE FROM beat.route WHERE operation = 'profile'});
sql(q{SELECT beat.set_route('profile', 'bravo')});
(my $strict = $spec{bravo}) =~ s/"bio": \{"path": "\$\.user\.bio", "optional": true\}/"bio": "\$.user.bio"/;
$strict =~ s/'/''/g;
sql(qq{SELECT beat.set_mapping('bravo', 'profile', 'social', 'profile', '$strict')});
my $obs_before = sql(q{SELECT count(*) FROM beat.observation});
enqueue_profiles('profiles', $nobio);
ok(settle('profiles'), 'a profile without the bio its mapping requires');
is(sql(qq{SELECT state FROM beat.task WHERE params->>'handle' = '$nobio'}), 'dead',
	'fails its task permanently (one attempt)');
like(sql(qq{SELECT last_error FROM beat.task WHERE params->>'handle' = '$nobio'}),
	qr/provider "bravo", operation "profile", dimension "bio": required path \$\.user\.bio is missing/,
	'naming the provider and the path');
is(sql(qq{SELECT count(*) FROM beat.entity WHERE key = '$nobio'}), '0', 'and writes no entity');
is(sql(q{SELECT count(*) FROM beat.observation}), $obs_before, 'nor an observation');
is(sql(qq{SELECT count(*) FROM beat.event WHERE topic = 'task.dead'
          AND task_id = (SELECT id FROM beat.task WHERE params->>'handle' = '$nobio')}),
	'1', 'but a task.dead event');
# an answer that passes its mapping but cannot be stored (here a trigger
# of the user's refuses it) kills its tasks, not the worker
my $wpid = sql(q{SELECT pid FROM beat.worker_status WHERE flow = 'profiles'});
sql(q{CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN IF NEW.key = 'poison' THEN RAISE EXCEPTION 'no poison here'; END IF; RETURN NEW; END $$});
sql(q{CREATE TRIGGER refuse_poison BEFORE INSERT ON beat.entity FOR EACH ROW EXECUTE FUNCTION refuse_poison()});
enqueue_profiles('profiles', 'poison');
ok(settle('profiles'), 'an answer whose entity cannot be stored');
is(sql(q{SELECT state || ': ' || last_error FROM beat.task WHERE params->>'handle' = 'poison'}),
	"dead: storing the answer's model failed: no poison here", 'kills its task, saying why');
is(sql(q{SELECT pid FROM beat.worker_status WHERE flow = 'profiles'}), $wpid, 'not the worker');
sql(q{DROP TRIGGER refuse_poison ON beat.entity});

# a parser runs restricted, and what it sets for the session is undone
sql(qq{SELECT beat.set_provider('echo', base_url => '$BASE', operations => '{"echo": {"url": "/json"}}')});
sql(q{SELECT beat.set_route('echo', 'echo')});
sql(q{CREATE FUNCTION sneaky(body jsonb, result jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
      BEGIN PERFORM set_config('application_name', 'hijacked', false);
            RETURN jsonb_build_object('key', body->>'path'); END $$});
sql(q{SELECT beat.set_mapping('echo', 'echo', 'web', 'page', parser => 'sneaky(jsonb, jsonb)')});
sql(q{SELECT beat.create_flow('echo', operation => 'echo', workers => 1)});
sql(q{SELECT beat.enqueue('echo', '{"n": 1}')});
ok(settle('echo'), 'a parser that sets application_name for the session');
is(sql(q{SELECT count(*) FROM beat.entity WHERE platform = 'web' AND key = '/json'}), '1', 'made its entity');
is(sql(q{SELECT count(*) FILTER (WHERE a.application_name IS DISTINCT FROM 'hijacked')
         || '/' || count(*)
         FROM pg_stat_activity a JOIN beat.worker_status w ON w.pid = a.pid WHERE w.flow = 'echo'}),
	'1/1', 'and the worker\'s setting was put back');

(my $lax = $spec{bravo}) =~ s/'/''/g;
sql(qq{SELECT beat.set_mapping('bravo', 'profile', 'social', 'profile', '$lax')});
sql(q{DELETE FROM beat.route WHERE operation = 'profile'});
sql(q{SELECT beat.set_route('profile', 'acme')});
sql(q{SELECT beat.set_route('posts', 'acme')});

# ------------------------------------------------ every event to LISTEN, and to a consumer
my $last_before = sql(q{SELECT coalesce(max(id), 0) FROM beat.event});
my $ldir  = PostgreSQL::Test::Utils::tempdir();
my $ready = "$ldir/listen.ready";
my ($lout, $lerr) = ('', '');
my $connstr = $node->connstr('postgres');
my $lh = IPC::Run::start([ $listen, $connstr, '--ready-file', $ready, '--count-file', "$ldir/count",
		'--max-seconds', '240' ],
	'<', \undef, '>', \$lout, '2>', \$lerr);
for (1 .. 100) { last if -e $ready; usleep(100_000); }
ok(-e $ready, 'the LISTEN client is listening');

# the consumer takes what there is so far, in sessions that end
my %got;
my $dups = 0;
sub consume
{
	my ($n) = @_;
	my $ids = sql(qq{SELECT string_agg(id::text, ' ' ORDER BY id) FROM beat.consume('tap', $n)});
	for (split ' ', $ids) { $dups++ if $got{$_}++; }
	return scalar split ' ', $ids;
}
consume(100);

my @run = map { "run$_" } 1 .. 150;
enqueue_profiles('profiles', @run);
enqueue_profiles('posts', @run);
consume(50);
# a session that consumes and dies before it commits gives nothing away
$node->psql('postgres', q{BEGIN; SELECT count(*) FROM beat.consume('tap', 100);
                          SELECT pg_terminate_backend(pg_backend_pid());});
consume(50);
ok(settle('profiles', 120) && settle('posts', 120), '150 profiles and their first pages of posts done');
is(sql(q{SELECT count(*) FROM beat.task WHERE flow IN ('profiles', 'posts') AND state = 'dead'
         AND params->>'handle' LIKE 'run%'}), '0', 'none died');
my $last_after = sql(q{SELECT max(id) FROM beat.event});
my $run_events = sql(qq{SELECT count(*) FROM beat.event WHERE id > $last_before});
cmp_ok($run_events, '>', 300, "the run published $run_events events");
# the upstream gives a handle 0..40 posts (byte 25 of its SHA-256); a first
# page holds up to 10
my $posts = 0;
$posts += List::Util::min(ord(substr(sha256($_), 25, 1)) % 41, 10) for @run;
is( sql(qq{SELECT count(*) FROM beat.entity WHERE kind = 'post' AND parent_id IN
           (SELECT id FROM beat.entity WHERE kind = 'profile' AND key LIKE 'run%')}),
	$posts, "each post of the first pages ($posts) is an entity linked to its profile");
is( sql(qq{SELECT count(*) FROM beat.event WHERE id > $last_before AND kind = 'post'
           AND topic = 'entity.created'}),
	$posts, 'each with its entity.created');

# let the listener hear what was written (at most 30 s), then stop it
for (1 .. 300)
{
	my $c = -e "$ldir/count" ? slurp_file("$ldir/count") : 0;
	last if $c >= $run_events;
	usleep(100_000);
}
$lh->signal('TERM');
$lh->finish;
my %l = $lout =~ /(\w+)=(\d+)/g;
is($l{notifications}, $run_events, 'the LISTEN client got a notification per event');
is($l{duplicates}, 0, 'none twice');
is($l{missing}, 0, 'none missing between the first and the last');
is("$l{min_id} $l{max_id}", ($last_before + 1) . " $last_after", 'from the first event of the run to the last');

# the consumer comes back and catches up
1 while consume(1000) > 0;
is($dups, 0, 'the consumer got no event twice');
is( scalar(keys %got), sql(q{SELECT count(*) FROM beat.event}),
	'and every event once, across sessions and a session that died');
is((sort { $b <=> $a } keys %got)[0], $last_after, 'up to the last');

# ------------------------------------------------ pg_cron refreshes what is stale
sql(q{CREATE EXTENSION pg_cron});
sql(q{SELECT beat.create_flow('refresh', operation => 'profile', paused => true)});
sql(q{UPDATE beat.entity SET last_seen = now() - interval '2 hours' WHERE kind = 'profile'});
my $stale = sql(q{SELECT count(*) FROM beat.entity WHERE kind = 'profile'});
# two jobs on the same schedule: overlapping runs
for my $j (qw(refresh-a refresh-b))
{
	sql(qq{SELECT cron.schedule('$j', '* * * * *',
	       \$\$SELECT beat.refresh('refresh', 'social', 'profile', '1 hour')\$\$)});
}
ok( wait_for(q{SELECT count(*) >= 2 FROM cron.job_run_details WHERE status = 'succeeded'}, 90),
	'pg_cron ran both refresh jobs');
is(sql(q{SELECT count(*) FROM beat.task WHERE flow = 'refresh'}), $stale,
	"the runs enqueued one refresh per stale profile ($stale)");
is(sql(q{SELECT count(DISTINCT params->>'handle') FROM beat.task WHERE flow = 'refresh'}), $stale,
	'each handle once');
is(sql(q{SELECT beat.refresh('refresh', 'social', 'profile', '1 hour')}), '0',
	'another run while they are pending adds nothing');
sql(q{SELECT cron.unschedule('refresh-a'), cron.unschedule('refresh-b')});
sql(q{SELECT beat.resume('refresh')});
ok(settle('refresh', 120), 'the refreshes ran');
is(sql(q{SELECT count(*) FROM beat.entity WHERE kind = 'profile' AND last_seen < now() - interval '1 hour'}),
	'0', 'and nothing is stale any more');

$node->stop;
done_testing();
