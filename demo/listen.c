/*
 * listen.c -- count the notifications of channel beat_events.
 *
 *   listen CONNINFO [--idle-exit SECONDS] [--max-seconds SECONDS] [--ready-file PATH]
 *          [--count-file PATH]
 *
 * Connects with PQconnectdb(CONNINFO), runs LISTEN beat_events, then (if
 * --ready-file is given) writes its pid to PATH (atomically: PATH.tmp, then
 * rename) so that a script can wait for the file before it sends anything.
 * With --count-file, it writes the number of notifications so far to PATH
 * the same way, at most every 100 ms, as it grows.
 * Each payload is a small JSON object such as
 *   {"id": 123, "topic": "entity.created", "key": "alice"}
 * whose "id" (a positive bigint) is found by a small hand-written scan.
 *
 * It stops on SIGTERM/SIGINT (noticed within 100 ms), after --idle-exit
 * seconds without a notification (only once at least one arrived), or after
 * --max-seconds in all (default 600), and then prints exactly one line:
 *   notifications=N min_id=A max_id=B duplicates=D missing=M
 * N counts every notification of the channel; A, B, D and M only those with
 * an id (A and B are 0 when there is none).  D counts the arrivals of an id
 * already seen; M the ids between A and B that never arrived.
 *
 * Exit status: 0; 2 when the connection, LISTEN or the ready file fails (the
 * libpq error on stderr, nothing on stdout) or the connection is lost later
 * (the error on stderr, the line still printed); 2 for a usage error.
 *
 * Build: gcc -Wall -Wextra -Werror -O2 -I/usr/include/postgresql demo/listen.c -lpq -o demo/listen
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <libpq-fe.h>

#define CHANNEL "beat_events"
#define TICK_MS 100
#define MAX_WARNINGS 5

static volatile sig_atomic_t stop_signal = 0;

static void
on_signal(int sig)
{
	stop_signal = sig;
}

static double
now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double) ts.tv_sec + (double) ts.tv_nsec / 1e9;
}

/* ---- the ids: an array, sorted and de-duplicated whenever it fills up ---- */
typedef struct IdSet
{
	int64_t    *v;
	size_t		len;			/* v[0..sorted) sorted and distinct, the rest not */
	size_t		sorted;
	size_t		cap;
	uint64_t	duplicates;		/* counted by compact() */
	int64_t		min;
	int64_t		max;
	uint64_t	with_id;
} IdSet;

static int
cmp_id(const void *a, const void *b)
{
	int64_t		x = *(const int64_t *) a;
	int64_t		y = *(const int64_t *) b;

	return (x > y) - (x < y);
}

/* Sort, drop (and count) the duplicates. */
static void
compact(IdSet *s)
{
	size_t		i,
				out;

	if (s->len == s->sorted)
		return;
	qsort(s->v, s->len, sizeof(int64_t), cmp_id);
	for (i = 1, out = 1; i < s->len; i++)
	{
		if (s->v[i] == s->v[out - 1])
			s->duplicates++;
		else
			s->v[out++] = s->v[i];
	}
	s->len = s->sorted = (s->len > 0 ? out : 0);
}

static void
add_id(IdSet *s, int64_t id)
{
	if (s->len == s->cap)
	{
		compact(s);
		if (s->cap == 0 || s->len > s->cap / 2)	/* still over half full: grow */
		{
			size_t		cap = s->cap ? s->cap * 2 : 65536;
			int64_t    *v = realloc(s->v, cap * sizeof(int64_t));

			if (v == NULL)
			{
				fprintf(stderr, "listen: out of memory for %zu ids\n", cap);
				exit(2);
			}
			s->v = v;
			s->cap = cap;
		}
	}
	s->v[s->len++] = id;
	if (s->with_id == 0 || id < s->min)
		s->min = id;
	if (s->with_id == 0 || id > s->max)
		s->max = id;
	s->with_id++;
}

/*
 * The value of the "id" key of a flat JSON object: a positive integer that
 * fits in an int64 (whitespace allowed around the colon).  0 if there is none.
 */
