/*-------------------------------------------------------------------------
 *
 * pg_beat.c
 *		Module load: GUCs, shared memory, and the commit-time wake-up.
 *
 * pg_beat must be in shared_preload_libraries: its shared memory is sized
 * and allocated at postmaster start (shmem_request_hook, then
 * shmem_startup_hook, each chained to whatever was installed before).
 *
 * Wake-up protocol.  A function that makes work available (beat.enqueue and
 * friends) calls beat_wake_at_commit(flow), which only notes the request in
 * backend-local state; a change to beat.flow calls
 * beat_wake_launcher_at_commit().  The transaction callback acts on them
 * after the commit is visible to other backends (XACT_EVENT_COMMIT runs
 * after the proc array is updated), so a woken process always finds the new
 * rows: it sets the latches of that flow's workers (or of the launcher).  An
 * abort, of the transaction or of the subtransaction that made the request,
 * drops it: a rollback never wakes anyone.  A prepared transaction does not
 * carry the request to COMMIT PREPARED; workers find such tasks when they
 * next wake (at the latest after beat.reaper_interval, when the launcher
 * reaps).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/shmem.h"
#include "storage/spin.h"
#include "utils/guc.h"

#include "pg_beat.h"
#include "limiter.h"
#include "provider.h"

PG_MODULE_MAGIC;

/* GUC variables */
char	   *beat_database_name = NULL;
int			beat_max_params_size = 1024 * 1024;
int			beat_max_workers = 32;
int			beat_max_response_size = 10 * 1024 * 1024;
int			beat_http_log_retention = 86400;
static int	beat_observation_retention = 30 * 86400;
static int	beat_event_retention = 7 * 86400;
int			beat_reaper_interval = 1000;
int			beat_shutdown_grace = 2000;
char	   *beat_log_redact_params = NULL;
bool		beat_allow_private_addresses = false;

BeatShared *beat_shared = NULL;

/*
 * Postmaster memory survives a crash restart, shared memory does not: the
 * postmaster counts restarts that come less than a minute apart, so that
 * the launcher can wait before starting workers that may crash again.
 */
static TimestampTz last_shmem_init = 0;
static int	quick_restarts = 0;

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

/*
 * The outermost transaction nesting level that asked for a wake-up in the
 * current transaction, or 0 when none did.  Requests made deeper than this
 * level are implied by it; see beat_subxact_callback.  What to wake: the
 * flows named (all flows once more than WAKE_FLOWS_MAX are), the launcher,
 * and the beat.wait callers of the tasks finished (all of them once more
 * than WAKE_TASKS_MAX are).
 */
#define WAKE_FLOWS_MAX 8
#define WAKE_TASKS_MAX 256
static int	wake_nest_level = 0;
static int	wake_nflows = 0;
static bool wake_all_flows = false;
static bool wake_launcher = false;
static char wake_flows[WAKE_FLOWS_MAX][NAMEDATALEN];
static int	wake_ntasks = 0;
static bool wake_all_tasks = false;
static int64 wake_tasks[WAKE_TASKS_MAX];

void		_PG_init(void);
static void beat_shmem_request(void);
static void beat_shmem_startup(void);
static void beat_xact_callback(XactEvent event, void *arg);
static void beat_subxact_callback(SubXactEvent event, SubTransactionId mySubid,
								  SubTransactionId parentSubid, void *arg);

PG_FUNCTION_INFO_V1(beat_wakeups);

