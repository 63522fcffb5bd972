/*-------------------------------------------------------------------------
 *
 * queue.c
 *		The task queue's SQL functions: enqueue, claim, complete, fail,
 *		heartbeat, cancel, requeue, reap and purge.
 *
 * Every function is one or two statements through saved SPI plans, but
 * for three writes done directly with the table and index access methods
 * (a batch without keys, claim and complete_batch), each of which goes
 * back to its statement on a table it does not know exactly; none builds
 * SQL from its arguments.  Concurrency rests on row locks:
 *
 * - claim updates due rows without waiting, skipping those another
 *   transaction holds (as FOR UPDATE SKIP LOCKED does), so concurrent
 *   claimers get disjoint tasks and never wait on each other;
 * - complete, fail and heartbeat update only a row that is running and
 *   leased to the calling worker; when no row matches they read the task
 *   again to say why, and raise an error, so nothing is written;
 * - the rows to change are picked by a sub-select locked with FOR UPDATE
 *   SKIP LOCKED and matched with "id = ANY (ARRAY(sub-select))": the
 *   sub-select runs once, so even a plan made while beat.task looked empty
 *   costs one pass over the table, never one pass per picked row;
 * - idempotency rests on the partial unique index task_idempotency_idx and
 *   INSERT ... ON CONFLICT DO NOTHING, which waits for a racing insert of
 *   the same key to commit or abort before deciding.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/htup_details.h"
#include "access/heapam.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/dependency.h"
#include "catalog/pg_am.h"
#include "catalog/pg_class.h"
#include "catalog/pg_opfamily.h"
#include "catalog/pg_type.h"
#include "commands/sequence.h"
#include "commands/trigger.h"
#include "executor/executor.h"
#include "executor/spi.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "nodes/makefuncs.h"
#include "storage/bufmgr.h"
#include "storage/procarray.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"
#include "utils/uuid.h"
#include "common/int.h"
#include "common/pg_prng.h"

#include "pg_beat.h"

PG_FUNCTION_INFO_V1(beat_enqueue);
PG_FUNCTION_INFO_V1(beat_enqueue_batch);
PG_FUNCTION_INFO_V1(beat_claim);
PG_FUNCTION_INFO_V1(beat_complete);
PG_FUNCTION_INFO_V1(beat_complete_batch);
PG_FUNCTION_INFO_V1(beat_fail);
PG_FUNCTION_INFO_V1(beat_heartbeat);
PG_FUNCTION_INFO_V1(beat_cancel);
PG_FUNCTION_INFO_V1(beat_requeue);
PG_FUNCTION_INFO_V1(beat_reap);
PG_FUNCTION_INFO_V1(beat_purge);

#define IDEMPOTENCY_ARBITER \
	"ON CONFLICT (flow, idempotency_key) " \
	"WHERE idempotency_key IS NOT NULL AND state IN " LIVE_STATES " DO NOTHING "

/*
 * In REPEATABLE READ and SERIALIZABLE an INSERT reads beat.flow as of the
 * transaction's snapshot, so a flow dropped since would go unnoticed: there
 * the INSERT locks the flow row, and a concurrent drop makes it fail with a
 * serialization error.  READ COMMITTED needs no row lock (see flow.c).
 */
#define FLOW_LOCK " FOR KEY SHARE OF f"

/* A new task is pending, or scheduled when its run_at is still to come. */
#define INITIAL_STATE(run_at) \
	"CASE WHEN " run_at " > now() THEN 'scheduled'::beat.task_state" \
	" ELSE 'pending'::beat.task_state END"

/* How often an idempotent enqueue retries when the duplicate it hit vanished. */
#define IDEMPOTENCY_RETRIES 100

/* The arguments shared by enqueue and enqueue_batch, checked. */
typedef struct EnqueueArgs
{
	text	   *flow;
	char	   *flow_name;
	Datum		priority;
	bool		priority_null;
	Datum		run_at;
	bool		run_at_null;
	Datum		correlation_id;
	bool		correlation_id_null;
	Datum		max_attempts;
	bool		max_attempts_null;
} EnqueueArgs;

static SPIPlanPtr plan_enqueue[2][2];	/* [keyed][locks the flow row] */
static SPIPlanPtr plan_find_live = NULL;
static SPIPlanPtr plan_flow_exists = NULL;
static SPIPlanPtr plan_batch[2][2];	/* [keyed][locks the flow row] */
static SPIPlanPtr plan_find_live_many = NULL;
static SPIPlanPtr plan_flow_defaults[2];	/* [locks the flow row] */
static SPIPlanPtr plan_promote = NULL;
static SPIPlanPtr plan_claim = NULL;
static SPIPlanPtr plan_complete = NULL;
static SPIPlanPtr plan_complete_batch = NULL;
static SPIPlanPtr plan_complete_ids = NULL;
static SPIPlanPtr plan_fail = NULL;
static SPIPlanPtr plan_heartbeat = NULL;
static SPIPlanPtr plan_task_state = NULL;
static SPIPlanPtr plan_cancel = NULL;
static SPIPlanPtr plan_requeue = NULL;
static SPIPlanPtr plan_reap = NULL;
static SPIPlanPtr plan_purge = NULL;

/*
 * A new random (version 4) UUID, for a correlation id nobody gave.  From a
 * per-backend xoshiro128** seeded with 128 strong random bits: this is an
 * identifier, not a secret, and gen_random_uuid()'s strong randomness for
 * every row cost a fifth of a batch enqueue.
 */
static Datum
new_uuid(void)
{
	static pg_prng_state prng;
	static bool seeded = false;
	pg_uuid_t  *u = palloc(sizeof(pg_uuid_t));
	uint64		hi;
	uint64		lo;

	if (!seeded)
	{
		if (!pg_prng_strong_seed(&prng))
			ereport(ERROR,
					(errcode(ERRCODE_INTERNAL_ERROR),
					 errmsg("could not seed the correlation id generator")));
		seeded = true;
	}
	hi = pg_prng_uint64(&prng);
	lo = pg_prng_uint64(&prng);
	memcpy(u->data, &hi, 8);
	memcpy(u->data + 8, &lo, 8);
	u->data[6] = (u->data[6] & 0x0f) | 0x40;	/* version 4 */
	u->data[8] = (u->data[8] & 0x3f) | 0x80;	/* RFC 4122 variant */
	return UUIDPGetDatum(u);
}

/* Check the common enqueue arguments at the given positions. */
static void
read_enqueue_args(FunctionCallInfo fcinfo, EnqueueArgs *a)
{
	beat_require(fcinfo, 0, "flow");
	a->flow = PG_GETARG_TEXT_PP(0);
	a->flow_name = text_to_cstring(a->flow);

	a->priority_null = PG_ARGISNULL(2);
	a->priority = PG_GETARG_DATUM(2);
	if (!a->priority_null)
		beat_check_range(DatumGetInt32(a->priority),
						 BEAT_PRIORITY_MIN, BEAT_PRIORITY_MAX, "priority");

	a->run_at_null = PG_ARGISNULL(3);
	a->run_at = PG_GETARG_DATUM(3);
	if (!a->run_at_null && TIMESTAMP_NOT_FINITE(DatumGetTimestampTz(a->run_at)))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("run_at must be a finite time")));

	a->correlation_id_null = PG_ARGISNULL(5);
	a->correlation_id = PG_GETARG_DATUM(5);

	a->max_attempts_null = PG_ARGISNULL(6);
	a->max_attempts = PG_GETARG_DATUM(6);
	if (!a->max_attempts_null)
		beat_check_range(DatumGetInt32(a->max_attempts),
						 1, BEAT_MAX_ATTEMPTS_MAX, "max_attempts");
}

/* Check one params value: a JSON object no larger than beat.max_params_size. */
static Jsonb *
check_params(Datum d, int index)
{
	Jsonb	   *jb = DatumGetJsonbP(d);
	char		where[64] = "";

	if (index >= 0)
		snprintf(where, sizeof(where), " (element %d)", index + 1);

	if (!JB_ROOT_IS_OBJECT(jb))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("params must be a JSON object%s", where),
				 errhint("Pass task parameters as an object, for example '{\"handle\": \"alice\"}'.")));
	if (VARSIZE(jb) > (Size) beat_max_params_size)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("params are too large%s", where),
				 errdetail("They take %zu bytes; the limit is %d bytes.",
						   (Size) VARSIZE(jb), beat_max_params_size),
				 errhint("Raise beat.max_params_size, or keep large payloads elsewhere and pass a reference.")));
	return jb;
}

/* Check an idempotency key: NULL means none, empty or too long is refused. */
static void
check_key(text *key)
{
	(void) beat_check_name(key, "idempotency key");
}

static void flow_missing(Datum flow) pg_attribute_noreturn();

/*
 * Raise "flow does not exist" unless the flow exists; else its row (paused,
 * lease) is left in SPI_tuptable.
 */
static void
require_flow(Datum flow)
{
	Oid			argtypes[1] = {TEXTOID};

	beat_prepare(&plan_flow_exists,
				 "SELECT paused, lease FROM beat.flow WHERE name = $1",
				 1, argtypes);
	beat_execute(plan_flow_exists, &flow, " ", SPI_OK_SELECT);
	if (SPI_processed == 0)
		flow_missing(flow);
}

/*
 * Raise: flow is not there for a statement that just read beat.flow.  (Not
 * require_flow(): a flow created since would make it return, and the
 * caller would go on with SPI_tuptable holding another query's rows.)
 */
static void
flow_missing(Datum flow)
{
	ereport(ERROR,
			(errcode(ERRCODE_UNDEFINED_OBJECT),
			 errmsg("flow \"%s\" does not exist", TextDatumGetCString(flow)),
			 errhint("Create it with beat.create_flow().")));
}

/* The id of the live task of flow with this key, or 0 if there is none. */
static int64
find_live(Datum flow, Datum key)
{
	Oid			argtypes[2] = {TEXTOID, TEXTOID};
	Datum		values[2] = {flow, key};
	bool		isnull;

	beat_prepare(&plan_find_live,
				 "SELECT id FROM beat.task WHERE flow = $1 AND idempotency_key = $2"
				 " AND state IN " LIVE_STATES,
				 2, argtypes);
	beat_execute(plan_find_live, values, "  ", SPI_OK_SELECT);
	if (SPI_processed == 0)
		return 0;
	return DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
									   SPI_tuptable->tupdesc, 1, &isnull));
}

