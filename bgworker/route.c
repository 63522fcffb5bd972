/*-------------------------------------------------------------------------
 *
 * route.c
 *		Choosing a provider and a credential for each transfer of a flow
 *		that names an operation, judging the answer by the provider's rules,
 *		and finding the cursor of the next page.
 *
 * Choosing.  The route's providers are walked by rank, lowest first.
 * Within a rank, providers are drawn at random in proportion to their
 * weights; a provider that cannot serve now is set aside and another is
 * drawn, then the next rank is tried.  A provider cannot serve while its
 * breaker is open or its own limit holds (provider.c), when all its keys
 * are disabled or resting, or when its limits refuse every key.  Its keys
 * are tried least recently used first; the first whose limits (the
 * provider's beat.provider.limits, with {{provider}}, {{credential}} and
 * the task's params filled in) admit the call is used, and the breaker
 * counts the call.  A provider with no credentials at all is called
 * without one.  When nothing can serve, the choice says when the first
 * thing will (a breaker's cool-down, a rest, a limit's next admission)
 * and why.
 *
 * Judging.  A provider's rules are tried in order: a status (or range),
 * and optionally a JSONPath on the body with the value it must give.  The
 * first that matches names the outcome; a rate_limited rule may say where
 * the wait is (a header, or a path in the body) instead of Retry-After.
 * Then the defaults: 2xx ok, 429 rate_limited, 401 and 403 auth_failed,
 * 408 and 5xx transient, anything else permanent.
 *
 * This runs in the worker between transactions (choosing) or inside the
 * record transaction (judging, which evaluates JSONPath on jsonb).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <math.h>
#include <string.h>

#include "catalog/pg_type.h"
#include "common/pg_prng.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
/* fmgrprotos.h declares the SQL function json_object; jansson has its own */
#define json_object pg_sql_json_object
#include "utils/builtins.h"
#undef json_object
#include "utils/jsonb.h"
#include "utils/jsonpath.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "pg_beat.h"
#include "route.h"

#define NO_KEY_WAIT_US	(60 * USECS_PER_SEC)	/* every key disabled: look again */

static SPIPlanPtr plan_route = NULL;
static Datum empty_vars = (Datum) 0;

/* Call a strict-or-not function that may return NULL. */
static Datum
call_nullable(PGFunction fn, int nargs, Datum *args, bool *isnull)
{
	LOCAL_FCINFO(fcinfo, 4);
	Datum		result;

	InitFunctionCallInfoData(*fcinfo, NULL, nargs, InvalidOid, NULL, NULL);
	for (int i = 0; i < nargs; i++)
	{
		fcinfo->args[i].value = args[i];
		fcinfo->args[i].isnull = false;
	}
	result = (*fn) (fcinfo);
	*isnull = fcinfo->isnull;
	return result;
}

/* The body of a result jsonb ({"status", "headers", "body", ...}), or 0. */
static Datum
result_body(Datum result)
{
	Datum		args[2];
	bool		isnull;
	Datum		body;

	if (result == (Datum) 0)
		return (Datum) 0;
	args[0] = result;
	args[1] = CStringGetTextDatum("body");
	body = call_nullable(jsonb_object_field, 2, args, &isnull);
	return isnull ? (Datum) 0 : body;
}

/*
 * The first value path gives on jsonb doc (silently: no match is no value).
 * The _tz variant: a datetime comparison between values with and without a
 * time zone would otherwise raise, and an error here kills the worker.
 */
static bool
path_first(Datum doc, Datum path, Datum *out)
{
	Datum		args[4];
	bool		isnull;

	if (doc == (Datum) 0)
		return false;
	args[0] = doc;
	args[1] = path;
	args[2] = empty_vars;
	args[3] = BoolGetDatum(true);
	*out = call_nullable(jsonb_path_query_first_tz, 4, args, &isnull);
	return !isnull;
}

