/*-------------------------------------------------------------------------
 *
 * worker.c
 *		A flow worker: claims its flow's tasks and runs each as an HTTP
 *		transfer, up to the flow's concurrency at once, on one libcurl multi
 *		handle.
 *
 * libcurl tells us which sockets it wants through the socket callback; we
 * keep them in an epoll set of our own, whose descriptor sits in a
 * WaitEventSet beside our latch and the postmaster-death event.  So one
 * wait covers a commit that made work (the latch), a socket that is ready,
 * curl's next timeout, the earliest run_at of our flow's waiting tasks,
 * and signals.  No callback of libcurl calls into PostgreSQL's error
 * machinery, so nothing ever unwinds through libcurl.
 *
 * Each pass, in this order: check for interrupts and reload; reread our
 * flow if a commit changed flows; claim as many due tasks as we have free
 * transfers, in one short transaction; hand curl what is ready; record
 * every finished transfer in one transaction (task states and
 * beat.http_log); sleep.  No transaction is open during network I/O.
 *
 * Rate limits (beat.flow.limits, see extension/limiter.c) are charged per
 * task inside the claim transaction, before its transfer starts.  A task a
 * limit refuses is put back as scheduled at exactly now + retry_after,
 * without counting the attempt; limits with no placeholder are asked
 * before claiming, so a flow at its limit claims nothing and sleeps until
 * its next admission.
 *
 * On SIGTERM (shutdown, pg_terminate_backend, DROP DATABASE) we stop
 * claiming, give transfers in flight beat.shutdown_grace to finish, record
 * those that did and hand the rest back to pending without counting the
 * attempt, then exit.  A worker that dies instead loses its leases to the
 * launcher at once (launcher.c).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <math.h>
#include <sys/epoll.h>
#include <unistd.h>

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/spin.h"
#include "tcop/tcopprot.h"
#include "utils/array.h"
/* fmgrprotos.h declares the SQL function json_object; jansson has its own */
#define json_object pg_sql_json_object
#include "utils/builtins.h"
#undef json_object				/* and never call it: see http.h */
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/resowner.h"
#include "utils/snapmgr.h"

#include "pg_beat.h"
#include "limiter.h"
#include "http.h"

/* One task on its way through curl. */
typedef struct Transfer
{
	CURL	   *easy;
	int64		task_id;
	int			attempt;
	BeatRequest req;
	char	   *body;			/* response body, malloc'd */
	size_t		len;
	size_t		cap;
	bool		too_large;
	json_t	   *headers;		/* kept response headers */
	char		errbuf[CURL_ERROR_SIZE];
	CURLcode	code;
	char	   *build_error;	/* the request could not be built */
	struct Transfer *next;
} Transfer;

/* Our flow's settings, reread when flows change. */
typedef struct FlowConfig
{
	bool		exists;
	bool		paused;
	int			concurrency;
	long		timeout_ms;
	int			max_redirects;
	BeatTemplate *tmpl;
	BeatStatusSet ok;
	BeatStatusSet retry;
	int			nlimits;		/* beat.flow.limits: key templates */
	char	   *limits[BEAT_MAX_STACKED_KEYS];
	bool		limits_fixed;	/* no template has a placeholder */
} FlowConfig;

#define SAFETY_WAKE_MS	30000	/* a wake-up that was lost costs at most this */
#define MAX_EVENTS		64

static BeatWorkerSlot *slot;
static char flow_name[NAMEDATALEN];
static int	my_index;
static uint32 my_generation;
static char *worker_name;		/* the lease owner: pg_beat:<flow>:<n>:<pid> */

static CURLM *multi;
static int	epfd = -1;
static TimestampTz curl_deadline = 0;	/* 0: curl wants no timeout */
static Transfer *inflight = NULL;
static int	n_inflight = 0;
static Transfer *finished = NULL;	/* done with curl, to be recorded */
static int	n_finished = 0;
static uint64 stat_done = 0;
static uint64 stat_failed = 0;

static FlowConfig cfg;
static MemoryContext pass_ctx;	/* reset every pass of the loop */
static uint32 cfg_generation;
static bool cfg_loaded = false;

static SPIPlanPtr plan_flow = NULL;
static SPIPlanPtr plan_claim = NULL;
static SPIPlanPtr plan_next_due = NULL;
static SPIPlanPtr plan_record = NULL;
static SPIPlanPtr plan_log = NULL;
static SPIPlanPtr plan_hand_back = NULL;
static SPIPlanPtr plan_limited = NULL;

/* Free our slot when we exit, however we exit. */
static void
worker_detach(int code, Datum arg)
{
	LWLockAcquire(beat_shared->lock, LW_EXCLUSIVE);
	if (slot->pid == MyProcPid)
	{
		slot->state = BEAT_SLOT_FREE;
		slot->pid = 0;
		slot->latch = NULL;
	}
	LWLockRelease(beat_shared->lock);
}

/* Publish our counters for beat.worker_status. */
static void
publish(BeatSlotState state)
{
	slot->state = state;
	SpinLockAcquire(&slot->mutex);
	slot->in_flight = n_inflight;
	slot->done = stat_done;
	slot->failed = stat_failed;
	slot->last_activity = GetCurrentTimestamp();
	SpinLockRelease(&slot->mutex);
}

/* curl: watch socket s for what it asks, in our epoll set. */
static int
socket_cb(CURL *easy, curl_socket_t s, int what, void *userp, void *socketp)
{
	struct epoll_event ev;

	memset(&ev, 0, sizeof(ev));
	ev.data.fd = s;
	if (what == CURL_POLL_REMOVE)
	{
		(void) epoll_ctl(epfd, EPOLL_CTL_DEL, s, NULL);
		return 0;
	}
	if (what & CURL_POLL_IN)
		ev.events |= EPOLLIN;
	if (what & CURL_POLL_OUT)
		ev.events |= EPOLLOUT;
	if (epoll_ctl(epfd, EPOLL_CTL_MOD, s, &ev) != 0 && errno == ENOENT)
		(void) epoll_ctl(epfd, EPOLL_CTL_ADD, s, &ev);
	return 0;
}