/* Insert one task; return its id, or 0 if a live duplicate key stopped it. */
static int64
insert_one(EnqueueArgs *a, Jsonb *params, text *key)
{
	Oid			argtypes[7] = {TEXTOID, JSONBOID, INT4OID, TIMESTAMPTZOID,
	TEXTOID, UUIDOID, INT4OID};
	Datum		values[7];
	char		nulls[7] = "       ";
	SPIPlanPtr	plan;
	bool		isnull;

	values[0] = PointerGetDatum(a->flow);
	values[1] = JsonbPGetDatum(params);
	values[2] = a->priority;
	nulls[2] = a->priority_null ? 'n' : ' ';
	values[3] = a->run_at;
	nulls[3] = a->run_at_null ? 'n' : ' ';
	values[4] = PointerGetDatum(key);
	nulls[4] = key == NULL ? 'n' : ' ';
	values[5] = a->correlation_id_null ? new_uuid() : a->correlation_id;
	values[6] = a->max_attempts;
	nulls[6] = a->max_attempts_null ? 'n' : ' ';

#define ENQUEUE_SQL(lock, extra) \
	"INSERT INTO beat.task (flow, state, params, priority, run_at, idempotency_key," \
	" correlation_id, max_attempts)" \
	" SELECT f.name, " INITIAL_STATE("$4") ", $2, coalesce($3, f.priority)," \
	" coalesce($4, now()), $5," \
	" $6, coalesce($7, f.max_attempts)" \
	" FROM beat.flow f WHERE f.name = $1" lock " " extra "RETURNING id"

	if (key == NULL && !IsolationUsesXactSnapshot())
		plan = beat_prepare(&plan_enqueue[0][0], ENQUEUE_SQL("", ""), 7, argtypes);
	else if (key == NULL)
		plan = beat_prepare(&plan_enqueue[0][1], ENQUEUE_SQL(FLOW_LOCK, ""),
							7, argtypes);
	else if (!IsolationUsesXactSnapshot())
		plan = beat_prepare(&plan_enqueue[1][0],
							ENQUEUE_SQL("", IDEMPOTENCY_ARBITER), 7, argtypes);
	else
		plan = beat_prepare(&plan_enqueue[1][1],
							ENQUEUE_SQL(FLOW_LOCK, IDEMPOTENCY_ARBITER), 7, argtypes);

	beat_execute(plan, values, nulls, SPI_OK_INSERT_RETURNING);
	if (SPI_processed == 0)
		return 0;
	return DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
									   SPI_tuptable->tupdesc, 1, &isnull));
}

/*
 * Enqueue one task with an idempotency key.  A duplicate found by ON
 * CONFLICT may finish (or its transaction abort) before we read it; then
 * the key is free again and we insert once more.
 */
static int64
enqueue_keyed(EnqueueArgs *a, Jsonb *params, text *key)
{
	for (int i = 0; i < IDEMPOTENCY_RETRIES; i++)
	{
		int64		id = insert_one(a, params, key);

		if (id != 0)
		{
			beat_wake_at_commit(a->flow_name);
			return id;
		}
		require_flow(PointerGetDatum(a->flow));
		id = find_live(PointerGetDatum(a->flow), PointerGetDatum(key));
		if (id != 0)
			return id;
	}
	ereport(ERROR,
			(errcode(ERRCODE_T_R_SERIALIZATION_FAILURE),
			 errmsg("could not enqueue task with idempotency key \"%s\"",
					text_to_cstring(key)),
			 errdetail("Concurrent transactions kept finishing the task with that key."),
			 errhint("Retry the transaction.")));
	return 0;					/* keep the compiler quiet */
}

/* beat.enqueue(flow, params, priority, run_at, idempotency_key, correlation_id, max_attempts) */
Datum
beat_enqueue(PG_FUNCTION_ARGS)
{
	EnqueueArgs a;
	Jsonb	   *params;
	text	   *key = NULL;
	int64		id;

	read_enqueue_args(fcinfo, &a);
	beat_require(fcinfo, 1, "params");
	params = check_params(PG_GETARG_DATUM(1), -1);
	if (!PG_ARGISNULL(4))
	{
		key = PG_GETARG_TEXT_PP(4);
		check_key(key);
	}

	beat_spi_connect();
	if (key != NULL)
		id = enqueue_keyed(&a, params, key);
	else
	{
		id = insert_one(&a, params, NULL);
		if (id == 0)
			flow_missing(PointerGetDatum(a.flow));
		beat_wake_at_commit(a.flow_name);
	}
	beat_spi_finish();

	PG_RETURN_INT64(id);
}

/*
 * Turn the params argument of enqueue_batch, a jsonb[] or a JSON array of
 * objects, into checked jsonb datums: *elems_out, *count of them.
 */
static void
batch_params(FunctionCallInfo fcinfo, int *count, Datum **elems_out)
{
	Oid			argtype = get_fn_expr_argtype(fcinfo->flinfo, 1);
	Datum	   *elems;
	int			n = 0;

	if (argtype == JSONBOID)
	{
		Jsonb	   *arr = PG_GETARG_JSONB_P(1);
		JsonbIterator *it;
		JsonbValue	v;
		JsonbIteratorToken tok;
		int			cap;

		if (!JB_ROOT_IS_ARRAY(arr) || JB_ROOT_IS_SCALAR(arr))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("params must be a JSON array of objects")));
		cap = JB_ROOT_COUNT(arr);
		elems = palloc(sizeof(Datum) * Max(cap, 1));
		it = JsonbIteratorInit(&arr->root);
		while ((tok = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
		{
			if (tok != WJB_ELEM)
				continue;
			if (v.type != jbvBinary || !JsonContainerIsObject(v.val.binary.data))
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("params must be a JSON object (element %d)", n + 1)));
			elems[n] = JsonbPGetDatum(JsonbValueToJsonb(&v));
			(void) check_params(elems[n], n);
			n++;
		}
	}
	else
	{
		ArrayType  *arr = PG_GETARG_ARRAYTYPE_P(1);
		bool	   *nulls;

		if (ARR_NDIM(arr) > 1)
			ereport(ERROR,
					(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
					 errmsg("params must be a one-dimensional array")));
		deconstruct_array(arr, JSONBOID, -1, false, TYPALIGN_INT,
						  &elems, &nulls, &n);
		for (int i = 0; i < n; i++)
		{
			if (nulls[i])
				ereport(ERROR,
						(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
						 errmsg("params must not contain nulls (element %d)", i + 1)));
			elems[i] = JsonbPGetDatum(check_params(elems[i], i));
		}
	}

	*count = n;
	*elems_out = elems;
}

/* Check idempotency_keys against the params count; return NULL if absent. */
static ArrayType *
batch_keys(FunctionCallInfo fcinfo, int count, Datum **keys, bool **key_nulls)
{
	ArrayType  *arr;
	int			n;

	if (PG_ARGISNULL(4))
		return NULL;
	arr = PG_GETARG_ARRAYTYPE_P(4);
	if (ARR_NDIM(arr) > 1)
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("idempotency_keys must be a one-dimensional array")));
	deconstruct_array(arr, TEXTOID, -1, false, TYPALIGN_INT, keys, key_nulls, &n);
	if (n != count)
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("idempotency_keys must have one element per params element"),
				 errdetail("There are %d params and %d keys.", count, n)));
	for (int i = 0; i < n; i++)
		if (!(*key_nulls)[i])
			check_key(DatumGetTextPP((*keys)[i]));
	return arr;
}

/* Byte equality of two text datums, which is what the unique index compares. */
static bool
same_text(Datum a, Datum b)
{
	text	   *x = DatumGetTextPP(a);
	text	   *y = DatumGetTextPP(b);

	return VARSIZE_ANY_EXHDR(x) == VARSIZE_ANY_EXHDR(y) &&
		memcmp(VARDATA_ANY(x), VARDATA_ANY(y), VARSIZE_ANY_EXHDR(x)) == 0;
}

#define BATCH_SQL(keycol, keyarg, extra, cols, lock) \
	"INSERT INTO beat.task (flow, state, params, priority, run_at, correlation_id," \
	" max_attempts" keycol ")" \
	" SELECT f.name, " INITIAL_STATE("$4") ", u.p, coalesce($3, f.priority)," \
	" coalesce($4, now())," \
	" u.c, coalesce($6, f.max_attempts)" keyarg \
	" FROM beat.flow f, unnest($2" extra ") WITH ORDINALITY AS u(" cols ")" \
	" WHERE f.name = $1 ORDER BY u.ord" lock " "

/*
 * The direct insert of a batch without keys.
 *
 * An INSERT ... SELECT FROM unnest() spends a third of its time outside
 * the table and its indexes: scanning the function's result, projecting,
 * sorting by ordinality, and copying RETURNING rows.  A batch without keys
 * cannot conflict with anything, so it is written the way COPY writes:
 * rows formed here, heap_multi_insert (one WAL record per page, not per
 * row), then the index entries.  What the INSERT would have done besides
 * is done here too: the identity's nextval, the defaults, the CHECK
 * constraints, the partial indexes' predicates.  A table this code does
 * not know exactly (a column it does not fill, an insert trigger, row
 * security) goes back to the INSERT.
 */
typedef enum DirectCol
{
	D_ID, D_FLOW, D_STATE, D_PRIORITY, D_RUN_AT, D_ATTEMPTS, D_MAX_ATTEMPTS,
	D_PARAMS, D_CORRELATION_ID, D_CREATED_AT, D_UPDATED_AT, D_NCOLS
} DirectCol;

static const char *const direct_cols[D_NCOLS] = {
	"id", "flow", "state", "priority", "run_at", "attempts", "max_attempts",
	"params", "correlation_id", "created_at", "updated_at"
};

/* Their types (InvalidOid: an enum, the state's; see column_is). */
static const Oid direct_types[D_NCOLS] = {
	INT8OID, TEXTOID, InvalidOid, INT4OID, TIMESTAMPTZOID, INT4OID, INT4OID,
	JSONBOID, UUIDOID, TIMESTAMPTZOID, TIMESTAMPTZOID
};

/* The columns a new task leaves NULL. */
static const char *const direct_null_cols[] = {
	"idempotency_key", "result", "last_error", "lease_owner",
	"lease_expires_at", "started_at", "finished_at", "provider",
	"credential_id"
};

/*
 * Whether rel is a table the direct writes (of a batch, and of a claim)
 * may write with the table access method's own calls: a plain heap table,
 * not a partition, with no rules or row security, that we may read and
 * write as need says (each privilege on its own: pg_class_aclcheck passes
 * a mask when any one of its privileges is held).  The callers check the
 * triggers of their kind of write.
 */
static bool
direct_table(Relation rel, AclMode need)
{
	Oid			relid = RelationGetRelid(rel);

	if (rel->rd_rel->relkind != RELKIND_RELATION || rel->rd_rel->relispartition ||
		rel->rd_tableam != GetHeapamTableAmRoutine() ||
		rel->rd_rules != NULL || rel->rd_rel->relrowsecurity)
		return false;
	for (AclMode bit = 1; bit != 0 && bit <= need; bit <<= 1)
		if ((need & bit) && pg_class_aclcheck(relid, GetUserId(), bit) != ACLCHECK_OK)
			return false;
	return true;
}

/* Whether column a has type; InvalidOid stands for an enum (the state). */
static bool
column_is(Form_pg_attribute a, Oid type)
{
	return OidIsValid(type) ? a->atttypid == type :
		get_typtype(a->atttypid) == TYPTYPE_ENUM;
}