/* A jsonb scalar as text (palloc'd): strings unquoted; NULL for null. */
static char *
jsonb_scalar_text(Datum v)
{
	Jsonb	   *jb = DatumGetJsonbP(v);
	JsonbValue	jv;

	if (JB_ROOT_IS_SCALAR(jb) && JsonbExtractScalar(&jb->root, &jv))
	{
		if (jv.type == jbvNull)
			return NULL;
		if (jv.type == jbvString)
			return pnstrdup(jv.val.string.val, jv.val.string.len);
	}
	return JsonbToCString(NULL, &jb->root, VARSIZE(jb));
}

/* A number of seconds from a jsonb number or numeric string; -1 if none. */
static double
jsonb_seconds(Datum v)
{
	char	   *s = jsonb_scalar_text(v);
	char	   *end;
	double		d;

	if (s == NULL)
		return -1;
	d = strtod(s, &end);
	return (end == s || *end != '\0' || !isfinite(d) || d < 0) ? -1 : d;
}

static Datum
compile_path(const char *text)
{
	return DirectFunctionCall1(jsonpath_in, CStringGetDatum(text));
}

/* A string field of a jansson object, or NULL. */
static const char *
jstr(json_t *o, const char *key)
{
	json_t	   *v = json_object_get(o, key);

	return json_is_string(v) ? json_string_value(v) : NULL;
}

/*
 * Let go of a route snapshot: the worker holds its current one, and each
 * transfer the one it was chosen from, so a reload never frees what a
 * transfer in flight still reads (its template, keys, rules, hosts).
 */
void
route_release(Route *route)
{
	if (route == NULL || --route->refcount > 0)
		return;
	for (int i = 0; i < route->nproviders; i++)
	{
		RouteProvider *p = &route->providers[i];

		beat_template_free(p->tmpl);
		for (int k = 0; k < p->ncreds; k++)
			json_decref(p->creds[k].secret);
	}
	MemoryContextDelete(route->cxt);
}

/* Read one provider's rules (JSON text of an array, checked by set_provider). */
static void
load_rules(RouteProvider *p, const char *text)
{
	json_t	   *rules = json_loads(text, 0, NULL);
	size_t		i;
	json_t	   *r;

	p->nrules = 0;
	if (!json_is_array(rules))
	{
		json_decref(rules);
		return;
	}
	p->rules = palloc0(sizeof(RouteRule) * Max(json_array_size(rules), 1));
	json_array_foreach(rules, i, r)
	{
		RouteRule  *rule = &p->rules[p->nrules];
		json_t	   *st = json_object_get(r, "status");
		const char *outcome = jstr(r, "outcome");
		json_t	   *wait = json_object_get(r, "wait");

		if (json_is_array(st))
		{
			rule->lo = (int) json_number_value(json_array_get(st, 0));
			rule->hi = (int) json_number_value(json_array_get(st, 1));
		}
		else
			rule->lo = rule->hi = (int) json_number_value(st);
		if (jstr(r, "path"))
			rule->path = compile_path(jstr(r, "path"));
		if (json_object_get(r, "equals"))
		{
			char	   *eq = json_dumps(json_object_get(r, "equals"), JSON_ENCODE_ANY);

			rule->equals = DirectFunctionCall1(jsonb_in, CStringGetDatum(eq));
			free(eq);
		}
		rule->verdict = outcome == NULL ? VERDICT_PERMANENT :
			strcmp(outcome, "ok") == 0 ? VERDICT_OK :
			strcmp(outcome, "rate_limited") == 0 ? VERDICT_RATE_LIMITED :
			strcmp(outcome, "auth_failed") == 0 ? VERDICT_AUTH_FAILED :
			strcmp(outcome, "transient") == 0 ? VERDICT_TRANSIENT : VERDICT_PERMANENT;
		if (jstr(wait, "header"))
		{
			rule->wait_header = pstrdup(jstr(wait, "header"));
			for (char *c = rule->wait_header; *c; c++)
				*c = pg_ascii_tolower((unsigned char) *c);
		}
		if (jstr(wait, "path"))
			rule->wait_path = compile_path(jstr(wait, "path"));
		p->nrules++;
	}
	json_decref(rules);
}