/* curl: call us back with a timeout after timeout_ms (-1: no timeout). */
static int
timer_cb(CURLM *m, long timeout_ms, void *userp)
{
	curl_deadline = timeout_ms < 0 ? 0 :
		TimestampTzPlusMilliseconds(GetCurrentTimestamp(), timeout_ms);
	return 0;
}

/* curl: a piece of the response body; refuse what exceeds the limit. */
static size_t
write_cb(char *ptr, size_t size, size_t nmemb, void *userdata)
{
	Transfer   *t = userdata;
	size_t		n = size * nmemb;

	if (t->len + n > (size_t) beat_max_response_size)
	{
		t->too_large = true;
		return 0;
	}
	if (t->len + n + 1 > t->cap)
	{
		size_t		cap = Max(t->cap * 2, Max(t->len + n + 1, 16384));
		char	   *p = realloc(t->body, cap);

		if (p == NULL)
			return 0;
		t->body = p;
		t->cap = cap;
	}
	memcpy(t->body + t->len, ptr, n);
	t->len += n;
	t->body[t->len] = '\0';
	return n;
}

/* curl: one response header line; a status line starts a new response. */
static size_t
header_cb(char *buffer, size_t size, size_t nitems, void *userdata)
{
	Transfer   *t = userdata;
	size_t		n = size * nitems;
	char	   *colon;
	size_t		namelen;
	const char *value;
	size_t		vlen;

	if (n >= 5 && strncmp(buffer, "HTTP/", 5) == 0)
	{
		json_object_clear(t->headers);
		return n;
	}
	colon = memchr(buffer, ':', n);
	if (colon == NULL)
		return n;
	namelen = colon - buffer;
	if (!beat_header_kept(buffer, namelen))
		return n;
	value = colon + 1;
	vlen = n - namelen - 1;
	while (vlen > 0 && (*value == ' ' || *value == '\t'))
		value++, vlen--;
	while (vlen > 0 && (value[vlen - 1] == '\r' || value[vlen - 1] == '\n' ||
						value[vlen - 1] == ' '))
		vlen--;
	{
		char		name[64];
		json_t	   *v = json_stringn(value, vlen);

		if (v != NULL && namelen < sizeof(name))
		{
			for (size_t i = 0; i < namelen; i++)
				name[i] = pg_ascii_tolower((unsigned char) buffer[i]);
			name[namelen] = '\0';
			json_object_set_new(t->headers, name, v);
		}
		else
			json_decref(v);
	}
	return n;
}

/* Free a transfer and all it holds. */
static void
transfer_free(Transfer *t)
{
	if (t->easy)
		curl_easy_cleanup(t->easy);
	beat_request_free(&t->req);
	free(t->body);
	json_decref(t->headers);
	free(t->build_error);
	free(t);
}

/* Read an int[] datum into a status set. */
static void
status_set(BeatStatusSet *set, Datum lo, Datum hi)
{
	Datum	   *los;
	Datum	   *his;
	bool	   *nulls;
	int			n;
	int			m;

	deconstruct_array(DatumGetArrayTypeP(lo), INT4OID, 4, true, TYPALIGN_INT,
					  &los, &nulls, &n);
	deconstruct_array(DatumGetArrayTypeP(hi), INT4OID, 4, true, TYPALIGN_INT,
					  &his, &nulls, &m);
	set->n = Min(Min(n, m), (int) lengthof(set->lo));
	for (int i = 0; i < set->n; i++)
	{
		set->lo[i] = DatumGetInt32(los[i]);
		set->hi[i] = DatumGetInt32(his[i]);
	}
}

/* Reread our flow's settings.  Inside SPI. */
static void
load_flow(void)
{
	Oid			argtypes[1] = {TEXTOID};
	Datum		v = CStringGetTextDatum(flow_name);
	HeapTuple	tup;
	TupleDesc	desc;
	bool		isnull;
	Datum		request;
	char	   *error = NULL;

	cfg_generation = pg_atomic_read_u32(&beat_shared->flow_generation);
	beat_prepare(&plan_flow,
				 "SELECT paused, concurrency,"
				 " (extract(epoch FROM timeout) * 1000)::bigint, max_redirects,"
				 " request::text,"
				 " array(SELECT coalesce(lower(r), 0) FROM unnest(ok_statuses) r),"
				 " array(SELECT coalesce(upper(r), 1000) FROM unnest(ok_statuses) r),"
				 " array(SELECT coalesce(lower(r), 0) FROM unnest(retry_statuses) r),"
				 " array(SELECT coalesce(upper(r), 1000) FROM unnest(retry_statuses) r),"
				 " limits"
				 " FROM beat.flow WHERE name = $1",
				 1, argtypes);
	beat_execute(plan_flow, &v, " ", SPI_OK_SELECT);

	beat_template_free(cfg.tmpl);
	for (int i = 0; i < cfg.nlimits; i++)
		free(cfg.limits[i]);
	memset(&cfg, 0, sizeof(cfg));
	cfg_loaded = true;
	if (SPI_processed == 0)
		return;

	tup = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;
	request = SPI_getbinval(tup, desc, 5, &isnull);
	if (isnull)
		return;					/* no template: the launcher will stop us */

	cfg.tmpl = beat_template_parse(TextDatumGetCString(request), &error);
	if (cfg.tmpl == NULL)
	{
		ereport(WARNING,
				(errmsg("pg_beat: flow \"%s\" has an unusable request template: %s",
						flow_name, error ? error : "?")));
		free(error);
		return;
	}
	cfg.exists = true;
	cfg.paused = DatumGetBool(SPI_getbinval(tup, desc, 1, &isnull));
	cfg.concurrency = DatumGetInt32(SPI_getbinval(tup, desc, 2, &isnull));
	cfg.timeout_ms = (long) DatumGetInt64(SPI_getbinval(tup, desc, 3, &isnull));
	cfg.max_redirects = DatumGetInt32(SPI_getbinval(tup, desc, 4, &isnull));
	status_set(&cfg.ok, SPI_getbinval(tup, desc, 6, &isnull),
			   SPI_getbinval(tup, desc, 7, &isnull));
	status_set(&cfg.retry, SPI_getbinval(tup, desc, 8, &isnull),
			   SPI_getbinval(tup, desc, 9, &isnull));
	{
		Datum	   *elems;
		bool	   *nulls;
		int			n;

		deconstruct_array(DatumGetArrayTypeP(SPI_getbinval(tup, desc, 10, &isnull)),
						  TEXTOID, -1, false, TYPALIGN_INT, &elems, &nulls, &n);
		cfg.limits_fixed = true;
		for (int i = 0; i < n && i < BEAT_MAX_STACKED_KEYS; i++)
		{
			cfg.limits[i] = strdup(TextDatumGetCString(elems[i]));
			if (strstr(cfg.limits[i], "{{") != NULL)
				cfg.limits_fixed = false;
		}
		cfg.nlimits = Min(n, BEAT_MAX_STACKED_KEYS);
	}
}

