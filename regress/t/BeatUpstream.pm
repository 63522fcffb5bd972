# BeatUpstream: start regress/upstream/upstream.py (the local stand-in
# provider) for a TAP test, and stop it however the test ends.
#
#   use FindBin;
#   use lib $FindBin::RealBin;
#   use BeatUpstream;
#   my $up = BeatUpstream->start;
#   $up->base;       # http://127.0.0.1:PORT
#   $up->stats;      # GET /_stats, decoded
#   $up->reset;      # POST /_reset
#
# The upstream is found through PG_BEAT_UPSTREAM, else at
# ../upstream/upstream.py next to the test (run-tests copies regress/upstream
# beside its copy of regress/t); PG_BEAT_PYTHON picks the interpreter.
package BeatUpstream;

use strict;
use warnings;

use Cwd qw(abs_path);
use File::Basename qw(dirname);
use HTTP::Tiny;
use IPC::Run;
use JSON::PP;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

my @running;    # stopped in END, also when a test dies

# Start the upstream on a free port; die if it does not come up in 15 s.
sub start
{
	my ($class) = @_;
	my $script = $ENV{PG_BEAT_UPSTREAM}
	  // dirname(abs_path($0)) . '/../upstream/upstream.py';
	my $python = $ENV{PG_BEAT_PYTHON} // '/usr/bin/python3';
	die "upstream.py not found at $script: set PG_BEAT_UPSTREAM, or copy "
	  . "regress/upstream next to the t/ directory this test runs from\n"
	  unless -r $script;

	my $self = bless { out => '', err => '' }, $class;
	my $port_file = PostgreSQL::Test::Utils::tempdir() . '/upstream.port';
	$self->{harness} = IPC::Run::start(
		[ $python, $script, '--port', '0', '--port-file', $port_file,
		  '--max-seconds', '300' ],
		'<', \undef, '>', \$self->{out}, '2>', \$self->{err});
	push @running, $self;

	my $deadline = time + 15;
	until (-s $port_file || time > $deadline)
	{
		$self->{harness}->pump_nb;
		usleep(50_000);
	}
	die "upstream did not start (stderr: $self->{err})" unless -s $port_file;
	my $port = PostgreSQL::Test::Utils::slurp_file($port_file);
	chomp $port;
	$self->{base} = "http://127.0.0.1:$port";
	$self->{http} = HTTP::Tiny->new(timeout => 10);
	note "upstream listening on $self->{base}";
	return $self;
}

# The base URL, http://127.0.0.1:PORT.
sub base { return $_[0]->{base}; }

# GET /_stats: what the upstream received and sent, decoded.
sub stats
{
	my ($self) = @_;
	my $r = $self->{http}->get("$self->{base}/_stats");
	die "GET /_stats: $r->{status} $r->{reason}" unless $r->{success};
	return decode_json($r->{content});
}

# POST /_faults with $f (a hash: API key => fault), or DELETE /_faults when
# $f is undef: fail chosen API keys, or stop failing them.
sub faults
{
	my ($self, $f) = @_;
	my $r =
	  defined $f
	  ? $self->{http}->post("$self->{base}/_faults",
		{ content => encode_json($f), headers => { 'Content-Type' => 'application/json' } })
	  : $self->{http}->delete("$self->{base}/_faults");
	die "faults: $r->{status} $r->{content}" unless $r->{success};
	return;
}

# POST /_reset: zero the upstream's counters.
sub reset
{
	my ($self) = @_;
	my $r = $self->{http}->post("$self->{base}/_reset");
	die "POST /_reset: $r->{status} $r->{reason}" unless $r->{success};
	return;
}

# Stop every upstream started, on any exit.
END
{
	local $?;
	for my $self (@running)
	{
		eval { $self->{harness}->kill_kill(grace => 5); 1 }
		  or diag "stopping the upstream: $@";
		diag "upstream stderr: $self->{err}" if $self->{err} ne '';
	}
}

1;