/* Read the enabled credentials, [{"id", "secret", "rest_us", "streak"}, ...]. */
static void
load_creds(RouteProvider *p, const char *text, TimestampTz now)
{
	json_t	   *creds = json_loads(text, 0, NULL);
	size_t		i;
	json_t	   *c;

	p->ncreds = 0;
	p->creds = palloc0(sizeof(RouteCred) * Max(json_array_size(creds), 1));
	p->cred_ids = palloc0(sizeof(int64) * Max(json_array_size(creds), 1));
	json_array_foreach(creds, i, c)
	{
		RouteCred  *rc = &p->creds[p->ncreds];
		json_t	   *secret = json_object_get(c, "secret");
		const char *part;
		json_t	   *kv;
		json_t	   *rest = json_object_get(c, "rest_us");

		rc->id = (int64) json_integer_value(json_object_get(c, "id"));
		snprintf(rc->idtext, sizeof(rc->idtext), INT64_FORMAT, rc->id);
		rc->secret = json_incref(secret);
		rc->values = palloc0(sizeof(char *) * 32);
		json_object_foreach(secret, part, kv)
		{
			const char *name;
			json_t	   *v;

			json_object_foreach(kv, name, v)
				if (json_is_string(v) && rc->nvalues < 32)
				rc->values[rc->nvalues++] = pstrdup(json_string_value(v));
		}
		p->cred_ids[p->ncreds] = rc->id;
		/* a rest that outlived the worker (or the server) still holds */
		beat_credential_seed(rc->id,
							 json_is_integer(rest) && json_integer_value(rest) > 0 ?
							 now + json_integer_value(rest) : 0,
							 (int) json_integer_value(json_object_get(c, "streak")));
		p->ncreds++;
	}
	json_decref(creds);
}

/*
 * Load the route of operation: its providers by rank, each with the
 * operation's template, limits, rules and enabled keys.  Inside SPI.
 * Returns a new snapshot, held once by the caller (route_release).
 */