/* Queue a transfer that failed before it started, to be recorded. */
static void
finish_unsent(Transfer *t)
{
	t->next = finished;
	finished = t;
	n_finished++;
}

/* Record a claimed task as failed permanently before any request. */
static void
fail_unsent(int64 task_id, int attempt, const char *error)
{
	Transfer   *t = calloc(1, sizeof(Transfer));

	if (t == NULL)
		ereport(ERROR, (errcode(ERRCODE_OUT_OF_MEMORY), errmsg("out of memory")));
	t->task_id = task_id;
	t->attempt = attempt;
	t->req.method = cfg.tmpl ? cfg.tmpl->method : "GET";
	t->build_error = strdup(error);
	finish_unsent(t);
}

/* Build and start the transfer for one claimed task. */
static void
start_transfer(int64 task_id, int attempt, const char *params)
{
	Transfer   *t = calloc(1, sizeof(Transfer));
	char	   *error = NULL;

	if (t == NULL)
		ereport(ERROR, (errcode(ERRCODE_OUT_OF_MEMORY), errmsg("out of memory")));
	t->task_id = task_id;
	t->attempt = attempt;
	t->headers = beat_json_new_object();

	if (!beat_request_build(cfg.tmpl, params, beat_log_redact_params, &t->req, &error))
	{
		t->build_error = error;
		finish_unsent(t);
		return;
	}

	t->easy = curl_easy_init();
	if (t->easy == NULL)
	{
		t->build_error = strdup("could not create a curl handle");
		finish_unsent(t);
		return;
	}
	curl_easy_setopt(t->easy, CURLOPT_URL, t->req.url);
	curl_easy_setopt(t->easy, CURLOPT_PRIVATE, t);
	curl_easy_setopt(t->easy, CURLOPT_ERRORBUFFER, t->errbuf);
	curl_easy_setopt(t->easy, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(t->easy, CURLOPT_PROTOCOLS_STR, "http,https");
	curl_easy_setopt(t->easy, CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
	curl_easy_setopt(t->easy, CURLOPT_FOLLOWLOCATION, cfg.max_redirects > 0 ? 1L : 0L);
	curl_easy_setopt(t->easy, CURLOPT_MAXREDIRS, (long) cfg.max_redirects);
	curl_easy_setopt(t->easy, CURLOPT_TIMEOUT_MS, cfg.timeout_ms);
	curl_easy_setopt(t->easy, CURLOPT_MAXFILESIZE_LARGE, (curl_off_t) beat_max_response_size);
	curl_easy_setopt(t->easy, CURLOPT_WRITEFUNCTION, write_cb);
	curl_easy_setopt(t->easy, CURLOPT_WRITEDATA, t);
	curl_easy_setopt(t->easy, CURLOPT_HEADERFUNCTION, header_cb);
	curl_easy_setopt(t->easy, CURLOPT_HEADERDATA, t);
	curl_easy_setopt(t->easy, CURLOPT_USERAGENT, "pg_beat/" PG_BEAT_VERSION);
	curl_easy_setopt(t->easy, CURLOPT_ACCEPT_ENCODING, "");
	if (t->req.headers)
		curl_easy_setopt(t->easy, CURLOPT_HTTPHEADER, t->req.headers);
	if (strcmp(t->req.method, "HEAD") == 0)
		curl_easy_setopt(t->easy, CURLOPT_NOBODY, 1L);
	else if (strcmp(t->req.method, "GET") != 0)
		curl_easy_setopt(t->easy, CURLOPT_CUSTOMREQUEST, t->req.method);
	if (t->req.body)
	{
		curl_easy_setopt(t->easy, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t) t->req.body_len);
		curl_easy_setopt(t->easy, CURLOPT_POSTFIELDS, t->req.body);
	}

	if (curl_multi_add_handle(multi, t->easy) != CURLM_OK)
	{
		t->build_error = strdup("could not add the transfer to curl");
		finish_unsent(t);
		return;
	}
	t->next = inflight;
	inflight = t;
	n_inflight++;
}

static Datum make_array(Datum *values, bool *nulls, int n, Oid typid);

/*
 * Claim up to n due tasks, charge the flow's limits for each, and start
 * the transfers of those admitted; in one short transaction.  Returns
 * true when it got all it asked for, so more may be waiting.  Otherwise
 * sets *next_due to when something can next be claimed: the flow's next
 * waiting task, or the next admission of its limits (0: nothing known).
 */
static bool
claim_and_start(int n, TimestampTz *next_due)
{
	int			asked = n;
	Oid			argtypes[3] = {TEXTOID, TEXTOID, INT4OID};
	Datum		values[3];
	int			claimed;
	bool		isnull;

	values[0] = CStringGetTextDatum(flow_name);
	values[1] = CStringGetTextDatum(worker_name);
	values[2] = Int32GetDatum(n);

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();

	/*
	 * The claim's commit is durable, though a lost claim would only leave
	 * its tasks pending: the attempt it counts must survive a crash, or a
	 * task that crashes the worker would never run out of attempts.
	 */
	beat_spi_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, "pg_beat: claim");

	*next_due = 0;
	beat_limiter_refresh();

	/*
	 * Limits that every call passes (no placeholder): ask first, so that a
	 * flow at its limit claims nothing, and claim only what they admit.
	 */
	if (cfg.nlimits > 0 && cfg.limits_fixed)
	{
		char	   *error = NULL;
		BeatAcquireResult r = beat_limiter_try((const char *const *) cfg.limits,
											   cfg.nlimits, 1, BEAT_PEEK, &error);

		if (error == NULL && !r.allowed)
		{
			*next_due = GetCurrentTimestamp() + r.retry_us;
			n = 0;
		}
		else if (error == NULL && r.remaining < n - 1)
			n = (int) r.remaining + 1;
	}

	claimed = 0;
	if (n > 0)
	{
		Datum	   *refused_ids = palloc(sizeof(Datum) * n);
		Datum	   *refused_wait = palloc(sizeof(Datum) * n);
		int			nrefused = 0;
		int64		soonest = 0;
		SPITupleTable *rows;

		values[2] = Int32GetDatum(n);
		beat_prepare(&plan_claim,
					 "SELECT id, attempt, params::text FROM beat.claim($1, $2, $3)",
					 3, argtypes);
		beat_execute(plan_claim, values, "   ", SPI_OK_SELECT);
		claimed = (int) SPI_processed;
		rows = SPI_tuptable;
		for (int i = 0; i < claimed; i++)
		{
			HeapTuple	tup = rows->vals[i];
			TupleDesc	desc = rows->tupdesc;
			int64		id = DatumGetInt64(SPI_getbinval(tup, desc, 1, &isnull));
			int			attempt = DatumGetInt32(SPI_getbinval(tup, desc, 2, &isnull));
			char	   *params = TextDatumGetCString(SPI_getbinval(tup, desc, 3, &isnull));

			if (cfg.nlimits > 0)
			{
				char	   *keys[BEAT_MAX_STACKED_KEYS];
				char	   *error = NULL;
				BeatAcquireResult r;

				if (!beat_render_keys(cfg.limits, cfg.nlimits, params, keys, &error))
				{
					fail_unsent(id, attempt, psprintf("limit keys: %s", error));
					free(error);
					continue;
				}
				r = beat_limiter_try((const char *const *) keys, cfg.nlimits, 1,
									 BEAT_CHARGE, &error);
				for (int k = 0; k < cfg.nlimits; k++)
					free(keys[k]);
				if (error != NULL)
				{
					fail_unsent(id, attempt, error);
					continue;
				}
				if (!r.allowed)
				{
					/* wait exactly retry_after, as a scheduled task: not an attempt */
					refused_ids[nrefused] = Int64GetDatum(id);
					refused_wait[nrefused++] = Float8GetDatum(r.retry_us / 1000000.0);
					if (soonest == 0 || r.retry_us < soonest)
						soonest = r.retry_us;
					continue;
				}
			}
			start_transfer(id, attempt, params);
		}

		if (nrefused > 0)
		{
			Oid			types[3] = {INT8ARRAYOID, FLOAT8ARRAYOID, TEXTOID};
			Datum		args[3];

			args[0] = make_array(refused_ids, NULL, nrefused, INT8OID);
			args[1] = make_array(refused_wait, NULL, nrefused, FLOAT8OID);
			args[2] = values[1];
			beat_prepare(&plan_limited,
						 "UPDATE beat.task t SET state = 'scheduled',"
						 " run_at = statement_timestamp() + make_interval(secs => r.wait),"
						 " attempts = greatest(t.attempts - 1, 0),"
						 " lease_owner = NULL, lease_expires_at = NULL,"
						 " updated_at = statement_timestamp()"
						 " FROM unnest($1, $2) AS r(id, wait)"
						 " WHERE t.id = r.id AND t.state = 'running' AND t.lease_owner = $3",
						 3, types);
			beat_execute(plan_limited, args, "   ", SPI_OK_UPDATE);
			*next_due = GetCurrentTimestamp() + soonest;
		}
	}

	if (claimed < n && *next_due == 0)
	{
		Datum		ms;

		beat_prepare(&plan_next_due,
					 "SELECT (extract(epoch FROM min(run_at) - clock_timestamp()) * 1000)::float8"
					 " FROM beat.task WHERE flow = $1 AND state IN ('scheduled', 'failed')",
					 1, argtypes);
		beat_execute(plan_next_due, values, " ", SPI_OK_SELECT);
		ms = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
		if (!isnull)
			*next_due = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
													Max((long) ceil(DatumGetFloat8(ms)), 0));
	}

	/* bound by fixed limits: come back at their next admission */
	if (n < asked && n > 0 && claimed == n && *next_due == 0)
	{
		char	   *error = NULL;
		BeatAcquireResult r = beat_limiter_try((const char *const *) cfg.limits,
											   cfg.nlimits, 1, BEAT_PEEK, &error);

		*next_due = GetCurrentTimestamp() + (error == NULL && !r.allowed ? r.retry_us : 0);
	}

	PopActiveSnapshot();
	beat_spi_finish();
	CommitTransactionCommand();
	MemoryContextSwitchTo(pass_ctx);
	pgstat_report_stat(false);
	pgstat_report_activity(STATE_IDLE, NULL);
	return claimed == asked;
}

