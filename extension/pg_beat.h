/*-------------------------------------------------------------------------
 *
 * pg_beat.h
 *		Declarations shared by the pg_beat extension and its workers.
 *
 * The shared state lives in one struct, BeatShared, allocated at
 * postmaster start.  Its counters are atomics and need no lock; anything
 * added later that is not a single atomic word is guarded by BeatShared->lock.
 *
 *-------------------------------------------------------------------------
 */
#ifndef PG_BEAT_H
#define PG_BEAT_H

#include "postgres.h"

#include "datatype/timestamp.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "port/atomics.h"
#include "storage/lwlock.h"

/* The state every pg_beat process shares. */
typedef struct BeatShared
{
	LWLock	   *lock;			/* guards anything that is not an atomic */
	pg_atomic_uint64 wakeups;	/* committed transactions that woke workers */
} BeatShared;

extern BeatShared *beat_shared;

/* GUCs */
extern char *beat_database_name;
extern int	beat_max_params_size;

/* pg_beat.c: ask for the workers to be woken when this transaction commits */
extern void beat_wake_at_commit(void);

/* util.c: saved plans and argument checks */
extern SPIPlanPtr beat_prepare(SPIPlanPtr *cache, const char *sql,
							   int nargs, Oid *argtypes);
extern void beat_execute(SPIPlanPtr plan, Datum *values, const char *nulls,
						 int expected);
extern void beat_spi_connect(void);
extern void beat_spi_finish(void);
extern void beat_require(FunctionCallInfo fcinfo, int argno, const char *name);
extern char *beat_check_name(text *t, const char *what);
extern void beat_check_interval(Interval *iv, const char *what, bool zero_ok);
extern void beat_check_range(int64 value, int64 lo, int64 hi, const char *what);

/* Limits that the SQL API checks and documents. */
#define BEAT_PRIORITY_MIN		(-1000)
#define BEAT_PRIORITY_MAX		1000
#define BEAT_MAX_ATTEMPTS_MAX	1000
#define BEAT_MAX_TASKS_MAX		10000
#define BEAT_NAME_MAX			200

#endif							/* PG_BEAT_H */
