/*-------------------------------------------------------------------------
 *
 * flow.c
 *		beat.create_flow, beat.alter_flow and beat.drop_flow.
 *
 * beat.task has no foreign key to beat.flow (it would lock the flow row for
 * every enqueued task).  Instead drop_flow takes SHARE ROW EXCLUSIVE on
 * beat.task, which waits for every transaction that has written tasks and
 * holds off new writers until it commits; its statements then see every
 * task of the flow, so no task outlives its flow.  An enqueue in READ
 * COMMITTED that was waiting on that lock reads beat.flow afterwards and
 * finds the flow gone; one in REPEATABLE READ or SERIALIZABLE locks the flow
 * row instead (see queue.c).  drop_flow itself needs READ COMMITTED, where
 * each statement sees what committed before it.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "funcapi.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"

#include "pg_beat.h"

PG_FUNCTION_INFO_V1(beat_create_flow);
PG_FUNCTION_INFO_V1(beat_alter_flow);
PG_FUNCTION_INFO_V1(beat_drop_flow);
PG_FUNCTION_INFO_V1(beat_pause);
PG_FUNCTION_INFO_V1(beat_resume);
PG_FUNCTION_INFO_V1(beat_flow_changed);
PG_FUNCTION_INFO_V1(beat_request_problem);

#define FLOW_NARGS 17

/*
 * Is setting argument i given?  A server may run this library with the
 * SQL definitions of an older version (before ALTER EXTENSION UPDATE),
 * which pass fewer arguments: those not passed count as NULL.
 */
#define ARG_GIVEN(i) (PG_NARGS() > (i) && !PG_ARGISNULL(i))

static SPIPlanPtr plan_flow_insert = NULL;
static SPIPlanPtr plan_flow_update = NULL;
static SPIPlanPtr plan_flow_update_v1 = NULL;
static SPIPlanPtr plan_flow_update_v2 = NULL;
static SPIPlanPtr plan_flow_update_v3 = NULL;
static SPIPlanPtr plan_flow_backoff = NULL;
static SPIPlanPtr plan_check_request = NULL;
static SPIPlanPtr plan_flow_pause = NULL;
static SPIPlanPtr plan_flow_lock = NULL;
static SPIPlanPtr plan_flow_live = NULL;
static SPIPlanPtr plan_flow_delete_tasks = NULL;
static SPIPlanPtr plan_flow_delete = NULL;

/*
 * Check the name of a flow or an operation (what): lower-case letters,
 * digits, '_', '.', '-'; 1-63 bytes.
 */
static void
check_lower_name(const char *name, const char *what)
{
	size_t		len = strlen(name);

	if (len == 0 || len > 63)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_NAME),
				 errmsg("%s name must have 1 to 63 characters", what)));
	for (size_t i = 0; i < len; i++)
	{
		char		c = name[i];
		bool		ok = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
			(i > 0 && (c == '_' || c == '.' || c == '-'));

		if (!ok)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_NAME),
					 errmsg("invalid %s name \"%s\"", what, name),
					 errdetail("A %s name starts with a lower-case letter or digit and continues with lower-case letters, digits, '_', '.' or '-'.",
							   what)));
	}
}

/* The flow name argument, checked. */
static char *
check_flow_name(FunctionCallInfo fcinfo)
{
	char	   *name;

	beat_require(fcinfo, 0, "name");
	name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	check_lower_name(name, "flow");
	return name;
}