/*
 * Find the n columns cols of rel, of types (see column_is), and note their
 * numbers in att.  False if one is missing or of another type, or if rel
 * has a generated column.  With others (nothers names), every other
 * column must be one of those, without a default (the columns a direct
 * insert leaves NULL); without, other columns are let be.
 */
static bool
find_columns(Relation rel, const char *const *cols, const Oid *types, int n,
			 AttrNumber *att, const char *const *others, int nothers)
{
	TupleDesc	desc = RelationGetDescr(rel);

	for (int c = 0; c < n; c++)
		att[c] = InvalidAttrNumber;
	for (int i = 0; i < desc->natts; i++)
	{
		Form_pg_attribute a = TupleDescAttr(desc, i);
		const char *name = NameStr(a->attname);
		bool		known = false;

		if (a->attisdropped)
			continue;
		if (a->attgenerated)
			return false;
		for (int c = 0; c < n && !known; c++)
			if (strcmp(name, cols[c]) == 0)
			{
				if (!column_is(a, types[c]))
					return false;
				att[c] = a->attnum;
				known = true;
			}
		for (int c = 0; c < nothers && !known; c++)
			if (strcmp(name, others[c]) == 0)
			{
				if (a->atthasdef)
					return false;
				known = true;
			}
		if (!known && others != NULL)
			return false;
	}
	for (int c = 0; c < n; c++)
		if (att[c] == InvalidAttrNumber)
			return false;
	return true;
}

/* The value named name of the state enum, beat.task's column attnum. */
static Datum
state_value(Relation rel, AttrNumber attnum, const char *name)
{
	return DirectFunctionCall2(enum_in, CStringGetDatum(name),
							   ObjectIdGetDatum(TupleDescAttr(RelationGetDescr(rel),
															  attnum - 1)->atttypid));
}

#define DIRECT_CHUNK 100		/* rows per heap_multi_insert: a few pages */

/*
 * Find direct_cols in rel; false if rel is not exactly what we fill: a
 * plain heap table (no partition), no rules, row security or insert
 * triggers (foreign keys and deferrable unique constraints have them), we
 * may insert into it, and every column one we know, of the type we write,
 * the NULL ones without a default.  False sends the batch through the
 * INSERT, which handles (or refuses, with its own error) what this path
 * does not.
 */
static bool
direct_columns(Relation rel, AttrNumber *att)
{
	TriggerDesc *td = rel->trigdesc;

	if (!direct_table(rel, ACL_INSERT) ||
		(td && (td->trig_insert_before_row || td->trig_insert_after_row ||
				td->trig_insert_instead_row || td->trig_insert_before_statement ||
				td->trig_insert_after_statement || td->trig_insert_new_table)))
		return false;
	if (!find_columns(rel, direct_cols, direct_types, D_NCOLS, att,
					  direct_null_cols, lengthof(direct_null_cols)))
		return false;
	return TupleDescAttr(RelationGetDescr(rel), att[D_ID] - 1)->attidentity != '\0';
}

/*
 * Insert count tasks without keys into beat.task (SPI connected); fill
 * ids in input order.  Returns false, having written nothing, when the
 * table needs the INSERT (see above).
 */
static bool
insert_direct(EnqueueArgs *a, Datum *params, Datum *cids, int count, int64 *ids)
{
	Oid			relid;
	Relation	rel;
	AttrNumber	att[D_NCOLS];
	Oid			argtypes[1] = {TEXTOID};
	Datum		flow = PointerGetDatum(a->flow);
	bool		locks = IsolationUsesXactSnapshot();
	Datum		priority;
	Datum		max_attempts;
	Datum		state;
	Datum		now = TimestampTzGetDatum(GetCurrentTransactionStartTimestamp());
	Datum		run_at;
	Oid			seq;
	bool		isnull;
	EState	   *estate;
	ResultRelInfo *rri;
	TupleDesc	slotdesc;
	TupleTableSlot **slots;
	int			nslots = Min(count, DIRECT_CHUNK);
	CommandId	cid;
	BulkInsertState bistate;

	/*
	 * The table lock first, then the flow: a drop_flow that committed
	 * while we waited for the lock is seen by the snapshot taken after it.
	 */
	rel = table_openrv(makeRangeVar("beat", "task", -1), RowExclusiveLock);
	relid = RelationGetRelid(rel);
	if (!direct_columns(rel, att))
	{
		table_close(rel, NoLock);
		return false;
	}

	beat_prepare(&plan_flow_defaults[locks],
				 locks ? "SELECT priority, max_attempts FROM beat.flow f WHERE name = $1"
				 FLOW_LOCK :
				 "SELECT priority, max_attempts FROM beat.flow WHERE name = $1",
				 1, argtypes);
	beat_execute(plan_flow_defaults[locks], &flow, " ", SPI_OK_SELECT);
	if (SPI_processed == 0)
		flow_missing(flow);
	priority = a->priority_null ?
		SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull) :
		a->priority;
	max_attempts = a->max_attempts_null ?
		SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull) :
		a->max_attempts;
	run_at = a->run_at_null ? now : a->run_at;
	state = state_value(rel, att[D_STATE],
						!a->run_at_null &&
						DatumGetTimestampTz(a->run_at) > DatumGetTimestampTz(now) ?
						"scheduled" : "pending");
	seq = getIdentitySequence(relid, att[D_ID], false);

	estate = CreateExecutorState();
	rri = makeNode(ResultRelInfo);
	InitResultRelInfo(rri, rel, 0, NULL, 0);
	ExecOpenIndices(rri, false);
	/* an unpinned copy of the descriptor: no resource owner entry per slot */
	slotdesc = CreateTupleDescCopy(RelationGetDescr(rel));
	slots = palloc(sizeof(TupleTableSlot *) * nslots);
	for (int i = 0; i < nslots; i++)
		slots[i] = MakeSingleTupleTableSlot(slotdesc, table_slot_callbacks(rel));
	cid = GetCurrentCommandId(true);
	bistate = GetBulkInsertState();

	for (int start = 0; start < count; start += DIRECT_CHUNK)
	{
		int			n = Min(count - start, DIRECT_CHUNK);

		for (int j = 0; j < n; j++)
		{
			TupleTableSlot *slot = slots[j];
			int64		id = nextval_internal(seq, false);

			ExecClearTuple(slot);
			memset(slot->tts_isnull, true, sizeof(bool) * slot->tts_tupleDescriptor->natts);
#define SET(col, v) (slot->tts_values[att[col] - 1] = (v), slot->tts_isnull[att[col] - 1] = false)
			SET(D_ID, Int64GetDatum(id));
			SET(D_FLOW, PointerGetDatum(a->flow));
			SET(D_STATE, state);
			SET(D_PRIORITY, priority);
			SET(D_RUN_AT, run_at);
			SET(D_ATTEMPTS, Int32GetDatum(0));
			SET(D_MAX_ATTEMPTS, max_attempts);
			SET(D_PARAMS, params[start + j]);
			SET(D_CORRELATION_ID, cids[start + j]);
			SET(D_CREATED_AT, now);
			SET(D_UPDATED_AT, now);
#undef SET
			ExecStoreVirtualTuple(slot);
			if (rel->rd_att->constr)
				ExecConstraints(rri, slot, estate);
			ids[start + j] = id;
		}
		table_multi_insert(rel, slots, n, cid, 0, bistate);
		for (int j = 0; j < n; j++)
		{
			/* no recheck list: a deferrable unique index has a trigger, sent us away */
			(void) ExecInsertIndexTuples(rri, slots[j], estate, false, false, NULL, NIL);
			ResetPerTupleExprContext(estate);
		}
	}

	FreeBulkInsertState(bistate);
	for (int i = 0; i < nslots; i++)
		ExecDropSingleTupleTableSlot(slots[i]);
	ExecCloseIndices(rri);
	FreeExecutorState(estate);
	table_close(rel, NoLock);
	CommandCounterIncrement();
	return true;
}

/*
 * beat.enqueue_batch(flow, params, priority, run_at, idempotency_keys,
 * correlation_id, max_attempts): one INSERT for the whole batch; ids come
 * back in input order, with the existing id where a key was a duplicate.
 */