Route *
route_load(const char *operation)
{
	Oid			argtypes[1] = {TEXTOID};
	Datum		arg = CStringGetTextDatum(operation);
	MemoryContext old;
	MemoryContext cxt;
	TimestampTz now = GetCurrentTimestamp();
	Route	   *route;

	if (empty_vars == (Datum) 0)
	{
		old = MemoryContextSwitchTo(TopMemoryContext);
		empty_vars = DirectFunctionCall1(jsonb_in, CStringGetDatum("{}"));
		MemoryContextSwitchTo(old);
	}
	cxt = AllocSetContextCreate(TopMemoryContext, "pg_beat route", ALLOCSET_SMALL_SIZES);
	route = MemoryContextAllocZero(cxt, sizeof(Route));
	route->cxt = cxt;
	route->refcount = 1;

	beat_prepare(&plan_route,
				 "SELECT p.name, r.rank, r.weight, p.base_url, (p.operations -> $1)::text,"
				 " p.allowed_hosts, p.limits, p.rules::text,"
				 " (extract(epoch FROM p.timeout) * 1000)::bigint,"
				 " (extract(epoch FROM p.rest_base) * 1000000)::bigint,"
				 " (extract(epoch FROM p.rest_cap) * 1000000)::bigint,"
				 " p.breaker_failures, p.breaker_rate::float8, p.breaker_min_calls,"
				 " (extract(epoch FROM p.breaker_window) * 1000000)::bigint,"
				 " (extract(epoch FROM p.breaker_cooldown) * 1000000)::bigint,"
				 " p.breaker_probes,"
				 " coalesce((SELECT jsonb_agg(jsonb_build_object('id', c.id, 'secret', c.secret,"
				 "     'rest_us', (extract(epoch FROM c.disabled_until - now()) * 1000000)::bigint,"
				 "     'streak', c.failure_streak) ORDER BY c.id)"
				 "   FROM beat.credential c WHERE c.provider = p.name AND c.enabled), '[]')::text,"
				 " (SELECT count(*) FROM beat.credential c WHERE c.provider = p.name)"
				 " FROM beat.route r JOIN beat.provider p ON p.name = r.provider"
				 " WHERE r.operation = $1 AND p.operations ? $1"
				 " ORDER BY r.rank, p.name LIMIT " CppAsString2(ROUTE_MAX_PROVIDERS),
				 1, argtypes);
	beat_execute(plan_route, &arg, " ", SPI_OK_SELECT);

	old = MemoryContextSwitchTo(route->cxt);
	for (uint64 row = 0; row < SPI_processed; row++)
	{
		HeapTuple	tup = SPI_tuptable->vals[row];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		RouteProvider *p = &route->providers[route->nproviders];
		bool		isnull;
		char	   *error = NULL;
		char	   *base;
		json_t	   *op;
		json_t	   *cursor;
		Datum	   *elems;
		bool	   *nulls;
		int			n;

		memset(p, 0, sizeof(*p));
		strlcpy(p->name, TextDatumGetCString(SPI_getbinval(tup, desc, 1, &isnull)), NAMEDATALEN);
		p->rank = DatumGetInt32(SPI_getbinval(tup, desc, 2, &isnull));
		p->weight = DatumGetInt32(SPI_getbinval(tup, desc, 3, &isnull));
		base = TextDatumGetCString(SPI_getbinval(tup, desc, 4, &isnull));
		p->tmpl = beat_template_parse(TextDatumGetCString(SPI_getbinval(tup, desc, 5, &isnull)),
									  &error);
		if (p->tmpl == NULL)
		{
			ereport(WARNING,
					(errmsg("pg_beat: provider \"%s\" has an unusable template for operation \"%s\": %s",
							p->name, operation, error ? error : "?")));
			free(error);
			continue;
		}
		if (p->tmpl->url[0] == '/')
		{
			/* a path joins the base URL */
			size_t		blen = strlen(base);
			char	   *url;

			while (blen > 0 && base[blen - 1] == '/')
				blen--;
			url = malloc(blen + strlen(p->tmpl->url) + 1);
			if (url == NULL)
				ereport(ERROR, (errcode(ERRCODE_OUT_OF_MEMORY), errmsg("out of memory")));
			memcpy(url, base, blen);
			strcpy(url + blen, p->tmpl->url);
			free(p->tmpl->url);
			p->tmpl->url = url;
		}

		deconstruct_array(DatumGetArrayTypeP(SPI_getbinval(tup, desc, 6, &isnull)),
						  TEXTOID, -1, false, TYPALIGN_INT, &elems, &nulls, &n);
		p->hosts = palloc(sizeof(char *) * Max(n, 1));
		for (int i = 0; i < n; i++)
		{
			p->hosts[i] = TextDatumGetCString(elems[i]);
			for (char *c = p->hosts[i]; *c; c++)
				*c = pg_ascii_tolower((unsigned char) *c);
		}
		p->nhosts = n;
		deconstruct_array(DatumGetArrayTypeP(SPI_getbinval(tup, desc, 7, &isnull)),
						  TEXTOID, -1, false, TYPALIGN_INT, &elems, &nulls, &n);
		p->nlimits = Min(n, BEAT_MAX_STACKED_KEYS);
		for (int i = 0; i < p->nlimits; i++)
			p->limits[i] = TextDatumGetCString(elems[i]);
		load_rules(p, TextDatumGetCString(SPI_getbinval(tup, desc, 8, &isnull)));
		p->timeout_ms = (long) DatumGetInt64(SPI_getbinval(tup, desc, 9, &isnull));
		p->rest_base_us = DatumGetInt64(SPI_getbinval(tup, desc, 10, &isnull));
		p->rest_cap_us = DatumGetInt64(SPI_getbinval(tup, desc, 11, &isnull));
		p->breaker.failures = DatumGetInt32(SPI_getbinval(tup, desc, 12, &isnull));
		p->breaker.rate = DatumGetFloat8(SPI_getbinval(tup, desc, 13, &isnull));
		p->breaker.min_calls = DatumGetInt32(SPI_getbinval(tup, desc, 14, &isnull));
		p->breaker.window_us = DatumGetInt64(SPI_getbinval(tup, desc, 15, &isnull));
		p->breaker.cooldown_us = DatumGetInt64(SPI_getbinval(tup, desc, 16, &isnull));
		p->breaker.probes = DatumGetInt32(SPI_getbinval(tup, desc, 17, &isnull));
		load_creds(p, TextDatumGetCString(SPI_getbinval(tup, desc, 18, &isnull)), now);
		if (DatumGetInt64(SPI_getbinval(tup, desc, 19, &isnull)) > 0 && p->ncreds == 0)
			p->ncreds = -1;		/* has keys, none enabled */

		op = json_loads(TextDatumGetCString(SPI_getbinval(tup, desc, 5, &isnull)), 0, NULL);
		cursor = json_object_get(op, "cursor");
		if (json_is_object(cursor))
		{
			if (jstr(cursor, "path"))
				p->cursor_path = compile_path(jstr(cursor, "path"));
			if (jstr(cursor, "more"))
				p->more_path = compile_path(jstr(cursor, "more"));
			if (jstr(cursor, "link"))
				p->cursor_link = pstrdup(jstr(cursor, "link"));
			p->cursor_param = pstrdup(jstr(cursor, "param") ? jstr(cursor, "param") : "cursor");
			p->max_pages = json_is_integer(json_object_get(op, "max_pages")) ?
				(int) json_integer_value(json_object_get(op, "max_pages")) : 100;
		}
		json_decref(op);
		route->nproviders++;
	}
	MemoryContextSwitchTo(old);
	return route;
}

