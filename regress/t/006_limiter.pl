# The shared-memory limiter under concurrency and across restarts:
# - many sessions hammering a stacked set never get more than the rate
#   allows, and a refused call charges nothing anywhere (all or nothing);
# - a quota survives a fast restart exactly, and a crash without ever
#   admitting more than its limit.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);

my $node = PostgreSQL::Test::Cluster->new('limiter');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'pg_beat'
restart_after_crash = on
});
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION pg_beat');

# 50 a second with a burst of 5, stacked with a huge quota that counts
# every charge, and a fast rate that admits everything.
$node->safe_psql('postgres', q{
SELECT (beat.set_limit('iso:rate', 50, per => '1 second', burst => 5)).name;
SELECT (beat.set_limit('iso:count', 1000000000, quota => 'week')).name;
SELECT (beat.set_limit('iso:fast', 100000, per => '1 second', burst => 100000)).name;
CREATE TABLE admitted (at timestamptz NOT NULL DEFAULT clock_timestamp());
GRANT ALL ON admitted TO PUBLIC;
});

my $script = "$PostgreSQL::Test::Utils::tmp_check/acquire.sql";
open my $fh, '>', $script or die "cannot write $script: $!";
print $fh "INSERT INTO admitted SELECT FROM beat.acquire('{iso:fast, iso:count, iso:rate}') WHERE allowed;\n";
close $fh;

my $start = time();
$node->command_ok(
	[ 'pgbench', '-n', '-c', '8', '-j', '2', '-T', '4', '-f', $script,
	  '-h', $node->host, '-p', $node->port, 'postgres' ],
	'8 sessions hammer a stacked set for 4 s');
my $elapsed = time() - $start;

my $admitted = $node->safe_psql('postgres', 'SELECT count(*) FROM admitted');
my $calls = $node->safe_psql('postgres',
	q{SELECT 1000000000 - 1 - remaining FROM beat.peek('{iso:count}')});
my $bound = int(50 * $elapsed) + 5 + 1;
note("admitted $admitted in ${elapsed}s; the rate allows at most $bound");
cmp_ok($admitted, '<=', $bound, 'never more than rate * elapsed + burst + 1');
cmp_ok($admitted, '>=', int(50 * ($elapsed - 1.5)), 'and close to what the rate allows');
is($calls, $admitted, 'the counting quota was charged exactly once per admission: refused calls charged nothing');

# Quotas across restarts, on a fixed clock so that the window is stable.
$node->safe_psql('postgres', q{
SELECT (beat.set_limit('q:day', 20000, quota => 'day')).name;
});
my $spend = q{
SET beat.limiter_clock = '2026-06-01 12:00:00+00';
DO $$ BEGIN FOR i IN 1..15000 LOOP PERFORM beat.acquire('{q:day}'); END LOOP; END $$;
SELECT remaining FROM beat.peek('{q:day}');
};
my $remaining_before = $node->safe_psql('postgres', $spend);
is($remaining_before, '4999', '15,000 spent of 20,000 (peek: 4,999 after one more)');

my $peek = q{SET beat.limiter_clock = '2026-06-01 12:30:00+00';
SELECT remaining FROM beat.peek('{q:day}');};

$node->restart;
is($node->safe_psql('postgres', $peek), '4999', 'after a fast restart: exactly 5,000 left');

# Spend 2,100 more, then crash.
$node->safe_psql('postgres', q{
SET beat.limiter_clock = '2026-06-01 13:00:00+00';
DO $$ BEGIN FOR i IN 1..2100 LOOP PERFORM beat.acquire('{q:day}'); END LOOP; END $$;
});
$node->stop('immediate');
$node->start;
my $after_crash = $node->safe_psql('postgres', $peek);
note("after the crash: $after_crash left (+1) of the 2,900 truly left");
cmp_ok($after_crash, '<=', 2899, 'after a crash: never more left than truly is (no over-admission)');
cmp_ok($after_crash, '>=', 2899 - 400, 'and at most two reserve steps (2 x 1% of the limit) lost');

# The next day starts afresh, even after the crash.
is($node->safe_psql('postgres', q{SET beat.limiter_clock = '2026-06-02 00:00:00+00';
SELECT remaining FROM beat.peek('{q:day}');}), '19999', 'a new day has the whole quota');

$node->stop;
done_testing();
