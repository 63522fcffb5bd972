/*-------------------------------------------------------------------------
 *
 * util.c
 *		Saved SPI plans and the argument checks every SQL function shares.
 *
 * Plans are prepared once per backend and kept for its lifetime
 * (SPI_keepplan).  They refer to beat.* objects by name, so the plan cache
 * replans them if the extension is dropped and created again.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "executor/spi.h"
#include "utils/array.h"
#include "utils/guc.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/timestamp.h"

#include "pg_beat.h"

/* Return the cached plan for sql, preparing and keeping it on first use. */
SPIPlanPtr
beat_prepare(SPIPlanPtr *cache, const char *sql, int nargs, Oid *argtypes)
{
	return beat_prepare_opts(cache, sql, nargs, argtypes, 0);
}

/* The same with cursor options (CURSOR_OPT_GENERIC_PLAN). */
SPIPlanPtr
beat_prepare_opts(SPIPlanPtr *cache, const char *sql, int nargs, Oid *argtypes,
				  int options)
{
	SPIPlanPtr	plan;

	if (*cache != NULL)
		return *cache;

	plan = SPI_prepare_cursor(sql, nargs, argtypes, options);
	if (plan == NULL)
		elog(ERROR, "pg_beat: could not prepare statement: %s",
			 SPI_result_code_string(SPI_result));
	if (SPI_keepplan(plan) != 0)
		elog(ERROR, "pg_beat: could not keep prepared statement");
	*cache = plan;
	return plan;
}

/* Run a saved plan, failing loudly on anything but the expected result. */
void
beat_execute(SPIPlanPtr plan, Datum *values, const char *nulls, int expected)
{
	beat_execute_plan(plan, values, nulls, expected, 0);
}

/*
 * The same, planned with the planner settings of flags (pg_beat.h).  The
 * plan cache makes a saved plan when it is first run, and again when it
 * is run after an invalidation, so the settings hold for the run only.
 * An error restores them with the (sub)transaction; a user's trigger on
 * beat.task that fires inside the statement plans with them too.
 */
void
beat_execute_plan(SPIPlanPtr plan, Datum *values, const char *nulls, int expected,
				  int flags)
{
	int			nest = 0;
	int			rc;

	if (flags != 0)
	{
		nest = NewGUCNestLevel();
		if (flags & BEAT_PLAN_NO_SEQSCAN)
			(void) set_config_option("enable_seqscan", "off", PGC_USERSET,
									 PGC_S_SESSION, GUC_ACTION_SAVE, true, 0, false);
		if (flags & BEAT_PLAN_NO_NESTLOOP)
			(void) set_config_option("enable_nestloop", "off", PGC_USERSET,
									 PGC_S_SESSION, GUC_ACTION_SAVE, true, 0, false);
	}
	rc = SPI_execute_plan(plan, values, nulls, false, 0);
	if (flags != 0)
		AtEOXact_GUC(true, nest);
	if (rc != expected)
		elog(ERROR, "pg_beat: SPI_execute_plan returned %s",
			 SPI_result_code_string(rc));
}

/* Connect to SPI or fail. */
void
beat_spi_connect(void)
{
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "pg_beat: SPI_connect failed");
}

/* Disconnect from SPI or fail. */
void
beat_spi_finish(void)
{
	if (SPI_finish() != SPI_OK_FINISH)
		elog(ERROR, "pg_beat: SPI_finish failed");
}

/* Refuse a NULL argument, naming it. */
void
beat_require(FunctionCallInfo fcinfo, int argno, const char *name)
{
	if (PG_ARGISNULL(argno))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s must not be null", name)));
}

/* Check a worker or key name: not empty, not too long; return it as C text. */
char *
beat_check_name(text *t, const char *what)
{
	int			len = VARSIZE_ANY_EXHDR(t);

	if (len == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must not be empty", what)));
	if (len > BEAT_NAME_MAX)
		ereport(ERROR,
				(errcode(ERRCODE_NAME_TOO_LONG),
				 errmsg("%s is too long", what),
				 errdetail("It has %d bytes; the limit is %d.", len, BEAT_NAME_MAX)));
	return text_to_cstring(t);
}

/* Check that an interval is positive (or, when zero_ok, not negative). */
void
beat_check_interval(Interval *iv, const char *what, bool zero_ok)
{
	Interval	zero;
	int			cmp;

	memset(&zero, 0, sizeof(zero));
	cmp = DatumGetInt32(DirectFunctionCall2(interval_cmp,
											IntervalPGetDatum(iv),
											IntervalPGetDatum(&zero)));
	if (cmp < 0 || (cmp == 0 && !zero_ok))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must be %s", what, zero_ok ? "zero or positive" : "positive"),
				 errdetail("The value given was %s.",
						   DatumGetCString(DirectFunctionCall1(interval_out,
															   IntervalPGetDatum(iv))))));
}

/* Check that an interval is at most max (max_text says it to the user). */
void
beat_check_interval_max(Interval *iv, const Interval *max, const char *what,
						const char *max_text)
{
	if (DatumGetInt32(DirectFunctionCall2(interval_cmp, IntervalPGetDatum(iv),
										  IntervalPGetDatum(max))) > 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must be at most %s", what, max_text)));
}

/* Check that an integer lies in [lo, hi]. */
void
beat_check_range(int64 value, int64 lo, int64 hi, const char *what)
{
	if (value < lo || value > hi)
		ereport(ERROR,
				(errcode(ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE),
				 errmsg("%s must be between " INT64_FORMAT " and " INT64_FORMAT, what, lo, hi),
				 errdetail("The value given was " INT64_FORMAT ".", value)));
}

/* Compare two int64 for qsort and bsearch. */
int
beat_cmp_int64(const void *a, const void *b)
{
	int64		x = *(const int64 *) a;
	int64		y = *(const int64 *) b;

	return (x > y) - (x < y);
}

/* A one-dimensional array of n datums of type typid, with nulls (or NULL). */
Datum
beat_make_array(Datum *values, bool *nulls, int n, Oid typid)
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

/* A column of n rows of type typid, every row NULL until set. */
BeatColumn
beat_column(int n, Oid typid)
{
	BeatColumn	c;

	c.v = palloc0(sizeof(Datum) * Max(n, 1));
	c.nulls = palloc(sizeof(bool) * Max(n, 1));
	memset(c.nulls, true, sizeof(bool) * Max(n, 1));
	c.typid = typid;
	return c;
}

void
beat_column_set(BeatColumn *c, int i, Datum v, bool isnull)
{
	c->v[i] = isnull ? (Datum) 0 : v;
	c->nulls[i] = isnull;
}

/* A text value, NULL for a NULL string. */
void
beat_column_text(BeatColumn *c, int i, const char *s)
{
	beat_column_set(c, i, s ? CStringGetTextDatum(s) : (Datum) 0, s == NULL);
}

/* Its first n rows, as an array. */
Datum
beat_column_array(const BeatColumn *c, int n)
{
	return beat_make_array(c->v, c->nulls, n, c->typid);
}