/* Check every non-NULL setting argument of create_flow and alter_flow. */
static void
check_flow_settings(FunctionCallInfo fcinfo)
{
	if (ARG_GIVEN(1))
		beat_check_range(PG_GETARG_INT32(1), 1, BEAT_MAX_ATTEMPTS_MAX, "max_attempts");
	if (ARG_GIVEN(2))
		beat_check_interval(PG_GETARG_INTERVAL_P(2), "backoff_base", false);
	if (ARG_GIVEN(3))
		beat_check_interval(PG_GETARG_INTERVAL_P(3), "backoff_cap", false);
	if (ARG_GIVEN(4))
		beat_check_interval(PG_GETARG_INTERVAL_P(4), "lease", false);
	if (ARG_GIVEN(5))
		beat_check_range(PG_GETARG_INT32(5), BEAT_PRIORITY_MIN, BEAT_PRIORITY_MAX,
						 "priority");
	if (ARG_GIVEN(6))
		beat_check_interval(PG_GETARG_INTERVAL_P(6), "retention", true);
	if (ARG_GIVEN(7))
		beat_check_range(PG_GETARG_INT32(7), 0, 64, "workers");
	if (ARG_GIVEN(8))
		beat_check_range(PG_GETARG_INT32(8), 1, 1024, "concurrency");
	if (ARG_GIVEN(11))
	{
		Interval	hour = {.time = USECS_PER_HOUR};

		beat_check_interval(PG_GETARG_INTERVAL_P(11), "timeout", false);
		beat_check_interval_max(PG_GETARG_INTERVAL_P(11), &hour, "timeout", "1 hour");
	}
	if (ARG_GIVEN(14))
		beat_check_range(PG_GETARG_INT32(14), 0, 50, "max_redirects");
	if (ARG_GIVEN(15))
	{
		ArrayType  *arr = PG_GETARG_ARRAYTYPE_P(15);
		Datum	   *elems;
		bool	   *nulls;
		int			n;

		deconstruct_array(arr, TEXTOID, -1, false, TYPALIGN_INT, &elems, &nulls, &n);
		if (ARR_NDIM(arr) > 1 || n > 16)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("limits must be a list of at most 16 keys")));
		for (int i = 0; i < n; i++)
		{
			if (nulls[i])
				ereport(ERROR,
						(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
						 errmsg("limits must not contain nulls")));
			(void) beat_check_name(DatumGetTextPP(elems[i]), "a limit key");
		}
	}
	if (ARG_GIVEN(16))
	{
		if (ARG_GIVEN(10))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("a flow has a request or an operation, not both"),
					 errhint("A request is one fixed call; an operation is served by the providers of its route (beat.route).")));
		check_lower_name(text_to_cstring(PG_GETARG_TEXT_PP(16)), "operation");
	}
}

/*
 * What is wrong with a request template, or NULL.  A flow's request is an
 * object with a "url" (http or https) and optional "method", "query" and
 * "headers" (objects of scalars) and "body".  A provider's operation
 * (operation true) may also have a url that is a path (joined to the
 * provider's base URL), and "cursor" and "max_pages", which
 * beat.check_operation checks.  Runs inside SPI.
 */
static char *
request_problem(Datum tmpl, bool operation)
{
	Oid			argtypes[2] = {JSONBOID, BOOLOID};
	Datum		values[2] = {tmpl, BoolGetDatum(operation)};
	bool		isnull;
	Datum		problem;

	beat_prepare(&plan_check_request,
				 "SELECT CASE"
				 " WHEN jsonb_typeof($1) <> 'object'"
				 "   THEN CASE WHEN $2 THEN 'an operation' ELSE 'request' END || ' must be a JSON object'"
				 " WHEN EXISTS (SELECT FROM jsonb_object_keys($1) k"
				 "   WHERE k NOT IN ('method', 'url', 'query', 'headers', 'body')"
				 "     AND NOT ($2 AND k IN ('cursor', 'max_pages')))"
				 "   THEN CASE WHEN $2"
				 "     THEN 'unknown key; the keys are method, url, query, headers, body, cursor and max_pages'"
				 "     ELSE 'request has an unknown key; the keys are method, url, query, headers and body' END"
				 " WHEN $2 AND (jsonb_typeof($1->'url') IS DISTINCT FROM 'string'"
				 "   OR ($1->>'url' !~ '^/' AND $1->>'url' !~* '^https?://[^/?#{}]'))"
				 "   THEN 'url must be a path starting with / (joined to base_url) or an http(s) URL'"
				 " WHEN jsonb_typeof($1->'url') IS DISTINCT FROM 'string'"
				 "   THEN 'request.url must be a string'"
				 " WHEN NOT $2 AND $1->>'url' !~* '^https?://[^/?#{}]'"
				 "   THEN 'request.url must start with http:// or https:// and a host'"
				 " WHEN $1 ? 'method' AND (jsonb_typeof($1->'method') <> 'string'"
				 "   OR $1->>'method' NOT IN ('GET', 'POST', 'PUT', 'PATCH', 'DELETE', 'HEAD'))"
				 "   THEN CASE WHEN $2 THEN '' ELSE 'request.' END"
				 "     || 'method must be one of GET, POST, PUT, PATCH, DELETE, HEAD'"
				 " WHEN $1 ? 'query' AND (jsonb_typeof($1->'query') <> 'object'"
				 "   OR EXISTS (SELECT FROM jsonb_each($1->'query') e"
				 "     WHERE jsonb_typeof(e.value) NOT IN ('string', 'number', 'boolean')))"
				 "   THEN CASE WHEN $2 THEN '' ELSE 'request.' END"
				 "     || 'query must be an object of strings, numbers or booleans'"
				 " WHEN $1 ? 'headers' AND (jsonb_typeof($1->'headers') <> 'object'"
				 "   OR EXISTS (SELECT FROM jsonb_each($1->'headers') e"
				 "     WHERE jsonb_typeof(e.value) NOT IN ('string', 'number', 'boolean')"
				 "        OR e.key !~ '^[A-Za-z0-9!#$%&''*+.^_`|~-]+$'))"
				 "   THEN CASE WHEN $2 THEN '' ELSE 'request.' END"
				 "     || 'headers must be an object of header names and scalar values'"
				 " END",
				 2, argtypes);
	beat_execute(plan_check_request, values, "  ", SPI_OK_SELECT);
	problem = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	return isnull ? NULL : TextDatumGetCString(problem);
}

