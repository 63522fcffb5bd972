/*-------------------------------------------------------------------------
 *
 * launcher.c
 *		The pg_beat launcher: one background worker, registered at preload,
 *		that runs the flow workers and the reaper.
 *
 * Each pass, in this order: reread the configuration if asked; in one
 * transaction, check that pg_beat is installed in beat.database_name, the
 * first time after a server start or crash count the attempts that the
 * crash undid (the claim journals, journal.c) and hand back every lease of
 * its workers, later only those of workers that no longer exist, read
 * which flows want workers, reap expired leases when beat.reaper_interval
 * has passed and apply retention once a minute; then start the workers
 * that are missing, stop those no longer wanted, and sleep on the latch
 * until the next timer.  A commit that changes beat.flow sets the latch
 * (see pg_beat.c), and so does the postmaster when a worker we started
 * stops (bgw_notify_pid).
 *
 * Slots in BeatShared->workers are filled here under the exclusive lock;
 * a worker frees its own slot when it exits.  A worker that crashed leaves
 * its slot behind; we free it when GetBackgroundWorkerPid() says STOPPED,
 * hand its leases back at once, and start a new one after a backoff that
 * doubles with each crash (1 s to 1 min).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "storage/spin.h"
#include "tcop/tcopprot.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"

#include "pg_beat.h"
#include "journal.h"
#include "limiter.h"

/* What the launcher knows of each slot it started (process-local). */
typedef struct LauncherSlot
{
	BackgroundWorkerHandle *handle;
	pid_t		pid;			/* last pid seen running, 0 if none */
	TimestampTz started_at;
} LauncherSlot;

/*
 * A worker of (flow, index) that stopped without being asked (a crash or an
 * error): how often in a row, and when it may be started again.
 */
typedef struct CrashRecord
{
	char		flow[NAMEDATALEN];
	int			index;
	int			crashes;
	TimestampTz restart_after;
} CrashRecord;

/* A flow that wants workers. */
typedef struct WantedFlow
{
	char		name[NAMEDATALEN];
	int			workers;
} WantedFlow;

#define PURGE_INTERVAL_MS	60000
#define NOT_INSTALLED_SLEEP_MS 10000
#define MAX_RESTART_DELAY_MS 60000

static LauncherSlot *local_slots;
static CrashRecord *crash_records;	/* max_workers of them; flow[0] = unused */
static TimestampTz no_start_before = 0;	/* after quick crash restarts */
static uint32 my_generation;

static SPIPlanPtr plan_installed = NULL;
/*
 * Hand back the leases of a worker that is gone: pending again, or dead
 * when that was the last attempt (the WHERE clause says whose).
 */
#define RELEASE_LEASES \
	"UPDATE beat.task SET" \
	" state = CASE WHEN attempts >= max_attempts" \
	"   THEN 'dead'::beat.task_state ELSE 'pending'::beat.task_state END," \
	" finished_at = CASE WHEN attempts >= max_attempts" \
	"   THEN statement_timestamp() END," \
	" last_error = 'worker ' || lease_owner || ' stopped while it held the task'," \
	" lease_owner = NULL, lease_expires_at = NULL," \
	" updated_at = statement_timestamp()"

static SPIPlanPtr plan_release = NULL;
static SPIPlanPtr plan_orphans = NULL;
static SPIPlanPtr plan_wanted = NULL;

/* Register the launcher; called from _PG_init while preloading. */
void
beat_register_launcher(void)
{
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	snprintf(worker.bgw_name, BGW_MAXLEN, "pg_beat launcher");
	snprintf(worker.bgw_type, BGW_MAXLEN, "pg_beat launcher");
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = 5;
	snprintf(worker.bgw_library_name, BGW_MAXLEN, "pg_beat");
	snprintf(worker.bgw_function_name, BGW_MAXLEN, "beat_launcher_main");
	RegisterBackgroundWorker(&worker);
}

/* The lease owner name of a worker: pg_beat:<flow>:<index>:<pid>. */
char *
beat_worker_name(const char *flow, int index, int pid)
{
	return psprintf("pg_beat:%s:%d:%d", flow, index, pid);
}

/* Leave the launcher's place in shared memory when we exit. */
static void
launcher_detach(int code, Datum arg)
{
	LWLockAcquire(beat_shared->lock, LW_EXCLUSIVE);
	if (beat_shared->launcher_pid == MyProcPid)
	{
		beat_shared->launcher_pid = 0;
		beat_shared->launcher_latch = NULL;
	}
	LWLockRelease(beat_shared->lock);
}