/* The index of the provider called name in the route, or -1. */
int
route_find(const Route *route, const char *name)
{
	for (int i = 0; i < route->nproviders; i++)
		if (strcmp(route->providers[i].name, name) == 0)
			return i;
	return -1;
}

/* Keep the earliest of the times something may serve again. */
static void
note_wait(RouteChoice *c, TimestampTz until, const char *provider, const char *why)
{
	if (until != 0 && (c->wait_until == 0 || until < c->wait_until))
		c->wait_until = until;
	if (c->why == NULL)
		c->why = psprintf("%s: %s", provider, why);
	else
		c->why = psprintf("%s; %s: %s", c->why, provider, why);
}

/*
 * Try provider p for a call with params: a key its limits admit and a pass
 * through its breaker.  Returns the key's index, -1 for a provider without
 * keys, or -2 when it cannot serve now (noted in *c).
 */
static int
try_provider(RouteProvider *p, const char *params, TimestampTz now, RouteChoice *c)
{
	int			order[64];
	int			ready;
	TimestampTz until;
	TimestampTz rested = 0;
	bool		any_limited = false;

	if (!beat_provider_available(p->name, now, &until))
	{
		note_wait(c, until, p->name, "circuit breaker open or provider limit");
		return -2;
	}
	if (p->ncreds < 0)
	{
		note_wait(c, now + NO_KEY_WAIT_US, p->name, "every credential disabled");
		return -2;
	}
	if (p->ncreds == 0)
	{
		order[0] = -1;
		ready = 1;
	}
	else
	{
		ready = beat_credentials_ready(p->cred_ids, p->ncreds, now, order, &rested);
		if (ready == 0)
		{
			note_wait(c, rested ? rested : now + NO_KEY_WAIT_US, p->name,
					  rested ? "every credential resting after 429" : "every credential disabled");
			return -2;
		}
	}

	for (int k = 0; k < ready; k++)
	{
		int			ci = order[k];
		char	   *keys[BEAT_MAX_STACKED_KEYS];
		char	   *error = NULL;
		BeatAcquireResult r;

		r.allowed = true;
		if (p->nlimits > 0)
		{
			if (!beat_render_keys(p->limits, p->nlimits, params, p->name,
								  ci >= 0 ? p->creds[ci].idtext : NULL, keys, &error))
			{
				note_wait(c, now + NO_KEY_WAIT_US, p->name, psprintf("limit keys: %s", error));
				free(error);
				return -2;
			}
			r = beat_limiter_try((const char *const *) keys, p->nlimits, 1, BEAT_CHARGE, &error);
			if (error != NULL)
			{
				/* palloc'd, unlike beat_render_keys' error: not free()d */
				note_wait(c, now + NO_KEY_WAIT_US, p->name, psprintf("limits: %s", error));
				for (int i = 0; i < p->nlimits; i++)
					free(keys[i]);
				return -2;
			}
			if (!r.allowed)
			{
				if (rested == 0 || now + r.retry_us < rested)
					rested = now + r.retry_us;
				any_limited = true;
				for (int i = 0; i < p->nlimits; i++)
					free(keys[i]);
				continue;
			}
		}
		if (!beat_breaker_admit(p->name, &p->breaker, now, &until, &c->probe))
		{
			if (p->nlimits > 0)
				(void) beat_limiter_try((const char *const *) keys, p->nlimits, 1,
										BEAT_REFUND, &error);
			for (int i = 0; i < p->nlimits; i++)
				free(keys[i]);
			note_wait(c, until, p->name, "circuit breaker half-open, probes out");
			return -2;
		}
		for (int i = 0; i < p->nlimits; i++)
			free(keys[i]);
		if (ci >= 0)
			beat_credential_used(p->creds[ci].id, now);
		return ci;
	}
	note_wait(c, rested, p->name, any_limited ? "rate limits" : "no credential ready");
	return -2;
}