Datum
beat_enqueue_batch(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	EnqueueArgs a;
	Datum	   *elems;
	int			count;
	Datum	   *keys = NULL;
	bool	   *key_nulls = NULL;
	ArrayType  *keyarr;
	int64	   *ids;
	Datum	   *cids;
	Oid			argtypes[7] = {TEXTOID, JSONBARRAYOID, INT4OID, TIMESTAMPTZOID,
	UUIDARRAYOID, INT4OID, TEXTARRAYOID};
	Datum		values[7];
	char		nulls[8] = "       ";
	bool		isnull;

	read_enqueue_args(fcinfo, &a);
	beat_require(fcinfo, 1, "params");
	batch_params(fcinfo, &count, &elems);
	keyarr = batch_keys(fcinfo, count, &keys, &key_nulls);

	InitMaterializedSRF(fcinfo, MAT_SRF_USE_EXPECTED_DESC);
	ids = palloc0(sizeof(int64) * Max(count, 1));

	values[0] = PointerGetDatum(a.flow);
	values[1] = (Datum) 0;		/* the params and correlation ids as arrays, */
	values[2] = a.priority;
	nulls[2] = a.priority_null ? 'n' : ' ';
	values[3] = a.run_at;
	nulls[3] = a.run_at_null ? 'n' : ' ';
	/* one correlation id per task: the one given, or a new one each */
	cids = palloc(sizeof(Datum) * Max(count, 1));
	for (int i = 0; i < count; i++)
		cids[i] = a.correlation_id_null ? new_uuid() : a.correlation_id;
	values[4] = (Datum) 0;		/* built when SQL needs them */
	values[5] = a.max_attempts;
	nulls[5] = a.max_attempts_null ? 'n' : ' ';
	values[6] = PointerGetDatum(keyarr);

	beat_spi_connect();
	if (count == 0)
		require_flow(values[0]);
	else if (keyarr == NULL && insert_direct(&a, elems, cids, count, ids))
		beat_wake_at_commit(a.flow_name);
	else if (keyarr == NULL)
	{
		/* No keys: nothing can conflict, rows come back in input order. */
		SPIPlanPtr	plan;

		values[1] = beat_make_array(elems, NULL, count, JSONBOID);
		values[4] = beat_make_array(cids, NULL, count, UUIDOID);
		if (!IsolationUsesXactSnapshot())
			plan = beat_prepare(&plan_batch[0][0],
								BATCH_SQL("", "", ", $5", "p, c, ord", "") "RETURNING id",
								6, argtypes);
		else
			plan = beat_prepare(&plan_batch[0][1],
								BATCH_SQL("", "", ", $5", "p, c, ord", FLOW_LOCK) "RETURNING id",
								6, argtypes);
		beat_execute(plan, values, nulls, SPI_OK_INSERT_RETURNING);
		if (SPI_processed == 0)
			flow_missing(values[0]);
		if (SPI_processed != (uint64) count)
			elog(ERROR, "pg_beat: batch inserted " UINT64_FORMAT " of %d tasks",
				 SPI_processed, count);
		for (int i = 0; i < count; i++)
			ids[i] = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[i],
												 SPI_tuptable->tupdesc, 1, &isnull));
		beat_wake_at_commit(a.flow_name);
	}
	else
	{
		/*
		 * With keys: rows come back in input order minus the duplicates.  A
		 * keyed position takes the id inserted for its key, or else the live
		 * task that holds it; unkeyed positions take the returned unkeyed
		 * rows in order.
		 */
		uint64		nret;
		uint64		r = 0;
		int			missing = 0;
		SPIPlanPtr	plan;

		values[1] = beat_make_array(elems, NULL, count, JSONBOID);
		values[4] = beat_make_array(cids, NULL, count, UUIDOID);
		if (!IsolationUsesXactSnapshot())
			plan = beat_prepare(&plan_batch[1][0],
								BATCH_SQL(", idempotency_key", ", u.k", ", $5, $7", "p, c, k, ord", "")
								IDEMPOTENCY_ARBITER "RETURNING id, idempotency_key",
								7, argtypes);
		else
			plan = beat_prepare(&plan_batch[1][1],
								BATCH_SQL(", idempotency_key", ", u.k", ", $5, $7", "p, c, k, ord",
										  FLOW_LOCK)
								IDEMPOTENCY_ARBITER "RETURNING id, idempotency_key",
								7, argtypes);
		beat_execute(plan, values, nulls, SPI_OK_INSERT_RETURNING);
		nret = SPI_processed;
		if (nret == 0)
			require_flow(values[0]);
		if (nret > 0)
			beat_wake_at_commit(a.flow_name);

		for (int i = 0; i < count; i++)
		{
			if (r < nret)
			{
				HeapTuple	tup = SPI_tuptable->vals[r];
				bool		knull;
				Datum		k = SPI_getbinval(tup, SPI_tuptable->tupdesc, 2, &knull);

				if (knull == key_nulls[i] &&
					(knull || same_text(k, keys[i])))
				{
					ids[i] = DatumGetInt64(SPI_getbinval(tup, SPI_tuptable->tupdesc,
														 1, &isnull));
					r++;
					continue;
				}
			}
			/* only a keyed position can be skipped by ON CONFLICT */
			Assert(!key_nulls[i]);
			missing++;
		}
		if (r != nret)
			elog(ERROR, "pg_beat: could not match batch results to input");

		if (missing > 0)
		{
			Oid			findtypes[2] = {TEXTOID, TEXTARRAYOID};
			Datum		findvals[2];
			SPITupleTable *found;
			uint64		nfound;

			/* One query for the duplicates; see enqueue_keyed for the rest. */
			beat_prepare(&plan_find_live_many,
						 "SELECT idempotency_key, id FROM beat.task"
						 " WHERE flow = $1 AND idempotency_key = ANY ($2)"
						 " AND state IN " LIVE_STATES,
						 2, findtypes);
			findvals[0] = values[0];
			findvals[1] = PointerGetDatum(keyarr);
			beat_execute(plan_find_live_many, findvals, "  ", SPI_OK_SELECT);
			found = SPI_tuptable;
			nfound = SPI_processed;
			for (int i = 0; i < count; i++)
			{
				if (ids[i] != 0)
					continue;
				for (uint64 j = 0; j < nfound; j++)
				{
					HeapTuple	tup = found->vals[j];
					Datum		k = SPI_getbinval(tup, found->tupdesc, 1, &isnull);

					if (same_text(k, keys[i]))
					{
						ids[i] = DatumGetInt64(SPI_getbinval(tup, found->tupdesc,
															 2, &isnull));
						break;
					}
				}
				if (ids[i] == 0)
					ids[i] = enqueue_keyed(&a, DatumGetJsonbP(elems[i]),
										   DatumGetTextPP(keys[i]));
			}
		}
	}
	beat_spi_finish();

	for (int i = 0; i < count; i++)
	{
		Datum		v = Int64GetDatum(ids[i]);
		bool		n = false;

		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, &v, &n);
	}
	return (Datum) 0;
}

/*
 * The state of task_id, and if asked its lease owner (NULL if none) and
 * the transaction that last wrote its row; raise if it does not exist.
 * Inside SPI; the strings are SPI's.
 */
char *
beat_task_state(int64 task_id, char **owner, TransactionId *xmin)
{
	Oid			argtypes[1] = {INT8OID};
	Datum		v = Int64GetDatum(task_id);
	bool		isnull;

	beat_prepare(&plan_task_state,
				 "SELECT state::text, lease_owner, xmin FROM beat.task WHERE id = $1",
				 1, argtypes);
	beat_execute(plan_task_state, &v, " ", SPI_OK_SELECT);
	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("task " INT64_FORMAT " does not exist", task_id)));
	if (owner)
		*owner = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2);
	if (xmin)
		*xmin = DatumGetTransactionId(SPI_getbinval(SPI_tuptable->vals[0],
													SPI_tuptable->tupdesc, 3, &isnull));
	return SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
}

/* Explain why worker does not hold the lease of task_id, and raise. */
static void
report_not_held(int64 task_id, const char *worker)
{
	char	   *owner;
	char	   *state = beat_task_state(task_id, &owner, NULL);

	if (owner != NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("worker \"%s\" does not hold the lease of task " INT64_FORMAT,
						worker, task_id),
				 errdetail("Worker \"%s\" holds it.", owner)));
	if (strcmp(state, "pending") == 0)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("worker \"%s\" does not hold the lease of task " INT64_FORMAT,
						worker, task_id),
				 errdetail("The task is %s.", state),
				 errhint("An expired lease is handed back by beat.reap(); keep the lease of a long task with beat.heartbeat().")));
	ereport(ERROR,
			(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
			 errmsg("worker \"%s\" does not hold the lease of task " INT64_FORMAT,
					worker, task_id),
			 errdetail("The task is %s.", state)));
}

/*
 * Make the flow's scheduled and failed tasks whose run_at has come pending,
 * so that claim finds them.  Rows another session is promoting or
 * cancelling right now are skipped, not waited for.  Only beat_claim calls
 * it; it plans the same way as claim (see there).
 */
static void
promote_due(Datum flow)
{
	Oid			argtypes[1] = {TEXTOID};

	beat_prepare_opts(&plan_promote,
				 "UPDATE beat.task SET state = 'pending', updated_at = statement_timestamp()"
				 " WHERE id = ANY (ARRAY(SELECT id FROM beat.task"
				 "   WHERE flow = $1 AND state IN ('scheduled', 'failed')"
				 "     AND run_at <= statement_timestamp()"
				 "   FOR UPDATE SKIP LOCKED))",
				 1, argtypes, CURSOR_OPT_GENERIC_PLAN);
	beat_execute_plan(plan_promote, &flow, " ", SPI_OK_UPDATE, BEAT_PLAN_INDEXED);
}

/*
 * The direct claim.
 *
 * The claim statement (below) picks due rows from task_claim_idx, locks
 * them FOR UPDATE SKIP LOCKED, then finds each one again through the
 * primary key to update it, every step a node of the executor.  Here the
 * claim index is walked once, and each due task is locked and updated
 * where it was found, with the table access method's own calls.  The
 * lock is taken as FOR NO KEY UPDATE SKIP LOCKED takes it
 * (table_tuple_lock with LockWaitSkip): a task another transaction
 * writes or holds is skipped, one this transaction holds is taken.  (A
 * task held only FOR KEY SHARE is taken: that lock does not conflict with
 * this one; the statement's FOR UPDATE would skip it.)  A task that changed since the
 * snapshot is skipped too: the statement would follow it to its new
 * version in READ COMMITTED, and raise a serialization error in
 * REPEATABLE READ.  It is left for the next claim.
 *
 * What the UPDATE does besides is done here too: the CHECK constraints,
 * the index entries (with the hint that lets the unchanged primary key
 * delete its old entries bottom-up), and AFTER ROW triggers, queued and
 * fired as the statement's would be (the extension's own task_finished
 * and task_dead are of that kind; a claim passes neither's WHEN).  A table
 * this code does not know exactly (see update_open; also a claim index
 * on other columns, or a result of other columns) goes back to the
 * statement.
 */
typedef enum ClaimCol
{
	/* what a claim returns, in beat.claimed_task's order */
	K_ID, K_FLOW, K_PARAMS, K_PRIORITY, K_ATTEMPTS, K_MAX_ATTEMPTS,
	K_IDEMPOTENCY_KEY, K_CORRELATION_ID, K_RUN_AT, K_CREATED_AT,
	K_LEASE_EXPIRES_AT,
	/* what else it reads or writes */
	K_STATE, K_LEASE_OWNER, K_STARTED_AT, K_UPDATED_AT,
	K_NCOLS
} ClaimCol;

#define K_NOUT (K_LEASE_EXPIRES_AT + 1)

static const char *const claim_cols[K_NCOLS] = {
	"id", "flow", "params", "priority", "attempts", "max_attempts",
	"idempotency_key", "correlation_id", "run_at", "created_at",
	"lease_expires_at", "state", "lease_owner", "started_at", "updated_at"
};

/* Their types (InvalidOid: the state's enum; see column_is). */
static const Oid claim_types[K_NCOLS] = {
	INT8OID, TEXTOID, JSONBOID, INT4OID, INT4OID, INT4OID,
	TEXTOID, UUIDOID, TIMESTAMPTZOID, TIMESTAMPTZOID,
	TIMESTAMPTZOID, InvalidOid, TEXTOID, TIMESTAMPTZOID, TIMESTAMPTZOID
};

/* The columns a claim writes (claim_direct sets each). */
static const int claim_written[] = {
	K_STATE, K_ATTEMPTS, K_LEASE_OWNER, K_LEASE_EXPIRES_AT, K_STARTED_AT, K_UPDATED_AT
};

/* The claim index's key columns, in order. */
static const ClaimCol claim_index_keys[] = {K_FLOW, K_PRIORITY, K_RUN_AT, K_ID};

/*
 * A direct update of beat.task: what claim_direct and complete_direct
 * share.  The executor state holds what an UPDATE statement would do
 * beside writing the row: its CHECK constraints, index entries and AFTER
 * ROW triggers.
 */
typedef struct DirectUpdate
{
	Relation	rel;
	EState	   *estate;
	ResultRelInfo *rri;
	bool		after_triggers;
	Snapshot	snapshot;
	CommandId	cid;
	TupleTableSlot *oldslot;	/* the version found */
	TupleTableSlot *newslot;	/* the version to write */
} DirectUpdate;

/*
 * Open beat.task for a direct update that reads the ncols columns cols (of
 * types, InvalidOid for the state's enum; see column_is) and writes
 * written (indexes into cols), and find them (att).  False, with nothing
 * left open, when the table is not one this code knows exactly: not a
 * plain heap table we may read and update, inheritors (an UPDATE would
 * update them too), rules, row security, a BEFORE or statement-level
 * update trigger, a generated column, a column missing or of another
 * type, or a key column (one of a unique index a foreign key could
 * reference) among those written, which would make the update take a
 * stronger lock than FOR NO KEY UPDATE and wait for FOR KEY SHARE lockers.
 * Such a table goes to the statement.
 */