/* Raise if a flow's request template is not usable.  Inside SPI. */
static void
check_request(Datum request)
{
	char	   *problem = request_problem(request, false);

	if (problem != NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s", problem),
				 errhint("A request looks like {\"method\": \"GET\", \"url\": \"https://api.example.com/users/{{handle}}\", \"headers\": {\"Accept\": \"application/json\"}}.")));
}

/*
 * beat.request_problem(tmpl, operation): the same check for
 * beat.check_operation, as text (NULL when the template is fine).
 */
Datum
beat_request_problem(PG_FUNCTION_ARGS)
{
	MemoryContext caller = CurrentMemoryContext;
	char	   *problem;

	beat_spi_connect();
	problem = request_problem(PG_GETARG_DATUM(0), PG_GETARG_BOOL(1));
	if (problem != NULL)
		problem = MemoryContextStrdup(caller, problem);
	beat_spi_finish();
	if (problem == NULL)
		PG_RETURN_NULL();
	PG_RETURN_TEXT_P(cstring_to_text(problem));
}

/* Refuse a backoff_cap shorter than backoff_base, given or current. */
static void
check_backoff(FunctionCallInfo fcinfo)
{
	Oid			argtypes[3] = {TEXTOID, INTERVALOID, INTERVALOID};
	Datum		values[3] = {PG_GETARG_DATUM(0), PG_GETARG_DATUM(2), PG_GETARG_DATUM(3)};
	char		nulls[4] = "   ";
	bool		isnull;

	nulls[1] = PG_ARGISNULL(2) ? 'n' : ' ';
	nulls[2] = PG_ARGISNULL(3) ? 'n' : ' ';
	beat_prepare(&plan_flow_backoff,
				 "SELECT coalesce($2, backoff_base) <= coalesce($3, backoff_cap),"
				 " coalesce($2, backoff_base)::text, coalesce($3, backoff_cap)::text"
				 " FROM beat.flow WHERE name = $1",
				 3, argtypes);
	beat_execute(plan_flow_backoff, values, nulls, SPI_OK_SELECT);
	if (SPI_processed == 1 &&
		!DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc,
									1, &isnull)))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("backoff_cap must not be shorter than backoff_base"),
				 errdetail("backoff_base would be %s and backoff_cap %s.",
						   SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2),
						   SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 3))));
}

/* The SET list every version of create_flow/alter_flow shares ($1 is name). */
#define FLOW_SET_V1 \
	"UPDATE beat.flow SET" \
	" max_attempts = coalesce($2, max_attempts)," \
	" backoff_base = coalesce($3, backoff_base)," \
	" backoff_cap = coalesce($4, backoff_cap)," \
	" lease = coalesce($5, lease)," \
	" priority = coalesce($6, priority)," \
	" retention = coalesce($7, retention)," \
	" workers = coalesce($8, workers)," \
	" concurrency = coalesce($9, concurrency)," \
	" paused = coalesce($10, paused),"
#define FLOW_SET_V2 FLOW_SET_V1 \
	" request = coalesce($11, request)," \
	" timeout = coalesce($12, timeout)," \
	" ok_statuses = coalesce($13, ok_statuses)," \
	" retry_statuses = coalesce($14, retry_statuses)," \
	" max_redirects = coalesce($15, max_redirects),"