/*
 * Give back one call's charge to the limit keys that templates render to
 * for params (with provider and credential, as when charged): the call
 * was never sent.  The same templates and params give the same keys.
 */
void
route_refund_keys(char *const *templates, int n, const char *params,
				  const char *provider, const char *credential)
{
	char	   *keys[BEAT_MAX_STACKED_KEYS];
	char	   *error = NULL;

	if (n == 0)
		return;
	if (!beat_render_keys(templates, n, params, provider, credential, keys, &error))
	{
		/* they rendered when charged, so this cannot fail; the charge stays */
		free(error);
		return;
	}
	/* a refund's only error is palloc'd and there is nothing to undo */
	(void) beat_limiter_try((const char *const *) keys, n, 1, BEAT_REFUND, &error);
	for (int i = 0; i < n; i++)
		free(keys[i]);
}

/* The same for what route_choose charged provider p through credential cred. */
void
route_refund(const RouteProvider *p, int cred, const char *params)
{
	route_refund_keys(p->limits, p->nlimits, params, p->name,
					  cred >= 0 ? p->creds[cred].idtext : NULL);
}

/*
 * Choose a provider and key for a call with params.  pinned >= 0 allows
 * only that provider (a continuation page); providers in the tried mask
 * failed this attempt already and are skipped.
 */
RouteChoice
route_choose(Route *route, const char *params, int pinned, uint64 tried, TimestampTz now)
{
	RouteChoice c = {-1, -1, 0, 0, NULL};
	int			start = 0;

	while (start < route->nproviders)
	{
		int			end = start;
		int			cand[ROUTE_MAX_PROVIDERS];
		int			ncand = 0;

		while (end < route->nproviders &&
			   route->providers[end].rank == route->providers[start].rank)
			end++;
		for (int i = start; i < end; i++)
			if ((pinned < 0 || i == pinned) && (tried & (UINT64CONST(1) << i)) == 0)
				cand[ncand++] = i;

		while (ncand > 0)
		{
			uint64		total = 0;
			uint64		pick;
			int			j;
			int			ci;

			for (j = 0; j < ncand; j++)
				total += route->providers[cand[j]].weight;
			pick = pg_prng_uint64_range(&pg_global_prng_state, 0, total - 1);
			for (j = 0; j < ncand - 1; j++)
			{
				if (pick < (uint64) route->providers[cand[j]].weight)
					break;
				pick -= route->providers[cand[j]].weight;
			}
			ci = try_provider(&route->providers[cand[j]], params, now, &c);
			if (ci >= -1)
			{
				c.provider = cand[j];
				c.cred = ci;
				return c;
			}
			cand[j] = cand[--ncand];
		}
		start = end;
	}
	if (c.why == NULL)
		c.why = pstrdup(route->nproviders == 0 ? "no provider serves the operation" :
						"every provider failed this attempt");
	return c;
}

/* Seconds in a wait header: a delay, or a Unix time when it is that large. */
static int64
header_wait_us(json_t *headers, const char *name)
{
	const char *v = jstr(headers, name);
	char	   *end;
	double		d;

	if (v == NULL)
		return -1;
	d = strtod(v, &end);
	if (end == v || !isfinite(d) || d < 0)
		return -1;
	if (d > 1e9)
		d -= (double) time(NULL);
	return (int64) (Max(d, 0) * USECS_PER_SEC);
}

