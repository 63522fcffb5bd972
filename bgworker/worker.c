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
#include "access/xlog.h"
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
#include "utils/guc.h"
#undef json_object				/* and never call it: see http.h */
#include "utils/jsonb.h"
#include "utils/datum.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/resowner.h"
#include "utils/snapmgr.h"

#include "pg_beat.h"
#include "limiter.h"
#include "http.h"
#include "route.h"
#include "journal.h"

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
	char		refused[160];	/* the request was refused: host or address */
	bool		sent;			/* a request went out (prereq_cb let one go) */
	/* flows that name an operation: who serves this call */
	char	   *params;			/* the task's params (malloc'd), to call again */
	Route	   *route;			/* the snapshot prov was chosen from (held), or NULL */
	int			prov;			/* index into route, or -1: the flow's request */
	int			cred;			/* index into its creds, or -1: no key */
	bool		pinned;			/* a continuation page: only prov may serve */
	uint64		tried;			/* route's providers that failed this attempt */
	int			hops;			/* calls made before this one in this attempt */
	TimestampTz probe;			/* the breaker probe it took, or 0 (provider_of) */
	json_t	   *all_headers;	/* every response header, for the rules */
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
	bool		is_op;			/* served through the route of operation */
	char		operation[NAMEDATALEN];
} FlowConfig;

#define SAFETY_WAKE_MS	30000	/* a wake-up that was lost costs at most this */
#define MAX_HOPS		16		/* calls one attempt may make across providers */
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
static Route *route = NULL;		/* cfg.is_op: the providers of the operation */
static MemoryContext pass_ctx;	/* reset every pass of the loop */
static uint32 cfg_generation;

static SPIPlanPtr plan_flow = NULL;
static SPIPlanPtr plan_claim = NULL;
static SPIPlanPtr plan_next_due = NULL;
static SPIPlanPtr plan_record = NULL;
static SPIPlanPtr plan_log = NULL;
static SPIPlanPtr plan_hand_back = NULL;
static SPIPlanPtr plan_limited = NULL;
static SPIPlanPtr plan_claim_op = NULL;
static SPIPlanPtr plan_next_page = NULL;
static SPIPlanPtr plan_credentials = NULL;
static SPIPlanPtr plan_disable_key = NULL;
static SPIPlanPtr plan_parse = NULL;
static SPIPlanPtr plan_ingest = NULL;
static SPIPlanPtr plan_ingest_failed = NULL;
static SPIPlanPtr plan_extend = NULL;

/* Free our slot when we exit, however we exit. */
static void
worker_detach(int code, Datum arg)
{
	beat_journal_remove();

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
		if (t->all_headers)
			json_object_clear(t->all_headers);
		return n;
	}
	colon = memchr(buffer, ':', n);
	if (colon == NULL)
		return n;
	namelen = colon - buffer;
	if (!beat_header_kept(buffer, namelen) && t->all_headers == NULL)
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
			if (t->all_headers)
				json_object_set(t->all_headers, name, v);
			if (beat_header_kept(buffer, namelen))
				json_object_set(t->headers, name, v);
		}
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
	json_decref(t->all_headers);
	free(t->build_error);
	free(t->params);
	route_release(t->route);
	free(t);
}

/* The provider that serves transfer t, or NULL for a request flow's. */
static RouteProvider *
provider_of(const Transfer *t)
{
	return t->route && t->prov >= 0 ? &t->route->providers[t->prov] : NULL;
}

/* The key t uses, or NULL. */
static RouteCred *
cred_of(const Transfer *t)
{
	RouteProvider *p = provider_of(t);

	return p && t->cred >= 0 ? &p->creds[t->cred] : NULL;
}

static int64
cred_id_of(const Transfer *t)
{
	RouteCred  *c = cred_of(t);

	return c ? c->id : 0;
}

/*
 * Is url's host outside the allowed hosts of t's provider?  Then say so in
 * t->refused.  A transfer without a provider (a flow's own request) may go
 * anywhere its template says.
 */
static bool
host_refused(Transfer *t, const char *url)
{
	char		host[128];

	if (provider_of(t) == NULL || route_host_allowed(provider_of(t), url, host, sizeof(host)))
		return false;
	snprintf(t->refused, sizeof(t->refused),
			 "host %s is not in the allowed hosts of provider \"%s\"", host,
			 provider_of(t)->name);
	return true;
}

/*
 * curl: a connection is ready and the request about to go, for the first
 * URL and every redirect.  Refuse private and loopback addresses unless
 * beat.allow_private_addresses, and a host outside the provider's list.
 */
static int
prereq_cb(void *clientp, char *ip, char *local_ip, int port, int local_port)
{
	Transfer   *t = clientp;
	char	   *url = NULL;

	if (!beat_allow_private_addresses && beat_address_private(ip))
	{
		snprintf(t->refused, sizeof(t->refused),
				 "address %s is loopback or private (beat.allow_private_addresses is off)", ip);
		return CURL_PREREQFUNC_ABORT;
	}
	if (provider_of(t) &&
		curl_easy_getinfo(t->easy, CURLINFO_EFFECTIVE_URL, &url) == CURLE_OK && url != NULL &&
		host_refused(t, url))
		return CURL_PREREQFUNC_ABORT;
	t->sent = true;
	return CURL_PREREQFUNC_OK;
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
				 " limits, operation"
				 " FROM beat.flow WHERE name = $1",
				 1, argtypes);
	beat_execute(plan_flow, &v, " ", SPI_OK_SELECT);

	beat_template_free(cfg.tmpl);
	for (int i = 0; i < cfg.nlimits; i++)
		free(cfg.limits[i]);
	memset(&cfg, 0, sizeof(cfg));
	if (SPI_processed == 0)
		return;

	tup = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;
	request = SPI_getbinval(tup, desc, 5, &isnull);
	if (!isnull)
	{
		cfg.tmpl = beat_template_parse(TextDatumGetCString(request), &error);
		if (cfg.tmpl == NULL)
		{
			ereport(WARNING,
					(errmsg("pg_beat: flow \"%s\" has an unusable request template: %s",
							flow_name, error ? error : "?")));
			free(error);
			return;
		}
	}
	else
	{
		Datum		op = SPI_getbinval(tup, desc, 11, &isnull);

		if (isnull)
			return;				/* no request, no operation: the launcher stops us */
		cfg.is_op = true;
		strlcpy(cfg.operation, TextDatumGetCString(op), NAMEDATALEN);
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
	route_release(route);
	route = NULL;
	if (cfg.is_op)
	{
		route = route_load(cfg.operation);
		if (route->nproviders == 0)
			ereport(WARNING,
					(errmsg("pg_beat: no provider serves operation \"%s\" of flow \"%s\"; its tasks wait",
							cfg.operation, flow_name),
					 errhint("Add one with beat.set_route().")));
	}
}

/* Queue a transfer to be recorded: one curl finished, or one never sent. */
static void
queue_finished(Transfer *t)
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
	t->prov = -1;
	t->cred = -1;
	strlcpy(t->req.method, cfg.tmpl ? cfg.tmpl->method : "GET", sizeof(t->req.method));
	t->build_error = strdup(error);
	queue_finished(t);
}

/* A new transfer for a claimed task (malloc'd). */
static Transfer *
transfer_new(int64 task_id, int attempt, const char *params)
{
	Transfer   *t = calloc(1, sizeof(Transfer));

	if (t == NULL || (t->params = strdup(params)) == NULL)
		ereport(ERROR, (errcode(ERRCODE_OUT_OF_MEMORY), errmsg("out of memory")));
	t->task_id = task_id;
	t->attempt = attempt;
	t->prov = -1;
	t->cred = -1;
	t->headers = beat_json_new_object();
	return t;
}

/*
 * Build t's request from tmpl (and the key's secret) and hand it to curl;
 * a transfer that cannot start is queued to be recorded as failed (its
 * sent stays false: record_finished gives back what the call was charged).
 */