static bool
update_open(DirectUpdate *du, const char *const *cols, const Oid *types, int ncols,
			const int *written, int nwritten, AttrNumber *att)
{
	Relation	rel;
	TriggerDesc *td;
	Bitmapset  *updated = NULL;
	RangeTblEntry *rte;

	/* as the statement's executor refuses */
	PreventCommandIfReadOnly("UPDATE");
	PreventCommandIfParallelMode("UPDATE");
	rel = table_openrv(makeRangeVar("beat", "task", -1), RowExclusiveLock);
	td = rel->trigdesc;
	if (!direct_table(rel, ACL_SELECT | ACL_UPDATE) || rel->rd_rel->relhassubclass ||
		(td && (td->trig_update_before_row || td->trig_update_instead_row ||
				td->trig_update_before_statement || td->trig_update_after_statement ||
				td->trig_update_new_table || td->trig_update_old_table)))
		goto refuse;
	if (!find_columns(rel, cols, types, ncols, att, NULL, 0))
		goto refuse;
	for (int c = 0; c < nwritten; c++)
		updated = bms_add_member(updated, att[written[c]] - FirstLowInvalidHeapAttributeNumber);
	if (bms_overlap(RelationGetIndexAttrBitmap(rel, INDEX_ATTR_BITMAP_KEY), updated))
		goto refuse;

	/*
	 * The executor state.  Its one range table entry says which columns
	 * change: the "UPDATE OF" of a trigger and the index hint read it.
	 */
	rte = makeNode(RangeTblEntry);
	rte->rtekind = RTE_RELATION;
	rte->relid = RelationGetRelid(rel);
	rte->relkind = RELKIND_RELATION;
	rte->rellockmode = RowExclusiveLock;
	rte->updatedCols = updated;
	du->rel = rel;
	du->estate = CreateExecutorState();
	ExecInitRangeTable(du->estate, list_make1(rte));
	du->rri = makeNode(ResultRelInfo);
	InitResultRelInfo(du->rri, rel, 1, NULL, 0);
	/* where firing a trigger looks for it (and closing, for its indexes) */
	du->estate->es_opened_result_relations = list_make1(du->rri);
	ExecOpenIndices(du->rri, false);
	du->oldslot = NULL;
	du->newslot = NULL;
	CheckCmdReplicaIdentity(rel, CMD_UPDATE);
	return true;

refuse:
	table_close(rel, NoLock);
	return false;
}

/*
 * Start writing: a new command, so that what this transaction wrote before
 * is seen and what we write now is not, and a snapshot of that command, as
 * SPI gives a statement.
 */
static void
update_start(DirectUpdate *du)
{
	TupleDesc	desc = RelationGetDescr(du->rel);

	CommandCounterIncrement();
	du->cid = GetCurrentCommandId(true);
	PushCopiedSnapshot(GetTransactionSnapshot());
	UpdateActiveSnapshotCommandId();
	du->snapshot = GetActiveSnapshot();
	du->estate->es_snapshot = du->snapshot;
	du->estate->es_output_cid = du->cid;
	du->after_triggers = du->rel->trigdesc && du->rel->trigdesc->trig_update_after_row;
	if (du->after_triggers)
		AfterTriggerBeginQuery();
	du->oldslot = table_slot_create(du->rel, NULL);
	du->newslot = MakeSingleTupleTableSlot(desc, &TTSOpsVirtual);
}

/* Begin newslot as a copy of oldslot, for the caller to change. */
static void
update_copy(DirectUpdate *du)
{
	int			natts = RelationGetDescr(du->rel)->natts;

	slot_getallattrs(du->oldslot);
	ExecClearTuple(du->newslot);
	memcpy(du->newslot->tts_values, du->oldslot->tts_values, sizeof(Datum) * natts);
	memcpy(du->newslot->tts_isnull, du->oldslot->tts_isnull, sizeof(bool) * natts);
}

/*
 * Write newslot (filled since update_copy) over the version at tid,
 * waiting for a transaction that holds it, as the statement's update does.
 * On TM_Ok, its index entries are made and its AFTER ROW triggers queued.
 */
static TM_Result
update_row(DirectUpdate *du, ItemPointer tid, TM_FailureData *tmfd, LockTupleMode *lockmode)
{
	TM_Result	result;
	bool		update_indexes;
	List	   *recheck = NIL;

	ExecStoreVirtualTuple(du->newslot);
	if (RelationGetDescr(du->rel)->constr)
		ExecConstraints(du->rri, du->newslot, du->estate);
	result = table_tuple_update(du->rel, tid, du->newslot, du->cid, du->snapshot,
								InvalidSnapshot, true, tmfd, lockmode, &update_indexes);
	if (result != TM_Ok)
		return result;
	if (update_indexes)
		recheck = ExecInsertIndexTuples(du->rri, du->newslot, du->estate, true, false, NULL, NIL);
	if (du->after_triggers)
		ExecARUpdateTriggers(du->estate, du->rri, NULL, NULL, tid, NULL, du->newslot,
							 recheck, NULL, false);
	list_free(recheck);
	return TM_Ok;
}

/* Let go of what update_open and update_start took. */
static void
update_close(DirectUpdate *du)
{
	if (du->oldslot != NULL)
	{
		ExecDropSingleTupleTableSlot(du->oldslot);
		ExecDropSingleTupleTableSlot(du->newslot);
		if (du->after_triggers)
			AfterTriggerEndQuery(du->estate);	/* fires them */
		PopActiveSnapshot();
	}
	ExecCloseResultRelations(du->estate);
	ExecResetTupleTable(du->estate->es_tupleTable, false);	/* the triggers' slots */
	FreeExecutorState(du->estate);
	table_close(du->rel, NoLock);
}

/*
 * task_claim_idx among the indexes rri has opened (and locked): a valid
 * btree on (flow, priority, run_at, id), all ascending, so that its order
 * is the claim order, WHERE state = 'pending', so that it holds every
 * pending task.  NULL if there is no such index.
 */
static Relation
claim_index(ResultRelInfo *rri, AttrNumber *att, Oid pending)
{
	for (int i = 0; i < rri->ri_NumIndices; i++)
	{
		Relation	idx = rri->ri_IndexRelationDescs[i];
		List	   *pred;
		OpExpr	   *op;
		bool		ok;

		if (strcmp(RelationGetRelationName(idx), "task_claim_idx") != 0)
			continue;
		ok = idx->rd_rel->relam == BTREE_AM_OID &&
			idx->rd_index->indisvalid &&
			idx->rd_index->indnkeyatts == lengthof(claim_index_keys) &&
			RelationGetIndexExpressions(idx) == NIL &&
			idx->rd_opcintype[0] == TEXTOID &&
			idx->rd_opfamily[0] == TEXT_BTREE_FAM_OID;
		for (int k = 0; ok && k < lengthof(claim_index_keys); k++)
			ok = idx->rd_index->indkey.values[k] == att[claim_index_keys[k]] &&
				idx->rd_indoption[k] == 0;
		pred = ok ? RelationGetIndexPredicate(idx) : NIL;
		op = list_length(pred) == 1 && IsA(linitial(pred), OpExpr) ? linitial(pred) : NULL;
		if (op && list_length(op->args) == 2 &&
			get_opcode(op->opno) == F_ENUM_EQ &&
			IsA(linitial(op->args), Var) &&
			((Var *) linitial(op->args))->varattno == att[K_STATE] &&
			IsA(lsecond(op->args), Const) &&
			!((Const *) lsecond(op->args))->constisnull &&
			DatumGetObjectId(((Const *) lsecond(op->args))->constvalue) == pending)
			return idx;
		return NULL;
	}
	return NULL;
}

/*
 * Whether another transaction, still running, holds the version in slot
 * in a way that conflicts with the claim's lock: it updated or deleted it,
 * or locks it FOR SHARE or stronger.  table_tuple_lock with LockWaitSkip
 * would skip such a task too, but only after asking the lock manager
 * twice (the tuple's lock, then the holder's transaction); with several
 * claimers, a claim passes the tasks the others hold.  A look at the
 * tuple's header answers first.  A multixact, a lock FOR KEY
 * SHARE, our own transaction or one that has ended are for
 * table_tuple_lock to judge.
 */
static bool
claim_held(TupleTableSlot *slot)
{
	BufferHeapTupleTableSlot *bslot = (BufferHeapTupleTableSlot *) slot;
	HeapTupleHeader htup;
	uint16		infomask;
	TransactionId xmax = InvalidTransactionId;

	Assert(TTS_IS_BUFFERTUPLE(slot) && BufferIsValid(bslot->buffer));
	LockBuffer(bslot->buffer, BUFFER_LOCK_SHARE);
	htup = bslot->base.tuple->t_data;
	infomask = htup->t_infomask;
	if (!(infomask & (HEAP_XMAX_INVALID | HEAP_XMAX_IS_MULTI)) &&
		!(HEAP_XMAX_IS_LOCKED_ONLY(infomask) && HEAP_XMAX_IS_KEYSHR_LOCKED(infomask)))
		xmax = HeapTupleHeaderGetRawXmax(htup);
	LockBuffer(bslot->buffer, BUFFER_LOCK_UNLOCK);

	return TransactionIdIsValid(xmax) &&
		!TransactionIdIsCurrentTransactionId(xmax) &&
		TransactionIdIsInProgress(xmax);
}

/*
 * Claim up to max_tasks due tasks of flow for worker into the function's
 * result (SPI connected, due tasks promoted).  lease is NULL for the
 * flow's.  Returns false, having written nothing, when the table needs
 * the claim statement.
 */