/* Give curl what is ready: sockets, then its timeout if it has come. */
static void
drive_curl(void)
{
	struct epoll_event events[MAX_EVENTS];
	int			running;
	int			n;

	n = epoll_wait(epfd, events, MAX_EVENTS, 0);
	for (int i = 0; i < n; i++)
	{
		int			flags = 0;

		if (events[i].events & EPOLLIN)
			flags |= CURL_CSELECT_IN;
		if (events[i].events & EPOLLOUT)
			flags |= CURL_CSELECT_OUT;
		if (events[i].events & (EPOLLERR | EPOLLHUP))
			flags |= CURL_CSELECT_ERR;
		curl_multi_socket_action(multi, events[i].data.fd, flags, &running);
	}
	if (curl_deadline != 0 && GetCurrentTimestamp() >= curl_deadline)
	{
		curl_deadline = 0;
		curl_multi_socket_action(multi, CURL_SOCKET_TIMEOUT, 0, &running);
	}
}

/* Move the transfers curl has finished from inflight to finished. */
static void
collect_done(void)
{
	CURLMsg    *m;
	int			left;

	while ((m = curl_multi_info_read(multi, &left)) != NULL)
	{
		Transfer   *t;
		Transfer  **p;

		if (m->msg != CURLMSG_DONE)
			continue;
		curl_easy_getinfo(m->easy_handle, CURLINFO_PRIVATE, (char **) &t);
		t->code = m->data.result;
		curl_multi_remove_handle(multi, t->easy);
		for (p = &inflight; *p; p = &(*p)->next)
			if (*p == t)
			{
				*p = t->next;
				break;
			}
		n_inflight--;
		t->next = finished;
		finished = t;
		n_finished++;
	}
}

