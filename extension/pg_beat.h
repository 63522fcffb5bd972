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
#include "utils/timestamp.h"
#include "storage/latch.h"
#include "storage/lwlock.h"
#include "storage/s_lock.h"

/* What a worker slot is doing; shown by beat.worker_status. */
typedef enum BeatSlotState
{
	BEAT_SLOT_FREE = 0,			/* unused */
	BEAT_SLOT_STARTING,			/* registered by the launcher, not yet running */
	BEAT_SLOT_IDLE,				/* running, nothing in flight */
	BEAT_SLOT_BUSY,				/* running, transfers in flight */
	BEAT_SLOT_STOPPING			/* asked to stop: handing back what it holds */
} BeatSlotState;

/*
 * One flow worker.  The launcher fills flow, index and generation, clears
 * clean_exit and sets the state to STARTING, under BeatShared->lock held
 * exclusively; the worker sets pid and latch when it starts, clean_exit when
 * it stops on purpose, and frees the slot when it exits, also under the
 * exclusive lock.  Between those, only the worker writes state (idle, busy,
 * stopping: an aligned int read without the lock, for display), claiming
 * (an atomic, paired with BeatShared->draining through memory barriers), and
 * the counters below the mutex, which anyone reads under that spinlock.
 */
typedef struct BeatWorkerSlot
{
	BeatSlotState state;
	int			index;			/* which of the flow's workers (0-based) */
	uint32		generation;		/* launcher generation that started it */
	pid_t		pid;
	Latch	   *latch;
	bool		clean_exit;		/* the worker stopped on purpose (set as it exits) */
	char		flow[NAMEDATALEN];

	pg_atomic_uint32 claiming;	/* a claim is under way (see beat.drain) */
	slock_t		mutex;			/* guards the fields below */
	int			in_flight;
	uint64		done;
	uint64		failed;
	TimestampTz started_at;
	TimestampTz last_activity;
} BeatWorkerSlot;

/*
 * The state every pg_beat process shares.  The counters are atomics; the
 * launcher fields and the slots are guarded by lock (shared to read,
 * exclusive to change), except where BeatWorkerSlot says otherwise.
 */
typedef struct BeatShared
{
	LWLock	   *lock;
	pg_atomic_uint64 wakeups;	/* committed transactions that woke workers */
	pg_atomic_uint32 flow_generation;	/* bumped by every committed flow change */
	pg_atomic_uint32 draining;	/* beat.drain(): workers claim nothing */
	uint32		launcher_generation;	/* bumped by each launcher start */
	pid_t		launcher_pid;
	Latch	   *launcher_latch;
	TimestampTz launcher_started_at;
	int			quick_restarts;	/* crash restarts in a row, each < 1 min apart */
	bool		claims_recovered;	/* the claim journals were read (journal.c) */
	int			max_workers;
	BeatWorkerSlot workers[FLEXIBLE_ARRAY_MEMBER];
} BeatShared;

extern BeatShared *beat_shared;

/* GUCs */
extern char *beat_database_name;
extern int	beat_max_params_size;
extern int	beat_max_workers;
extern int	beat_max_response_size;
extern int	beat_http_log_retention;
extern int	beat_reaper_interval;
extern int	beat_shutdown_grace;
extern char *beat_log_redact_params;
extern bool beat_allow_private_addresses;

/* pg_beat.c: wake the workers of flow (NULL: all flows) when this commits */
extern void beat_wake_at_commit(const char *flow);
extern void beat_wake_launcher_at_commit(void);
extern void beat_wake_waiters_at_commit(int64 task_id);
extern void beat_set_worker_latches(const char *flow);

/* queue.c: a task's state (inside SPI) */
extern char *beat_task_state(int64 task_id, char **owner, TransactionId *xmin);

/* wait.c: beat.wait() and the wake-ups of its waiters */
extern Size beat_wait_shmem_size(void);
extern void beat_wait_shmem_startup(void);
extern void beat_wake_waiters(const int64 *task_ids, int n, bool all);

/* bgworker/launcher.c and bgworker/worker.c: the processes' entry points */
extern PGDLLEXPORT void beat_launcher_main(Datum arg);
extern PGDLLEXPORT void beat_worker_main(Datum arg);
extern void beat_register_launcher(void);
extern char *beat_worker_name(const char *flow, int index, int pid);

/* util.c: saved plans and argument checks */
extern SPIPlanPtr beat_prepare(SPIPlanPtr *cache, const char *sql,
							   int nargs, Oid *argtypes);
