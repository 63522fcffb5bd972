# pg_beat refuses to load unless it is in shared_preload_libraries, and
# says which setting to change.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = PostgreSQL::Test::Cluster->new('not_preloaded');
$node->init;
$node->start;

my ($rc, $out, $err) = $node->psql('postgres', 'CREATE EXTENSION pg_beat');
isnt($rc, 0, 'CREATE EXTENSION fails when pg_beat is not preloaded');
like($err, qr/pg_beat must be loaded via shared_preload_libraries/,
	'the error says why');
like($err, qr/HINT:.*shared_preload_libraries/, 'the hint names the setting');
is($node->safe_psql('postgres',
		"SELECT count(*) FROM pg_namespace WHERE nspname = 'beat'"),
	'0', 'nothing is left half-installed');

# Preloaded, the same command works.
$node->append_conf('postgresql.conf', "shared_preload_libraries = 'pg_beat'");
$node->restart;
my ($created) = $node->psql('postgres', 'CREATE EXTENSION pg_beat');
is($created, 0, 'installs once preloaded');

$node->stop;
done_testing();