/*
 * Is pg_beat installed in this database, at the library's version?
 * Inside SPI.  Says once in the log when the versions differ.
 */
static bool
extension_installed(void)
{
	static bool warned = false;
	bool		isnull;
	Datum		v;
	char	   *version;

	beat_prepare(&plan_installed,
				 "SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'pg_beat'",
				 0, NULL);
	beat_execute(plan_installed, NULL, NULL, SPI_OK_SELECT);
	if (SPI_processed == 0)
		return false;
	v = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	version = TextDatumGetCString(v);
	if (strcmp(version, PG_BEAT_VERSION) == 0)
	{
		warned = false;
		return true;
	}
	if (!warned)
		ereport(LOG,
				(errmsg("pg_beat: the extension in database \"%s\" is version %s but the library is %s; no workers until ALTER EXTENSION pg_beat UPDATE",
						beat_database_name, version, PG_BEAT_VERSION)));
	warned = true;
	return false;
}

/*
 * Hand back the leases of one worker that is gone: pending again, or dead
 * if that was the last attempt (the attempt counts: the task may be what
 * killed it).  Inside SPI; returns how many.
 */
static uint64
release_leases(const char *owner)
{
	Oid			argtypes[1] = {TEXTOID};
	Datum		v = CStringGetTextDatum(owner);

	beat_prepare(&plan_release,
				 RELEASE_LEASES
				 " WHERE state = 'running' AND lease_owner = $1",
				 1, argtypes);
	beat_execute(plan_release, &v, " ", SPI_OK_UPDATE);
	return SPI_processed;
}

/*
 * At launcher start: hand back every lease of an in-database worker that
 * is not running now (after a restart or a crash, that is all of them).
 */
static void
recover_orphans(void)
{
	Datum	   *live;
	int			nlive = 0;
	Oid			argtypes[1] = {TEXTARRAYOID};
	Datum		v;

	live = palloc(sizeof(Datum) * Max(beat_shared->max_workers, 1));
	LWLockAcquire(beat_shared->lock, LW_SHARED);
	for (int i = 0; i < beat_shared->max_workers; i++)
	{
		BeatWorkerSlot *slot = &beat_shared->workers[i];

		if (slot->state != BEAT_SLOT_FREE && slot->pid != 0)
			live[nlive++] = CStringGetTextDatum(beat_worker_name(slot->flow, slot->index,
																 slot->pid));
	}
	LWLockRelease(beat_shared->lock);
	v = beat_make_array(live, NULL, nlive, TEXTOID);

	beat_prepare(&plan_orphans,
				 RELEASE_LEASES
				 " WHERE state = 'running' AND starts_with(lease_owner, 'pg_beat:')"
				 "   AND lease_owner <> ALL ($1)",
				 1, argtypes);
	beat_execute(plan_orphans, &v, " ", SPI_OK_UPDATE);
	if (SPI_processed > 0)
		ereport(LOG,
				(errmsg("pg_beat: handed back " UINT64_FORMAT " tasks held by workers of a previous run",
						SPI_processed)));
}

/*
 * Read the flows that want workers into *out, allocated in ctx (SPI frees
 * its own memory when it disconnects).  Inside SPI; returns the count.
 */
static int
read_wanted(WantedFlow **out, MemoryContext ctx)
{
	WantedFlow *wanted;
	bool		isnull;

	beat_prepare(&plan_wanted,
				 "SELECT name, workers FROM beat.flow"
				 " WHERE (request IS NOT NULL OR operation IS NOT NULL) AND workers > 0 ORDER BY name",
				 0, NULL);
	beat_execute(plan_wanted, NULL, NULL, SPI_OK_SELECT);
	wanted = MemoryContextAllocZero(ctx, sizeof(WantedFlow) * Max(SPI_processed, 1));
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];

		strlcpy(wanted[i].name,
				TextDatumGetCString(SPI_getbinval(tup, SPI_tuptable->tupdesc, 1, &isnull)),
				NAMEDATALEN);
		wanted[i].workers = DatumGetInt32(SPI_getbinval(tup, SPI_tuptable->tupdesc, 2,
														&isnull));
	}
	*out = wanted;
	return (int) SPI_processed;
}

/* Is (flow, index) wanted? */
static bool
is_wanted(WantedFlow *wanted, int nwanted, const char *flow, int index)
{
	for (int i = 0; i < nwanted; i++)
		if (strcmp(wanted[i].name, flow) == 0)
			return index < wanted[i].workers;
	return false;
}

