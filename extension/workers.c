/*-------------------------------------------------------------------------
 *
 * workers.c
 *		What SQL sees of the background workers: beat.worker_status,
 *		beat.drain, beat.undrain and beat.purge_http_log.
 *
 * The slots are read under BeatShared->lock (shared) and each slot's
 * counters under its spinlock; see pg_beat.h.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "storage/latch.h"
#include "storage/spin.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"

#include "pg_beat.h"

PG_FUNCTION_INFO_V1(beat_worker_status_rows);
PG_FUNCTION_INFO_V1(beat_drain);
PG_FUNCTION_INFO_V1(beat_undrain);
PG_FUNCTION_INFO_V1(beat_purge_http_log);

static SPIPlanPtr plan_purge_log = NULL;

/* The name beat.worker_status shows for a slot state. */
static const char *
state_name(BeatSlotState state)
{
	switch (state)
	{
		case BEAT_SLOT_STARTING:
			return "starting";
		case BEAT_SLOT_IDLE:
			return "idle";
		case BEAT_SLOT_BUSY:
			return "busy";
		case BEAT_SLOT_STOPPING:
			return "stopping";
		default:
			return "free";
	}
}

/* beat.worker_status_rows(): the launcher, then one row per flow worker. */
Datum
beat_worker_status_rows(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	Datum		values[9];
	bool		nulls[9];

	InitMaterializedSRF(fcinfo, 0);

	LWLockAcquire(beat_shared->lock, LW_SHARED);
	if (beat_shared->launcher_pid != 0)
	{
		memset(nulls, true, sizeof(nulls));
		values[0] = Int32GetDatum(beat_shared->launcher_pid);
		nulls[0] = false;
		values[3] = CStringGetTextDatum("launcher");
		nulls[3] = false;
		values[7] = TimestampTzGetDatum(beat_shared->launcher_started_at);
		nulls[7] = false;
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	for (int i = 0; i < beat_shared->max_workers; i++)
	{
		BeatWorkerSlot *slot = &beat_shared->workers[i];

		if (slot->state == BEAT_SLOT_FREE)
			continue;
		memset(nulls, false, sizeof(nulls));
		values[0] = Int32GetDatum(slot->pid);
		nulls[0] = slot->pid == 0;
		values[1] = CStringGetTextDatum(slot->flow);
		values[2] = Int32GetDatum(slot->index);
		values[3] = CStringGetTextDatum(state_name(slot->state));
		SpinLockAcquire(&slot->mutex);
		values[4] = Int32GetDatum(slot->in_flight);
		values[5] = Int64GetDatum((int64) slot->done);
		values[6] = Int64GetDatum((int64) slot->failed);
		values[7] = TimestampTzGetDatum(slot->started_at);
		values[8] = TimestampTzGetDatum(slot->last_activity);
		SpinLockRelease(&slot->mutex);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	LWLockRelease(beat_shared->lock);
	return (Datum) 0;
}

/* Total transfers in flight over all workers, counting a claim under way. */
static int
total_in_flight(void)
{
	int			total = 0;

	LWLockAcquire(beat_shared->lock, LW_SHARED);
	for (int i = 0; i < beat_shared->max_workers; i++)
	{
		BeatWorkerSlot *slot = &beat_shared->workers[i];

		if (slot->state == BEAT_SLOT_FREE)
			continue;
		SpinLockAcquire(&slot->mutex);
		total += slot->in_flight;
		SpinLockRelease(&slot->mutex);
		total += pg_atomic_read_u32(&slot->claiming);
	}
	LWLockRelease(beat_shared->lock);
	return total;
}

/*
 * beat.drain(timeout): stop claiming everywhere, wait until nothing is in
 * flight or timeout passes, and return the workers still holding transfers.
 * Claiming stays stopped until beat.undrain().
 */
Datum
beat_drain(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	Interval   *timeout;
	TimestampTz deadline;

	beat_require(fcinfo, 0, "timeout");
	timeout = PG_GETARG_INTERVAL_P(0);
	beat_check_interval(timeout, "timeout", true);
	deadline = DatumGetTimestampTz(DirectFunctionCall2(timestamptz_pl_interval,
													   TimestampTzGetDatum(GetCurrentTimestamp()),
													   IntervalPGetDatum(timeout)));

	InitMaterializedSRF(fcinfo, 0);
	pg_atomic_write_u32(&beat_shared->draining, 1);
	pg_memory_barrier();		/* pairs with the workers' claiming flag */
	beat_set_worker_latches(NULL);

	while (total_in_flight() > 0 && GetCurrentTimestamp() < deadline)
	{
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 10, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
	}

	LWLockAcquire(beat_shared->lock, LW_SHARED);
	for (int i = 0; i < beat_shared->max_workers; i++)
	{
		BeatWorkerSlot *slot = &beat_shared->workers[i];
		Datum		values[3];
		bool		nulls[3] = {false, false, false};
		int			in_flight;

		if (slot->state == BEAT_SLOT_FREE)
			continue;
		SpinLockAcquire(&slot->mutex);
		in_flight = slot->in_flight;
		SpinLockRelease(&slot->mutex);
		if (in_flight == 0)
			continue;
		values[0] = CStringGetTextDatum(slot->flow);
		values[1] = Int32GetDatum(slot->pid);
		values[2] = Int32GetDatum(in_flight);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	LWLockRelease(beat_shared->lock);
	return (Datum) 0;
}

/* beat.undrain(): let the workers claim again. */
Datum
beat_undrain(PG_FUNCTION_ARGS)
{
	pg_atomic_write_u32(&beat_shared->draining, 0);
	beat_set_worker_latches(NULL);
	PG_RETURN_VOID();
}

/* beat.purge_http_log(older_than): delete old transfer log rows. */
Datum
beat_purge_http_log(PG_FUNCTION_ARGS)
{
	Oid			argtypes[1] = {INTERVALOID};
	Datum		v;
	Interval	keep;
	int64		count;
	bool		isnull;

	if (PG_ARGISNULL(0))
	{
		memset(&keep, 0, sizeof(keep));
		keep.time = (int64) beat_http_log_retention * USECS_PER_SEC;
		v = IntervalPGetDatum(&keep);
	}
	else
	{
		beat_check_interval(PG_GETARG_INTERVAL_P(0), "older_than", true);
		v = PG_GETARG_DATUM(0);
	}

	beat_spi_connect();
	beat_prepare(&plan_purge_log,
				 "WITH d AS (DELETE FROM beat.http_log"
				 "  WHERE created_at < statement_timestamp() - $1 RETURNING 1)"
				 " SELECT count(*) FROM d",
				 1, argtypes);
	beat_execute(plan_purge_log, &v, " ", SPI_OK_SELECT);
	count = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
										SPI_tuptable->tupdesc, 1, &isnull));
	beat_spi_finish();
	PG_RETURN_INT64(count);
}