static bool
claim_direct(ReturnSetInfo *rsinfo, Datum flow, Datum worker, int max_tasks,
			 Datum lease, bool lease_null)
{
	DirectUpdate du;
	TupleDesc	out = rsinfo->setDesc;
	Relation	idx;
	AttrNumber	att[K_NCOLS];
	bool		known;
	bool		isnull;
	Oid			pending;
	Datum		running;
	Datum		now = TimestampTzGetDatum(GetCurrentStatementStartTimestamp());
	Datum		expires;
	IndexScanDesc scan;
	ScanKeyData key;
	int			claimed = 0;

	/* the table lock first, then the flow, as insert_direct does */
	if (!update_open(&du, claim_cols, claim_types, K_NCOLS,
					 claim_written, lengthof(claim_written), att))
		return false;
	pending = DatumGetObjectId(state_value(du.rel, att[K_STATE], "pending"));
	running = state_value(du.rel, att[K_STATE], "running");
	idx = claim_index(du.rri, att, pending);
	/* and the result must be beat.claimed_task as this code knows it */
	known = idx != NULL && out->natts == K_NOUT;
	for (int c = 0; known && c < K_NOUT; c++)
		known = TupleDescAttr(out, c)->atttypid == claim_types[c];
	if (!known)
	{
		update_close(&du);
		return false;
	}

	require_flow(flow);
	if (DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull)))
	{
		/* paused: nothing to claim */
		update_close(&du);
		return true;
	}
	if (lease_null)
		lease = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull);
	expires = DirectFunctionCall2(timestamptz_pl_interval, now, lease);

	/* after promote_due: what it wrote is seen */
	update_start(&du);
	scan = index_beginscan(du.rel, idx, du.snapshot, 1, 0);
	ScanKeyEntryInitialize(&key, 0, 1, BTEqualStrategyNumber, InvalidOid,
						   idx->rd_indcollation[0], F_TEXTEQ, flow);
	index_rescan(scan, &key, 1, NULL, 0);

	while (claimed < max_tasks && index_getnext_slot(scan, ForwardScanDirection, du.oldslot))
	{
		TupleTableSlot *newslot = du.newslot;
		ItemPointerData tid = du.oldslot->tts_tid;
		TM_FailureData tmfd;
		LockTupleMode lockmode;
		Datum		state;
		bool		state_null;
		int32		attempts;
		Datum		vals[K_NOUT];
		bool		nulls[K_NOUT];

		CHECK_FOR_INTERRUPTS();
		ResetPerTupleExprContext(du.estate);
		state = slot_getattr(du.oldslot, att[K_STATE], &state_null);
		if (state_null || DatumGetObjectId(state) != pending)
			continue;

		/*
		 * Lock the version we saw, as FOR NO KEY UPDATE SKIP LOCKED would
		 * (the strength of the update's own lock, no key column changing);
		 * a task another transaction holds or changed since the snapshot
		 * is skipped.
		 */
		if (claim_held(du.oldslot) ||
			table_tuple_lock(du.rel, &tid, du.snapshot, du.oldslot, du.cid,
							 LockTupleNoKeyExclusive, LockWaitSkip, 0, &tmfd) != TM_Ok)
			continue;

		update_copy(&du);
		/* attempts + 1, as the statement computes it (NULL stays NULL) */
		if (!newslot->tts_isnull[att[K_ATTEMPTS] - 1])
		{
			if (pg_add_s32_overflow(DatumGetInt32(newslot->tts_values[att[K_ATTEMPTS] - 1]),
									1, &attempts))
				ereport(ERROR,
						(errcode(ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE),
						 errmsg("integer out of range")));
			newslot->tts_values[att[K_ATTEMPTS] - 1] = Int32GetDatum(attempts);
		}
#define SET(col, v) (newslot->tts_values[att[col] - 1] = (v), newslot->tts_isnull[att[col] - 1] = false)
		SET(K_STATE, running);
		SET(K_LEASE_OWNER, worker);
		SET(K_LEASE_EXPIRES_AT, expires);
		SET(K_STARTED_AT, now);
		SET(K_UPDATED_AT, now);
#undef SET

		/* ours alone now: the update waits for no one */
		if (update_row(&du, &tid, &tmfd, &lockmode) != TM_Ok)
			elog(ERROR, "pg_beat: could not update locked task " INT64_FORMAT,
				 DatumGetInt64(newslot->tts_values[att[K_ID] - 1]));

		/* the row as RETURNING gives it: the new values, the old ones kept */
		for (int c = 0; c < K_NOUT; c++)
		{
			vals[c] = newslot->tts_values[att[c] - 1];
			nulls[c] = newslot->tts_isnull[att[c] - 1];
		}
		tuplestore_putvalues(rsinfo->setResult, out, vals, nulls);
		claimed++;
	}

	index_endscan(scan);
	update_close(&du);
	return true;
}

/*
 * The direct completion.
 *
 * complete_batch's statement finds each task through the primary key and
 * updates those its worker holds.  Here each is found through the same
 * index and updated where it was found, as claim_direct updates (and
 * with its fallback to the statement).  The ids are taken in ascending
 * order, as the statement's index scan takes them when no results are
 * given (with results, its join may take any order).  A task that
 * another transaction holds is waited for, as the statement waits; if that
 * transaction changed it, READ COMMITTED finds the newest version, locks
 * it and checks it is still held, as the statement's recheck
 * (EvalPlanQual) does, and REPEATABLE READ raises the statement's
 * serialization error.
 */
typedef enum DoneCol
{
	C_ID, C_STATE, C_RESULT, C_LEASE_OWNER, C_LEASE_EXPIRES_AT, C_FINISHED_AT,
	C_UPDATED_AT,
	C_NCOLS
} DoneCol;

static const char *const done_cols[C_NCOLS] = {
	"id", "state", "result", "lease_owner", "lease_expires_at", "finished_at",
	"updated_at"
};

static const Oid done_types[C_NCOLS] = {
	INT8OID, InvalidOid, JSONBOID, TEXTOID, TIMESTAMPTZOID, TIMESTAMPTZOID,
	TIMESTAMPTZOID
};

static const int done_written[] = {
	C_STATE, C_RESULT, C_LEASE_OWNER, C_LEASE_EXPIRES_AT, C_FINISHED_AT, C_UPDATED_AT
};

/* An id to complete, and where it was in the caller's array. */
typedef struct DoneId
{
	int64		id;
	int			pos;
} DoneId;

static int
done_cmp(const void *a, const void *b)
{
	const DoneId *x = a;
	const DoneId *y = b;

	return x->id < y->id ? -1 : x->id > y->id ? 1 : x->pos - y->pos;
}

/*
 * The primary key among the indexes rri has opened: a valid btree on id
 * alone.  NULL if it is not that.
 */
static Relation
done_index(ResultRelInfo *rri, AttrNumber *att)
{
	Oid			pk = RelationGetPrimaryKeyIndex(rri->ri_RelationDesc);

	for (int i = 0; i < rri->ri_NumIndices; i++)
	{
		Relation	idx = rri->ri_IndexRelationDescs[i];

		if (RelationGetRelid(idx) != pk)
			continue;
		if (idx->rd_rel->relam == BTREE_AM_OID &&
			idx->rd_index->indisvalid &&
			idx->rd_index->indnkeyatts == 1 &&
			idx->rd_index->indkey.values[0] == att[C_ID] &&
			idx->rd_opcintype[0] == INT8OID &&
			idx->rd_opfamily[0] == INTEGER_BTREE_FAM_OID &&
			RelationGetIndexExpressions(idx) == NIL &&
			RelationGetIndexPredicate(idx) == NIL)
			return idx;
		return NULL;
	}
	return NULL;
}

/* HELD_BY(worker), on the version in slot. */
static bool
done_held(DirectUpdate *du, AttrNumber *att, Datum worker)
{
	bool		isnull;
	Datum		owner = slot_getattr(du->oldslot, att[C_LEASE_OWNER], &isnull);
	Oid			coll = TupleDescAttr(RelationGetDescr(du->rel), att[C_LEASE_OWNER] - 1)->attcollation;

	if (isnull || !DatumGetBool(DirectFunctionCall2Coll(texteq, coll, owner, worker)))
		return false;
	(void) slot_getattr(du->oldslot, att[C_LEASE_EXPIRES_AT], &isnull);
	return !isnull;
}

/* The statement's error for a row our own command changed since it was found. */
static void
done_self_modified(DirectUpdate *du, TM_FailureData *tmfd)
{
	if (tmfd->cmax != du->cid)
		ereport(ERROR,
				(errcode(ERRCODE_TRIGGERED_DATA_CHANGE_VIOLATION),
				 errmsg("tuple to be updated was already modified by an operation triggered by the current command"),
				 errhint("Consider using an AFTER trigger instead of a BEFORE trigger to propagate changes to other rows.")));
	/* else an id given twice: completed once, as by the statement */
}

/*
 * Complete the n tasks ids that worker holds, with results (NULL: none).
 * Writes the ids completed into done and their count into *ndone.
 * Returns false, having written nothing, when the table needs the
 * statement.
 */
static bool
complete_direct(Datum *ids, int n, Datum worker, Datum *results, bool *resnulls,
				int64 *done, uint64 *ndone)
{
	DirectUpdate du;
	AttrNumber	att[C_NCOLS];
	Relation	idx;
	Datum		succeeded;
	Datum		now = TimestampTzGetDatum(GetCurrentStatementStartTimestamp());
	DoneId	   *order;
	IndexScanDesc scan;
	ScanKeyData key;

	if (!update_open(&du, done_cols, done_types, C_NCOLS,
					 done_written, lengthof(done_written), att))
		return false;
	idx = done_index(du.rri, att);
	if (idx == NULL)
	{
		update_close(&du);
		return false;
	}
	succeeded = state_value(du.rel, att[C_STATE], "succeeded");
	order = palloc(sizeof(DoneId) * n);
	for (int i = 0; i < n; i++)
	{
		order[i].id = DatumGetInt64(ids[i]);
		order[i].pos = i;
	}
	qsort(order, n, sizeof(DoneId), done_cmp);

	update_start(&du);
	*ndone = 0;
	scan = index_beginscan(du.rel, idx, du.snapshot, 1, 0);
	for (int i = 0; i < n; i++)
	{
		ItemPointerData tid;
		TM_FailureData tmfd;
		LockTupleMode lockmode;
		TM_Result	result;
		bool		isnull;

		CHECK_FOR_INTERRUPTS();
		ResetPerTupleExprContext(du.estate);
		ScanKeyEntryInitialize(&key, 0, 1, BTEqualStrategyNumber, InvalidOid,
							   InvalidOid, F_INT8EQ, Int64GetDatum(order[i].id));
		index_rescan(scan, &key, 1, NULL, 0);
		if (!index_getnext_slot(scan, ForwardScanDirection, du.oldslot) ||
			!done_held(&du, att, worker))
			continue;
		tid = du.oldslot->tts_tid;

		for (;;)
		{
			TupleTableSlot *newslot = du.newslot;
			int			pos = order[i].pos;

			update_copy(&du);
#define SET(col, v, isnull) (newslot->tts_values[att[col] - 1] = (v), newslot->tts_isnull[att[col] - 1] = (isnull))
			SET(C_STATE, succeeded, false);
			SET(C_RESULT, results ? results[pos] : (Datum) 0, results ? resnulls[pos] : true);
			SET(C_FINISHED_AT, now, false);
			SET(C_UPDATED_AT, now, false);
			SET(C_LEASE_OWNER, (Datum) 0, true);
			SET(C_LEASE_EXPIRES_AT, (Datum) 0, true);
#undef SET
			result = update_row(&du, &tid, &tmfd, &lockmode);
			if (result == TM_Ok)
			{
				done[(*ndone)++] = order[i].id;
				break;
			}
			if (result == TM_SelfModified)
			{
				done_self_modified(&du, &tmfd);
				break;
			}
			if (IsolationUsesXactSnapshot())
				ereport(ERROR,
						(errcode(ERRCODE_T_R_SERIALIZATION_FAILURE),
						 errmsg(result == TM_Deleted ?
								"could not serialize access due to concurrent delete" :
								"could not serialize access due to concurrent update")));
			if (result == TM_Deleted)
				break;
			if (result != TM_Updated)
				elog(ERROR, "pg_beat: unexpected result %d updating task " INT64_FORMAT,
					 (int) result, order[i].id);

			/* READ COMMITTED: the newest version, locked, must still be this held task */
			result = table_tuple_lock(du.rel, &tid, du.snapshot, du.oldslot, du.cid, lockmode,
									  LockWaitBlock, TUPLE_LOCK_FLAG_FIND_LAST_VERSION, &tmfd);
			if (result == TM_SelfModified)
			{
				done_self_modified(&du, &tmfd);
				break;
			}
			if (result == TM_Deleted)
				break;
			if (result != TM_Ok)
				elog(ERROR, "pg_beat: unexpected result %d locking task " INT64_FORMAT,
					 (int) result, order[i].id);
			tid = du.oldslot->tts_tid;
			if (!done_held(&du, att, worker) ||
				DatumGetInt64(slot_getattr(du.oldslot, att[C_ID], &isnull)) != order[i].id)
				break;
		}
	}
	index_endscan(scan);
	update_close(&du);
	pfree(order);
	return true;
}