static void
launch(Transfer *t, const BeatTemplate *tmpl, json_t *secret, long timeout_ms)
{
	char	   *error = NULL;

	if (!beat_request_build(tmpl, t->params, beat_log_redact_params, secret, &t->req, &error))
	{
		t->build_error = error;
		queue_finished(t);
		return;
	}
	if (host_refused(t, t->req.url))
	{
		/* refused before anything is connected to */
		queue_finished(t);
		return;
	}

	t->easy = curl_easy_init();
	if (t->easy == NULL)
	{
		t->build_error = strdup("could not create a curl handle");
		queue_finished(t);
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
	curl_easy_setopt(t->easy, CURLOPT_TIMEOUT_MS, timeout_ms);
	curl_easy_setopt(t->easy, CURLOPT_MAXFILESIZE_LARGE, (curl_off_t) beat_max_response_size);
	curl_easy_setopt(t->easy, CURLOPT_WRITEFUNCTION, write_cb);
	curl_easy_setopt(t->easy, CURLOPT_WRITEDATA, t);
	curl_easy_setopt(t->easy, CURLOPT_HEADERFUNCTION, header_cb);
	curl_easy_setopt(t->easy, CURLOPT_HEADERDATA, t);
	curl_easy_setopt(t->easy, CURLOPT_PREREQFUNCTION, prereq_cb);
	curl_easy_setopt(t->easy, CURLOPT_PREREQDATA, t);
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
		queue_finished(t);
		return;
	}
	t->next = inflight;
	inflight = t;
	n_inflight++;
}

/* Build and start the transfer for one claimed task of a request flow. */
static void
start_transfer(int64 task_id, int attempt, const char *params)
{
	launch(transfer_new(task_id, attempt, params), cfg.tmpl, NULL, cfg.timeout_ms);
}

/* How a call of an operation's task went out, or why it did not. */
typedef enum DispatchResult
{
	DISPATCH_STARTED,			/* a provider and key took it (or it is queued failed) */
	DISPATCH_WAIT,				/* nothing can serve now: *until, *why */
	DISPATCH_FAIL				/* it can never be served as it is: *why */
} DispatchResult;

/*
 * The providers of t's attempt that failed, as indexes into the current
 * route (t's mask is over the snapshot t was chosen from).
 */
static uint64
tried_now(const Transfer *t)
{
	uint64		mask = 0;

	if (t->route == NULL || t->route == route)
		return t->tried;
	for (int i = 0; i < t->route->nproviders; i++)
		if (t->tried & (UINT64CONST(1) << i))
		{
			int			j = route_find(route, t->route->providers[i].name);

			if (j >= 0)
				mask |= UINT64CONST(1) << j;
		}
	return mask;
}

/*
 * Choose a provider and key for the next call of t's task and start it.
 * t carries the attempt's history (tried, hops); pinned names the only
 * provider that may serve (a continuation page), or is NULL.  On anything
 * but STARTED the caller still owns t.
 */
static DispatchResult
dispatch(Transfer *t, const char *pinned, TimestampTz *until, char **why)
{
	RouteChoice c;
	RouteProvider *p;
	Transfer   *n;
	int			pin = -1;
	uint64		tried = tried_now(t);

	if (pinned && (pin = route_find(route, pinned)) < 0)
	{
		*why = psprintf("the cursor belongs to provider \"%s\", which no longer serves operation \"%s\"",
						pinned, cfg.operation);
		return DISPATCH_FAIL;
	}
	c = route_choose(route, t->params, pin, tried, GetCurrentTimestamp());
	if (c.provider < 0)
	{
		*until = c.wait_until;
		*why = pinned ? psprintf("the cursor belongs to provider \"%s\": %s", pinned, c.why) :
			c.why;
		return DISPATCH_WAIT;
	}

	/* a fresh transfer, carrying the attempt's history */
	n = transfer_new(t->task_id, t->attempt, t->params);
	n->route = route;
	route->refcount++;
	n->prov = c.provider;
	n->cred = c.cred;
	n->pinned = pinned != NULL;
	n->tried = tried;
	n->hops = t->hops + 1;		/* the claim's seed has -1 */
	n->probe = c.probe;
	n->all_headers = beat_json_new_object();
	p = provider_of(n);
	launch(n, p->tmpl, c.cred >= 0 ? p->creds[c.cred].secret : NULL, p->timeout_ms);
	return DISPATCH_STARTED;
}

/* Start one of our short transactions (activity: what pg_stat_activity shows). */
static void
xact_begin(const char *activity)
{
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	if (activity)
		pgstat_report_activity(STATE_RUNNING, activity);
}

/*
 * Commit it (SPI connected, a snapshot pushed) and go back to the pass's
 * memory; with report, flush statistics and show the worker idle.
 */
static void
xact_end(bool report)
{
	PopActiveSnapshot();
	beat_spi_finish();
	CommitTransactionCommand();
	MemoryContextSwitchTo(pass_ctx);
	if (report)
	{
		pgstat_report_stat(false);
		pgstat_report_activity(STATE_IDLE, NULL);
	}
}


/*
 * The claim journal (journal.c): start its next content with every attempt
 * under way, in flight or finished and not yet recorded.
 */
static void
journal_collect(void)
{
	beat_journal_reset();
	for (Transfer *t = inflight; t != NULL; t = t->next)
		beat_journal_add(t->task_id, t->attempt);
	for (Transfer *t = finished; t != NULL; t = t->next)
		beat_journal_add(t->task_id, t->attempt);
}

/*
 * Write it.  After a claim, a journal that could not be written is replaced
 * by what it stands for: the claim's commit reaching the disk.
 */