/*
 * What an answer with status means.  result is its jsonb (0 if none);
 * headers are all response headers, lower-case.  For rate_limited, *wait_us
 * is the wait the provider asked for (0: none said).
 */
BeatVerdict
route_classify(const RouteProvider *p, long status, Datum result, json_t *headers,
			   int64 retry_after_s, int64 *wait_us, char **why)
{
	Datum		body = (Datum) 0;
	bool		have_body = false;

	*wait_us = retry_after_s > 0 ? retry_after_s * USECS_PER_SEC : 0;
	*why = NULL;
	for (int i = 0; i < p->nrules; i++)
	{
		const RouteRule *r = &p->rules[i];
		Datum		v;

		if (status < r->lo || status > r->hi)
			continue;
		if (r->path)
		{
			if (!have_body)
			{
				body = result_body(result);
				have_body = true;
			}
			if (!path_first(body, r->path, &v))
				continue;
			if (r->equals && !DatumGetBool(DirectFunctionCall2(jsonb_eq, v, r->equals)))
				continue;
		}
		if (r->verdict == VERDICT_RATE_LIMITED)
		{
			int64		w = -1;

			if (r->wait_header)
				w = header_wait_us(headers, r->wait_header);
			else if (r->wait_path)
			{
				if (!have_body)
				{
					body = result_body(result);
					have_body = true;
				}
				if (path_first(body, r->wait_path, &v))
				{
					double		s = jsonb_seconds(v);

					w = s >= 0 ? (int64) (s * USECS_PER_SEC) : -1;
				}
			}
			if (w >= 0)
				*wait_us = w;
		}
		*why = psprintf("HTTP %ld (rule %d)", status, i + 1);
		return r->verdict;
	}
	*why = psprintf("HTTP %ld", status);
	if (status >= 200 && status < 300)
		return VERDICT_OK;
	if (status == 429)
		return VERDICT_RATE_LIMITED;
	if (status == 401 || status == 403)
		return VERDICT_AUTH_FAILED;
	if (status == 408 || status >= 500)
		return VERDICT_TRANSIENT;
	return VERDICT_PERMANENT;
}

/* The value of query parameter name in url, decoded (palloc'd), or NULL. */
static char *
url_param(const char *url, const char *name)
{
	const char *q = strchr(url, '?');
	size_t		nlen = strlen(name);

	while (q != NULL)
	{
		const char *end;

		q++;
		end = q + strcspn(q, "&#");
		if ((size_t) (end - q) > nlen && strncmp(q, name, nlen) == 0 && q[nlen] == '=')
		{
			int			outlen;
			char	   *dec = curl_easy_unescape(NULL, q + nlen + 1, (int) (end - q - nlen - 1),
												 &outlen);
			char	   *out = dec ? pnstrdup(dec, outlen) : NULL;

			curl_free(dec);
			return out;
		}
		q = *end == '&' ? end : NULL;
	}
	return NULL;
}

/* The URL of Link: <...>; rel="next", or NULL (palloc'd). */
static char *
link_next(const char *link)
{
	const char *p = link;

	while (p && *p)
	{
		const char *open = strchr(p, '<');
		const char *close = open ? strchr(open, '>') : NULL;
		const char *next;
		const char *rel;

		if (close == NULL)
			return NULL;
		next = strchr(close, ',');
		rel = strstr(close, "rel=");
		if (rel && (next == NULL || rel < next) &&
			(strncmp(rel + 4, "\"next\"", 6) == 0 || strncmp(rel + 4, "next", 4) == 0))
			return pnstrdup(open + 1, close - open - 1);
		p = next;
	}
	return NULL;
}

/*
 * The cursor of the next page in an ok answer, or NULL when this is the
 * last page: no cursor, an empty one, or a "more" marker that is not true.
 */