/* Find the slot running (flow, index) for this launcher, or -1. */
static int
find_slot(const char *flow, int index)
{
	for (int i = 0; i < beat_shared->max_workers; i++)
	{
		BeatWorkerSlot *slot = &beat_shared->workers[i];

		if (slot->state != BEAT_SLOT_FREE && slot->generation == my_generation &&
			slot->index == index && strcmp(slot->flow, flow) == 0)
			return i;
	}
	return -1;
}

/* Start the worker for (flow, index) in a free slot; false if none could be. */
static bool
start_worker(const char *flow, int index)
{
	BackgroundWorker worker;
	int			n = -1;
	MemoryContext old;
	bool		registered;

	LWLockAcquire(beat_shared->lock, LW_EXCLUSIVE);
	for (int i = 0; i < beat_shared->max_workers; i++)
		if (beat_shared->workers[i].state == BEAT_SLOT_FREE)
		{
			n = i;
			break;
		}
	if (n >= 0)
	{
		BeatWorkerSlot *slot = &beat_shared->workers[n];

		slot->state = BEAT_SLOT_STARTING;
		slot->index = index;
		slot->generation = my_generation;
		slot->pid = 0;
		slot->latch = NULL;
		slot->clean_exit = false;
		strlcpy(slot->flow, flow, NAMEDATALEN);
		SpinLockAcquire(&slot->mutex);
		slot->in_flight = 0;
		slot->done = 0;
		slot->failed = 0;
		slot->started_at = GetCurrentTimestamp();
		slot->last_activity = slot->started_at;
		SpinLockRelease(&slot->mutex);
	}
	LWLockRelease(beat_shared->lock);

	if (n < 0)
	{
		ereport(WARNING,
				(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
				 errmsg("pg_beat: no free worker slot for flow \"%s\"", flow),
				 errhint("Raise beat.max_workers (and max_worker_processes), or lower the workers of your flows.")));
		return false;
	}

	memset(&worker, 0, sizeof(worker));
	snprintf(worker.bgw_name, BGW_MAXLEN, "pg_beat worker %s/%d", flow, index);
	snprintf(worker.bgw_type, BGW_MAXLEN, "pg_beat worker");
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = BGW_NEVER_RESTART;
	snprintf(worker.bgw_library_name, BGW_MAXLEN, "pg_beat");
	snprintf(worker.bgw_function_name, BGW_MAXLEN, "beat_worker_main");
	worker.bgw_main_arg = Int32GetDatum(n);
	worker.bgw_notify_pid = MyProcPid;

	/* the handle outlives this pass: keep it in TopMemoryContext */
	old = MemoryContextSwitchTo(TopMemoryContext);
	registered = RegisterDynamicBackgroundWorker(&worker, &local_slots[n].handle);
	MemoryContextSwitchTo(old);
	if (!registered)
	{
		LWLockAcquire(beat_shared->lock, LW_EXCLUSIVE);
		beat_shared->workers[n].state = BEAT_SLOT_FREE;
		LWLockRelease(beat_shared->lock);
		local_slots[n].handle = NULL;
		ereport(WARNING,
				(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
				 errmsg("pg_beat: could not start a worker for flow \"%s\"", flow),
				 errhint("Raise max_worker_processes: each pg_beat worker takes one.")));
		return false;
	}
	local_slots[n].pid = 0;
	local_slots[n].started_at = GetCurrentTimestamp();
	return true;
}

/* The crash record of (flow, index), or NULL; create it when asked. */
static CrashRecord *
crash_record(const char *flow, int index, bool create)
{
	CrashRecord *free_rec = NULL;

	for (int i = 0; i < beat_shared->max_workers; i++)
	{
		CrashRecord *r = &crash_records[i];

		if (r->flow[0] == '\0')
		{
			if (free_rec == NULL)
				free_rec = r;
			continue;
		}
		if (r->index == index && strcmp(r->flow, flow) == 0)
			return r;
	}
	if (!create || free_rec == NULL)
		return NULL;
	strlcpy(free_rec->flow, flow, NAMEDATALEN);
	free_rec->index = index;
	free_rec->crashes = 0;
	free_rec->restart_after = 0;
	return free_rec;
}

/* Note that (flow, index) stopped: forget it if fine, else back off. */
static void
note_stop(const char *flow, int index, bool fine)
{
	CrashRecord *r = crash_record(flow, index, !fine);

	if (fine)
	{
		if (r)
			r->flow[0] = '\0';
		return;
	}
	if (r == NULL)
		return;
	r->crashes++;
	r->restart_after = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
												   Min(MAX_RESTART_DELAY_MS,
													   1000 << Min(r->crashes - 1, 6)));
}

