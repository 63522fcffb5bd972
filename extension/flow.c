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
#include "executor/spi.h"
#include "funcapi.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"

#include "pg_beat.h"

PG_FUNCTION_INFO_V1(beat_create_flow);
PG_FUNCTION_INFO_V1(beat_alter_flow);
PG_FUNCTION_INFO_V1(beat_drop_flow);

#define FLOW_NARGS 10

static SPIPlanPtr plan_flow_insert = NULL;
static SPIPlanPtr plan_flow_update = NULL;
static SPIPlanPtr plan_flow_backoff = NULL;
static SPIPlanPtr plan_flow_lock = NULL;
static SPIPlanPtr plan_flow_live = NULL;
static SPIPlanPtr plan_flow_delete_tasks = NULL;
static SPIPlanPtr plan_flow_delete = NULL;

/* Check a flow name: lower-case letters, digits, '_', '.', '-'; 1-63 bytes. */
static char *
check_flow_name(FunctionCallInfo fcinfo)
{
	char	   *name;
	size_t		len;

	beat_require(fcinfo, 0, "name");
	name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	len = strlen(name);
	if (len == 0 || len > 63)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_NAME),
				 errmsg("flow name must have 1 to 63 characters")));
	for (size_t i = 0; i < len; i++)
	{
		char		c = name[i];
		bool		ok = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
			(i > 0 && (c == '_' || c == '.' || c == '-'));

		if (!ok)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_NAME),
					 errmsg("invalid flow name \"%s\"", name),
					 errdetail("A flow name starts with a lower-case letter or digit and continues with lower-case letters, digits, '_', '.' or '-'.")));
	}
	return name;
}

/* Check every non-NULL setting argument of create_flow and alter_flow. */
static void
check_flow_settings(FunctionCallInfo fcinfo)
{
	if (!PG_ARGISNULL(1))
		beat_check_range(PG_GETARG_INT32(1), 1, BEAT_MAX_ATTEMPTS_MAX, "max_attempts");
	if (!PG_ARGISNULL(2))
		beat_check_interval(PG_GETARG_INTERVAL_P(2), "backoff_base", false);
	if (!PG_ARGISNULL(3))
		beat_check_interval(PG_GETARG_INTERVAL_P(3), "backoff_cap", false);
	if (!PG_ARGISNULL(4))
		beat_check_interval(PG_GETARG_INTERVAL_P(4), "lease", false);
	if (!PG_ARGISNULL(5))
		beat_check_range(PG_GETARG_INT32(5), BEAT_PRIORITY_MIN, BEAT_PRIORITY_MAX,
						 "priority");
	if (!PG_ARGISNULL(6))
		beat_check_interval(PG_GETARG_INTERVAL_P(6), "retention", true);
	if (!PG_ARGISNULL(7))
		beat_check_range(PG_GETARG_INT32(7), 0, 64, "workers");
	if (!PG_ARGISNULL(8))
		beat_check_range(PG_GETARG_INT32(8), 1, 1024, "concurrency");
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

/*
 * Apply the settings to the named flow and return its new row as a datum in
 * the caller's context; NULL if there is no such flow.
 */
static Datum
update_flow(FunctionCallInfo fcinfo, bool *found)
{
	Oid			argtypes[FLOW_NARGS] = {TEXTOID, INT4OID, INTERVALOID, INTERVALOID,
		INTERVALOID, INT4OID, INTERVALOID, INT4OID, INT4OID, BOOLOID};
	Datum		values[FLOW_NARGS];
	char		nulls[FLOW_NARGS + 1];
	HeapTuple	tup;
	TupleDesc	desc;

	for (int i = 0; i < FLOW_NARGS; i++)
	{
		values[i] = PG_GETARG_DATUM(i);
		nulls[i] = PG_ARGISNULL(i) ? 'n' : ' ';
	}
	nulls[FLOW_NARGS] = '\0';

	beat_prepare(&plan_flow_update,
				 "UPDATE beat.flow SET"
				 " max_attempts = coalesce($2, max_attempts),"
				 " backoff_base = coalesce($3, backoff_base),"
				 " backoff_cap = coalesce($4, backoff_cap),"
				 " lease = coalesce($5, lease),"
				 " priority = coalesce($6, priority),"
				 " retention = coalesce($7, retention),"
				 " workers = coalesce($8, workers),"
				 " concurrency = coalesce($9, concurrency),"
				 " paused = coalesce($10, paused),"
				 " updated_at = now()"
				 " WHERE name = $1 RETURNING *",
				 FLOW_NARGS, argtypes);
	if (!PG_ARGISNULL(2) || !PG_ARGISNULL(3))
		check_backoff(fcinfo);
	beat_execute(plan_flow_update, values, nulls, SPI_OK_UPDATE_RETURNING);
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
				 " AND state IN ('pending', 'running', 'failed')",
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