/* beat.claim(flow, worker, max_tasks, lease): lease due tasks in claim order. */
Datum
beat_claim(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	Oid			argtypes[4] = {TEXTOID, TEXTOID, INT4OID, INTERVALOID};
	Datum		values[4];
	char		nulls[5] = "    ";
	int			natts;

	beat_require(fcinfo, 0, "flow");
	beat_require(fcinfo, 1, "worker");
	beat_require(fcinfo, 2, "max_tasks");
	(void) beat_check_name(PG_GETARG_TEXT_PP(1), "worker");
	beat_check_range(PG_GETARG_INT32(2), 1, BEAT_MAX_TASKS_MAX, "max_tasks");
	if (!PG_ARGISNULL(3))
		beat_check_interval(PG_GETARG_INTERVAL_P(3), "lease", false);

	InitMaterializedSRF(fcinfo, MAT_SRF_USE_EXPECTED_DESC);

	values[0] = PG_GETARG_DATUM(0);
	values[1] = PG_GETARG_DATUM(1);
	values[2] = PG_GETARG_DATUM(2);
	values[3] = PG_GETARG_DATUM(3);
	nulls[3] = PG_ARGISNULL(3) ? 'n' : ' ';

	beat_spi_connect();

	/*
	 * Promote and claim run generic plans: their custom plans (the LIMIT
	 * known) were made anew on every call, and planning took longer than
	 * running.  A generic plan outlives the table it was made for, so it
	 * is made with sequential scans off (BEAT_PLAN_INDEXED): whatever
	 * size beat.task had then (empty, at a worker's first claim), every
	 * step of the plan goes through an index.
	 */
	promote_due(values[0]);
	if (claim_direct(rsinfo, values[0], values[1], PG_GETARG_INT32(2),
					 values[3], PG_ARGISNULL(3)))
	{
		beat_spi_finish();
		return (Datum) 0;
	}
	beat_prepare_opts(&plan_claim,
				 "WITH u AS ("
				 "  UPDATE beat.task t SET state = 'running', attempts = t.attempts + 1,"
				 "    lease_owner = $2,"
				 "    lease_expires_at = statement_timestamp()"
				 "      + coalesce($4, (SELECT f.lease FROM beat.flow f WHERE f.name = $1)),"
				 "    started_at = statement_timestamp(), updated_at = statement_timestamp()"
				 "  WHERE t.id = ANY (ARRAY("
				 "    SELECT c.id FROM beat.task c"
				 "    WHERE c.flow = $1 AND c.state = 'pending'"
				 "      AND EXISTS (SELECT FROM beat.flow f WHERE f.name = $1 AND NOT f.paused)"
				 "    ORDER BY c.priority, c.run_at, c.id"
				 "    LIMIT $3"
				 "    FOR UPDATE SKIP LOCKED))"
				 "  RETURNING t.id, t.flow, t.params, t.priority, t.attempts, t.max_attempts,"
				 "    t.idempotency_key, t.correlation_id, t.run_at, t.created_at,"
				 "    t.lease_expires_at"
				 ") SELECT * FROM u ORDER BY priority, run_at, id",
				 4, argtypes, CURSOR_OPT_GENERIC_PLAN);
	beat_execute_plan(plan_claim, values, nulls, SPI_OK_SELECT, BEAT_PLAN_INDEXED);
	if (SPI_processed == 0)
	{
		/* an unknown flow raises; a paused or empty one returns no rows */
		require_flow(values[0]);
		beat_spi_finish();
		return (Datum) 0;
	}

	natts = rsinfo->setDesc->natts;
	if (SPI_tuptable->tupdesc->natts != natts)
		elog(ERROR, "pg_beat: claim returned %d columns, expected %d",
			 SPI_tuptable->tupdesc->natts, natts);
	{
		Datum	   *row = palloc(sizeof(Datum) * natts);
		bool	   *rownulls = palloc(sizeof(bool) * natts);

		for (uint64 i = 0; i < SPI_processed; i++)
		{
			heap_deform_tuple(SPI_tuptable->vals[i], SPI_tuptable->tupdesc,
							  row, rownulls);
			tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, row, rownulls);
		}
	}
	beat_spi_finish();
	return (Datum) 0;
}

/* beat.complete(task_id, worker, result): the held task succeeded. */
Datum
beat_complete(PG_FUNCTION_ARGS)
{
	Oid			argtypes[3] = {INT8OID, TEXTOID, JSONBOID};
	Datum		values[3];
	char		nulls[4] = "   ";
	char	   *worker;

	beat_require(fcinfo, 0, "task_id");
	beat_require(fcinfo, 1, "worker");
	worker = beat_check_name(PG_GETARG_TEXT_PP(1), "worker");

	values[0] = PG_GETARG_DATUM(0);
	values[1] = PG_GETARG_DATUM(1);
	values[2] = PG_GETARG_DATUM(2);
	nulls[2] = PG_ARGISNULL(2) ? 'n' : ' ';

	beat_spi_connect();
	beat_prepare(&plan_complete,
				 "UPDATE beat.task t SET state = 'succeeded', result = $3,"
				 " finished_at = statement_timestamp(), updated_at = statement_timestamp(),"
				 " lease_owner = NULL, lease_expires_at = NULL"
				 " WHERE t.id = $1 AND " HELD_BY("$2"),
				 3, argtypes);
	beat_execute(plan_complete, values, nulls, SPI_OK_UPDATE);
	if (SPI_processed == 0)
		report_not_held(PG_GETARG_INT64(0), worker);
	beat_spi_finish();
	PG_RETURN_VOID();
}

/* beat.complete_batch(task_ids, worker, results): all held, or an error. */
Datum
beat_complete_batch(PG_FUNCTION_ARGS)
{
	Oid			argtypes[3] = {INT8ARRAYOID, TEXTOID, JSONBARRAYOID};
	Datum		values[3];
	char		nulls[4] = "   ";
	char	   *worker;
	ArrayType  *idarr;
	Datum	   *ids;
	bool	   *idnulls;
	int			n;
	Datum	   *results = NULL;
	bool	   *resnulls = NULL;
	int64	   *done;
	uint64		ndone;

	if (PG_ARGISNULL(0))
		PG_RETURN_INT64(0);
	beat_require(fcinfo, 1, "worker");
	worker = beat_check_name(PG_GETARG_TEXT_PP(1), "worker");

	idarr = PG_GETARG_ARRAYTYPE_P(0);
	if (ARR_NDIM(idarr) > 1)
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("task_ids must be a one-dimensional array")));
	deconstruct_array(idarr, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE,
					  &ids, &idnulls, &n);
	for (int i = 0; i < n; i++)
		if (idnulls[i])
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("task_ids must not contain nulls")));
	if (n == 0)
		PG_RETURN_INT64(0);
	if (!PG_ARGISNULL(2))
	{
		ArrayType  *res = PG_GETARG_ARRAYTYPE_P(2);
		int			nres = ArrayGetNItems(ARR_NDIM(res), ARR_DIMS(res));

		if (ARR_NDIM(res) > 1 || nres != n)
			ereport(ERROR,
					(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
					 errmsg("results must have one element per task id"),
					 errdetail("There are %d task ids and %d results.", n, nres)));
		deconstruct_array(res, JSONBOID, -1, false, TYPALIGN_INT, &results, &resnulls, &nres);
	}

	values[0] = PointerGetDatum(idarr);
	values[1] = PG_GETARG_DATUM(1);
	values[2] = PG_GETARG_DATUM(2);
	nulls[2] = PG_ARGISNULL(2) ? 'n' : ' ';

	beat_spi_connect();
	done = palloc(sizeof(int64) * n);
	if (!complete_direct(ids, n, values[1], results, resnulls, done, &ndone))
	{
		/*
		 * The statement.  Without results, no join: each task is looked up
		 * by id.  (A repeated id matches its task once either way, and is
		 * reported below.)
		 */
		if (PG_ARGISNULL(2))
		{
			beat_prepare(&plan_complete_ids,
						 "UPDATE beat.task t SET state = 'succeeded', result = NULL,"
						 " finished_at = statement_timestamp(), updated_at = statement_timestamp(),"
						 " lease_owner = NULL, lease_expires_at = NULL"
						 " WHERE t.id = ANY ($1) AND " HELD_BY("$2")
						 " RETURNING t.id",
						 2, argtypes);
			beat_execute_plan(plan_complete_ids, values, nulls, SPI_OK_UPDATE_RETURNING,
							  BEAT_PLAN_INDEXED);
		}
		else
		{
			beat_prepare(&plan_complete_batch,
						 "UPDATE beat.task t SET state = 'succeeded', result = r.result,"
						 " finished_at = statement_timestamp(), updated_at = statement_timestamp(),"
						 " lease_owner = NULL, lease_expires_at = NULL"
						 " FROM unnest($1, $3) AS r(id, result)"
						 " WHERE t.id = ANY ($1) AND t.id = r.id AND " HELD_BY("$2")
						 " RETURNING t.id",
						 3, argtypes);
			beat_execute_plan(plan_complete_batch, values, nulls, SPI_OK_UPDATE_RETURNING,
							  BEAT_PLAN_BATCH);
		}
		ndone = Min(SPI_processed, (uint64) n);
		for (uint64 i = 0; i < ndone; i++)
		{
			bool		isnull;

			done[i] = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[i],
												  SPI_tuptable->tupdesc, 1, &isnull));
		}
	}

	if (ndone != (uint64) n)
	{
		/* Name the first id that was not held, or the repeated one. */
		qsort(done, ndone, sizeof(int64), beat_cmp_int64);
		for (int i = 0; i < n; i++)
		{
			int64		id = DatumGetInt64(ids[i]);

			if (bsearch(&id, done, ndone, sizeof(int64), beat_cmp_int64) == NULL)
				report_not_held(id, worker);
		}
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("task_ids must not contain duplicates")));
	}
	beat_spi_finish();
	PG_RETURN_INT64(n);
}