char *
route_cursor(const RouteProvider *p, Datum result, json_t *headers)
{
	if (p->cursor_path)
	{
		Datum		body = result_body(result);
		Datum		v;
		char	   *s;

		if (p->more_path)
		{
			if (!path_first(body, p->more_path, &v))
				return NULL;
			s = jsonb_scalar_text(v);
			if (s == NULL || strcmp(s, "true") != 0)
				return NULL;
		}
		if (!path_first(body, p->cursor_path, &v))
			return NULL;
		s = jsonb_scalar_text(v);
		return (s == NULL || s[0] == '\0') ? NULL : s;
	}
	if (p->cursor_link)
	{
		const char *link = jstr(headers, "link");
		char	   *url = link ? link_next(link) : NULL;
		char	   *s = url ? url_param(url, p->cursor_link) : NULL;

		return (s == NULL || s[0] == '\0') ? NULL : s;
	}
	return NULL;
}

/*
 * Is url's host one the provider may contact?  The host, lower-case, is
 * copied to host (hostlen bytes).  No palloc: curl callbacks call this.
 */
bool
route_host_allowed(const RouteProvider *p, const char *url, char *host, size_t hostlen)
{
	CURLU	   *u = curl_url();
	char	   *h = NULL;
	bool		ok = false;

	host[0] = '\0';
	if (u == NULL)
		return false;
	if (curl_url_set(u, CURLUPART_URL, url, 0) == CURLUE_OK &&
		curl_url_get(u, CURLUPART_HOST, &h, 0) == CURLUE_OK && h != NULL)
	{
		size_t		hl;

		strlcpy(host, h, hostlen);
		for (char *c = host; *c; c++)
			*c = pg_ascii_tolower((unsigned char) *c);
		hl = strlen(host);
		for (int i = 0; i < p->nhosts && !ok; i++)
		{
			const char *a = p->hosts[i];

			if (a[0] == '*' && a[1] == '.')
			{
				size_t		sl = strlen(a + 1); /* ".example.com" */

				ok = hl > sl && strcmp(host + hl - sl, a + 1) == 0;
			}
			else
				ok = strcmp(host, a) == 0;
		}
	}
	curl_free(h);
	curl_url_cleanup(u);
	return ok;
}

/*
 * Is ip (text, as curl reports it) loopback, private, link-local,
 * carrier-grade NAT, unspecified or otherwise not a public address?
 */
bool
beat_address_private(const char *ip)
{
	unsigned char a[16];

	if (inet_pton(AF_INET, ip, a) == 1)
	{
		return a[0] == 0 || a[0] == 10 || a[0] == 127 ||
			(a[0] == 169 && a[1] == 254) ||
			(a[0] == 172 && (a[1] & 0xf0) == 16) ||
			(a[0] == 192 && a[1] == 168) ||
			(a[0] == 100 && (a[1] & 0xc0) == 64) ||
			a[0] >= 224;
	}
	if (inet_pton(AF_INET6, ip, a) == 1)
	{
		static const unsigned char zero[16] = {0};
		static const unsigned char mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};

		if (memcmp(a, zero, 15) == 0 && (a[15] == 0 || a[15] == 1))
			return true;		/* :: and ::1 */
		if (memcmp(a, mapped, 12) == 0)
		{
			char		v4[INET_ADDRSTRLEN];

			inet_ntop(AF_INET, a + 12, v4, sizeof(v4));
			return beat_address_private(v4);
		}
		return (a[0] & 0xfe) == 0xfc ||	/* fc00::/7 unique local */
			(a[0] == 0xfe && (a[1] & 0xc0) == 0x80) ||	/* fe80::/10 */
			a[0] == 0xff;		/* multicast */
	}
	return true;				/* not an address we understand: refuse */
}

/* Overwrite every secret string of c found in body with '*'. */
void
route_scrub(const RouteCred *c, char *body, size_t len)
{
	if (c == NULL || body == NULL)
		return;
	for (int i = 0; i < c->nvalues; i++)
	{
		size_t		vlen = strlen(c->values[i]);
		char	   *p = body;

		if (vlen < 4)
			continue;
		while ((p = memmem(p, len - (p - body), c->values[i], vlen)) != NULL)
		{
			memset(p, '*', vlen);
			p += vlen;
		}
	}
}
