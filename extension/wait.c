/*-------------------------------------------------------------------------
 *
 * wait.c
 *		beat.wait(task_id, timeout): block until a task has finished.
 *
 * A program that enqueues a task and needs its answer could poll the
 * task's row; on a small machine a tight poll takes a core from the
 * workers it waits for.  beat.wait sleeps on its latch instead.
 *
 * Each backend has one slot in shared memory: the task it waits for (0:
 * none) and its latch.  A row trigger on beat.task (task_finished, AFTER
 * UPDATE OF state, when the state becomes succeeded, dead or cancelled)
 * notes the task's id, whichever path made the change: a worker, the SQL
 * functions, the launcher, an UPDATE by hand.  The ids wait with the
 * transaction's other wake-ups in pg_beat.c (a subtransaction that rolls
 * back drops those it asked for); after the commit, beat_wake_waiters
 * sets the latch of every backend that waits for one of them.  A woken
 * waiter looks at the row again, with a new snapshot, so a wake-up for a
 * change that in the end did not finish the task only costs a look.  A look each second catches
 * what no trigger sees: a task deleted, a prepared transaction committed.
 *
 * No wake-up is lost: a waiter publishes its slot, then (after a barrier)
 * resets its latch and looks; the committer makes its commit visible,
 * then (after a barrier) reads the slots.  Either the look sees the
 * commit, or the committer sees the slot and sets the latch.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/xact.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "port/atomics.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/shmem.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

#include "pg_beat.h"

PG_FUNCTION_INFO_V1(beat_wait);
PG_FUNCTION_INFO_V1(beat_task_finished);

/* One backend's wait. */
typedef struct BeatWaiter
{
	pg_atomic_uint64 task_id;	/* 0: not waiting */
	Latch	   *latch;
} BeatWaiter;

typedef struct BeatWaiters
{
	pg_atomic_uint32 waiting;	/* slots in use: committers skip the scan at 0 */
	BeatWaiter	slots[FLEXIBLE_ARRAY_MEMBER];
} BeatWaiters;

static BeatWaiters *waiters = NULL;

/* A look when nothing woke us: for what the trigger does not see. */
#define WAIT_LOOK_MS 1000

Size
beat_wait_shmem_size(void)
{
	return add_size(offsetof(BeatWaiters, slots),
					mul_size(MaxBackends, sizeof(BeatWaiter)));
}

/* Allocate or attach (the caller holds AddinShmemInitLock). */
void
beat_wait_shmem_startup(void)
{
	bool		found;

	waiters = ShmemInitStruct("pg_beat waiters", beat_wait_shmem_size(), &found);
	if (!found)
	{
		pg_atomic_init_u32(&waiters->waiting, 0);
		for (int i = 0; i < MaxBackends; i++)
		{
			pg_atomic_init_u64(&waiters->slots[i].task_id, 0);
			waiters->slots[i].latch = NULL;
		}
	}
}

/*
 * The trigger task_finished: note the task whose state became succeeded,
 * dead or cancelled (the trigger's WHEN says so) for the commit.
 */
Datum
beat_task_finished(PG_FUNCTION_ARGS)
{
	TriggerData *td = (TriggerData *) fcinfo->context;
	bool		isnull;

	if (!CALLED_AS_TRIGGER(fcinfo) ||
		!TRIGGER_FIRED_FOR_ROW(td->tg_event) || !TRIGGER_FIRED_BY_UPDATE(td->tg_event))
		elog(ERROR, "pg_beat: task_finished must run on UPDATE FOR EACH ROW");
	/* id, the first column of beat.task (0.1.0.sql), is never null */
	Assert(TupleDescAttr(td->tg_relation->rd_att, 0)->atttypid == INT8OID);
	beat_wake_waiters_at_commit(DatumGetInt64(heap_getattr(td->tg_newtuple, 1,
														   td->tg_relation->rd_att,
														   &isnull)));
	/* BEFORE in 0.6.0 (the library may be newer than the catalog) */
	return PointerGetDatum(TRIGGER_FIRED_BEFORE(td->tg_event) ? td->tg_newtuple : NULL);
}

/*
 * After a commit that finished these tasks (all: too many to list), set
 * the latches of those waiting for them (pg_beat.c's commit callback).
 */
