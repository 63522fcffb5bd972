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
 * friends) calls beat_wake_at_commit(), which only notes the request in
 * backend-local state.  The transaction callback acts on it after the commit
 * is visible to other backends (XACT_EVENT_COMMIT runs after the proc array
 * is updated), so a woken worker always finds the new rows.  An abort, of
 * the transaction or of the subtransaction that made the request, drops it:
 * a rollback never wakes anyone.  A prepared transaction does not carry the
 * request to COMMIT PREPARED; workers find such tasks on their next pass.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/shmem.h"
#include "utils/guc.h"

#include "pg_beat.h"

PG_MODULE_MAGIC;

/* GUC variables */
char	   *beat_database_name = NULL;
int			beat_max_params_size = 1024 * 1024;

BeatShared *beat_shared = NULL;

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

/*
 * The outermost transaction nesting level that asked for a wake-up in the
 * current transaction, or 0 when none did.  Requests made deeper than this
 * level are implied by it; see beat_subxact_callback.
 */
static int	wake_nest_level = 0;

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

	MarkGUCPrefixReserved("beat");

	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = beat_shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = beat_shmem_startup;

	RegisterXactCallback(beat_xact_callback, NULL);
	RegisterSubXactCallback(beat_subxact_callback, NULL);
}

/* Ask the postmaster for our shared memory and our lock. */
static void
beat_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();

	RequestAddinShmemSpace(MAXALIGN(sizeof(BeatShared)));
	RequestNamedLWLockTranche("pg_beat", 1);
}

/* Allocate or attach to the shared state. */
static void
beat_shmem_startup(void)
{
	bool		found;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	beat_shared = ShmemInitStruct("pg_beat", sizeof(BeatShared), &found);
	if (!found)
	{
		beat_shared->lock = &(GetNamedLWLockTranche("pg_beat"))->lock;
		pg_atomic_init_u64(&beat_shared->wakeups, 0);
	}
	LWLockRelease(AddinShmemInitLock);
}

/* Note that the workers should be woken if this transaction commits. */
void
beat_wake_at_commit(void)
{
	int			level = GetCurrentTransactionNestLevel();

	if (wake_nest_level == 0 || level < wake_nest_level)
		wake_nest_level = level;
}

/* Wake the workers after a commit that asked for it; forget on abort. */
static void
beat_xact_callback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_COMMIT:
			if (wake_nest_level > 0 && beat_shared != NULL)
				pg_atomic_fetch_add_u64(&beat_shared->wakeups, 1);
			wake_nest_level = 0;
			break;
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PREPARE:
			wake_nest_level = 0;
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
		wake_nest_level = 0;
}

/* beat.wakeups(): committed transactions that signalled the workers. */
Datum
beat_wakeups(PG_FUNCTION_ARGS)
{
	PG_RETURN_INT64((int64) pg_atomic_read_u64(&beat_shared->wakeups));
}