static int64_t
parse_id(const char *payload)
{
	const char *p = payload;

	while ((p = strstr(p, "\"id\"")) != NULL)
	{
		const char *q = p + 4;
		int64_t		v = 0;
		int			digits = 0;

		p = q;
		while (*q == ' ' || *q == '\t' || *q == '\n' || *q == '\r')
			q++;
		if (*q != ':')
			continue;			/* "id" was a value, not a key */
		q++;
		while (*q == ' ' || *q == '\t' || *q == '\n' || *q == '\r')
			q++;
		for (; *q >= '0' && *q <= '9'; q++, digits++)
		{
			if (v > (INT64_MAX - (*q - '0')) / 10)
				return 0;		/* does not fit in a bigint */
			v = v * 10 + (*q - '0');
		}
		if (digits == 0 || *q == '.' || *q == 'e' || *q == 'E')
			return 0;			/* not a whole number */
		return v;				/* 0 for "id": 0, which is not positive */
	}
	return 0;
}

/* Count the notifications libpq has read so far. */
static void
drain(PGconn *conn, IdSet *ids, uint64_t *notifications, double *last_notify)
{
	static int	warnings = 0;
	PGnotify   *n;

	while ((n = PQnotifies(conn)) != NULL)
	{
		if (strcmp(n->relname, CHANNEL) == 0)
		{
			int64_t		id = parse_id(n->extra);

			(*notifications)++;
			*last_notify = now_s();
			if (id > 0)
				add_id(ids, id);
			else if (warnings++ < MAX_WARNINGS)
				fprintf(stderr, "listen: no positive \"id\" in payload: %.200s\n", n->extra);
		}
		PQfreemem(n);
	}
}

static double
seconds_arg(const char *opt, const char *val)
{
	char	   *end;
	double		v;

	errno = 0;
	v = strtod(val, &end);
	if (errno != 0 || end == val || *end != '\0' || !(v > 0 && v < 1e9))
	{
		fprintf(stderr, "listen: %s wants a number of seconds > 0, not \"%s\"\n", opt, val);
		exit(2);
	}
	return v;
}

static void
usage(void)
{
	fprintf(stderr, "usage: listen CONNINFO [--idle-exit SECONDS] [--max-seconds SECONDS] "
			"[--ready-file PATH] [--count-file PATH]\n");
	exit(2);
}

/* Write value and a newline to path, atomically (a temporary file renamed). */
static int
write_number_file(const char *path, long value)
{
	size_t		n = strlen(path) + 32;
	char	   *tmp = malloc(n);
	FILE	   *f;
	int			ok;

	if (tmp == NULL)
		return 0;
	snprintf(tmp, n, "%s.tmp.%ld", path, (long) getpid());
	f = fopen(tmp, "w");
	if (f == NULL)
	{
		fprintf(stderr, "listen: cannot create %s: %s\n", tmp, strerror(errno));
		free(tmp);
		return 0;
	}
	ok = fprintf(f, "%ld\n", value) > 0;
	ok = (fclose(f) == 0) && ok;
	if (!ok || rename(tmp, path) != 0)
	{
		fprintf(stderr, "listen: cannot write %s: %s\n", path, strerror(errno));
		unlink(tmp);
		free(tmp);
		return 0;
	}
	free(tmp);
	return 1;
}