void
beat_wake_waiters(const int64 *task_ids, int n, bool all)
{
	/* the commit is visible; now read the slots (see the top of the file) */
	pg_memory_barrier();
	if (pg_atomic_read_u32(&waiters->waiting) == 0)
		return;
	for (int i = 0; i < MaxBackends; i++)
	{
		uint64		t = pg_atomic_read_u64(&waiters->slots[i].task_id);
		bool		match = all;

		if (t == 0)
			continue;
		for (int k = 0; k < n && !match; k++)
			match = (uint64) task_ids[k] == t;
		if (match)
		{
			pg_read_barrier();
			SetLatch(waiters->slots[i].latch);
		}
	}
}

/*
 * Give our slot back: on the way out of beat.wait, by error too, and when
 * the backend exits during a wait (a FATAL error, pg_terminate_backend).
 */
static void
release_slot(void)
{
	BeatWaiter *w = &waiters->slots[MyBackendId - 1];

	if (pg_atomic_read_u64(&w->task_id) != 0)
	{
		pg_atomic_write_u64(&w->task_id, 0);
		pg_atomic_fetch_sub_u32(&waiters->waiting, 1);
	}
}

static void
release_slot_at_exit(int code, Datum arg)
{
	release_slot();
}

/* The state of task_id, with a new snapshot; raise if it does not exist. */
static char *
look(int64 task_id)
{
	TransactionId xmin;
	char	   *state = beat_task_state(task_id, NULL, &xmin);

	if (TransactionIdIsCurrentTransactionId(xmin))
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("task " INT64_FORMAT " was changed by this transaction", task_id),
				 errdetail("No worker sees the task before this transaction commits."),
				 errhint("Commit, then call beat.wait().")));
	return state;
}

static bool
finished(const char *state)
{
	char		quoted[NAMEDATALEN + 2];

	snprintf(quoted, sizeof(quoted), "'%s'", state);
	return strstr(DONE_STATES, quoted) != NULL;
}

/*
 * beat.wait(task_id, timeout): the task's state once it has succeeded, is
 * dead or was cancelled, or its state when timeout has passed.
 */
Datum
beat_wait(PG_FUNCTION_ARGS)
{
	int64		task_id;
	Interval   *timeout;
	TimestampTz deadline;
	BeatWaiter *w;
	static bool exit_hook_set = false;
	MemoryContext caller = CurrentMemoryContext;
	char	   *state = NULL;
	text	   *result;

	beat_require(fcinfo, 0, "task_id");
	beat_require(fcinfo, 1, "timeout");
	task_id = PG_GETARG_INT64(0);
	timeout = PG_GETARG_INTERVAL_P(1);
	beat_check_interval(timeout, "timeout", true);
	if (IsolationUsesXactSnapshot())
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("beat.wait() needs the READ COMMITTED isolation level"),
				 errdetail("Under one snapshot for the whole transaction, the task would never be seen to finish.")));
	deadline = DatumGetTimestampTz(DirectFunctionCall2(timestamptz_pl_interval,
													   TimestampTzGetDatum(GetCurrentTimestamp()),
													   IntervalPGetDatum(timeout)));

	if (!exit_hook_set)
	{
		before_shmem_exit(release_slot_at_exit, (Datum) 0);
		exit_hook_set = true;
	}

	beat_spi_connect();
	PG_TRY();
	{
		w = &waiters->slots[MyBackendId - 1];
		w->latch = MyLatch;
		pg_atomic_fetch_add_u32(&waiters->waiting, 1);
		pg_atomic_write_u64(&w->task_id, (uint64) task_id);

		for (;;)
		{
			long		ms;

			/* published; now reset and look (see the top of the file) */
			pg_memory_barrier();
			ResetLatch(MyLatch);
			state = look(task_id);
			if (finished(state))
				break;
			ms = TimestampDifferenceMilliseconds(GetCurrentTimestamp(), deadline);
			if (ms <= 0)
				break;
			pfree(state);
			SPI_freetuptable(SPI_tuptable);
			(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
							 Max(Min(ms, WAIT_LOOK_MS), 1), PG_WAIT_EXTENSION);
			CHECK_FOR_INTERRUPTS();
		}
	}
	PG_FINALLY();
	{
		release_slot();
	}
	PG_END_TRY();
	/* the answer outlives SPI's memory */
	MemoryContextSwitchTo(caller);
	result = cstring_to_text(state);
	beat_spi_finish();
	PG_RETURN_TEXT_P(result);
}
