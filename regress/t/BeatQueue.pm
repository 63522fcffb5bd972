# BeatQueue: what the TAP tests compare of beat.task across restarts and
# crashes.
#
#   use FindBin;
#   use lib $FindBin::RealBin;
#   use BeatQueue;
#   my $s = BeatQueue::snapshot($node, 'after restart');
#   # $s->{total distinct sum pending running succeeded other digest}
package BeatQueue;

use strict;
use warnings;

use Test::More;

# One row summarising the queue: counts by state, how many distinct params
# there are (the tests give every task its own), the sum of the ids, and a
# digest of (id, state, lease owner,
# attempts) over the whole table, to compare whole.
sub snapshot
{
	my ($node, $label) = @_;
	my $row = $node->safe_psql(
		'postgres', q{
		SELECT count(*),
		       count(DISTINCT params),
		       coalesce(sum(id), 0),
		       count(*) FILTER (WHERE state = 'pending'),
		       count(*) FILTER (WHERE state = 'running'),
		       count(*) FILTER (WHERE state = 'succeeded'),
		       count(*) FILTER (WHERE state NOT IN ('pending', 'running', 'succeeded')),
		       coalesce(md5(string_agg(id || ':' || state || ':'
		                               || coalesce(lease_owner, '') || ':' || attempts,
		                               ',' ORDER BY id)), '')
		FROM beat.task});
	my %s;
	@s{qw(total distinct sum pending running succeeded other digest)} =
	  split /\|/, $row;
	note "$label: "
	  . join(' ', map { "$_=$s{$_}" } qw(total distinct sum pending running succeeded other));
	return \%s;
}

1;