/* Load the module: refuse unless preloaded, define GUCs, ask for shmem. */
void
_PG_init(void)
{
	if (!process_shared_preload_libraries_in_progress)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("pg_beat must be loaded via shared_preload_libraries"),
				 errhint("Add pg_beat to shared_preload_libraries in postgresql.conf and restart the server.")));

	DefineCustomStringVariable("beat.database_name",
							   "Database in which pg_beat's workers run.",
							   NULL,
							   &beat_database_name,
							   "postgres",
							   PGC_POSTMASTER,
							   GUC_SUPERUSER_ONLY,
							   NULL, NULL, NULL);

	DefineCustomIntVariable("beat.max_params_size",
							"Largest params object a task may carry.",
							"Larger params are refused by beat.enqueue and beat.enqueue_batch.",
							&beat_max_params_size,
							1024 * 1024,
							64,
							256 * 1024 * 1024,
							PGC_SUSET,
							GUC_UNIT_BYTE,
							NULL, NULL, NULL);

	DefineCustomIntVariable("beat.max_workers",
							"Most flow worker processes pg_beat runs at once.",
							"Sizes shared memory; each also needs a max_worker_processes slot.",
							&beat_max_workers,
							32, 1, 1024,
							PGC_POSTMASTER,
							0,
							NULL, NULL, NULL);

	DefineCustomIntVariable("beat.max_response_size",
							"Largest HTTP response body a worker accepts.",
							"A larger response fails its task permanently.",
							&beat_max_response_size,
							10 * 1024 * 1024, 1024, 1024 * 1024 * 1024,
							PGC_SIGHUP,
							GUC_UNIT_BYTE,
							NULL, NULL, NULL);

	DefineCustomIntVariable("beat.http_log_retention",
							"How long rows of beat.http_log are kept.",
							"The launcher deletes older rows; 0 keeps none.",
							&beat_http_log_retention,
							86400, 0, INT_MAX,
							PGC_SIGHUP,
							GUC_UNIT_S,
							NULL, NULL, NULL);

	/* read by beat.purge_data() from pg_settings (in seconds) */
	DefineCustomIntVariable("beat.observation_retention",
							"How long rows of beat.observation are kept.",
							"The launcher deletes older rows; 0 keeps them all.",
							&beat_observation_retention,
							30 * 86400, 0, INT_MAX,
							PGC_SIGHUP,
							GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomIntVariable("beat.event_retention",
							"How long rows of beat.event are kept.",
							"The launcher deletes older rows; 0 keeps them all.  "
							"A consumer away for longer misses what was deleted.",
							&beat_event_retention,
							7 * 86400, 0, INT_MAX,
							PGC_SIGHUP,
							GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomIntVariable("beat.reaper_interval",
							"How often the launcher returns expired leases.",
							NULL,
							&beat_reaper_interval,
							1000, 10, 3600 * 1000,
							PGC_SIGHUP,
							GUC_UNIT_MS,
							NULL, NULL, NULL);

	DefineCustomIntVariable("beat.shutdown_grace",
							"How long a stopping worker waits for transfers in flight.",
							"What is still in flight then is handed back to pending.",
							&beat_shutdown_grace,
							2000, 0, 60000,
							PGC_SIGHUP,
							GUC_UNIT_MS,
							NULL, NULL, NULL);

	DefineCustomStringVariable("beat.log_redact_params",
							   "Query parameters whose values beat.http_log hides.",
							   "A comma-separated list of names, compared without case.",
							   &beat_log_redact_params,
							   "key,api_key,apikey,token,access_token,secret,client_secret,password,signature,sig,auth",
							   PGC_SIGHUP,
							   0,
							   NULL, NULL, NULL);

	DefineCustomIntVariable("beat.max_credentials",
							"Most provider credentials whose state shared memory keeps.",
							"A credential beyond it is used without rests or auth-failure memory between workers.",
							&beat_max_credentials,
							1000, 16, 1000000,
							PGC_POSTMASTER,
							0,
							NULL, NULL, NULL);

	DefineCustomBoolVariable("beat.allow_private_addresses",
							 "Let the workers connect to loopback, private and link-local addresses.",
							 "Off by default, so a URL cannot reach the database host or its network; tests and the demo turn it on.",
							 &beat_allow_private_addresses,
							 false,
							 PGC_SIGHUP,
							 GUC_SUPERUSER_ONLY,
							 NULL, NULL, NULL);

	beat_limiter_init();

	MarkGUCPrefixReserved("beat");

	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = beat_shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = beat_shmem_startup;

	RegisterXactCallback(beat_xact_callback, NULL);
	RegisterSubXactCallback(beat_subxact_callback, NULL);

	beat_register_launcher();
}

/* Shared memory for the state and one slot per possible worker. */
static Size
beat_shmem_size(void)
{
	return add_size(offsetof(BeatShared, workers),
					mul_size(beat_max_workers, sizeof(BeatWorkerSlot)));
}

/* Ask the postmaster for our shared memory and our lock. */
static void
beat_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();

	RequestAddinShmemSpace(MAXALIGN(beat_shmem_size()));
	RequestAddinShmemSpace(beat_limiter_shmem_size());
	RequestAddinShmemSpace(beat_wait_shmem_size());
	RequestNamedLWLockTranche("pg_beat", 1);
	beat_limiter_shmem_request();
	beat_provider_shmem_request();
}

/* Allocate or attach to the shared state. */
static void
beat_shmem_startup(void)
{
	bool		found;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	beat_shared = ShmemInitStruct("pg_beat", beat_shmem_size(), &found);
	if (!found)
	{
		memset(beat_shared, 0, beat_shmem_size());
		beat_shared->lock = &(GetNamedLWLockTranche("pg_beat"))->lock;
		pg_atomic_init_u64(&beat_shared->wakeups, 0);
		pg_atomic_init_u32(&beat_shared->flow_generation, 0);
		pg_atomic_init_u32(&beat_shared->draining, 0);
		beat_shared->max_workers = beat_max_workers;
		if (!IsUnderPostmaster)
		{
			TimestampTz now = GetCurrentTimestamp();

			if (last_shmem_init != 0 &&
				!TimestampDifferenceExceeds(last_shmem_init, now, 60000))
				quick_restarts++;
			else
				quick_restarts = 0;
			last_shmem_init = now;
			beat_shared->quick_restarts = quick_restarts;
		}
		for (int i = 0; i < beat_max_workers; i++)
		{
			SpinLockInit(&beat_shared->workers[i].mutex);
			pg_atomic_init_u32(&beat_shared->workers[i].claiming, 0);
		}
	}
	beat_limiter_shmem_startup();
	beat_provider_shmem_startup();
	beat_wait_shmem_startup();
	LWLockRelease(AddinShmemInitLock);
}