#define FLOW_SET_V3 FLOW_SET_V2 \
	" limits = coalesce($16, limits),"
/* a request replaces an operation and the other way round */
#define FLOW_SET_V4 FLOW_SET_V1 \
	" request = CASE WHEN $17 IS NOT NULL THEN NULL ELSE coalesce($11, request) END," \
	" timeout = coalesce($12, timeout)," \
	" ok_statuses = coalesce($13, ok_statuses)," \
	" retry_statuses = coalesce($14, retry_statuses)," \
	" max_redirects = coalesce($15, max_redirects)," \
	" limits = coalesce($16, limits)," \
	" operation = CASE WHEN $11 IS NOT NULL THEN NULL ELSE coalesce($17, operation) END,"
#define FLOW_WHERE " updated_at = now() WHERE name = $1 RETURNING *"

/*
 * Apply the settings to the named flow and return its new row as a datum in
 * the caller's context; NULL if there is no such flow.  The SQL definition
 * of an older version passes fewer settings, and its table has fewer
 * columns: the statement follows the number of arguments.
 */
static Datum
update_flow(FunctionCallInfo fcinfo, bool *found)
{
	Oid			argtypes[FLOW_NARGS] = {TEXTOID, INT4OID, INTERVALOID, INTERVALOID,
		INTERVALOID, INT4OID, INTERVALOID, INT4OID, INT4OID, BOOLOID,
	JSONBOID, INTERVALOID, INT4MULTIRANGEOID, INT4MULTIRANGEOID, INT4OID, TEXTARRAYOID,
	TEXTOID};
	Datum		values[FLOW_NARGS];
	char		nulls[FLOW_NARGS + 1];
	HeapTuple	tup;
	TupleDesc	desc;
	SPIPlanPtr	plan;

	for (int i = 0; i < FLOW_NARGS; i++)
	{
		values[i] = ARG_GIVEN(i) ? PG_GETARG_DATUM(i) : (Datum) 0;
		nulls[i] = ARG_GIVEN(i) ? ' ' : 'n';
	}
	nulls[FLOW_NARGS] = '\0';
	if (ARG_GIVEN(10))
		check_request(values[10]);

	if (PG_NARGS() <= 10)
		plan = beat_prepare(&plan_flow_update_v1, FLOW_SET_V1 FLOW_WHERE, 10, argtypes);
	else if (PG_NARGS() <= 15)
		plan = beat_prepare(&plan_flow_update_v2, FLOW_SET_V2 FLOW_WHERE, 15, argtypes);
	else if (PG_NARGS() <= 16)
		plan = beat_prepare(&plan_flow_update_v3, FLOW_SET_V3 FLOW_WHERE, 16, argtypes);
	else
		plan = beat_prepare(&plan_flow_update, FLOW_SET_V4 FLOW_WHERE, FLOW_NARGS,
							argtypes);
	if (ARG_GIVEN(2) || ARG_GIVEN(3))
		check_backoff(fcinfo);
	beat_execute(plan, values, nulls, SPI_OK_UPDATE_RETURNING);
	*found = SPI_processed > 0;
	if (!*found)
		return (Datum) 0;

	tup = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;
	return PointerGetDatum(SPI_returntuple(tup, desc));
}

/* beat.create_flow(name, settings...): a new flow; NULL settings take defaults. */
Datum
beat_create_flow(PG_FUNCTION_ARGS)
{
	Oid			argtypes[1] = {TEXTOID};
	char	   *name = check_flow_name(fcinfo);
	Datum		row;
	bool		found;

	check_flow_settings(fcinfo);

	beat_spi_connect();
	beat_prepare(&plan_flow_insert,
				 "INSERT INTO beat.flow (name) VALUES ($1)"
				 " ON CONFLICT (name) DO NOTHING",
				 1, argtypes);
	beat_execute(plan_flow_insert, &fcinfo->args[0].value, " ", SPI_OK_INSERT);
	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(ERRCODE_DUPLICATE_OBJECT),
				 errmsg("flow \"%s\" already exists", name),
				 errhint("Change it with beat.alter_flow().")));
	row = update_flow(fcinfo, &found);
	beat_spi_finish();

	PG_RETURN_DATUM(row);
}