/* A jsonb datum of text, or NULL if jsonb refuses it; never raises. */
static Datum
jsonb_or_null(const char *text, bool *isnull)
{
	MemoryContext cxt = CurrentMemoryContext;
	ResourceOwner owner = CurrentResourceOwner;
	Datum		result = (Datum) 0;

	*isnull = true;
	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(cxt);
	PG_TRY();
	{
		result = DirectFunctionCall1(jsonb_in, CStringGetDatum(text));
		*isnull = false;
		ReleaseCurrentSubTransaction();
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(cxt);
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
	}
	PG_END_TRY();
	MemoryContextSwitchTo(cxt);
	CurrentResourceOwner = owner;
	return result;
}

/* A curl timing in milliseconds, or NULL when curl has none. */
static Datum
timing_ms(CURL *easy, CURLINFO info, bool *isnull)
{
	curl_off_t	us = -1;

	*isnull = easy == NULL || curl_easy_getinfo(easy, info, &us) != CURLE_OK || us < 0;
	return Float8GetDatum(*isnull ? 0 : us / 1000.0);
}

/* A one-dimensional array of n datums of type typid, with nulls. */
static Datum
make_array(Datum *values, bool *nulls, int n, Oid typid)
{
	int16		typlen;
	bool		typbyval;
	char		typalign;
	int			dims[1] = {n};
	int			lbs[1] = {1};

	get_typlenbyvalalign(typid, &typlen, &typbyval, &typalign);
	return PointerGetDatum(construct_md_array(values, nulls, 1, dims, lbs, typid,
											  typlen, typbyval, typalign));
}

/*
 * Record every finished transfer in one transaction: the task's new state
 * and result, and a row of beat.http_log each.  A task whose lease we lost
 * (reaped or cancelled meanwhile) is left alone and logged as 'lost'.
 */