extern SPIPlanPtr beat_prepare_opts(SPIPlanPtr *cache, const char *sql,
									 int nargs, Oid *argtypes, int options);
extern void beat_execute(SPIPlanPtr plan, Datum *values, const char *nulls,
						 int expected);

/*
 * Planner settings for beat_execute_plan.  A queue's table is often empty
 * when a backend first plans a statement on it, and huge soon after; a
 * saved plan made then keeps its sequential scan until the next ANALYZE
 * (the reaper's, once a second).  BEAT_PLAN_INDEXED: sequential scans
 * off, so the plan goes through an index whatever the table's size.
 * BEAT_PLAN_BATCH, for statements that join an array of task ids to
 * beat.task ("t.id = ANY ($1) AND t.id = r.id"): nested loops off too,
 * which ran the array's unnest once per task (n * n for a batch of n);
 * a hash or merge join costs n.
 */
#define BEAT_PLAN_NO_SEQSCAN	0x01
#define BEAT_PLAN_NO_NESTLOOP	0x02
#define BEAT_PLAN_INDEXED		BEAT_PLAN_NO_SEQSCAN
#define BEAT_PLAN_BATCH			(BEAT_PLAN_NO_SEQSCAN | BEAT_PLAN_NO_NESTLOOP)
extern void beat_execute_plan(SPIPlanPtr plan, Datum *values, const char *nulls,
							  int expected, int flags);
extern void beat_spi_connect(void);
extern void beat_spi_finish(void);
extern void beat_require(FunctionCallInfo fcinfo, int argno, const char *name);
extern char *beat_check_name(text *t, const char *what);
extern void beat_check_interval(Interval *iv, const char *what, bool zero_ok);
extern void beat_check_interval_max(Interval *iv, const Interval *max, const char *what,
									const char *max_text);
extern void beat_check_range(int64 value, int64 lo, int64 hi, const char *what);
extern int	beat_cmp_int64(const void *a, const void *b);

/*
 * util.c: one column of a batch statement, a value or NULL per row, passed
 * to the statement as an array that unnest() turns back into rows.
 */
typedef struct BeatColumn
{
	Datum	   *v;
	bool	   *nulls;
	Oid			typid;
} BeatColumn;

extern Datum beat_make_array(Datum *values, bool *nulls, int n, Oid typid);
extern BeatColumn beat_column(int n, Oid typid);
extern void beat_column_set(BeatColumn *c, int i, Datum v, bool isnull);
extern void beat_column_text(BeatColumn *c, int i, const char *s);
extern Datum beat_column_array(const BeatColumn *c, int n);

/* The states in which a task still has work ahead of it, and the final ones. */
#define LIVE_STATES "('pending', 'scheduled', 'running', 'failed')"
#define DONE_STATES "('succeeded', 'dead', 'cancelled')"

/*
 * "The task is running and this worker holds its lease", over beat.task t,
 * for statements that name their tasks by id.  The table's CHECK makes a
 * row with a lease_owner and a lease_expires_at a running one, so this is
 * state = 'running' AND t.lease_owner = owner, written so that no index
 * but the primary key serves it.  Said with state = 'running', the
 * planner may read all of task_lease_idx (whose predicate that is) and
 * filter by id instead: statistics taken when few tasks ran make that
 * index look tiny, and every complete then read every running task.
 */
#define HELD_BY(owner) \
	"t.lease_owner = " owner " AND t.lease_expires_at IS NOT NULL"

/*
 * The retry delay in SQL, over beat.task t and beat.flow f: full jitter,
 * a uniform random time between zero and min(cap, base * 2^(attempts - 1)),
 * or the provider's retry_after when that is longer.  The exponent stops at
 * 40, long past any sane cap.
 */
#define BACKOFF_SQL(retry_after) \
	"greatest(coalesce(" retry_after ", interval '0')," \
	" random() * least(f.backoff_cap," \
	"   f.backoff_base * power(2, least(t.attempts - 1, 40))))"

/* Limits that the SQL API checks and documents. */
#define BEAT_PRIORITY_MIN		(-1000)
#define BEAT_PRIORITY_MAX		1000
#define BEAT_MAX_ATTEMPTS_MAX	1000
#define BEAT_MAX_TASKS_MAX		10000
#define BEAT_NAME_MAX			200

#endif							/* PG_BEAT_H */