/*
 * Look at every slot we started: note the pid of those running, and for
 * those that stopped, free the slot and (inside SPI) hand back their leases.
 * Returns true if any stopped.
 */
static bool
collect_stopped(void)
{
	bool		any = false;

	for (int i = 0; i < beat_shared->max_workers; i++)
	{
		LauncherSlot *ls = &local_slots[i];
		pid_t		pid;
		BgwHandleStatus status;
		char		flow[NAMEDATALEN];
		int			index;
		bool		clean;

		if (ls->handle == NULL)
			continue;
		status = GetBackgroundWorkerPid(ls->handle, &pid);
		if (status == BGWH_STARTED)
		{
			ls->pid = pid;
			continue;
		}
		if (status != BGWH_STOPPED)
			continue;			/* not yet started */

		LWLockAcquire(beat_shared->lock, LW_EXCLUSIVE);
		strlcpy(flow, beat_shared->workers[i].flow, NAMEDATALEN);
		index = beat_shared->workers[i].index;
		clean = beat_shared->workers[i].clean_exit;
		beat_shared->workers[i].state = BEAT_SLOT_FREE;
		beat_shared->workers[i].pid = 0;
		beat_shared->workers[i].latch = NULL;
		LWLockRelease(beat_shared->lock);

		if (ls->pid != 0)
		{
			uint64		n = release_leases(beat_worker_name(flow, index, ls->pid));

			if (n > 0)
				ereport(LOG,
						(errmsg("pg_beat: worker %d of flow \"%s\" stopped; handed back " UINT64_FORMAT " tasks",
								(int) ls->pid, flow, n)));
		}
		pfree(ls->handle);
		ls->handle = NULL;
		ls->pid = 0;

		/*
		 * A worker that stopped on purpose starts again at once when it is
		 * wanted; one that crashed, after 1 s, doubling with each crash in a
		 * row (a worker that ran a minute starts the count afresh), at most
		 * a minute.
		 */
		note_stop(flow, index, clean ||
				  TimestampDifferenceExceeds(ls->started_at, GetCurrentTimestamp(), 60000));
		any = true;
	}
	return any;
}

/*
 * Make the running workers match the wanted ones: stop the extra, start
 * the missing (after their restart backoff).  Returns the time of the next
 * restart it is waiting for, or 0.
 */
static TimestampTz
reconcile(WantedFlow *wanted, int nwanted)
{
	TimestampTz now = GetCurrentTimestamp();
	TimestampTz next = 0;

	/* stop what is no longer wanted */
	for (int i = 0; i < beat_shared->max_workers; i++)
	{
		BeatWorkerSlot *slot = &beat_shared->workers[i];

		if (local_slots[i].handle == NULL || slot->state == BEAT_SLOT_FREE)
			continue;
		if (!is_wanted(wanted, nwanted, slot->flow, slot->index))
			TerminateBackgroundWorker(local_slots[i].handle);
	}

	/* start what is missing, unless it is backing off */
	for (int f = 0; f < nwanted; f++)
	{
		for (int index = 0; index < wanted[f].workers; index++)
		{
			CrashRecord *r;
			TimestampTz not_before = no_start_before;

			if (find_slot(wanted[f].name, index) >= 0)
				continue;
			r = crash_record(wanted[f].name, index, false);
			if (r && r->restart_after > not_before)
				not_before = r->restart_after;
			if (not_before > now)
			{
				if (next == 0 || not_before < next)
					next = not_before;
				continue;
			}
			if (!start_worker(wanted[f].name, index))
			{
				TimestampTz retry = TimestampTzPlusMilliseconds(now, 10000);

				if (next == 0 || retry < next)
					next = retry;
				return next;
			}
		}
	}
	return next;
}

/* Stop every worker this launcher started. */
static void
stop_all(void)
{
	for (int i = 0; i < beat_shared->max_workers; i++)
		if (local_slots[i].handle != NULL)
			TerminateBackgroundWorker(local_slots[i].handle);
}