/* beat.fail(task_id, worker, error, retry_after, permanent): retry or dead. */
Datum
beat_fail(PG_FUNCTION_ARGS)
{
	Oid			argtypes[5] = {INT8OID, TEXTOID, TEXTOID, INTERVALOID, BOOLOID};
	Datum		values[5];
	char		nulls[6] = "     ";
	char	   *worker;
	bool		isnull;
	Datum		state;

	beat_require(fcinfo, 0, "task_id");
	beat_require(fcinfo, 1, "worker");
	beat_require(fcinfo, 2, "error");
	worker = beat_check_name(PG_GETARG_TEXT_PP(1), "worker");
	if (!PG_ARGISNULL(3))
		beat_check_interval(PG_GETARG_INTERVAL_P(3), "retry_after", true);

	values[0] = PG_GETARG_DATUM(0);
	values[1] = PG_GETARG_DATUM(1);
	values[2] = PG_GETARG_DATUM(2);
	values[3] = PG_GETARG_DATUM(3);
	nulls[3] = PG_ARGISNULL(3) ? 'n' : ' ';
	values[4] = PG_ARGISNULL(4) ? BoolGetDatum(false) : PG_GETARG_DATUM(4);

	beat_spi_connect();
	beat_prepare(&plan_fail,
				 "UPDATE beat.task t SET"
				 " state = CASE WHEN $5 OR t.attempts >= t.max_attempts"
				 "   THEN 'dead'::beat.task_state ELSE 'failed'::beat.task_state END,"
				 " run_at = CASE WHEN $5 OR t.attempts >= t.max_attempts THEN t.run_at"
				 "   ELSE statement_timestamp() + " BACKOFF_SQL("$4") " END,"
				 " finished_at = CASE WHEN $5 OR t.attempts >= t.max_attempts"
				 "   THEN statement_timestamp() END,"
				 " last_error = $3, lease_owner = NULL, lease_expires_at = NULL,"
				 " updated_at = statement_timestamp()"
				 " FROM beat.flow f"
				 " WHERE f.name = t.flow AND t.id = $1 AND " HELD_BY("$2")
				 " RETURNING t.state, t.flow",
				 5, argtypes);
	beat_execute(plan_fail, values, nulls, SPI_OK_UPDATE_RETURNING);
	if (SPI_processed == 0)
		report_not_held(PG_GETARG_INT64(0), worker);
	state = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	/* a retry is work to come: wake the workers so they plan for it */
	if (strcmp(SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1),
			   "failed") == 0)
		beat_wake_at_commit(SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2));
	beat_spi_finish();

	PG_RETURN_DATUM(state);
}

/* beat.heartbeat(task_id, worker, extend): push the lease's expiry out. */
Datum
beat_heartbeat(PG_FUNCTION_ARGS)
{
	Oid			argtypes[3] = {INT8OID, TEXTOID, INTERVALOID};
	Datum		values[3];
	char		nulls[4] = "   ";
	char	   *worker;
	bool		isnull;
	TimestampTz expires;

	beat_require(fcinfo, 0, "task_id");
	beat_require(fcinfo, 1, "worker");
	worker = beat_check_name(PG_GETARG_TEXT_PP(1), "worker");
	if (!PG_ARGISNULL(2))
		beat_check_interval(PG_GETARG_INTERVAL_P(2), "extend", false);

	values[0] = PG_GETARG_DATUM(0);
	values[1] = PG_GETARG_DATUM(1);
	values[2] = PG_GETARG_DATUM(2);
	nulls[2] = PG_ARGISNULL(2) ? 'n' : ' ';

	beat_spi_connect();
	beat_prepare(&plan_heartbeat,
				 "UPDATE beat.task t"
				 " SET lease_expires_at = statement_timestamp() + coalesce($3, f.lease)"
				 " FROM beat.flow f"
				 " WHERE f.name = t.flow AND t.id = $1 AND " HELD_BY("$2")
				 " RETURNING t.lease_expires_at",
				 3, argtypes);
	beat_execute(plan_heartbeat, values, nulls, SPI_OK_UPDATE_RETURNING);
	if (SPI_processed == 0)
		report_not_held(PG_GETARG_INT64(0), worker);
	/* by value only where int8 is (64-bit): read it before SPI frees the row */
	expires = DatumGetTimestampTz(SPI_getbinval(SPI_tuptable->vals[0],
												SPI_tuptable->tupdesc, 1, &isnull));
	beat_spi_finish();
	PG_RETURN_TIMESTAMPTZ(expires);
}

/*
 * Raise if the task does not exist, or if its state is not named in allowed
 * (a list as the message shows it); else return its state in *state.
 */
static void
report_state(int64 task_id, const char *action, const char *done,
			 const char *allowed, char **state)
{
	*state = beat_task_state(task_id, NULL, NULL);
	if (strstr(allowed, *state) == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("cannot %s task " INT64_FORMAT " because it is %s",
						action, task_id, *state),
				 errdetail("Only %s tasks can be %s.", allowed, done)));
}

/* beat.cancel(task_id): a task that has not finished will not run. */
Datum
beat_cancel(PG_FUNCTION_ARGS)
{
	Oid			argtypes[1] = {INT8OID};
	Datum		v = PG_GETARG_DATUM(0);

	beat_spi_connect();
	beat_prepare(&plan_cancel,
				 "UPDATE beat.task SET state = 'cancelled',"
				 " finished_at = statement_timestamp(), updated_at = statement_timestamp(),"
				 " lease_owner = NULL, lease_expires_at = NULL"
				 " WHERE id = $1 AND state IN " LIVE_STATES,
				 1, argtypes);
	beat_execute(plan_cancel, &v, " ", SPI_OK_UPDATE);
	if (SPI_processed == 0)
	{
		char	   *state;

		report_state(PG_GETARG_INT64(0), "cancel", "cancelled",
					 "pending, scheduled, running or failed", &state);
		elog(ERROR, "pg_beat: task " INT64_FORMAT " is %s but was not cancelled",
			 PG_GETARG_INT64(0), state);
	}
	beat_spi_finish();
	PG_RETURN_VOID();
}

/* beat.requeue(task_id): a dead or cancelled task runs again from scratch. */
Datum
beat_requeue(PG_FUNCTION_ARGS)
{
	Oid			argtypes[1] = {INT8OID};
	Datum		v = PG_GETARG_DATUM(0);

	beat_spi_connect();
	beat_prepare(&plan_requeue,
				 "UPDATE beat.task t SET state = 'pending', attempts = 0,"
				 " run_at = statement_timestamp(), finished_at = NULL, result = NULL,"
				 " updated_at = statement_timestamp()"
				 " WHERE t.id = $1 AND t.state IN ('dead', 'cancelled')"
				 "   AND NOT EXISTS (SELECT FROM beat.task d WHERE d.flow = t.flow"
				 "     AND d.idempotency_key = t.idempotency_key"
				 "     AND d.state IN " LIVE_STATES ")"
				 " RETURNING t.flow",
				 1, argtypes);
	beat_execute(plan_requeue, &v, " ", SPI_OK_UPDATE_RETURNING);
	if (SPI_processed == 0)
	{
		char	   *state;

		report_state(PG_GETARG_INT64(0), "requeue", "requeued", "dead or cancelled",
					 &state);
		/* dead or cancelled, so a live task holds its key */
		ereport(ERROR,
				(errcode(ERRCODE_UNIQUE_VIOLATION),
				 errmsg("cannot requeue task " INT64_FORMAT, PG_GETARG_INT64(0)),
				 errdetail("A live task of the same flow has the same idempotency key.")));
	}
	beat_wake_at_commit(SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1));
	beat_spi_finish();
	PG_RETURN_VOID();
}

/* beat.reap(): expired leases go back to pending, or dead when out of attempts. */
Datum
beat_reap(PG_FUNCTION_ARGS)
{
	TupleDesc	tupdesc;
	Datum		values[2];
	bool		nulls[2] = {false, false};
	bool		isnull;
	int64		requeued;
	int64		dead;

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "pg_beat: reap must return a record");
	tupdesc = BlessTupleDesc(tupdesc);

	/*
	 * Rows a live transaction holds are skipped: that worker is not dead.
	 * The launcher calls this every beat.reaper_interval, with a plan it
	 * keeps for good: made with sequential scans off, it reads the few
	 * running tasks through task_lease_idx, not the whole table.
	 */
	beat_spi_connect();
	beat_prepare(&plan_reap,
				 "WITH x AS ("
				 "  UPDATE beat.task t SET"
				 "   state = CASE WHEN t.attempts >= t.max_attempts"
				 "     THEN 'dead'::beat.task_state ELSE 'pending'::beat.task_state END,"
				 "   finished_at = CASE WHEN t.attempts >= t.max_attempts"
				 "     THEN statement_timestamp() END,"
				 "   last_error = 'lease of worker \"' || t.lease_owner || '\" expired',"
				 "   lease_owner = NULL, lease_expires_at = NULL,"
				 "   updated_at = statement_timestamp()"
				 "  WHERE t.id = ANY (ARRAY(SELECT id FROM beat.task"
				 "    WHERE state = 'running' AND lease_expires_at < statement_timestamp()"
				 "    FOR UPDATE SKIP LOCKED))"
				 "  RETURNING t.state"
				 ") SELECT count(*) FILTER (WHERE state = 'pending'),"
				 "  count(*) FILTER (WHERE state = 'dead') FROM x",
				 0, NULL);
	beat_execute_plan(plan_reap, NULL, NULL, SPI_OK_SELECT, BEAT_PLAN_INDEXED);
	/* read out before SPI frees the row (int8 is by reference on 32-bit) */
	requeued = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	dead = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull));
	beat_spi_finish();
	values[0] = Int64GetDatum(requeued);
	values[1] = Int64GetDatum(dead);

	if (requeued > 0)
		beat_wake_at_commit(NULL);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}

/* beat.purge(older_than): delete finished tasks past their retention. */
Datum
beat_purge(PG_FUNCTION_ARGS)
{
	Oid			argtypes[1] = {INTERVALOID};
	Datum		v = PG_GETARG_DATUM(0);
	char		nulls[2] = " ";
	bool		isnull;
	int64		count;

	if (PG_ARGISNULL(0))
		nulls[0] = 'n';
	else
		beat_check_interval(PG_GETARG_INTERVAL_P(0), "older_than", true);

	/* the launcher calls this every minute: through task_finished_idx */
	beat_spi_connect();
	beat_prepare(&plan_purge,
				 "WITH d AS ("
				 "  DELETE FROM beat.task t USING beat.flow f"
				 "  WHERE f.name = t.flow AND t.state IN " DONE_STATES
				 "    AND t.finished_at < statement_timestamp() - coalesce($1, f.retention)"
				 "  RETURNING 1"
				 ") SELECT count(*) FROM d",
				 1, argtypes);
	beat_execute_plan(plan_purge, &v, nulls, SPI_OK_SELECT, BEAT_PLAN_INDEXED);
	count = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
										SPI_tuptable->tupdesc, 1, &isnull));
	beat_spi_finish();
	PG_RETURN_INT64(count);
}