int
main(int argc, char **argv)
{
	const char *conninfo = NULL;
	const char *ready_file = NULL;
	const char *count_file = NULL;	/* the count so far, rewritten as it grows */
	uint64_t	counted = 0;
	double		count_written = 0;
	double		idle_exit = 0;	/* 0: never */
	double		max_seconds = 600;
	double		start,
				last_notify = 0;
	uint64_t	notifications = 0;
	IdSet		ids = {0};
	PGconn	   *conn;
	PGresult   *res;
	struct sigaction sa;
	int			i,
				rc = 0;

	for (i = 1; i < argc; i++)
	{
		if (strcmp(argv[i], "--idle-exit") == 0 && i + 1 < argc)
			idle_exit = seconds_arg(argv[i], argv[i + 1]), i++;
		else if (strcmp(argv[i], "--max-seconds") == 0 && i + 1 < argc)
			max_seconds = seconds_arg(argv[i], argv[i + 1]), i++;
		else if (strcmp(argv[i], "--ready-file") == 0 && i + 1 < argc)
			ready_file = argv[++i];
		else if (strcmp(argv[i], "--count-file") == 0 && i + 1 < argc)
			count_file = argv[++i];
		else if (strncmp(argv[i], "--", 2) == 0 || conninfo != NULL)
			usage();
		else
			conninfo = argv[i];
	}
	if (conninfo == NULL)
		usage();

	start = now_s();
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sigemptyset(&sa.sa_mask);
	sa.sa_flags = 0;			/* no SA_RESTART: let poll() return EINTR */
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);

	conn = PQconnectdb(conninfo);
	if (PQstatus(conn) != CONNECTION_OK)
	{
		fprintf(stderr, "listen: connection failed: %s", PQerrorMessage(conn));
		PQfinish(conn);
		return 2;
	}
	res = PQexec(conn, "LISTEN " CHANNEL);
	if (PQresultStatus(res) != PGRES_COMMAND_OK)
	{
		fprintf(stderr, "listen: LISTEN " CHANNEL " failed: %s", PQerrorMessage(conn));
		PQclear(res);
		PQfinish(conn);
		return 2;
	}
	PQclear(res);
	if (ready_file != NULL && !write_number_file(ready_file, (long) getpid()))
	{
		PQfinish(conn);
		return 2;
	}

	for (;;)
	{
		struct pollfd pfd;
		double		now,
					wait_s;
		int			timeout_ms;

		drain(conn, &ids, &notifications, &last_notify);
		if (count_file != NULL && notifications != counted && now_s() - count_written >= 0.1)
		{
			counted = notifications;
			count_written = now_s();
			(void) write_number_file(count_file, (long) counted);
		}
		if (stop_signal)
			break;
		now = now_s();
		if (now - start >= max_seconds)
			break;
		if (idle_exit > 0 && notifications > 0 && now - last_notify >= idle_exit)
			break;

		wait_s = max_seconds - (now - start);
		if (idle_exit > 0 && notifications > 0 && idle_exit - (now - last_notify) < wait_s)
			wait_s = idle_exit - (now - last_notify);
		timeout_ms = wait_s * 1000 >= TICK_MS ? TICK_MS : (int) (wait_s * 1000) + 1;
		pfd.fd = PQsocket(conn);
		pfd.events = POLLIN;
		pfd.revents = 0;
		if (pfd.fd < 0)
		{
			fprintf(stderr, "listen: connection lost: %s", PQerrorMessage(conn));
			rc = 2;
			break;
		}
		if (poll(&pfd, 1, timeout_ms) < 0)
		{
			if (errno == EINTR)
				continue;
			fprintf(stderr, "listen: poll: %s\n", strerror(errno));
			rc = 2;
			break;
		}
		if (pfd.revents != 0 &&
			(!PQconsumeInput(conn) || PQstatus(conn) != CONNECTION_OK))
		{
			fprintf(stderr, "listen: connection lost: %s", PQerrorMessage(conn));
			rc = 2;
			drain(conn, &ids, &notifications, &last_notify);	/* what came before */
			break;
		}
	}
	/* a signal may have come with notifications still unread in the socket */
	if (rc == 0 && PQconsumeInput(conn))
		drain(conn, &ids, &notifications, &last_notify);

	compact(&ids);
	printf("notifications=%" PRIu64 " min_id=%" PRId64 " max_id=%" PRId64
		   " duplicates=%" PRIu64 " missing=%" PRIu64 "\n",
		   notifications, ids.with_id ? ids.min : 0, ids.with_id ? ids.max : 0,
		   ids.duplicates,
		   ids.with_id ? (uint64_t) ids.max - (uint64_t) ids.min + 1 - ids.len : 0);
	fflush(stdout);
	free(ids.v);
	PQfinish(conn);
	return rc;
}
