# The limiter when its shared table is full (beat.limiter_max_keys):
# - a new key drops an idle one, and the call leaves no scan open behind it;
# - with none idle, the call fails with an error naming the setting, and
#   every other key still answers at once (no spinlock left held);
# - a key given twice in one call is charged once;
# - a backend that still points at a bucket dropped since (and its memory
#   given to another key) finds it gone, and charges nothing of the other
#   key's, nor waits on itself when it names that key in the same call.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

my $node = PostgreSQL::Test::Cluster->new('capacity');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'pg_beat'
beat.limiter_max_keys = 16
});
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION pg_beat');

# idle a millisecond after a charge: 1,000 a second, no burst
$node->safe_psql('postgres', q{
SELECT (beat.set_limit('fast:{{x}}', 1000, per => '1 second')).name;
SELECT (beat.set_limit('quota:{{x}}', 10, quota => 'day')).name;
});

sub live_keys
{
	return $node->safe_psql('postgres', 'SELECT count(*) FROM beat.limiter_status');
}

# --- a full table of idle keys: a new key drops one --------------------------

$node->safe_psql('postgres', q{
SELECT count(*) FROM generate_series(1, 16) g,
    LATERAL beat.acquire(ARRAY['fast:' || g]) a WHERE a.allowed;
});
is(live_keys(), '16', 'sixteen keys fill the table');
usleep(20_000);

my ($ret, $out, $err) = $node->psql('postgres',
	q{SELECT allowed FROM beat.acquire('{fast:new}')}, on_error_stop => 1);
is($ret, 0, 'with every key idle, a new key is admitted');
is($out, 't', 'the new key is charged');
unlike($err, qr/leaked hash_seq_search scan/, 'and leaves no table scan open');
is($err, '', 'without a warning');
cmp_ok(live_keys(), '<=', 16, 'the table stays within beat.limiter_max_keys');

# many more, each in its own transaction, one after another
($ret, $out, $err) = $node->psql('postgres', q{
DO $$
BEGIN
    FOR g IN 1 .. 200 LOOP
        PERFORM pg_sleep(0.002);
        PERFORM beat.acquire(ARRAY['fast:more' || g]);
    END LOOP;
END
$$;
}, on_error_stop => 1);
is($ret, 0, '200 new keys in one transaction, each dropping an idle one');
is($err, '', 'and no scan is left open');

# --- a bucket dropped while a backend points at it ---------------------------

# Session a meets fast:a, so it keeps a pointer to its bucket.  Then,
# from other sessions, fifteen quota keys (busy once charged) and fast:z
# take the table: every fast key before them is dropped, fast:a too, and
# their memory goes to the new keys.
my $a = $node->background_psql('postgres', timeout => 60, on_error_stop => 0);
is($a->query_safe(q{SELECT allowed FROM beat.acquire('{fast:a}')}), 't',
	'session a is admitted through fast:a');
usleep(20_000);
for my $i (1 .. 15)
{
	usleep(2_000);
	$node->safe_psql('postgres', qq{SELECT beat.acquire('{quota:$i}')});
}
usleep(20_000);
$node->safe_psql('postgres', q{SELECT beat.acquire('{fast:z}')});
is($node->safe_psql('postgres',
	q{SELECT count(*) FROM beat.limiter_status WHERE key = 'fast:z' OR key LIKE 'quota:%'}),
	'16', 'fifteen quota keys and fast:z fill the table');
is($node->safe_psql('postgres',
	q{SELECT count(*) FROM beat.limiter_status WHERE key = 'fast:a'}),
	'0', 'fast:a is gone');
usleep(20_000);

is($a->query_safe(q{SELECT allowed FROM beat.acquire('{fast:a}')}), 't',
	'session a is admitted through fast:a again');
is($node->safe_psql('postgres',
	q{SELECT count(*) FROM beat.limiter_status WHERE key = 'fast:a' AND limit_name = 'fast:{{x}}'}),
	'1', 'through a bucket of its own');
is($node->safe_psql('postgres', q{
SELECT count(*) FROM beat.limiter_status
WHERE key LIKE 'quota:%' AND limit_name = 'quota:{{x}}' AND remaining = 9}),
	'15', 'and every quota key is as it was: its own limit, charged once');

# Session a's pointer to fast:a may come to lead to the bucket of another
# key it then names in the same call: a must not take that bucket's mutex
# twice (it would wait on itself for good).  fast:a, idle, is the only key
# that can go; a key whose hash picks the same free list (the low 5 bits,
# of 32) gets its memory back at once.
my $other = $node->safe_psql('postgres', q{
SELECT k FROM (SELECT 'fast:y' || g AS k FROM generate_series(1, 1000) g) s
WHERE hashtext(k) & 31 = hashtext('fast:a') & 31 LIMIT 1});
usleep(20_000);
$node->safe_psql('postgres', qq{SELECT beat.acquire('{$other}')});
is($node->safe_psql('postgres',
	q{SELECT count(*) FROM beat.limiter_status WHERE key = 'fast:a'}),
	'0', "$other took the place of fast:a");
usleep(20_000);
$a->query(qq{SELECT allowed FROM beat.acquire('{fast:a, $other}')});
like($a->{stderr}, qr/too many rate limit keys are in use/,
	'a call naming both returns: no room for two new keys beside fifteen busy ones');
$a->quit;

# --- a full table of busy keys: an error, and nothing stuck -------------------

# quota keys charged today are not idle until the day ends (1 to 15 are
# charged a second time)
$node->safe_psql('postgres', q{
SELECT count(*) FROM generate_series(1, 16) g,
    LATERAL beat.acquire(ARRAY['quota:' || g]) a WHERE a.allowed;
});
is($node->safe_psql('postgres',
	q{SELECT count(*) FROM beat.limiter_status WHERE key LIKE 'quota:%'}),
	'16', 'sixteen busy quota keys fill the table');

($ret, $out, $err) = $node->psql('postgres',
	q{SELECT allowed FROM beat.acquire('{quota:17}')});
isnt($ret, 0, 'with no key idle, a new key is refused with an error');
like($err, qr/too many rate limit keys are in use/, 'which says why');
like($err, qr/beat\.limiter_max_keys/, 'and names the setting');

# The refusal ran the idle scan to its end under every partition lock: the
# locks are free again if another key answers at once.
($ret, $out, $err) = $node->psql('postgres',
	q{SELECT allowed FROM beat.acquire('{quota:1}')}, timeout => 20);
is($ret, 0, 'an existing key still answers after the refusal');
is($out, 't', 'and is admitted');
is($node->safe_psql('postgres',
	q{SELECT remaining FROM beat.peek('{quota:1}')}), '6',
	'charged once more (10 - 3, and 1 more after this peek)');

# --- a key given twice counts once -------------------------------------------

is($node->safe_psql('postgres',
	q{SELECT allowed FROM beat.acquire('{quota:2, quota:2}')}), 't',
	'a key given twice is admitted');
is($node->safe_psql('postgres',
	q{SELECT remaining FROM beat.peek('{quota:2}')}), '6',
	'and charged once (10 - 3, and 1 more after this peek)');

$node->stop;
done_testing();