/* Remember that a wake-up was asked for at the current nesting level. */
static void
note_wake_level(void)
{
	int			level = GetCurrentTransactionNestLevel();

	if (wake_nest_level == 0 || level < wake_nest_level)
		wake_nest_level = level;
}

/* Forget every wake-up request of the transaction. */
static void
forget_wakes(void)
{
	wake_nest_level = 0;
	wake_nflows = 0;
	wake_all_flows = false;
	wake_launcher = false;
	wake_ntasks = 0;
	wake_all_tasks = false;
}

/* Note that flow's workers (all workers when flow is NULL) should be woken. */
void
beat_wake_at_commit(const char *flow)
{
	note_wake_level();
	if (wake_all_flows)
		return;
	if (flow == NULL || wake_nflows == WAKE_FLOWS_MAX)
	{
		wake_all_flows = true;
		return;
	}
	for (int i = 0; i < wake_nflows; i++)
		if (strcmp(wake_flows[i], flow) == 0)
			return;
	strlcpy(wake_flows[wake_nflows++], flow, NAMEDATALEN);
}

/* Note that the launcher should look at the flows again. */
void
beat_wake_launcher_at_commit(void)
{
	note_wake_level();
	wake_launcher = true;
}

/* Note that the beat.wait callers waiting for task_id should be woken. */
void
beat_wake_waiters_at_commit(int64 task_id)
{
	note_wake_level();
	if (wake_all_tasks)
		return;
	if (wake_ntasks == WAKE_TASKS_MAX)
	{
		wake_all_tasks = true;
		return;
	}
	wake_tasks[wake_ntasks++] = task_id;
}

/* Set the latches of the running workers of flow (of all, when NULL). */
void
beat_set_worker_latches(const char *flow)
{
	LWLockAcquire(beat_shared->lock, LW_SHARED);
	for (int i = 0; i < beat_shared->max_workers; i++)
	{
		BeatWorkerSlot *slot = &beat_shared->workers[i];

		if (slot->latch != NULL &&
			(flow == NULL || strcmp(slot->flow, flow) == 0))
			SetLatch(slot->latch);
	}
	LWLockRelease(beat_shared->lock);
}

/* Act on the wake-up requests after a commit; forget them on abort. */
static void
beat_xact_callback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_COMMIT:
			if (wake_nest_level > 0 && beat_shared != NULL)
			{
				if (wake_launcher)
				{
					pg_atomic_fetch_add_u32(&beat_shared->flow_generation, 1);
					LWLockAcquire(beat_shared->lock, LW_SHARED);
					if (beat_shared->launcher_latch != NULL)
						SetLatch(beat_shared->launcher_latch);
					LWLockRelease(beat_shared->lock);
				}
				/* after a flow change every worker rereads its flow when it wakes */
				if (wake_launcher || wake_all_flows)
					beat_set_worker_latches(NULL);
				else
					for (int i = 0; i < wake_nflows; i++)
						beat_set_worker_latches(wake_flows[i]);
				if (wake_all_flows || wake_nflows > 0)
					pg_atomic_fetch_add_u64(&beat_shared->wakeups, 1);
				if (wake_all_tasks || wake_ntasks > 0)
					beat_wake_waiters(wake_tasks, wake_ntasks, wake_all_tasks);
			}
			forget_wakes();
			break;
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PREPARE:
			forget_wakes();
			break;
		default:
			break;
	}
}

/*
 * Keep wake_nest_level exact across subtransactions.  It holds the outermost
 * level with a live request.  Committing level L hands its request to L - 1;
 * aborting level L drops the request if it was made at L or deeper, because
 * every such request lies inside the aborted subtransaction.
 */
static void
beat_subxact_callback(SubXactEvent event, SubTransactionId mySubid,
					  SubTransactionId parentSubid, void *arg)
{
	int			level = GetCurrentTransactionNestLevel();

	if (wake_nest_level == 0)
		return;

	if (event == SUBXACT_EVENT_COMMIT_SUB && wake_nest_level == level)
		wake_nest_level = level - 1;
	else if (event == SUBXACT_EVENT_ABORT_SUB && wake_nest_level >= level)
		forget_wakes();
}

/* beat.wakeups(): committed transactions that signalled the workers. */
Datum
beat_wakeups(PG_FUNCTION_ARGS)
{
	PG_RETURN_INT64((int64) pg_atomic_read_u64(&beat_shared->wakeups));
}