/* beat.alter_flow(name, settings...): change the non-NULL settings. */
Datum
beat_alter_flow(PG_FUNCTION_ARGS)
{
	char	   *name = check_flow_name(fcinfo);
	Datum		row;
	bool		found;

	check_flow_settings(fcinfo);

	beat_spi_connect();
	row = update_flow(fcinfo, &found);
	if (!found)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("flow \"%s\" does not exist", name)));
	beat_spi_finish();

	PG_RETURN_DATUM(row);
}

/* beat.drop_flow(name, force): delete the flow and its tasks. */
Datum
beat_drop_flow(PG_FUNCTION_ARGS)
{
	Oid			argtypes[1] = {TEXTOID};
	char	   *name = check_flow_name(fcinfo);
	bool		force = PG_GETARG_BOOL(1);
	Datum		v = PG_GETARG_DATUM(0);
	bool		isnull;
	int64		live;
	int64		deleted;

	if (IsolationUsesXactSnapshot())
		ereport(ERROR,
				(errcode(ERRCODE_ACTIVE_SQL_TRANSACTION),
				 errmsg("beat.drop_flow must run in a READ COMMITTED transaction"),
				 errdetail("It must see every task committed before it takes its lock.")));

	beat_spi_connect();
	if (SPI_execute("LOCK TABLE beat.task IN SHARE ROW EXCLUSIVE MODE", false, 0)
		!= SPI_OK_UTILITY)
		elog(ERROR, "pg_beat: could not lock beat.task");

	beat_prepare(&plan_flow_lock,
				 "SELECT FROM beat.flow WHERE name = $1 FOR UPDATE",
				 1, argtypes);
	beat_execute(plan_flow_lock, &v, " ", SPI_OK_SELECT);
	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("flow \"%s\" does not exist", name)));

	beat_prepare(&plan_flow_live,
				 "SELECT count(*) FROM beat.task WHERE flow = $1"
				 " AND state IN " LIVE_STATES,
				 1, argtypes);
	beat_execute(plan_flow_live, &v, " ", SPI_OK_SELECT);
	live = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
									   SPI_tuptable->tupdesc, 1, &isnull));
	if (live > 0 && !force)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_IN_USE),
				 errmsg("flow \"%s\" has " INT64_FORMAT " unfinished tasks", name, live),
				 errhint("Wait for them to finish, cancel them, or drop the flow with force => true.")));

	beat_prepare(&plan_flow_delete_tasks,
				 "DELETE FROM beat.task WHERE flow = $1",
				 1, argtypes);
	beat_execute(plan_flow_delete_tasks, &v, " ", SPI_OK_DELETE);
	deleted = (int64) SPI_processed;

	beat_prepare(&plan_flow_delete,
				 "DELETE FROM beat.flow WHERE name = $1",
				 1, argtypes);
	beat_execute(plan_flow_delete, &v, " ", SPI_OK_DELETE);
	beat_spi_finish();

	PG_RETURN_INT64(deleted);
}

/* Set a flow's paused flag; raise if there is no such flow. */
static void
set_paused(Datum flow, bool paused)
{
	Oid			argtypes[2] = {TEXTOID, BOOLOID};
	Datum		values[2] = {flow, BoolGetDatum(paused)};

	beat_spi_connect();
	beat_prepare(&plan_flow_pause,
				 "UPDATE beat.flow SET paused = $2, updated_at = now()"
				 " WHERE name = $1",
				 2, argtypes);
	beat_execute(plan_flow_pause, values, "  ", SPI_OK_UPDATE);
	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("flow \"%s\" does not exist", TextDatumGetCString(flow))));
	beat_spi_finish();
}

/* beat.pause(flow): claims of the flow return nothing until resumed. */
Datum
beat_pause(PG_FUNCTION_ARGS)
{
	set_paused(PG_GETARG_DATUM(0), true);
	PG_RETURN_VOID();
}

/* beat.resume(flow): the flow's tasks are handed out again. */
Datum
beat_resume(PG_FUNCTION_ARGS)
{
	set_paused(PG_GETARG_DATUM(0), false);
	PG_RETURN_VOID();
}

/* Trigger on beat.flow: wake the launcher and the workers at commit. */
Datum
beat_flow_changed(PG_FUNCTION_ARGS)
{
	if (!CALLED_AS_TRIGGER(fcinfo))
		elog(ERROR, "pg_beat: beat_flow_changed must be called as a trigger");
	beat_wake_launcher_at_commit();
	return PointerGetDatum(NULL);
}
