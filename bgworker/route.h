/*-------------------------------------------------------------------------
 *
 * route.h
 *		The providers that serve a flow's operation, as a worker holds them
 *		(route.c): loaded from beat.route, beat.provider and beat.credential,
 *		then used to choose a provider and key for each transfer, classify
 *		each answer and find the next page's cursor.
 *
 *-------------------------------------------------------------------------
 */
#ifndef BEAT_ROUTE_H
#define BEAT_ROUTE_H

#include "postgres.h"

#include "datatype/timestamp.h"

#include "http.h"
#include "provider.h"
#include "limiter.h"

#define ROUTE_MAX_PROVIDERS	64

/* What an answer means, by the provider's rules and the defaults. */
typedef enum BeatVerdict
{
	VERDICT_OK,
	VERDICT_RATE_LIMITED,
	VERDICT_AUTH_FAILED,
	VERDICT_TRANSIENT,
	VERDICT_PERMANENT
} BeatVerdict;

typedef struct RouteCred
{
	int64		id;
	char		idtext[24];
	json_t	   *secret;			/* {"headers": {...}, "query": {...}} */
	int			nvalues;
	char	  **values;			/* the secret strings, to scrub from bodies */
} RouteCred;

typedef struct RouteRule
{
	int			lo;				/* status range, inclusive */
	int			hi;
	Datum		path;			/* jsonpath on the body, or 0 */
	Datum		equals;			/* jsonb the path must give, or 0: any match */
	BeatVerdict verdict;
	char	   *wait_header;	/* lower-case, or NULL */
	Datum		wait_path;		/* jsonpath, or 0 */
} RouteRule;

typedef struct RouteProvider
{
	char		name[NAMEDATALEN];
	int			rank;
	int			weight;
	BeatTemplate *tmpl;			/* the operation's request, url made absolute */
	int			nhosts;
	char	  **hosts;			/* allowed hosts, lower-case; "*.x" for subdomains */
	int			nlimits;
	char	   *limits[BEAT_MAX_STACKED_KEYS];
	long		timeout_ms;
	int64		rest_base_us;
	int64		rest_cap_us;
	BeatBreakerConfig breaker;
	int			nrules;
	RouteRule  *rules;
	int			ncreds;
	RouteCred  *creds;
	int64	   *cred_ids;
	/* pagination: the cursor in the body (path) or in Link rel=next (link) */
	Datum		cursor_path;
	Datum		more_path;
	char	   *cursor_link;
	char	   *cursor_param;
	int			max_pages;
} RouteProvider;

typedef struct Route
{
	MemoryContext cxt;			/* holds this struct and its Datums */
	int			refcount;		/* the worker's current route, and transfers */
	int			nproviders;
	RouteProvider providers[ROUTE_MAX_PROVIDERS];	/* by rank */
} Route;

/* The outcome of choosing a provider and key for one transfer. */
typedef struct RouteChoice
{
	int			provider;		/* index, or -1: nothing can serve now */
	int			cred;			/* index into its creds, or -1: it has none */
	TimestampTz wait_until;		/* -1 choice: when something may (0: unknown) */
	TimestampTz probe;			/* the breaker probe the call took, or 0 */
	char	   *why;			/* -1 choice: palloc'd reason */
} RouteChoice;

extern Route *route_load(const char *operation);
extern void route_release(Route *route);
extern int	route_find(const Route *route, const char *name);
extern RouteChoice route_choose(Route *route, const char *params, int pinned,
								uint64 tried, TimestampTz now);
extern void route_refund_keys(char *const *templates, int n, const char *params,
							  const char *provider, const char *credential);
extern void route_refund(const RouteProvider *p, int cred, const char *params);
extern BeatVerdict route_classify(const RouteProvider *p, long status, Datum result,
								  json_t *headers, int64 retry_after_s, int64 *wait_us,
								  char **why);
extern char *route_cursor(const RouteProvider *p, Datum result, json_t *headers);
extern bool route_host_allowed(const RouteProvider *p, const char *url, char *host,
							   size_t hostlen);
extern bool beat_address_private(const char *ip);
extern void route_scrub(const RouteCred *c, char *body, size_t len);

#endif							/* BEAT_ROUTE_H */