static void
journal_write(bool after_claim)
{
	static bool warned = false;

	if (beat_journal_write())
		return;
	if (!warned)
		ereport(WARNING,
				(errcode_for_file_access(),
				 errmsg("pg_beat: could not write the claim journal: %m"),
				 errdetail("Claims wait for the disk instead; after a crash, a task whose attempt was given back may count it again.")));
	warned = true;
	if (after_claim)
		XLogFlush(XactLastCommitEnd);
}

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

	xact_begin("pg_beat: claim");

	/*
	 * The claim commits without waiting for the disk: that flush would sit
	 * between a task's enqueue and its request.  A claim lost in a crash
	 * leaves its tasks as they were, to be claimed again; the attempt it
	 * counted is kept by the claim journal (journal.c), written below before
	 * any of these transfers starts.  The result's commit, which waits,
	 * flushes the claim with it.
	 */
	(void) set_config_option("synchronous_commit", "off", PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_LOCAL, true, 0, false);
	beat_spi_connect();
	PushActiveSnapshot(GetTransactionSnapshot());

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

		Datum	   *refused_why = palloc(sizeof(Datum) * n);
		bool	   *why_nulls = palloc(sizeof(bool) * n);

		values[2] = Int32GetDatum(n);
		if (cfg.is_op)
			beat_execute(beat_prepare(&plan_claim_op,
									  "SELECT c.id, c.attempt, c.params::text,"
									  " (SELECT t.provider FROM beat.task t WHERE t.id = c.id),"
									  " (c.params ->> 'page') ~ '^[0-9]{1,9}$' AND (c.params ->> 'page')::int > 1"
									  " FROM beat.claim($1, $2, $3) c",
									  3, argtypes),
						 values, "   ", SPI_OK_SELECT);
		else
			beat_execute(beat_prepare(&plan_claim,
									  "SELECT id, attempt, params::text FROM beat.claim($1, $2, $3)",
									  3, argtypes),
						 values, "   ", SPI_OK_SELECT);
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

				/* keys without a placeholder are the templates themselves */
				if (cfg.limits_fixed)
					r = beat_limiter_try((const char *const *) cfg.limits, cfg.nlimits, 1,
										 BEAT_CHARGE, &error);
				else if (beat_render_keys(cfg.limits, cfg.nlimits, params, NULL, NULL, keys, &error))
				{
					r = beat_limiter_try((const char *const *) keys, cfg.nlimits, 1,
										 BEAT_CHARGE, &error);
					for (int k = 0; k < cfg.nlimits; k++)
						free(keys[k]);
				}
				else
				{
					fail_unsent(id, attempt, psprintf("limit keys: %s", error));
					free(error);
					continue;
				}
				if (error != NULL)
				{
					fail_unsent(id, attempt, error);
					continue;
				}
				if (!r.allowed)
				{
					/* wait exactly retry_after, as a scheduled task: not an attempt */
					refused_ids[nrefused] = Int64GetDatum(id);
					why_nulls[nrefused] = true;
					refused_wait[nrefused++] = Float8GetDatum(r.retry_us / 1000000.0);
					if (soonest == 0 || r.retry_us < soonest)
						soonest = r.retry_us;
					continue;
				}
			}
			if (cfg.is_op)
			{
				/* the seed of the attempt: its task, and where a page must go */
				Transfer   *seed = transfer_new(id, attempt, params);
				TimestampTz until = 0;
				char	   *why = NULL;
				bool		pnull;
				Datum		pv = SPI_getbinval(tup, desc, 4, &pnull);
				bool		page = DatumGetBool(SPI_getbinval(tup, desc, 5, &isnull));
				DispatchResult d;

				seed->hops = -1;
				d = dispatch(seed, page && !pnull ? TextDatumGetCString(pv) : NULL, &until, &why);
				if (d == DISPATCH_WAIT)
				{
					int64		wait_us = until > 0 ?
						Max(until - GetCurrentTimestamp(), 0) : 60 * USECS_PER_SEC;

					refused_ids[nrefused] = Int64GetDatum(id);
					refused_why[nrefused] = CStringGetTextDatum(why);
					why_nulls[nrefused] = false;
					refused_wait[nrefused++] = Float8GetDatum(wait_us / 1000000.0);
					if (soonest == 0 || wait_us < soonest)
						soonest = wait_us;
				}
				else if (d == DISPATCH_FAIL)
					fail_unsent(id, attempt, why);
				/* no transfer carries these calls: give back their charge */
				if (d != DISPATCH_STARTED)
					route_refund_keys(cfg.limits, cfg.nlimits, params, NULL, NULL);
				transfer_free(seed);
			}
			else
				start_transfer(id, attempt, params);
		}

		if (nrefused > 0)
		{
			Oid			types[4] = {INT8ARRAYOID, FLOAT8ARRAYOID, TEXTOID, TEXTARRAYOID};
			Datum		args[4];

			args[0] = beat_make_array(refused_ids, NULL, nrefused, INT8OID);
			args[1] = beat_make_array(refused_wait, NULL, nrefused, FLOAT8OID);
			args[2] = values[1];
			args[3] = beat_make_array(refused_why, why_nulls, nrefused, TEXTOID);
			beat_prepare(&plan_limited,
						 "UPDATE beat.task t SET state = 'scheduled',"
						 " run_at = statement_timestamp() + make_interval(secs => r.wait),"
						 " attempts = greatest(t.attempts - 1, 0),"
						 " last_error = coalesce(r.why, t.last_error),"
						 " lease_owner = NULL, lease_expires_at = NULL,"
						 " updated_at = statement_timestamp()"
						 " FROM unnest($1, $2, $4) AS r(id, wait, why)"
						 " WHERE t.id = ANY ($1) AND t.id = r.id AND " HELD_BY("$3"),
						 4, types);
			beat_execute_plan(plan_limited, args, "    ", SPI_OK_UPDATE,
							  BEAT_PLAN_BATCH);
			*next_due = GetCurrentTimestamp() + soonest;
		}
	}

	if (claimed < n && *next_due == 0)
	{
		Datum		ms;

		/* through task_waiting_idx, however big beat.task was when planned */
		beat_prepare(&plan_next_due,
					 "SELECT (extract(epoch FROM min(run_at) - clock_timestamp()) * 1000)::float8"
					 " FROM beat.task WHERE flow = $1 AND state IN ('scheduled', 'failed')",
					 1, argtypes);
		beat_execute_plan(plan_next_due, values, " ", SPI_OK_SELECT, BEAT_PLAN_INDEXED);
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

	xact_end(true);
	if (claimed > 0)
	{
		journal_collect();
		journal_write(true);
	}
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
		queue_finished(t);
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

/* Row i of t: the provider's name and the key's id (NULL when none). */
static void
col_provider_credential(BeatColumn *provs, BeatColumn *creds, int i, const Transfer *t)
{
	beat_column_text(provs, i, provider_of(t) ? provider_of(t)->name : NULL);
	beat_column_set(creds, i, Int64GetDatum(cred_id_of(t)), cred_id_of(t) == 0);
}

/* What became of one finished transfer: its log row, and its task's fate. */
typedef struct Judged
{
	Transfer   *t;
	const char *log_outcome;	/* beat.http_log.outcome */
	const char *task_outcome;	/* ok, retry, permanent, wait; NULL: task goes on */
	char	   *error;
	Datum		result;
	bool		result_null;
	double		wait_s;			/* retry: the provider's wait; wait: the wait */
	bool		wait_null;
	long		status;
	char	   *cursor;			/* ok, with a next page */
	int			page;
	bool		auth_failed;	/* the key was disabled for it */
	Datum		model;			/* ok and mapped: what beat.parse made of it */
	bool		has_model;
} Judged;

/* The result jsonb of a response, body as it came or as a string. */
static void
result_of(Transfer *t, long status, double total_ms, Judged *j)
{
	char	   *json = beat_result_json(status, t->headers, t->body, t->len, total_ms, true);

	j->result_null = true;
	if (json != NULL)
	{
		j->result = jsonb_or_null(json, &j->result_null);
		free(json);
	}
	if (j->result_null)
	{
		json = beat_result_json(status, t->headers, t->body, t->len, total_ms, false);
		if (json != NULL)
		{
			j->result = jsonb_or_null(json, &j->result_null);
			free(json);
		}
	}
}

/* The page number of a task's params (1 when absent). */
static int
page_of(const char *params)
{
	json_t	   *p = json_loads(params, 0, NULL);
	json_t	   *v = json_object_get(p, "page");
	int			page = json_is_integer(v) ? (int) json_integer_value(v) :
		json_is_string(v) ? atoi(json_string_value(v)) : 1;

	json_decref(p);
	return Max(page, 1);
}

/*
 * Call t's task again through the route after t's answer (rate limited,
 * auth failed, or a transient failure that falls back).  The same attempt
 * goes on; j says what became of the task if nothing can take it now.
 */
static void
call_again(Judged *j, BeatVerdict v)
{
	Transfer   *t = j->t;
	TimestampTz until = 0;
	char	   *why = NULL;

	if (v == VERDICT_TRANSIENT)
	{
		if (t->pinned)
		{
			j->task_outcome = "retry";
			return;
		}
		t->tried |= UINT64CONST(1) << t->prov;
	}
	if (t->hops + 1 >= MAX_HOPS)
	{
		j->task_outcome = "retry";
		j->error = psprintf("%s; gave up after %d calls in one attempt", j->error, MAX_HOPS);
		return;
	}
	if (ShutdownRequestPending || beat_shared->launcher_generation != my_generation)
	{
		/* stopping: the task goes back without counting the attempt */
		j->task_outcome = "wait";
		j->wait_s = 0;
		j->wait_null = false;
		return;
	}
	switch (dispatch(t, t->pinned ? provider_of(t)->name : NULL, &until, &why))
	{
		case DISPATCH_STARTED:
			if (v == VERDICT_TRANSIENT)
			{
				j->log_outcome = "fallback";
				beat_provider_count_fallback(provider_of(t)->name);
			}
			return;				/* the task goes on in another transfer */
		case DISPATCH_WAIT:
			if (v == VERDICT_TRANSIENT)
			{
				/* every provider failed or is out: the attempt failed */
				j->task_outcome = "retry";
				j->error = psprintf("%s; no other provider could serve: %s", j->error, why);
				return;
			}
			j->task_outcome = "wait";
			j->wait_s = until > 0 ?
				Max(until - GetCurrentTimestamp(), 0) / 1000000.0 : 60.0;
			j->wait_null = false;
			j->error = psprintf("%s; waiting: %s", j->error, why);
			return;
		case DISPATCH_FAIL:
			j->task_outcome = "permanent";
			j->error = why;
			return;
	}
}

/*
 * The kept response headers go into the result too: overwrite a key's
 * secret strings in them, and hide secret query parameters in the URLs of
 * Link and Location (which often repeat the request's query).
 */
static void
scrub_headers(Transfer *t, const RouteCred *c)
{
	const char *name;
	json_t	   *v;
	void	   *tmp;

	json_object_foreach_safe(t->headers, tmp, name, v)
	{
		char	   *copy;

		if (!json_is_string(v) || (copy = strdup(json_string_value(v))) == NULL)
			continue;
		route_scrub(c, copy, strlen(copy));
		if (strcmp(name, "link") == 0 || strcmp(name, "location") == 0)
		{
			char	   *hidden = beat_redact_url(copy, beat_log_redact_params);

			free(copy);
			copy = hidden;
			if (c != NULL && json_object_get(c->secret, "query"))
			{
				const char *qn;
				json_t	   *qv;

				json_object_foreach(json_object_get(c->secret, "query"), qn, qv)
				{
					hidden = beat_redact_url(copy, qn);
					free(copy);
					copy = hidden;
				}
			}
		}
		json_object_set_new(t->headers, name, json_string(copy));
		free(copy);
	}
}

/*
 * Judge a transfer of an operation's task by its provider's rules, act on
 * the verdict (rests, breaker, calling again) and fill j.
 */
static void
judge_provider(Judged *j, long status, curl_off_t retry_after, double total_ms)
{
	Transfer   *t = j->t;
	RouteProvider *p = provider_of(t);
	int64		cred_id = cred_id_of(t);
	TimestampTz now = GetCurrentTimestamp();
	BeatVerdict v;
	int64		wait_us = 0;
	char	   *why = NULL;

	if (t->code == CURLE_OK)
	{
		route_scrub(cred_of(t), t->body, t->len);
		scrub_headers(t, cred_of(t));
		result_of(t, status, total_ms, j);
		v = route_classify(p, status, j->result_null ? (Datum) 0 : j->result,
						   t->all_headers, retry_after > 0 ? retry_after : 0, &wait_us, &why);
		j->error = psprintf("%s from provider \"%s\"", why, p->name);
	}
	else
	{
		BeatOutcome o = beat_classify_curl(t->code);

		v = o == BEAT_OUTCOME_RETRY ? VERDICT_TRANSIENT : VERDICT_PERMANENT;
		j->error = psprintf("%s%s%s (provider \"%s\")", curl_easy_strerror(t->code),
							t->errbuf[0] ? ": " : "", t->errbuf, p->name);
	}

	switch (v)
	{
		case VERDICT_OK:
			beat_breaker_report(p->name, &p->breaker, true, NULL, now);
			beat_provider_served(p->name);
			if (cred_id)
				beat_credential_ok(cred_id);
			j->log_outcome = "ok";
			j->task_outcome = "ok";
			j->error = NULL;
			if ((p->cursor_path || p->cursor_link) && !j->result_null)
			{
				j->page = page_of(t->params) + 1;
				if (j->page <= p->max_pages)
					j->cursor = route_cursor(p, j->result, t->all_headers);
			}
			return;
		case VERDICT_RATE_LIMITED:
			{
				TimestampTz rest = 0;
				int			streak = 0;

				/* not the provider failing: the breaker does not count it */
				beat_breaker_report(p->name, &p->breaker, true, NULL, now);
				(void) beat_credential_limited(p->name, p->cred_ids, Max(p->ncreds, 0),
											   cred_id, wait_us, p->rest_base_us,
											   p->rest_cap_us, now, &rest, &streak);
				j->log_outcome = "rate_limited";
				call_again(j, v);
				return;
			}
		case VERDICT_AUTH_FAILED:
			beat_breaker_report(p->name, &p->breaker, true, NULL, now);
			j->log_outcome = "auth_failed";
			if (cred_id)
			{
				beat_credential_auth_failed(cred_id);
				j->auth_failed = true;
				ereport(LOG,
						(errmsg("pg_beat: credential " INT64_FORMAT " of provider \"%s\" disabled: %s",
								cred_id, p->name, j->error),
						 errhint("Put it back with beat.enable_credential(" INT64_FORMAT ").",
								 cred_id)));
				call_again(j, v);
			}
			else
				j->task_outcome = "permanent";
			return;
		case VERDICT_TRANSIENT:
			beat_breaker_report(p->name, &p->breaker, false, j->error, now);
			if (cred_id)
				beat_credential_ok(cred_id);
			j->log_outcome = "retry";
			if (retry_after > 0)
			{
				j->wait_s = (double) retry_after;
				j->wait_null = false;
			}
			call_again(j, v);
			return;
		case VERDICT_PERMANENT:
			/* a network failure (a bad certificate, say) is the provider's */
			beat_breaker_report(p->name, &p->breaker, t->code == CURLE_OK, j->error, now);
			j->log_outcome = "permanent";
			j->task_outcome = "permanent";
			return;
	}
}

/* Judge a transfer of a request flow by its ok and retry statuses. */
static void
judge_request(Judged *j, long status, curl_off_t retry_after, double total_ms)
{
	Transfer   *t = j->t;
	BeatOutcome outcome;

	if (t->code == CURLE_OK)
	{
		if (beat_status_in(&cfg.ok, status))
			outcome = BEAT_OUTCOME_OK;
		else if (beat_status_in(&cfg.retry, status))
			outcome = BEAT_OUTCOME_RETRY;
		else
			outcome = BEAT_OUTCOME_PERMANENT;
		if (outcome != BEAT_OUTCOME_OK)
			j->error = psprintf("HTTP %ld", status);
		if (outcome == BEAT_OUTCOME_RETRY && retry_after > 0)
		{
			j->wait_s = (double) retry_after;
			j->wait_null = false;
		}
		result_of(t, status, total_ms, j);
	}
	else
	{
		outcome = beat_classify_curl(t->code);
		j->error = psprintf("%s%s%s", curl_easy_strerror(t->code),
							t->errbuf[0] ? ": " : "", t->errbuf);
	}
	j->log_outcome = j->task_outcome = outcome == BEAT_OUTCOME_OK ? "ok" :
		outcome == BEAT_OUTCOME_RETRY ? "retry" : "permanent";
}

/*
 * Parse the answers of succeeded tasks whose provider maps the operation
 * (beat.mapping), before anything is written: an answer that does not
 * match fails its task permanently, naming the provider and the path, and
 * nothing of it is stored.  The models wait in js for ingest_models.
 */
static void
parse_answers(Judged *js, int n)
{
	Oid			types[4] = {TEXTARRAYOID, TEXTOID, JSONBARRAYOID, TEXTARRAYOID};
	Datum		args[4];
	Datum	   *provs = palloc(sizeof(Datum) * n);
	Datum	   *results = palloc(sizeof(Datum) * n);
	Datum	   *params = palloc(sizeof(Datum) * n);
	int		   *which = palloc(sizeof(int) * n);
	int			m = 0;

	for (int i = 0; i < n; i++)
	{
		Judged	   *j = &js[i];

		if (!j->task_outcome || strcmp(j->task_outcome, "ok") != 0 ||
			provider_of(j->t) == NULL || j->result_null)
			continue;
		provs[m] = CStringGetTextDatum(provider_of(j->t)->name);
		results[m] = j->result;
		params[m] = CStringGetTextDatum(j->t->params ? j->t->params : "{}");
		which[m++] = i;
	}
	if (m == 0)
		return;
	args[0] = beat_make_array(provs, NULL, m, TEXTOID);
	args[1] = CStringGetTextDatum(cfg.operation);
	args[2] = beat_make_array(results, NULL, m, JSONBOID);
	args[3] = beat_make_array(params, NULL, m, TEXTOID);
	beat_prepare(&plan_parse,
				 "SELECT ord, model, error FROM beat.parse_results($1, $2, $3, $4)",
				 4, types);

	/*
	 * A mapping may name a parser function, which runs here, in a superuser
	 * session: as a restricted operation.  beat.parse runs it in a block
	 * that rolls back, which undoes any setting it changed.
	 */
	{
		Oid			userid;
		int			sec;

		GetUserIdAndSecContext(&userid, &sec);
		SetUserIdAndSecContext(userid, sec | SECURITY_RESTRICTED_OPERATION);
		beat_execute(plan_parse, args, NULL, SPI_OK_SELECT);
		SetUserIdAndSecContext(userid, sec);
	}
	for (uint64 r = 0; r < SPI_processed; r++)
	{
		HeapTuple	tup = SPI_tuptable->vals[r];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		bool		isnull;
		int			ord = DatumGetInt32(SPI_getbinval(tup, desc, 1, &isnull));
		Datum		model = SPI_getbinval(tup, desc, 2, &isnull);
		Judged	   *j;

		if (ord < 1 || ord > m)
			elog(ERROR, "pg_beat: beat.parse_results returned ordinal %d of %d", ord, m);
		j = &js[which[ord - 1]];
		if (!isnull)
		{
			j->model = datumCopy(model, false, -1);
			j->has_model = true;
			continue;
		}
		j->task_outcome = "permanent";
		j->cursor = NULL;
		j->error = psprintf("the answer does not match its mapping: %s",
							SPI_getvalue(tup, desc, 3));
	}
}

/*
 * Store the models of the tasks that succeeded (not those whose lease was
 * lost): entities, observations and events, in the transaction that
 * completes them.  Last in the transaction: beat.ingest publishes, and the
 * lock that orders events is held to the commit.
 */
static void
ingest_models(Judged *js, int n)
{
	Oid			types[3] = {INT8ARRAYOID, TEXTARRAYOID, JSONBARRAYOID};
	Datum		args[3];
	Datum	   *ids = palloc(sizeof(Datum) * n);
	Datum	   *provs = palloc(sizeof(Datum) * n);
	Datum	   *models = palloc(sizeof(Datum) * n);
	int			m = 0;

	for (int i = 0; i < n; i++)
	{
		Judged	   *j = &js[i];

		if (!j->has_model || strcmp(j->task_outcome, "ok") != 0 ||
			strcmp(j->log_outcome, "lost") == 0)
			continue;
		ids[m] = Int64GetDatum(j->t->task_id);
		provs[m] = CStringGetTextDatum(provider_of(j->t)->name);
		models[m++] = j->model;
	}
	if (m == 0)
		return;
	args[0] = beat_make_array(ids, NULL, m, INT8OID);
	args[1] = beat_make_array(provs, NULL, m, TEXTOID);
	args[2] = beat_make_array(models, NULL, m, JSONBOID);
	beat_prepare(&plan_ingest, "SELECT beat.ingest($1, $2, $3)", 3, types);

	/*
	 * The models were checked by beat.parse, so this should not fail; if it
	 * does (a parser's oddity, a constraint), an error here would kill the
	 * worker and the tasks would come back and kill the next one.  So it
	 * runs in a subtransaction: on an error, what it wrote goes away and the
	 * batch's tasks are dead with the reason (or retried, after a deadlock),
	 * instead of succeeded without their data.
	 */
	{
		MemoryContext cxt = CurrentMemoryContext;
		ResourceOwner owner = CurrentResourceOwner;

		BeginInternalSubTransaction(NULL);
		MemoryContextSwitchTo(cxt);
		PG_TRY();
		{
			beat_execute(plan_ingest, args, NULL, SPI_OK_SELECT);
			ReleaseCurrentSubTransaction();
			MemoryContextSwitchTo(cxt);
			CurrentResourceOwner = owner;
		}
		PG_CATCH();
		{
			ErrorData  *edata;
			Oid			dtypes[3] = {INT8ARRAYOID, TEXTOID, BOOLOID};
			Datum		dargs[3];
			bool		transient;

			MemoryContextSwitchTo(cxt);
			edata = CopyErrorData();
			FlushErrorState();
			RollbackAndReleaseCurrentSubTransaction();
			MemoryContextSwitchTo(cxt);
			CurrentResourceOwner = owner;
			ereport(WARNING,
					(errmsg("pg_beat: storing the models of %d tasks of flow \"%s\" failed: %s",
							m, flow_name, edata->message)));
			/* a deadlock or a lock or serialization failure may pass: retry */
			transient = edata->sqlerrcode == ERRCODE_T_R_DEADLOCK_DETECTED ||
				edata->sqlerrcode == ERRCODE_T_R_SERIALIZATION_FAILURE ||
				edata->sqlerrcode == ERRCODE_LOCK_NOT_AVAILABLE;
			dargs[0] = args[0];
			dargs[1] = CStringGetTextDatum(psprintf("storing the answer's model failed: %s",
													edata->message));
			dargs[2] = BoolGetDatum(transient);
			beat_prepare(&plan_ingest_failed,
						 "UPDATE beat.task SET"
						 " state = CASE WHEN $3 AND attempts < max_attempts"
						 "   THEN 'failed'::beat.task_state ELSE 'dead'::beat.task_state END,"
						 " finished_at = CASE WHEN $3 AND attempts < max_attempts"
						 "   THEN NULL ELSE finished_at END,"
						 " run_at = CASE WHEN $3 THEN statement_timestamp() + interval '1 second'"
						 "   ELSE run_at END,"
						 " last_error = $2, updated_at = statement_timestamp()"
						 " WHERE id = ANY ($1) AND state = 'succeeded'",
						 3, dtypes);
			beat_execute(plan_ingest_failed, dargs, NULL, SPI_OK_UPDATE);
			stat_done -= SPI_processed;
			stat_failed += SPI_processed;
		}
		PG_END_TRY();
	}
}

/*
 * Record every finished transfer in one transaction: a row of
 * beat.http_log each, and for each task whose attempt ended, its new state
 * and result.  A transfer of an operation's task that was rate limited, hit
 * a disabled key or failed over to the next provider starts the next call
 * here and leaves its task running.  A task whose lease we lost (reaped or
 * cancelled meanwhile) is left alone and logged as 'lost'.  A page with a
 * cursor enqueues the next page, on the same provider; the keys' uses and
 * states are written to beat.credential.
 */
static void
record_finished(void)
{
	Transfer   *list = finished;
	int			n = n_finished;
	Judged	   *js = palloc0(sizeof(Judged) * n);
	Datum	   *timings[5];
	bool	   *timing_nulls[5];
	static const CURLINFO timing_info[5] = {
		CURLINFO_NAMELOOKUP_TIME_T, CURLINFO_CONNECT_TIME_T,
		CURLINFO_APPCONNECT_TIME_T, CURLINFO_STARTTRANSFER_TIME_T,
		CURLINFO_TOTAL_TIME_T
	};
	Transfer   *t;
	int			i;
	int			nfinal = 0;
	bool		any_wait = false;

	/* what calling again queues now is for the next pass */
	finished = NULL;
	n_finished = 0;
	for (int k = 0; k < 5; k++)
	{
		timings[k] = palloc(sizeof(Datum) * n);
		timing_nulls[k] = palloc0(sizeof(bool) * n);
	}

	xact_begin("pg_beat: record results");

	/* judge each transfer; the jsonb work runs before SPI */
	for (t = list, i = 0; t != NULL; t = t->next, i++)
	{
		Judged	   *j = &js[i];
		long		status = 0;
		curl_off_t	retry_after = -1;
		double		total_ms = 0;

		j->t = t;
		j->result_null = true;
		j->wait_null = true;
		for (int k = 0; k < 5; k++)
			timings[k][i] = timing_ms(t->easy, timing_info[k], &timing_nulls[k][i]);
		if (!timing_nulls[4][i])
			total_ms = DatumGetFloat8(timings[4][i]);
		if (t->easy && t->code == CURLE_OK)
		{
			curl_easy_getinfo(t->easy, CURLINFO_RESPONSE_CODE, &status);
			if (curl_easy_getinfo(t->easy, CURLINFO_RETRY_AFTER, &retry_after) != CURLE_OK)
				retry_after = -1;
		}
		j->status = status;

		/* a call with no answer to judge gives its breaker probe back */
		if ((t->build_error || t->refused[0]) && provider_of(t))
			beat_breaker_release(provider_of(t)->name, t->probe);

		/*
		 * A call that never went out (refused on a redirect, it did) gives
		 * back its charges: the provider's, and the flow's when it was the
		 * attempt's first call (the flow's limits are charged once per
		 * attempt; their keys are rendered again from the flow's settings).
		 */
		if (!t->sent && (t->build_error || t->refused[0]))
		{
			if (provider_of(t))
				route_refund(provider_of(t), t->cred, t->params);
			if (t->hops == 0)
				route_refund_keys(cfg.limits, cfg.nlimits, t->params, NULL, NULL);
		}
		if (t->build_error)
		{
			j->log_outcome = j->task_outcome = "permanent";
			j->error = psprintf("request not sent: %s", t->build_error);
		}
		else if (t->refused[0])
		{
			j->log_outcome = "refused";
			j->task_outcome = "permanent";
			j->error = psprintf("request refused: %s", t->refused);
		}
		else if (t->code != CURLE_OK && (t->too_large || t->code == CURLE_FILESIZE_EXCEEDED))
		{
			j->log_outcome = j->task_outcome = "permanent";
			j->error = psprintf("response larger than beat.max_response_size (%d bytes)",
								beat_max_response_size);
		}
		else if (t->code == CURLE_TOO_MANY_REDIRECTS)
		{
			j->log_outcome = j->task_outcome = "permanent";
			j->error = psprintf("more than %d redirects", cfg.max_redirects);
		}
		else if (provider_of(t))
			judge_provider(j, status, retry_after, total_ms);
		else
			judge_request(j, status, retry_after, total_ms);
		if (j->task_outcome)
			nfinal++;
	}

	beat_spi_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
	if (cfg.is_op && nfinal > 0)
		parse_answers(js, n);
	if (nfinal > 0)
	{
		Oid			argtypes[8] = {INT8ARRAYOID, TEXTARRAYOID, JSONBARRAYOID,
			TEXTARRAYOID, FLOAT8ARRAYOID, TEXTOID, TEXTARRAYOID, INT8ARRAYOID};
		Datum		values[8];
		BeatColumn		ids = beat_column(nfinal, INT8OID);
		BeatColumn		outcomes = beat_column(nfinal, TEXTOID);
		BeatColumn		results = beat_column(nfinal, JSONBOID);
		BeatColumn		errors = beat_column(nfinal, TEXTOID);
		BeatColumn		waits = beat_column(nfinal, FLOAT8OID);
		BeatColumn		provs = beat_column(nfinal, TEXTOID);
		BeatColumn		creds = beat_column(nfinal, INT8OID);
		int64	   *updated;
		uint64		nupdated;
		uint64		nsucceeded = 0;
		bool		isnull;
		int			f = 0;

		for (i = 0; i < n; i++)
		{
			Judged	   *j = &js[i];

			if (!j->task_outcome)
				continue;
			beat_column_set(&ids, f, Int64GetDatum(j->t->task_id), false);
			beat_column_text(&outcomes, f, j->task_outcome);
			beat_column_set(&results, f, j->result, j->result_null);
			beat_column_text(&errors, f, j->error);
			beat_column_set(&waits, f, Float8GetDatum(j->wait_s), j->wait_null);
			col_provider_credential(&provs, &creds, f, j->t);
			f++;
		}
		values[0] = beat_column_array(&ids, nfinal);
		values[1] = beat_column_array(&outcomes, nfinal);
		values[2] = beat_column_array(&results, nfinal);
		values[3] = beat_column_array(&errors, nfinal);
		values[4] = beat_column_array(&waits, nfinal);
		values[5] = CStringGetTextDatum(worker_name);
		values[6] = beat_column_array(&provs, nfinal);
		values[7] = beat_column_array(&creds, nfinal);

		/*
		 * ok: succeeded.  wait: back to scheduled after the wait, the
		 * attempt not counted (nothing could serve it).  retry: failed and
		 * due after the backoff, or dead when out of attempts.  permanent:
		 * dead.
		 */
		beat_prepare(&plan_record,
					 "UPDATE beat.task t SET"
					 " state = CASE WHEN r.outcome = 'ok' THEN 'succeeded'::beat.task_state"
					 "   WHEN r.outcome = 'wait' THEN 'scheduled'::beat.task_state"
					 "   WHEN r.outcome = 'permanent' OR t.attempts >= t.max_attempts"
					 "   THEN 'dead'::beat.task_state ELSE 'failed'::beat.task_state END,"
					 " attempts = CASE WHEN r.outcome = 'wait' THEN greatest(t.attempts - 1, 0)"
					 "   ELSE t.attempts END,"
					 " result = CASE WHEN r.outcome = 'wait' THEN t.result ELSE r.result END,"
					 " last_error = CASE WHEN r.outcome = 'ok' THEN t.last_error ELSE r.error END,"
					 " run_at = CASE WHEN r.outcome = 'wait'"
					 "   THEN statement_timestamp() + make_interval(secs => r.wait)"
					 "   WHEN r.outcome = 'retry' AND t.attempts < t.max_attempts"
					 "   THEN statement_timestamp() + "
					 BACKOFF_SQL("make_interval(secs => r.wait)")
					 "   ELSE t.run_at END,"
					 " finished_at = CASE WHEN r.outcome = 'wait'"
					 "   OR (r.outcome = 'retry' AND t.attempts < t.max_attempts)"
					 "   THEN NULL ELSE statement_timestamp() END,"
					 " provider = coalesce(r.provider, t.provider),"
					 " credential_id = coalesce(r.credential_id, t.credential_id),"
					 " lease_owner = NULL, lease_expires_at = NULL,"
					 " updated_at = statement_timestamp()"
					 " FROM unnest($1, $2, $3, $4, $5, $7, $8)"
					 "   AS r(id, outcome, result, error, wait, provider, credential_id),"
					 "   beat.flow f"
					 " WHERE t.id = ANY ($1) AND t.id = r.id AND f.name = t.flow"
					 "   AND " HELD_BY("$6")
					 " RETURNING t.id, t.state::text",
					 8, argtypes);
		beat_execute_plan(plan_record, values, "        ", SPI_OK_UPDATE_RETURNING,
						  BEAT_PLAN_BATCH);

		/* what was not updated had lost its lease (ids are unique here) */
		nupdated = SPI_processed;
		updated = palloc(sizeof(int64) * Max(nupdated, 1));
		for (uint64 r = 0; r < nupdated; r++)
		{
			char	   *state = TextDatumGetCString(SPI_getbinval(SPI_tuptable->vals[r],
																   SPI_tuptable->tupdesc, 2,
																   &isnull));

			updated[r] = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[r],
													 SPI_tuptable->tupdesc, 1, &isnull));
			if (strcmp(state, "succeeded") == 0)
				nsucceeded++;
			else if (strcmp(state, "scheduled") != 0)
				stat_failed++;
		}
		stat_done += nsucceeded;

		/*
		 * Failed, waiting, or retried later: a run_at must be seen by
		 * whoever sleeps until the next due task (us too), so wake the
		 * flow's workers at commit; they reread it.
		 */
		if (nsucceeded < nupdated)
			beat_wake_at_commit(flow_name);

		qsort(updated, nupdated, sizeof(int64), beat_cmp_int64);
		for (i = 0; i < n; i++)
		{
			int64		id = js[i].t->task_id;

			if (js[i].task_outcome &&
				bsearch(&id, updated, nupdated, sizeof(int64), beat_cmp_int64) == NULL)
			{
				js[i].log_outcome = "lost";
				js[i].cursor = NULL;
			}
		}
	}

	/*
	 * A task that goes on in another call (a fallback, another key) keeps
	 * its lease: each call may take the provider's whole timeout, and a
	 * lease that ran out meanwhile would hand the task to another worker.
	 */
	{
		int			nh = 0;
		Datum	   *hids = palloc(sizeof(Datum) * n);

		for (i = 0; i < n; i++)
			if (!js[i].task_outcome)
				hids[nh++] = Int64GetDatum(js[i].t->task_id);
		if (nh > 0)
		{
			Oid			types[2] = {INT8ARRAYOID, TEXTOID};
			Datum		args[2];

			args[0] = beat_make_array(hids, NULL, nh, INT8OID);
			args[1] = CStringGetTextDatum(worker_name);
			beat_prepare(&plan_extend,
						 "UPDATE beat.task t SET lease_expires_at ="
						 " greatest(t.lease_expires_at, statement_timestamp() + f.lease)"
						 " FROM beat.flow f"
						 " WHERE t.id = ANY ($1) AND " HELD_BY("$2")
						 "   AND f.name = t.flow",
						 2, types);
			beat_execute_plan(plan_extend, args, NULL, SPI_OK_UPDATE,
							  BEAT_PLAN_INDEXED);
		}
	}

	/* the next page of each page that has one, on the same provider */
	{
		int			npages = 0;
		Datum	   *pids = palloc(sizeof(Datum) * n);
		Datum	   *pprov = palloc(sizeof(Datum) * n);
		Datum	   *pparam = palloc(sizeof(Datum) * n);
		Datum	   *pcursor = palloc(sizeof(Datum) * n);
		Datum	   *ppage = palloc(sizeof(Datum) * n);

		for (i = 0; i < n; i++)
		{
			Judged	   *j = &js[i];

			if (j->cursor == NULL)
				continue;
			pids[npages] = Int64GetDatum(j->t->task_id);
			pprov[npages] = CStringGetTextDatum(provider_of(j->t)->name);
			pparam[npages] = CStringGetTextDatum(provider_of(j->t)->cursor_param);
			pcursor[npages] = CStringGetTextDatum(j->cursor);
			ppage[npages++] = Int32GetDatum(j->page);
		}
		if (npages > 0)
		{
			Oid			types[5] = {INT8ARRAYOID, TEXTARRAYOID, TEXTARRAYOID,
			TEXTARRAYOID, INT4ARRAYOID};
			Datum		args[5];

			args[0] = beat_make_array(pids, NULL, npages, INT8OID);
			args[1] = beat_make_array(pprov, NULL, npages, TEXTOID);
			args[2] = beat_make_array(pparam, NULL, npages, TEXTOID);
			args[3] = beat_make_array(pcursor, NULL, npages, TEXTOID);
			args[4] = beat_make_array(ppage, NULL, npages, INT4OID);
			beat_prepare(&plan_next_page,
						 "INSERT INTO beat.task (flow, priority, max_attempts, idempotency_key,"
						 " params, correlation_id, provider)"
						 " SELECT p.flow, p.priority, p.max_attempts, 'beat:page:' || p.id,"
						 "   p.params || jsonb_build_object(n.param, n.cursor, 'page', n.page),"
						 "   p.correlation_id, n.provider"
						 " FROM unnest($1, $2, $3, $4, $5) AS n(id, provider, param, cursor, page)"
						 " JOIN beat.task p ON p.id = n.id AND p.id = ANY ($1)"
						 " ON CONFLICT (flow, idempotency_key) WHERE idempotency_key IS NOT NULL"
						 "   AND state IN ('pending', 'scheduled', 'running', 'failed')"
						 " DO NOTHING",
						 5, types);
			beat_execute_plan(plan_next_page, args, "     ", SPI_OK_INSERT,
							  BEAT_PLAN_BATCH);
			beat_wake_at_commit(flow_name);
		}
	}

	/* the keys' uses and states, in beat.credential (locked in id order) */
	{
		int			nc = 0;
		Datum	   *cid = palloc(sizeof(Datum) * n);
		Datum	   *cuses = palloc(sizeof(Datum) * n);
		Datum	   *cstatus = palloc(sizeof(Datum) * n);
		bool	   *cstatus_null = palloc(sizeof(bool) * n);
		Datum	   *cstreak = palloc(sizeof(Datum) * n);
		Datum	   *crest = palloc(sizeof(Datum) * n);
		Datum	   *cauth = palloc(sizeof(Datum) * n);
		Datum	   *creason = palloc(sizeof(Datum) * n);
		bool	   *creason_null = palloc(sizeof(bool) * n);
		bool		any_auth = false;
		TimestampTz now = GetCurrentTimestamp();

		for (i = 0; i < n; i++)
		{
			Judged	   *j = &js[i];
			int			k;

			/* a call refused before it connected did not use the key */
			if (cred_id_of(j->t) == 0 || j->t->easy == NULL)
				continue;
			for (k = 0; k < nc; k++)
				if (DatumGetInt64(cid[k]) == cred_id_of(j->t))
					break;
			if (k == nc)
			{
				cid[k] = Int64GetDatum(cred_id_of(j->t));
				cuses[k] = Int32GetDatum(0);
				cstatus_null[k] = true;
				cauth[k] = BoolGetDatum(false);
				creason_null[k] = true;
				nc++;
			}
			cuses[k] = Int32GetDatum(DatumGetInt32(cuses[k]) + 1);
			if (j->status > 0)
			{
				cstatus[k] = Int32GetDatum((int32) j->status);
				cstatus_null[k] = false;
			}
			if (j->auth_failed)
			{
				any_auth = true;
				cauth[k] = BoolGetDatum(true);
				creason[k] = CStringGetTextDatum(j->error ? j->error : "auth failed");
				creason_null[k] = false;
			}
		}
		for (int k = 0; k < nc; k++)
		{
			TimestampTz rest;
			int			streak;

			beat_credential_get(DatumGetInt64(cid[k]), &rest, &streak);
			cstreak[k] = Int32GetDatum(streak);
			crest[k] = Float8GetDatum(rest > now ? (rest - now) / 1000000.0 : 0);
		}
		if (nc > 0)
		{
			Oid			types[7] = {INT8ARRAYOID, INT4ARRAYOID, INT4ARRAYOID, INT4ARRAYOID,
			FLOAT8ARRAYOID, BOOLARRAYOID, TEXTARRAYOID};
			Datum		args[7];

			args[0] = beat_make_array(cid, NULL, nc, INT8OID);
			args[1] = beat_make_array(cuses, NULL, nc, INT4OID);
			args[2] = beat_make_array(cstatus, cstatus_null, nc, INT4OID);
			args[3] = beat_make_array(cstreak, NULL, nc, INT4OID);
			args[4] = beat_make_array(crest, NULL, nc, FLOAT8OID);
			args[5] = beat_make_array(cauth, NULL, nc, BOOLOID);
			args[6] = beat_make_array(creason, creason_null, nc, TEXTOID);
			beat_prepare(&plan_credentials,
						 "UPDATE beat.credential c SET uses = c.uses + u.n,"
						 " last_used_at = statement_timestamp(),"
						 " last_status = coalesce(u.status, c.last_status),"
						 " failure_streak = u.streak,"
						 " disabled_until = CASE WHEN u.rest > 0"
						 "   THEN statement_timestamp() + make_interval(secs => u.rest) END"
						 " FROM unnest($1, $2, $3, $4, $5, $6, $7)"
						 "   AS u(id, n, status, streak, rest, auth, reason)"
						 " WHERE c.id = u.id AND c.id IN (SELECT l.id FROM beat.credential l"
						 "   WHERE l.id = ANY ($1) ORDER BY l.id FOR NO KEY UPDATE)",
						 7, types);
			beat_execute(plan_credentials, args, "       ", SPI_OK_UPDATE);

			/*
			 * Only a key that failed auth changes a setting (enabled): that
			 * alone fires credential_changed and makes every worker reload.
			 */
			if (any_auth)
			{
				/* the same arguments; $2 to $5 go unused */
				beat_prepare(&plan_disable_key,
							 "UPDATE beat.credential c SET enabled = false, disabled_reason = u.reason"
							 " FROM unnest($1, $6, $7) AS u(id, auth, reason)"
							 " WHERE c.id = u.id AND u.auth AND c.enabled",
							 7, types);
				beat_execute(plan_disable_key, args, "       ", SPI_OK_UPDATE);
			}
		}
	}

	/* a row of beat.http_log per transfer that was made or refused */
	{
		Oid			argtypes[17] = {TEXTOID, TEXTOID, INT8ARRAYOID, INT4ARRAYOID,
			TEXTARRAYOID, TEXTARRAYOID, INT4ARRAYOID, INT8ARRAYOID,
			FLOAT8ARRAYOID, FLOAT8ARRAYOID, FLOAT8ARRAYOID, FLOAT8ARRAYOID,
			FLOAT8ARRAYOID, TEXTARRAYOID, TEXTARRAYOID, TEXTARRAYOID, INT8ARRAYOID};
		Datum		values[17];
		BeatColumn		ids = beat_column(n, INT8OID);
		BeatColumn		attempts = beat_column(n, INT4OID);
		BeatColumn		methods = beat_column(n, TEXTOID);
		BeatColumn		urls = beat_column(n, TEXTOID);
		BeatColumn		statuses = beat_column(n, INT4OID);
		BeatColumn		bytes = beat_column(n, INT8OID);
		BeatColumn		outcomes = beat_column(n, TEXTOID);
		BeatColumn		errors = beat_column(n, TEXTOID);
		BeatColumn		provs = beat_column(n, TEXTOID);
		BeatColumn		creds = beat_column(n, INT8OID);

		for (i = 0; i < n; i++)
		{
			Judged	   *j = &js[i];

			t = j->t;
			beat_column_set(&ids, i, Int64GetDatum(t->task_id), false);
			beat_column_set(&attempts, i, Int32GetDatum(t->attempt), false);
			beat_column_text(&methods, i, t->req.method[0] ? t->req.method : "GET");
			beat_column_text(&urls, i, t->req.url_logged ? t->req.url_logged : "");
			beat_column_set(&statuses, i, Int32GetDatum((int32) j->status), j->status <= 0);
			beat_column_set(&bytes, i, Int64GetDatum((int64) t->len), false);
			beat_column_text(&outcomes, i, j->log_outcome);
			beat_column_text(&errors, i, j->error);
			col_provider_credential(&provs, &creds, i, t);
		}
		values[0] = CStringGetTextDatum(flow_name);
		values[1] = CStringGetTextDatum(worker_name);
		values[2] = beat_column_array(&ids, n);
		values[3] = beat_column_array(&attempts, n);
		values[4] = beat_column_array(&methods, n);
		values[5] = beat_column_array(&urls, n);
		values[6] = beat_column_array(&statuses, n);
		values[7] = beat_column_array(&bytes, n);
		for (int k = 0; k < 5; k++)
			values[8 + k] = beat_make_array(timings[k], timing_nulls[k], n, FLOAT8OID);
		values[13] = beat_column_array(&outcomes, n);
		values[14] = beat_column_array(&errors, n);
		values[15] = beat_column_array(&provs, n);
		values[16] = beat_column_array(&creds, n);

		beat_prepare(&plan_log,
					 "INSERT INTO beat.http_log (task_id, flow, attempt, worker, method, url,"
					 " status, bytes, dns_ms, connect_ms, tls_ms, first_byte_ms, total_ms,"
					 " outcome, error, provider, credential_id)"
					 " SELECT l.task_id, $1, l.attempt, $2, l.method, l.url, l.status, l.bytes,"
					 "   l.dns, l.conn, l.tls, l.fb, l.total, l.outcome, l.error, l.provider,"
					 "   l.credential_id"
					 " FROM unnest($3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15,"
					 "   $16, $17)"
					 "   AS l(task_id, attempt, method, url, status, bytes, dns, conn, tls, fb,"
					 "        total, outcome, error, provider, credential_id)",
					 17, argtypes);
		beat_execute(plan_log, values, "                 ", SPI_OK_INSERT);
	}
	if (cfg.is_op && nfinal > 0)
		ingest_models(js, n);

	/*
	 * A task that waits gives its attempt back with this commit: it leaves
	 * the journal before, or a crash right after the commit would count the
	 * attempt again.  The others leave it after the commit: until then a
	 * crash may still undo their claims.
	 */
	for (i = 0; i < n && !any_wait; i++)
		any_wait = js[i].task_outcome && strcmp(js[i].task_outcome, "wait") == 0;
	if (any_wait)
	{
		journal_collect();
		for (i = 0; i < n; i++)
			if (js[i].task_outcome && strcmp(js[i].task_outcome, "wait") != 0)
				beat_journal_add(js[i].t->task_id, js[i].t->attempt);
		journal_write(false);
	}
	xact_end(true);
	journal_collect();
	journal_write(false);

	while (list)
	{
		t = list;
		list = t->next;
		transfer_free(t);
	}
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
		if (provider_of(t))
			beat_breaker_release(provider_of(t)->name, t->probe);
		curl_multi_remove_handle(multi, t->easy);
		transfer_free(t);
	}
	n_inflight = 0;
	if (n == 0)
		return;

	xact_begin(NULL);
	values[0] = beat_make_array(ids, NULL, n, INT8OID);	/* needs a transaction */
	values[1] = CStringGetTextDatum(worker_name);
	beat_spi_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
	beat_prepare(&plan_hand_back,
				 "UPDATE beat.task t SET state = 'pending',"
				 " attempts = greatest(t.attempts - 1, 0),"
				 " lease_owner = NULL, lease_expires_at = NULL,"
				 " updated_at = statement_timestamp()"
				 " WHERE t.id = ANY ($1) AND " HELD_BY("$2"),
				 2, argtypes);
	beat_execute(plan_hand_back, values, "  ", SPI_OK_UPDATE);
	if (SPI_processed > 0)
		ereport(LOG,
				(errmsg("pg_beat: worker for flow \"%s\" stopping; handed back " UINT64_FORMAT " tasks in flight",
						flow_name, SPI_processed)));
	/* the other workers of the flow take these at once */
	beat_wake_at_commit(flow_name);
	/* nothing under way now; before the commit, which gives the attempts back */
	journal_collect();
	journal_write(false);
	xact_end(false);
}

/* Reread our flow in a transaction of its own. */
static void
reload_flow(void)
{
	xact_begin(NULL);
	beat_spi_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
	load_flow();
	xact_end(false);
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
	StartTransactionCommand();
	beat_journal_open(slot_no, worker_name);
	CommitTransactionCommand();

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
		/* a stopping worker says so while its last transfers finish */
		publish(stopping ? BEAT_SLOT_STOPPING :
				n_inflight > 0 ? BEAT_SLOT_BUSY : BEAT_SLOT_IDLE);

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
