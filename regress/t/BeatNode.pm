# BeatNode: a test cluster that preloads pg_beat for the worker tests, and
# waiting on a query.
#
#   use FindBin;
#   use lib $FindBin::RealBin;
#   use BeatNode;
#   my $node = BeatNode::start('workers', q{beat.reaper_interval = '200ms'});
#   BeatNode::wait_for($node, 'SELECT ...', 10);   # seconds taken, or undef
package BeatNode;

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use Test::More;
use Time::HiRes qw(usleep gettimeofday tv_interval);

# A started cluster with pg_beat preloaded and created in 'postgres', its
# workers allowed to reach the upstream on 127.0.0.1, and a crash restarting
# the server (PostgreSQL::Test::Cluster turns that off) so that the tests
# after one still run.  $conf is added to postgresql.conf.
sub start
{
	my ($name, $conf) = @_;
	my $node = PostgreSQL::Test::Cluster->new($name);
	$node->init;
	$node->append_conf(
		'postgresql.conf', q{
shared_preload_libraries = 'pg_beat'
beat.database_name = 'postgres'
beat.allow_private_addresses = on
max_worker_processes = 32
restart_after_crash = on
} . ($conf // ''));
	$node->start;
	$node->safe_psql('postgres', 'CREATE EXTENSION pg_beat');
	return $node;
}

# Run $sql until it prints $expected ('t' unless given) or $timeout seconds
# pass.  Returns the seconds it took, or undef (with a diag) on timeout.
# Connection failures (a server restarting) count as "not yet".
sub wait_for
{
	my ($node, $sql, $timeout, $expected) = @_;
	$expected //= 't';
	my $t0   = [gettimeofday];
	my $last = '';
	while (1)
	{
		my ($ret, $out) = $node->psql('postgres', $sql);
		$last = $out // '';
		return tv_interval($t0) if $ret == 0 && $last eq $expected;
		last if tv_interval($t0) > $timeout;
		usleep(50_000);
	}
	diag "timed out after ${timeout}s waiting for:\n$sql\nexpected: $expected\n"
	  . "last output: $last";
	return undef;
}

# Wait until every task of $flow has ended (succeeded, dead or cancelled);
# on a timeout, show the ones that have not.  True when they all ended.
sub settle
{
	my ($node, $flow, $timeout) = @_;
	my $open = qq{FROM beat.task WHERE flow = '$flow'
	              AND state NOT IN ('succeeded', 'dead', 'cancelled')};
	return 1 if defined wait_for($node, "SELECT count(*) = 0 $open", $timeout // 60);
	diag $node->safe_psql('postgres',
		"SELECT id, state, attempts, provider, last_error $open ORDER BY id LIMIT 10");
	return 0;
}

# Wait until $flow has $n workers, all started and running (idle or busy).
sub wait_workers
{
	my ($node, $flow, $n, $timeout) = @_;
	return wait_for(
		$node,
		qq{SELECT count(*) = $n AND count(*) FILTER (WHERE pid IS NOT NULL
		                                             AND state IN ('idle', 'busy')) = $n
		   FROM beat.worker_status WHERE flow = '$flow'},
		$timeout);
}

1;