static void
record_finished(void)
{
	int			n = n_finished;
	Datum	   *ids = palloc(sizeof(Datum) * n);
	Datum	   *attempts = palloc(sizeof(Datum) * n);
	Datum	   *outcomes = palloc(sizeof(Datum) * n);
	Datum	   *results = palloc(sizeof(Datum) * n);
	Datum	   *errors = palloc(sizeof(Datum) * n);
	Datum	   *retry = palloc(sizeof(Datum) * n);
	Datum	   *methods = palloc(sizeof(Datum) * n);
	Datum	   *urls = palloc(sizeof(Datum) * n);
	Datum	   *statuses = palloc(sizeof(Datum) * n);
	Datum	   *bytes = palloc(sizeof(Datum) * n);
	Datum	   *timings[5];
	bool	   *result_nulls = palloc0(sizeof(bool) * n);
	bool	   *error_nulls = palloc0(sizeof(bool) * n);
	bool	   *retry_nulls = palloc0(sizeof(bool) * n);
	bool	   *status_nulls = palloc0(sizeof(bool) * n);
	bool	   *timing_nulls[5];
	bool	   *lost = palloc0(sizeof(bool) * n);
	static const CURLINFO timing_info[5] = {
		CURLINFO_NAMELOOKUP_TIME_T, CURLINFO_CONNECT_TIME_T,
		CURLINFO_APPCONNECT_TIME_T, CURLINFO_STARTTRANSFER_TIME_T,
		CURLINFO_TOTAL_TIME_T
	};
	Transfer   *t;
	int			i;
	int64	   *updated;
	uint64		done_before = stat_done;

	for (int k = 0; k < 5; k++)
	{
		timings[k] = palloc(sizeof(Datum) * n);
		timing_nulls[k] = palloc0(sizeof(bool) * n);
	}

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	pgstat_report_activity(STATE_RUNNING, "pg_beat: record results");

	/* judge each transfer; the jsonb conversions run before SPI */
	for (t = finished, i = 0; t != NULL; t = t->next, i++)
	{
		long		status = 0;
		BeatOutcome outcome;
		char	   *error = NULL;
		curl_off_t	retry_after = -1;
		double		total_ms = 0;

		ids[i] = Int64GetDatum(t->task_id);
		attempts[i] = Int32GetDatum(t->attempt);
		methods[i] = CStringGetTextDatum(t->req.method ? t->req.method : "GET");
		urls[i] = CStringGetTextDatum(t->req.url_logged ? t->req.url_logged : "");
		bytes[i] = Int64GetDatum((int64) t->len);
		for (int k = 0; k < 5; k++)
			timings[k][i] = timing_ms(t->easy, timing_info[k], &timing_nulls[k][i]);
		result_nulls[i] = true;
		retry_nulls[i] = true;

		if (t->build_error)
		{
			outcome = BEAT_OUTCOME_PERMANENT;
			error = psprintf("request not sent: %s", t->build_error);
		}
		else if (t->code == CURLE_OK)
		{
			curl_easy_getinfo(t->easy, CURLINFO_RESPONSE_CODE, &status);
			if (beat_status_in(&cfg.ok, status))
				outcome = BEAT_OUTCOME_OK;
			else if (beat_status_in(&cfg.retry, status))
				outcome = BEAT_OUTCOME_RETRY;
			else
				outcome = BEAT_OUTCOME_PERMANENT;
			if (outcome != BEAT_OUTCOME_OK)
				error = psprintf("HTTP %ld", status);
			if (outcome == BEAT_OUTCOME_RETRY &&
				curl_easy_getinfo(t->easy, CURLINFO_RETRY_AFTER, &retry_after) == CURLE_OK &&
				retry_after > 0)
			{
				retry[i] = Float8GetDatum((double) retry_after);
				retry_nulls[i] = false;
			}
			if (!timing_nulls[4][i])
				total_ms = DatumGetFloat8(timings[4][i]);
			{
				/* the body as it came; if jsonb refuses it, as a string */
				char	   *json = beat_result_json(status, t->headers, t->body, t->len,
													total_ms, true);

				if (json != NULL)
				{
					results[i] = jsonb_or_null(json, &result_nulls[i]);
					free(json);
				}
				if (result_nulls[i])
				{
					json = beat_result_json(status, t->headers, t->body, t->len,
											total_ms, false);
					if (json != NULL)
					{
						results[i] = jsonb_or_null(json, &result_nulls[i]);
						free(json);
					}
				}
			}
		}
		else if (t->too_large || t->code == CURLE_FILESIZE_EXCEEDED)
		{
			outcome = BEAT_OUTCOME_PERMANENT;
			error = psprintf("response larger than beat.max_response_size (%d bytes)",
							 beat_max_response_size);
		}
		else if (t->code == CURLE_TOO_MANY_REDIRECTS)
		{
			outcome = BEAT_OUTCOME_PERMANENT;
			error = psprintf("more than %d redirects", cfg.max_redirects);
		}
		else
		{
			outcome = beat_classify_curl(t->code);
			error = psprintf("%s%s%s", curl_easy_strerror(t->code),
							 t->errbuf[0] ? ": " : "", t->errbuf);
		}

		if (status > 0)
			statuses[i] = Int32GetDatum((int32) status);
		else
			status_nulls[i] = true;
		outcomes[i] = CStringGetTextDatum(outcome == BEAT_OUTCOME_OK ? "ok" :
										  outcome == BEAT_OUTCOME_RETRY ? "retry" :
										  "permanent");
		if (error)
			errors[i] = CStringGetTextDatum(error);
		else
			error_nulls[i] = true;
	}

	beat_spi_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
	{
		Oid			argtypes[6] = {INT8ARRAYOID, TEXTARRAYOID, JSONBARRAYOID,
		TEXTARRAYOID, FLOAT8ARRAYOID, TEXTOID};
		Datum		values[6];
		uint64		nupdated;
		bool		isnull;

		values[0] = make_array(ids, NULL, n, INT8OID);
		values[1] = make_array(outcomes, NULL, n, TEXTOID);
		values[2] = make_array(results, result_nulls, n, JSONBOID);
		values[3] = make_array(errors, error_nulls, n, TEXTOID);
		values[4] = make_array(retry, retry_nulls, n, FLOAT8OID);
		values[5] = CStringGetTextDatum(worker_name);

		beat_prepare(&plan_record,
					 "UPDATE beat.task t SET"
					 " state = CASE WHEN r.outcome = 'ok' THEN 'succeeded'::beat.task_state"
					 "   WHEN r.outcome = 'permanent' OR t.attempts >= t.max_attempts"
					 "   THEN 'dead'::beat.task_state ELSE 'failed'::beat.task_state END,"
					 " result = r.result,"
					 " last_error = CASE WHEN r.outcome = 'ok' THEN t.last_error ELSE r.error END,"
					 " run_at = CASE WHEN r.outcome = 'retry' AND t.attempts < t.max_attempts"
					 "   THEN statement_timestamp() + "
					 BACKOFF_SQL("make_interval(secs => r.retry_after)")
					 "   ELSE t.run_at END,"
					 " finished_at = CASE WHEN r.outcome = 'retry' AND t.attempts < t.max_attempts"
					 "   THEN NULL ELSE statement_timestamp() END,"
					 " lease_owner = NULL, lease_expires_at = NULL,"
					 " updated_at = statement_timestamp()"
					 " FROM unnest($1, $2, $3, $4, $5) AS r(id, outcome, result, error, retry_after),"
					 "   beat.flow f"
					 " WHERE t.id = r.id AND f.name = t.flow AND t.state = 'running'"
					 "   AND t.lease_owner = $6"
					 " RETURNING t.id, t.state = 'succeeded'",
					 6, argtypes);
		beat_execute(plan_record, values, "      ", SPI_OK_UPDATE_RETURNING);

		/* what was not updated had lost its lease (ids are unique here) */
		nupdated = SPI_processed;
		updated = palloc(sizeof(int64) * Max(nupdated, 1));
		for (uint64 r = 0; r < nupdated; r++)
		{
			updated[r] = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[r],
													 SPI_tuptable->tupdesc, 1, &isnull));
			if (DatumGetBool(SPI_getbinval(SPI_tuptable->vals[r],
										   SPI_tuptable->tupdesc, 2, &isnull)))
				stat_done++;
			else
				stat_failed++;
		}

		/*
		 * Failed, or retried later: a retry's run_at must be seen by whoever
		 * sleeps until the next due task (us too), so wake the flow's
		 * workers at commit; they reread it.
		 */
		if (nupdated > (uint64) (stat_done - done_before))
			beat_wake_at_commit(flow_name);

		qsort(updated, nupdated, sizeof(int64), beat_cmp_int64);
		for (i = 0; i < n; i++)
		{
			int64		id = DatumGetInt64(ids[i]);

			lost[i] = bsearch(&id, updated, nupdated, sizeof(int64), beat_cmp_int64) == NULL;
		}
		for (i = 0; i < n; i++)
			if (lost[i])
				outcomes[i] = CStringGetTextDatum("lost");
	}
	{
		Oid			argtypes[15] = {TEXTOID, TEXTOID, INT8ARRAYOID, INT4ARRAYOID,
			TEXTARRAYOID, TEXTARRAYOID, INT4ARRAYOID, INT8ARRAYOID,
			FLOAT8ARRAYOID, FLOAT8ARRAYOID, FLOAT8ARRAYOID, FLOAT8ARRAYOID,
		FLOAT8ARRAYOID, TEXTARRAYOID, TEXTARRAYOID};
		Datum		values[15];

		values[0] = CStringGetTextDatum(flow_name);
		values[1] = CStringGetTextDatum(worker_name);
		values[2] = make_array(ids, NULL, n, INT8OID);
		values[3] = make_array(attempts, NULL, n, INT4OID);
		values[4] = make_array(methods, NULL, n, TEXTOID);
		values[5] = make_array(urls, NULL, n, TEXTOID);
		values[6] = make_array(statuses, status_nulls, n, INT4OID);
		values[7] = make_array(bytes, NULL, n, INT8OID);
		for (int k = 0; k < 5; k++)
			values[8 + k] = make_array(timings[k], timing_nulls[k], n, FLOAT8OID);
		values[13] = make_array(outcomes, NULL, n, TEXTOID);
		values[14] = make_array(errors, error_nulls, n, TEXTOID);

		beat_prepare(&plan_log,
					 "INSERT INTO beat.http_log (task_id, flow, attempt, worker, method, url,"
					 " status, bytes, dns_ms, connect_ms, tls_ms, first_byte_ms, total_ms,"
					 " outcome, error)"
					 " SELECT l.task_id, $1, l.attempt, $2, l.method, l.url, l.status, l.bytes,"
					 "   l.dns, l.conn, l.tls, l.fb, l.total, l.outcome, l.error"
					 " FROM unnest($3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)"
					 "   AS l(task_id, attempt, method, url, status, bytes, dns, conn, tls, fb,"
					 "        total, outcome, error)",
					 15, argtypes);
		beat_execute(plan_log, values, "               ", SPI_OK_INSERT);
	}
	PopActiveSnapshot();
	beat_spi_finish();
	CommitTransactionCommand();
	MemoryContextSwitchTo(pass_ctx);
	pgstat_report_stat(false);
	pgstat_report_activity(STATE_IDLE, NULL);

	while (finished)
	{
		t = finished;
		finished = t->next;
		transfer_free(t);
	}
	n_finished = 0;
}