/* Entry point of the launcher. */
void
beat_launcher_main(Datum arg)
{
	MemoryContext pass_ctx;
	bool		recovered = false;
	TimestampTz next_reap = 0;
	TimestampTz next_purge = 0;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, SignalHandlerForShutdownRequest);
	BackgroundWorkerUnblockSignals();

	local_slots = MemoryContextAllocZero(TopMemoryContext,
										 sizeof(LauncherSlot) * beat_shared->max_workers);
	crash_records = MemoryContextAllocZero(TopMemoryContext,
										   sizeof(CrashRecord) * beat_shared->max_workers);

	LWLockAcquire(beat_shared->lock, LW_EXCLUSIVE);
	my_generation = ++beat_shared->launcher_generation;
	beat_shared->launcher_pid = MyProcPid;
	beat_shared->launcher_latch = MyLatch;
	beat_shared->launcher_started_at = GetCurrentTimestamp();
	LWLockRelease(beat_shared->lock);
	/* so that no one sets the latch of a process that has gone */
	before_shmem_exit(launcher_detach, 0);

	/* workers of an earlier launcher see the new generation and stop */
	beat_set_worker_latches(NULL);

	/*
	 * After crash restarts in quick succession, a worker may be what keeps
	 * crashing the server: wait 2^n seconds (at most 5 minutes) first.
	 */
	if (beat_shared->quick_restarts > 0)
	{
		int			delay = 1000 << Min(beat_shared->quick_restarts, 8);

		delay = Min(delay, 300000);
		ereport(LOG,
				(errmsg("pg_beat: the server restarted after a crash %d times in a row; starting workers in %d s",
						beat_shared->quick_restarts, delay / 1000)));
		no_start_before = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), delay);
	}

	BackgroundWorkerInitializeConnection(beat_database_name, NULL, 0);
	pgstat_report_appname("pg_beat launcher");

	pass_ctx = AllocSetContextCreate(TopMemoryContext, "pg_beat launcher pass",
									 ALLOCSET_DEFAULT_SIZES);

	while (!ShutdownRequestPending)
	{
		TimestampTz now;
		TimestampTz wake;
		long		timeout;
		bool		installed = false;
		bool		journals_read = false;
		WantedFlow *wanted = NULL;
		int			nwanted = 0;
		TimestampTz next_restart;

		MemoryContextReset(pass_ctx);
		MemoryContextSwitchTo(pass_ctx);

		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}

		now = GetCurrentTimestamp();
		SetCurrentStatementStartTimestamp();
		StartTransactionCommand();
		beat_spi_connect();
		PushActiveSnapshot(GetTransactionSnapshot());
		pgstat_report_activity(STATE_RUNNING, "pg_beat launcher pass");

		installed = extension_installed();
		if (installed)
		{
			if (!recovered)
			{
				/* before any worker of ours runs: see journal.c */
				if (!beat_shared->claims_recovered)
				{
					uint64		counted = beat_journal_recover();

					if (counted > 0)
						ereport(LOG,
								(errmsg("pg_beat: counted the attempts of " UINT64_FORMAT " tasks whose claims the crash undid",
										counted)));
					journals_read = true;
				}
				recover_orphans();
				recovered = true;
			}
			collect_stopped();
			nwanted = read_wanted(&wanted, pass_ctx);
			if (now >= next_reap)
			{
				if (SPI_execute("SELECT * FROM beat.reap()", false, 0) != SPI_OK_SELECT)
					elog(ERROR, "pg_beat: reap failed");
				next_reap = TimestampTzPlusMilliseconds(now, beat_reaper_interval);
			}
			if (now >= next_purge)
			{
				if (SPI_execute("SELECT beat.purge(), beat.purge_http_log(), beat.purge_data()", false, 0)
					!= SPI_OK_SELECT)
					elog(ERROR, "pg_beat: purge failed");
				next_purge = TimestampTzPlusMilliseconds(now, PURGE_INTERVAL_MS);
			}
		}

		PopActiveSnapshot();
		beat_spi_finish();
		CommitTransactionCommand();
		pgstat_report_stat(false);
		pgstat_report_activity(STATE_IDLE, NULL);

		MemoryContextSwitchTo(pass_ctx);
		if (journals_read)
		{
			/* counted and committed: the journals have done their part */
			beat_journal_remove_all();
			LWLockAcquire(beat_shared->lock, LW_EXCLUSIVE);
			beat_shared->claims_recovered = true;
			LWLockRelease(beat_shared->lock);
		}
		if (installed)
		{
			next_restart = reconcile(wanted, nwanted);
			wake = next_reap;
			if (next_restart != 0 && next_restart < wake)
				wake = next_restart;
		}
		else
		{
			stop_all();
			recovered = false;
			wake = TimestampTzPlusMilliseconds(now, NOT_INSTALLED_SLEEP_MS);
		}

		timeout = TimestampDifferenceMilliseconds(GetCurrentTimestamp(), wake);
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 Max(timeout, 1), PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
	}

	/* a clean stop: keep the exact quota counts for the next start */
	beat_limiter_save();

	/* exit 1 so that the postmaster starts us again after bgw_restart_time */
	proc_exit(1);
}