/*
 * Abandon the transfers still in flight and hand their tasks back to
 * pending without counting the attempt: we stopped, the task did nothing.
 */
static void
hand_back_inflight(void)
{
	Datum	   *ids = palloc(sizeof(Datum) * Max(n_inflight, 1));
	int			n = 0;
	Oid			argtypes[2] = {INT8ARRAYOID, TEXTOID};
	Datum		values[2];

	while (inflight)
	{
		Transfer   *t = inflight;

		inflight = t->next;
		ids[n++] = Int64GetDatum(t->task_id);
		curl_multi_remove_handle(multi, t->easy);
		transfer_free(t);
	}
	n_inflight = 0;
	if (n == 0)
		return;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	values[0] = make_array(ids, NULL, n, INT8OID);	/* needs a transaction */
	values[1] = CStringGetTextDatum(worker_name);
	beat_spi_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
	beat_prepare(&plan_hand_back,
				 "UPDATE beat.task SET state = 'pending',"
				 " attempts = greatest(attempts - 1, 0),"
				 " lease_owner = NULL, lease_expires_at = NULL,"
				 " updated_at = statement_timestamp()"
				 " WHERE id = ANY ($1) AND state = 'running' AND lease_owner = $2",
				 2, argtypes);
	beat_execute(plan_hand_back, values, "  ", SPI_OK_UPDATE);
	if (SPI_processed > 0)
		ereport(LOG,
				(errmsg("pg_beat: worker for flow \"%s\" stopping; handed back " UINT64_FORMAT " tasks in flight",
						flow_name, SPI_processed)));
	/* the other workers of the flow take these at once */
	beat_wake_at_commit(flow_name);
	PopActiveSnapshot();
	beat_spi_finish();
	CommitTransactionCommand();
	MemoryContextSwitchTo(pass_ctx);
}

/* Reread our flow in a transaction of its own. */
static void
reload_flow(void)
{
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	beat_spi_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
	load_flow();
	PopActiveSnapshot();
	beat_spi_finish();
	CommitTransactionCommand();
	MemoryContextSwitchTo(pass_ctx);
}

/* Milliseconds from now until ts, at least 0. */
static long
ms_until(TimestampTz ts)
{
	return Max(TimestampDifferenceMilliseconds(GetCurrentTimestamp(), ts), 0);
}

/* Entry point of a flow worker; arg is its slot number. */
void
beat_worker_main(Datum arg)
{
	int			slot_no = DatumGetInt32(arg);
	WaitEventSet *wes;
	bool		want_claim = true;
	TimestampTz next_due = 0;
	TimestampTz stop_deadline = 0;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, SignalHandlerForShutdownRequest);
	BackgroundWorkerUnblockSignals();

	slot = &beat_shared->workers[slot_no];
	LWLockAcquire(beat_shared->lock, LW_EXCLUSIVE);
	if (slot->state != BEAT_SLOT_STARTING)
	{
		LWLockRelease(beat_shared->lock);
		proc_exit(0);
	}
	slot->pid = MyProcPid;
	slot->latch = MyLatch;
	slot->state = BEAT_SLOT_IDLE;
	strlcpy(flow_name, slot->flow, NAMEDATALEN);
	my_index = slot->index;
	my_generation = slot->generation;
	LWLockRelease(beat_shared->lock);
	before_shmem_exit(worker_detach, 0);

	BackgroundWorkerInitializeConnection(beat_database_name, NULL, 0);
	worker_name = MemoryContextStrdup(TopMemoryContext,
									  beat_worker_name(flow_name, my_index, MyProcPid));
	pgstat_report_appname(psprintf("pg_beat worker %s/%d", flow_name, my_index));

	if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
		elog(ERROR, "pg_beat: curl_global_init failed");
	multi = curl_multi_init();
	epfd = epoll_create1(EPOLL_CLOEXEC);
	if (multi == NULL || epfd < 0)
		elog(ERROR, "pg_beat: could not set up curl: %m");
	curl_multi_setopt(multi, CURLMOPT_SOCKETFUNCTION, socket_cb);
	curl_multi_setopt(multi, CURLMOPT_TIMERFUNCTION, timer_cb);

	wes = CreateWaitEventSet(TopMemoryContext, 3);
	AddWaitEventToSet(wes, WL_LATCH_SET, PGINVALID_SOCKET, MyLatch, NULL);
	AddWaitEventToSet(wes, WL_EXIT_ON_PM_DEATH, PGINVALID_SOCKET, NULL, NULL);
	AddWaitEventToSet(wes, WL_SOCKET_READABLE, epfd, NULL, NULL);

	pass_ctx = AllocSetContextCreate(TopMemoryContext, "pg_beat worker pass",
									 ALLOCSET_DEFAULT_SIZES);
	reload_flow();

	for (;;)
	{
		bool		stopping;
		long		timeout;
		WaitEvent	event;

		MemoryContextReset(pass_ctx);
		MemoryContextSwitchTo(pass_ctx);
		CHECK_FOR_INTERRUPTS();

		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}
		if (pg_atomic_read_u32(&beat_shared->flow_generation) != cfg_generation)
			reload_flow();

		stopping = ShutdownRequestPending ||
			beat_shared->launcher_generation != my_generation || !cfg.exists;
		if (stopping && stop_deadline == 0)
		{
			stop_deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
														beat_shutdown_grace);
			publish(BEAT_SLOT_STOPPING);
		}

		/*
		 * Claim what fits, unless stopping, paused or drained.  We say we
		 * are claiming before we look at draining, and beat.drain() sets
		 * draining before it looks at who is claiming: with a barrier on
		 * each side, either we see draining or drain sees us and waits.
		 */
		if (!stopping && want_claim && !cfg.paused &&
			n_inflight + n_finished < cfg.concurrency)
		{
			pg_atomic_write_u32(&slot->claiming, 1);
			pg_memory_barrier();
			if (pg_atomic_read_u32(&beat_shared->draining) == 0)
			{
				int			free_slots = cfg.concurrency - n_inflight - n_finished;

				/* a full claim may have left more behind: ask again when slots free */
				want_claim = claim_and_start(free_slots, &next_due);
				publish(n_inflight > 0 ? BEAT_SLOT_BUSY : BEAT_SLOT_IDLE);
			}
			pg_memory_barrier();
			pg_atomic_write_u32(&slot->claiming, 0);
		}

		drive_curl();
		collect_done();
		if (n_finished > 0)
		{
			bool		was_full = n_inflight + n_finished >= cfg.concurrency;

			record_finished();
			if (was_full)
				want_claim = true;
		}

		if (stopping && (n_inflight == 0 || GetCurrentTimestamp() >= stop_deadline))
		{
			hand_back_inflight();
			publish(BEAT_SLOT_STOPPING);
			/* tell the launcher this was no crash: no restart backoff */
			LWLockAcquire(beat_shared->lock, LW_EXCLUSIVE);
			slot->clean_exit = true;
			LWLockRelease(beat_shared->lock);
			proc_exit(0);
		}
		publish(n_inflight > 0 ? BEAT_SLOT_BUSY : BEAT_SLOT_IDLE);

		/* sleep until the latch, a socket, curl's timer or the next due task */
		timeout = SAFETY_WAKE_MS;
		if (curl_deadline != 0)
			timeout = Min(timeout, ms_until(curl_deadline));
		if (!want_claim && next_due != 0)
			timeout = Min(timeout, ms_until(next_due));
		if (stopping)
			timeout = Min(timeout, ms_until(stop_deadline));
		if (want_claim && n_inflight < cfg.concurrency && !stopping && !cfg.paused &&
			pg_atomic_read_u32(&beat_shared->draining) == 0)
			timeout = 0;

		if (WaitEventSetWait(wes, timeout, &event, 1, PG_WAIT_EXTENSION) > 0)
		{
			if (event.events & WL_LATCH_SET)
			{
				ResetLatch(MyLatch);
				want_claim = true;
			}
		}
		else if (timeout == SAFETY_WAKE_MS)
			want_claim = true;	/* in case a wake-up was lost */
		if (next_due != 0 && GetCurrentTimestamp() >= next_due)
		{
			next_due = 0;
			want_claim = true;
		}
	}
}
