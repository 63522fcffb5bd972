/*-------------------------------------------------------------------------
 *
 * limiter.c
 *		Rate limits and quotas kept in shared memory: beat.acquire, peek,
 *		refund, penalize, beat.limiter_status, and the C entry point the
 *		flow workers call before each transfer.
 *
 * Limits are defined in beat.rate_limit (beat.set_limit, beat.drop_limit).
 * A limit's name is a key or a key template: 'global:day' matches only
 * itself; 'handle:{{handle}}' matches 'handle:<anything>' with one bucket
 * per distinct key.  A placeholder stands for one ':'-separated segment.
 * Each backend caches the definitions and reloads them (through SPI, so
 * inside a transaction) when a committed change bumps defs_generation.
 *
 * A rate (kind 'rate') is a GCRA: emission interval T = period / limit,
 * tolerance tau = burst * T, so any window of one period admits at most
 * limit + burst, evenly spread.  Times are kept scaled by the limit
 * (microseconds * limit, in int128), which makes T = period exactly.  A
 * quota (kind 'quota') counts uses in the current calendar window (hour,
 * day, week, month) of its time zone and starts at zero in the next.
 *
 * Locking.  Buckets live in one shared hash table, partitioned 16 ways; a
 * partition's spinlock guards which buckets it holds, and each bucket's
 * own spinlock (its mutex) guards its state.  A backend keeps pointers to
 * the buckets it has met: an acquire takes the mutexes of all its keys'
 * buckets in address order, finds each still its key's (or drops the
 * pointer and looks the key up again under its partition lock), decides
 * every key, and charges all of them or none: a few hundred nanoseconds
 * of arithmetic, nothing that can raise an error or wait (a quota's new
 * calendar window is computed with the mutexes released, then the acquire
 * starts over).  The mutex shares its cache line with the state a check
 * writes, so a check moves one line per key between processors.  Dropping
 * idle buckets and taking a snapshot for the quota file take every
 * partition spinlock in order, then one bucket's mutex at a time, after
 * releasing what they held; the file itself is written with the
 * spinlocks released, under the LWLock file_lock.
 *
 * Quotas survive restarts and crashes like sequences do.  A quota admits
 * only up to a "durable mark" that is already in the file
 * pg_stat/pg_beat_limits.state; the backend that would cross it first
 * raises the marks (by about 1% of the limit) and fsyncs the file, under
 * beat_limiter_file_lock.  After a crash each quota restarts at its mark:
 * it never admits more than its limit, and may lose up to the 1% it had
 * reserved.  A smart or fast shutdown writes the exact counts (the
 * launcher does, as it stops).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <sys/stat.h>
#include <unistd.h>

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "common/hashfn.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "portability/instr_time.h"
#include "storage/fd.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "storage/spin.h"
#include "utils/array.h"
#include "utils/arrayaccess.h"
#include "utils/builtins.h"
#include "utils/hsearch.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "pg_beat.h"
#include "limiter.h"

PG_FUNCTION_INFO_V1(beat_acquire);
PG_FUNCTION_INFO_V1(beat_peek);
PG_FUNCTION_INFO_V1(beat_refund);
PG_FUNCTION_INFO_V1(beat_penalize);
PG_FUNCTION_INFO_V1(beat_limiter_status_rows);
PG_FUNCTION_INFO_V1(beat_limits_changed);
PG_FUNCTION_INFO_V1(beat_bench_acquire);
PG_FUNCTION_INFO_V1(beat_bench_acquire_unchecked);
PG_FUNCTION_INFO_V1(beat_set_limit);
PG_FUNCTION_INFO_V1(beat_drop_limit);

#define LIMITER_PARTITIONS	16
#define LIMIT_MAX_PERIOD_DAYS	3653	/* beat.set_limit's longest per: 10 years */
#define LIMIT_MAX_BURST		INT64CONST(1000000000000000)	/* 10^15 */
#define LIMITS_FILE			"pg_stat/pg_beat_limits.state"
#define LIMITS_FILE_MAGIC	0x42454154	/* "BEAT" */
#define LIMITS_FILE_VERSION	2

typedef enum LimitKind
{
	LIMIT_RATE = 1,
	LIMIT_QUOTA = 2
} LimitKind;

typedef enum QuotaWindow
{
	WINDOW_HOUR = 1,
	WINDOW_DAY,
	WINDOW_WEEK,
	WINDOW_MONTH
} QuotaWindow;

/* One limit definition, as a backend caches it. */
typedef struct LimitDef
{
	char		name[BEAT_KEY_MAX];
	LimitKind	kind;
	int64		limit;
	int64		period_us;		/* rate */
	int64		burst;			/* rate */
	QuotaWindow window;			/* quota */
	char		time_zone[64];	/* quota */
	int64		created;		/* created_at: a dropped and re-created limit starts afresh */
	bool		is_template;
} LimitDef;

/*
 * A cache line of x86-64 and of most ARM processors.  PG_CACHE_LINE_SIZE,
 * 128, is an upper bound; shared memory is aligned to it, so to this too.
 */
#define BUCKET_LINE			64

/*
 * One bucket, keyed by the concrete key.  Its mutex guards every field
 * but the key.  The mutex and what a check writes share one cache line,
 * so that a check moves one line per key between processors: dynahash
 * puts an entry 16 bytes into its element, elements are a whole number
 * of cache lines, and their memory is cache-line aligned (asserted below).
 */
typedef struct LimitBucket
{
	char		key[BEAT_KEY_MAX];	/* hash key: must be first */
	/* read by every check; written when the definition changes */
	int64		limit_created;	/* the definition's created_at */
	int64		limit;			/* the settings the state was computed with */
	int64		period_us;
	int64		burst;
	int64		durable_mark;	/* quota: the count the file allows */
	LimitKind	kind;
	QuotaWindow window;
	union
	{
		struct
		{
			slock_t		mutex;
			bool		live;	/* in the table: false once dropped */
			uint8		fresh;	/* made, not yet set up for its limit: 1, or
								 * 2 once a make_room pass has seen it so */
			uint32		magic;	/* BUCKET_MAGIC: the mutex was initialized */
			int128		tat;	/* rate: theoretical arrival time, us * limit */
			int64		not_before; /* beat.penalize: nothing before this (us) */
			int64		used;	/* quota: uses in the window */
			int64		window_start;	/* quota: the current window, [start, end) */
			int64		window_end;
		};
		char		line[BUCKET_LINE];
	};
	char		limit_name[BEAT_KEY_MAX];	/* for the status view and the file */
} LimitBucket;

#define BUCKET_MAGIC		0x6265617a

#if SIZEOF_VOID_P == 8			/* a 32-bit build works, less well laid out */
StaticAssertDecl((MAXALIGN(sizeof(HASHELEMENT)) + offsetof(LimitBucket, line)) %
				 BUCKET_LINE == 0,
				 "a bucket's mutex must start a cache line");
StaticAssertDecl((MAXALIGN(sizeof(HASHELEMENT)) + sizeof(LimitBucket)) %
				 BUCKET_LINE == 0,
				 "a bucket's element must be whole cache lines");
#endif

/*
 * A quota bucket in LIMITS_FILE (version 2): the layout buckets had in
 * memory when the file was introduced, kept so that files written by
 * earlier builds still load.
 */
typedef struct LimitFileEntry
{
	char		key[BEAT_KEY_MAX];
	char		limit_name[BEAT_KEY_MAX];
	int64		limit_created;
	LimitKind	kind;
	int64		limit;
	int64		period_us;
	int64		burst;
	QuotaWindow window;
	int128		tat;
	int64		not_before;
	int64		window_start;
	int64		window_end;
	int64		used;
	int64		durable_mark;
} LimitFileEntry;

/* the fields of an entry besides its key and limit name, as a bucket has them */
#define LIMIT_FILE_FIELDS(X) \
	X(limit_created) X(kind) X(limit) X(period_us) X(burst) X(window) \
	X(tat) X(not_before) X(window_start) X(window_end) X(used) X(durable_mark)

#if SIZEOF_VOID_P == 8
/* what earlier builds of x86-64 and ARM64 wrote: a change loses every quota */
StaticAssertDecl(sizeof(LimitFileEntry) == 360 &&
				 offsetof(LimitFileEntry, tat) == 304 &&
				 offsetof(LimitFileEntry, durable_mark) == 352,
				 "the quota file's entries must keep their layout");
#endif

/* What was decided for one key. */
typedef struct Decision
{
	bool		allowed;
	int64		retry_us;		/* when refused: wait this long */
	int64		remaining;		/* units admissible right after */
	int64		reset_us;		/* until the bucket is whole again */
} Decision;

/* The limiter's shared state. */
/* A spinlock alone on its cache line. */
typedef union PaddedSpin
{
	slock_t		lock;
	char		pad[PG_CACHE_LINE_SIZE];
} PaddedSpin;

typedef struct LimiterShared
{
	pg_atomic_uint32 defs_generation;	/* read by every check */
	int			max_keys;
	LWLock	   *file_lock;		/* serializes writes of LIMITS_FILE */
	/* the rest of this cache line: the locks taken by every check are elsewhere */
	char		pad[PG_CACHE_LINE_SIZE - sizeof(pg_atomic_uint32) - sizeof(int) -
					sizeof(LWLock *)];
	PaddedSpin	locks[LIMITER_PARTITIONS];	/* partition locks */
} LimiterShared;

int			beat_limiter_max_keys = 10000;
char	   *beat_limiter_clock = NULL;

static LimiterShared *limiter = NULL;
static HTAB *buckets = NULL;

/* This backend's copy of the definitions. */
static LimitDef *defs = NULL;
static int	ndefs = 0;
static uint32 defs_generation = 0;
static bool defs_loaded = false;
static bool limits_changed = false;	/* this transaction changed limits */
static int64 clock_override = 0;	/* beat.limiter_clock, 0 = real time */

static SPIPlanPtr plan_defs = NULL;

static void lock_all(void);
static void unlock_all(void);

/* The limiter's share of shared memory. */
Size
beat_limiter_shmem_size(void)
{
	return add_size(MAXALIGN(sizeof(LimiterShared)),
					hash_estimate_size(beat_limiter_max_keys, sizeof(LimitBucket)));
}

/* Ask for the limiter's locks (from the shmem request hook). */
void
beat_limiter_shmem_request(void)
{
	RequestNamedLWLockTranche("pg_beat limiter", 1);
}

/* Read the quota file into fresh buckets (postmaster, at startup). */
static void
load_limits_file(void)
{
	FILE	   *f = AllocateFile(LIMITS_FILE, PG_BINARY_R);
	uint32		header[2];
	int32		count;

	if (f == NULL)
	{
		if (errno != ENOENT)
			ereport(LOG,
					(errcode_for_file_access(),
					 errmsg("pg_beat: could not read \"%s\": %m", LIMITS_FILE)));
		return;
	}
	if (fread(header, sizeof(header), 1, f) != 1 ||
		header[0] != LIMITS_FILE_MAGIC || header[1] != LIMITS_FILE_VERSION ||
		fread(&count, sizeof(count), 1, f) != 1)
	{
		ereport(LOG, (errmsg("pg_beat: ignoring \"%s\": not a quota file of this version",
							 LIMITS_FILE)));
		FreeFile(f);
		return;
	}
	for (int i = 0; i < count; i++)
	{
		LimitFileEntry b;
		LimitBucket *e;
		bool		found;

		if (fread(&b, sizeof(b), 1, f) != 1)
			break;
		/* only what this code writes: a damaged entry must not crash a check */
		if (memchr(b.key, '\0', BEAT_KEY_MAX) == NULL ||
			memchr(b.limit_name, '\0', BEAT_KEY_MAX) == NULL ||
			b.kind != LIMIT_QUOTA || b.limit <= 0 ||
			b.window < WINDOW_HOUR || b.window > WINDOW_MONTH ||
			b.window_end <= b.window_start || b.durable_mark < 0)
		{
			ereport(LOG, (errmsg("pg_beat: ignoring a damaged entry of \"%s\"", LIMITS_FILE)));
			continue;
		}
		if (hash_get_num_entries(buckets) >= limiter->max_keys)
		{
			ereport(LOG,
					(errmsg("pg_beat: \"%s\" holds more quota keys than beat.limiter_max_keys (%d); the rest start afresh",
							LIMITS_FILE, limiter->max_keys)));
			break;
		}
		e = hash_search(buckets, b.key, HASH_ENTER_NULL, &found);
		if (e == NULL)
			break;
		if (e->magic != BUCKET_MAGIC)
		{
			SpinLockInit(&e->mutex);
			e->magic = BUCKET_MAGIC;
		}
		strlcpy(e->limit_name, b.limit_name, BEAT_KEY_MAX);
#define FROM_FILE(f) e->f = b.f;
		LIMIT_FILE_FIELDS(FROM_FILE)
#undef FROM_FILE
		/* whatever the file says was used or reserved, counts as used */
		e->used = e->durable_mark;
		e->fresh = 0;
		e->live = true;
	}
	FreeFile(f);
}

/*
 * Write quota buckets (a snapshot: the spinlocks are not held) to the
 * file, durably, with the durable_mark each carries.  The caller holds
 * file_lock.
 */
static void
write_limits_file(const LimitBucket *snap, int32 count)
{
	char		tmp[MAXPGPATH];
	FILE	   *f;
	uint32		header[2] = {LIMITS_FILE_MAGIC, LIMITS_FILE_VERSION};
	bool		ok;

	snprintf(tmp, sizeof(tmp), "%s.tmp", LIMITS_FILE);
	f = AllocateFile(tmp, PG_BINARY_W);
	if (f == NULL)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("pg_beat: could not write \"%s\": %m", tmp)));
	ok = fwrite(header, sizeof(header), 1, f) == 1 &&
		fwrite(&count, sizeof(count), 1, f) == 1;
	for (int i = 0; ok && i < count; i++)
	{
		const LimitBucket *b = &snap[i];
		LimitFileEntry e;

		memset(&e, 0, sizeof(e));
		strlcpy(e.key, b->key, BEAT_KEY_MAX);
		strlcpy(e.limit_name, b->limit_name, BEAT_KEY_MAX);
#define TO_FILE(f) e.f = b->f;
		LIMIT_FILE_FIELDS(TO_FILE)
#undef TO_FILE
		ok = fwrite(&e, sizeof(e), 1, f) == 1;
	}
	if (!ok || fflush(f) != 0 || pg_fsync(fileno(f)) != 0)
	{
		int			save_errno = errno;

		FreeFile(f);
		unlink(tmp);
		errno = save_errno;
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("pg_beat: could not write \"%s\": %m", tmp)));
	}
	if (FreeFile(f) != 0)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("pg_beat: could not write \"%s\": %m", tmp)));
	durable_rename(tmp, LIMITS_FILE, ERROR);
}

/*
 * Copy the buckets (only the quotas, when quotas_only) into *snap, palloc'd
 * here (huge if need be); return how many.  Takes every partition lock,
 * and each bucket's mutex in turn; the caller holds none.  A bucket made
 * but not yet set up for its limit is left out.  The table can hold more
 * than max_keys (two backends in different partitions may both take the
 * last free key, and the quota file loads whatever it holds), so the
 * buffer is sized by the count under the locks, and allocated without
 * them.  With exact, the copies carry their counts as marks, and the
 * marks in memory come down to the counts too.
 */
static int32
snapshot(LimitBucket **snap, bool quotas_only, bool exact)
{
	HASH_SEQ_STATUS seq;
	LimitBucket *b;
	long		room = 0;
	int32		n = 0;

	*snap = NULL;
	for (;;)
	{
		lock_all();
		if (*snap != NULL && hash_get_num_entries(buckets) <= room)
			break;
		room = hash_get_num_entries(buckets) + 64;
		unlock_all();
		if (*snap != NULL)
			pfree(*snap);
		*snap = MemoryContextAllocHuge(CurrentMemoryContext, sizeof(LimitBucket) * room);
	}
	hash_seq_init(&seq, buckets);
	while ((b = hash_seq_search(&seq)) != NULL)
	{
		SpinLockAcquire(&b->mutex);
		if (!b->fresh && (!quotas_only || b->kind == LIMIT_QUOTA))
		{
			if (exact)
				b->durable_mark = b->used;
			memcpy(&(*snap)[n++], b, sizeof(LimitBucket));
		}
		SpinLockRelease(&b->mutex);
	}
	unlock_all();
	return n;
}

/*
 * Save the exact quota counts (the launcher does it when it stops on
 * SIGTERM, so at every smart or fast shutdown, never at an immediate one or
 * a crash, when shared memory may be half-written).  The durable marks in
 * memory come down to the counts written, so that what is admitted after
 * this raises them in the file again.
 */
void
beat_limiter_save(void)
{
	LimitBucket *snap;
	int32		n;

	if (limiter == NULL)
		return;

	/*
	 * Hold file_lock until the file is written: an acquire that needs a
	 * mark above the counts we write waits for it, then raises it again.
	 */
	LWLockAcquire(limiter->file_lock, LW_EXCLUSIVE);
	n = snapshot(&snap, true, true);
	PG_TRY();
	{
		write_limits_file(snap, n);
	}
	PG_FINALLY();
	{
		LWLockRelease(limiter->file_lock);
	}
	PG_END_TRY();
	pfree(snap);
}

/* Allocate or attach to the limiter's shared memory (shmem startup hook). */
void
beat_limiter_shmem_startup(void)
{
	bool		found;
	HASHCTL		info;

	limiter = ShmemInitStruct("pg_beat limiter", sizeof(LimiterShared), &found);
	if (!found)
	{
		pg_atomic_init_u32(&limiter->defs_generation, 1);
		limiter->max_keys = beat_limiter_max_keys;
		limiter->file_lock = &(GetNamedLWLockTranche("pg_beat limiter"))->lock;
		for (int i = 0; i < LIMITER_PARTITIONS; i++)
			SpinLockInit(&limiter->locks[i].lock);
	}

	memset(&info, 0, sizeof(info));
	info.keysize = BEAT_KEY_MAX;
	info.entrysize = sizeof(LimitBucket);
	info.num_partitions = LIMITER_PARTITIONS;
	buckets = ShmemInitHash("pg_beat limiter buckets",
							beat_limiter_max_keys, beat_limiter_max_keys,
							&info, HASH_ELEM | HASH_STRINGS | HASH_PARTITION);

	if (!IsUnderPostmaster && !found)
		load_limits_file();
}

/* The limiter's "now" in microseconds: real time, or beat.limiter_clock. */
static int64
limiter_now(void)
{
	return clock_override != 0 ? clock_override : (int64) GetCurrentTimestamp();
}

/* GUC check hook of beat.limiter_clock: '' or a timestamptz. */
bool
beat_limiter_clock_check(char **newval, void **extra, GucSource source)
{
	int64	   *v;

	if (*newval == NULL || (*newval)[0] == '\0')
	{
		v = malloc(sizeof(int64));
		if (v == NULL)
			return false;
		*v = 0;
		*extra = v;
		return true;
	}
	v = malloc(sizeof(int64));
	if (v == NULL)
		return false;
	PG_TRY();
	{
		*v = DatumGetTimestampTz(DirectFunctionCall3(timestamptz_in,
													 CStringGetDatum(*newval),
													 ObjectIdGetDatum(InvalidOid),
													 Int32GetDatum(-1)));
	}
	PG_CATCH();
	{
		FlushErrorState();
		free(v);
		GUC_check_errdetail("beat.limiter_clock must be empty or a timestamp.");
		return false;
	}
	PG_END_TRY();
	*extra = v;
	return true;
}

/* GUC assign hook of beat.limiter_clock. */
void
beat_limiter_clock_assign(const char *newval, void *extra)
{
	clock_override = extra ? *(int64 *) extra : 0;
}

/* Does key match the definition's name (a template: one segment each)? */
static bool
def_matches(const LimitDef *d, const char *key)
{
	const char *n = d->name;
	const char *k = key;

	if (!d->is_template)
		return strcmp(d->name, key) == 0;
	while (*n)
	{
		const char *nend = strchr(n, ':');
		const char *kend = strchr(k, ':');
		size_t		nlen = nend ? (size_t) (nend - n) : strlen(n);
		size_t		klen = kend ? (size_t) (kend - k) : strlen(k);
		bool		placeholder = nlen >= 4 && strncmp(n, "{{", 2) == 0 &&
			strncmp(n + nlen - 2, "}}", 2) == 0;

		if ((nend == NULL) != (kend == NULL))
			return false;
		if (placeholder ? klen == 0 : (nlen != klen || strncmp(n, k, nlen) != 0))
			return false;
		if (nend == NULL)
			return true;
		n = nend + 1;
		k = kend + 1;
	}
	return *k == '\0';
}

/* The definition for a key: an exact name first, else a matching template. */
static const LimitDef *
find_def(const char *key)
{
	const LimitDef *match = NULL;

	for (int i = 0; i < ndefs; i++)
	{
		if (!defs[i].is_template && strcmp(defs[i].name, key) == 0)
			return &defs[i];
		if (match == NULL && defs[i].is_template && def_matches(&defs[i], key))
			match = &defs[i];
	}
	return match;
}

/*
 * Reload the definitions if a committed change made them stale.  Needs a
 * transaction (it reads beat.rate_limit through SPI), and reads with the
 * latest snapshot, not the transaction's: under REPEATABLE READ the
 * transaction's would miss the change whose generation it has just read,
 * and keep the old definitions under the new generation.
 */
void
beat_limiter_refresh(void)
{
	uint32		gen = pg_atomic_read_u32(&limiter->defs_generation);
	bool		isnull;
	LimitDef   *fresh;
	int			n;

	if (defs_loaded && gen == defs_generation)
		return;

	beat_spi_connect();
	beat_prepare(&plan_defs,
				 "SELECT name, kind, \"limit\","
				 " (extract(epoch FROM coalesce(period, '0')) * 1000000)::bigint,"
				 " burst, coalesce(quota_window, ''), time_zone, created_at"
				 " FROM beat.rate_limit ORDER BY name",
				 0, NULL);
	if (SPI_execute_snapshot(plan_defs, NULL, NULL, GetLatestSnapshot(),
							 InvalidSnapshot, true, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "pg_beat: could not read beat.rate_limit");
	n = (int) SPI_processed;
	fresh = MemoryContextAllocZero(TopMemoryContext, sizeof(LimitDef) * Max(n, 1));
	for (int i = 0; i < n; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		LimitDef   *d = &fresh[i];
		char	   *kind = TextDatumGetCString(SPI_getbinval(tup, desc, 2, &isnull));
		char	   *window = TextDatumGetCString(SPI_getbinval(tup, desc, 6, &isnull));

		strlcpy(d->name, TextDatumGetCString(SPI_getbinval(tup, desc, 1, &isnull)),
				BEAT_KEY_MAX);
		d->kind = strcmp(kind, "quota") == 0 ? LIMIT_QUOTA : LIMIT_RATE;
		d->limit = DatumGetInt64(SPI_getbinval(tup, desc, 3, &isnull));
		d->period_us = DatumGetInt64(SPI_getbinval(tup, desc, 4, &isnull));
		d->burst = DatumGetInt64(SPI_getbinval(tup, desc, 5, &isnull));
		d->window = strcmp(window, "hour") == 0 ? WINDOW_HOUR :
			strcmp(window, "week") == 0 ? WINDOW_WEEK :
			strcmp(window, "month") == 0 ? WINDOW_MONTH : WINDOW_DAY;
		strlcpy(d->time_zone, TextDatumGetCString(SPI_getbinval(tup, desc, 7, &isnull)),
				sizeof(d->time_zone));
		d->created = DatumGetTimestampTz(SPI_getbinval(tup, desc, 8, &isnull));
		d->is_template = strstr(d->name, "{{") != NULL;
	}
	beat_spi_finish();

	if (defs)
		pfree(defs);
	defs = fresh;
	ndefs = n;
	defs_generation = gen;
	defs_loaded = true;
}

/* The start and end of the calendar window holding t, in the def's zone. */
static void
quota_window(const LimitDef *d, int64 t, int64 *start, int64 *end)
{
	static const char *const unit[] = {NULL, "hour", "day", "week", "month"};
	/* longer than any such window, shorter than two: lands in the next */
	static const int64 span[] = {0, 90 * USECS_PER_MINUTE, 26 * USECS_PER_HOUR,
	(7 * 24 + 12) * USECS_PER_HOUR, 32 * USECS_PER_DAY};
	Datum		u = CStringGetTextDatum(unit[d->window]);
	Datum		zone = CStringGetTextDatum(d->time_zone);

#define TRUNC(x) DatumGetTimestampTz(DirectFunctionCall3(timestamptz_trunc_zone, u, \
														 TimestampTzGetDatum(x), zone))
	*start = TRUNC(t);

	/*
	 * A boundary in an hour the zone lives twice (clocks going back) is
	 * its later instant, which can be after t: t, in the first of the two
	 * hours, then belongs to the window before, which ends there.  Half a
	 * span back is well inside that window.
	 */
	if (*start > t)
		*start = TRUNC(t - span[d->window] / 2);
	*end = TRUNC(*start + span[d->window]);
#undef TRUNC
	pfree(DatumGetPointer(u));
	pfree(DatumGetPointer(zone));

	/* never a window without t in it: a check would ask for one for ever */
	*start = Min(*start, t);
	*end = Max(*end, t + 1);
}

/* Ceiling of a / b for a >= 0, b > 0; past what 64 bits hold, the most. */
static int64
ceil_div(int128 a, int64 b)
{
	int128		q = (a + b - 1) / b;

	return q > PG_INT64_MAX ? PG_INT64_MAX : (int64) q;
}

/*
 * Bring a bucket in line with its definition and the time: a new bucket
 * starts whole; changed settings take effect at once (a rate keeps the
 * units it owes, paid at the new rate; a quota keeps its count); a quota
 * in a new window starts at zero.  Runs under the bucket's mutex: a quota
 * that needs its window for now gets it in window ([start, end)); without one,
 * or with one that does not hold now, it returns false and the caller
 * computes it with the lock released.
 */
static bool
bucket_sync(LimitBucket *b, const LimitDef *d, int64 now, const int64 *window)
{
	if (b->fresh || b->kind != d->kind || b->limit_created != d->created ||
		strcmp(b->limit_name, d->name) != 0)
	{
		b->fresh = 0;
		b->durable_mark = 0;
		b->not_before = 0;
		b->used = 0;
		strlcpy(b->limit_name, d->name, BEAT_KEY_MAX);
		b->limit_created = d->created;
		b->kind = d->kind;
		b->limit = d->limit;
		b->period_us = d->period_us;
		b->burst = d->burst;
		b->window = d->window;
		b->tat = (int128) now * d->limit;
		b->window_start = b->window_end = 0;
	}
	/* store only on a change: a check must not dirty a line it only reads */
	if (b->limit != d->limit || b->period_us != d->period_us || b->burst != d->burst)
	{
		if (b->kind == LIMIT_RATE && (b->limit != d->limit || b->period_us != d->period_us))
		{
			/*
			 * Keep the units still owed, and pay them at the new rate: what
			 * was tat - now at T_old becomes (tat - now) * T_new / T_old,
			 * rounded up.  Scaled: tat' = now * L' + (tat - now * L) * P' / P.
			 */
			int128		t_old = (int128) now * b->limit;
			int128		owed = b->tat > t_old ? b->tat - t_old : 0;

			b->tat = (int128) now * d->limit +
				(owed * d->period_us + b->period_us - 1) / b->period_us;
		}
		b->limit = d->limit;
		b->period_us = d->period_us;
		b->burst = d->burst;
	}
	if (b->kind == LIMIT_QUOTA && (b->window != d->window || now >= b->window_end ||
								   now < b->window_start))
	{
		/* a window computed at an earlier pass may be over by now */
		if (window == NULL || now < window[0] || now >= window[1])
			return false;
		if (window[0] != b->window_start || b->window != d->window)
		{
			b->used = 0;
			b->durable_mark = 0;
		}
		b->window = d->window;
		b->window_start = window[0];
		b->window_end = window[1];
	}
	return true;
}

/* Decide cost for one bucket at now, without changing it. */
static Decision
bucket_decide(const LimitBucket *b, int64 cost, int64 now)
{
	Decision	r;

	memset(&r, 0, sizeof(r));
	if (b->kind == LIMIT_RATE)
	{
		int128		t = (int128) now * b->limit;
		int128		T = b->period_us;
		int128		tau = (int128) b->burst * b->period_us;
		int128		base = b->tat > t ? b->tat : t;
		int128		new_tat = base + cost * T;

		r.allowed = new_tat - t <= tau + T;
		if (r.allowed)
		{
			r.remaining = (int64) ((tau + T - (new_tat - t)) / T);
			r.reset_us = ceil_div(new_tat - t, b->limit);
		}
		else
		{
			r.retry_us = ceil_div(base + (cost - 1) * T - tau - t, b->limit);
			r.remaining = (int64) Max((tau + T - (base - t)) / T, 0);
			r.reset_us = ceil_div(base - t, b->limit);
		}
	}
	else
	{
		r.allowed = b->used + cost <= b->limit;
		/* a limit lowered below what was used leaves nothing, not less */
		r.remaining = Max(b->limit - b->used - (r.allowed ? cost : 0), 0);
		r.reset_us = b->window_end - now;
		if (!r.allowed)
			r.retry_us = b->window_end - now;
	}
	if (now < b->not_before)
	{
		r.allowed = false;
		r.retry_us = Max(r.retry_us, b->not_before - now);
	}
	return r;
}

/* Charge cost to a bucket (the decision said yes). */
static void
bucket_charge(LimitBucket *b, int64 cost, int64 now)
{
	if (b->kind == LIMIT_RATE)
	{
		int128		t = (int128) now * b->limit;

		b->tat = (b->tat > t ? b->tat : t) + cost * (int128) b->period_us;
	}
	else
		b->used += cost;
}

/* Give cost back to a bucket (a call that was never made). */
static void
bucket_refund(LimitBucket *b, int64 cost, int64 now)
{
	if (b->kind == LIMIT_RATE)
	{
		int128		t = (int128) now * b->limit;

		b->tat -= cost * (int128) b->period_us;
		if (b->tat < t)
			b->tat = t;
	}
	else
		b->used = Max(b->used - cost, 0);
}

/* Is the bucket as a fresh one would be, so that dropping it loses nothing? */
static bool
bucket_idle(const LimitBucket *b, int64 now)
{
	if (now < b->not_before)
		return false;
	if (b->kind == LIMIT_RATE)
		return b->tat <= (int128) now * b->limit;
	return b->used == 0 || now >= b->window_end;
}

/* Take every partition spinlock, in order. */
static void
lock_all(void)
{
	for (int i = 0; i < LIMITER_PARTITIONS; i++)
		SpinLockAcquire(&limiter->locks[i].lock);
}

/* Release every partition spinlock. */
static void
unlock_all(void)
{
	for (int i = LIMITER_PARTITIONS - 1; i >= 0; i--)
		SpinLockRelease(&limiter->locks[i].lock);
}

/*
 * Make room for need new keys by dropping idle buckets; false if there
 * is not enough.  Takes every partition lock; the caller holds none.
 */
static bool
make_room(int need, int64 now)
{
	HASH_SEQ_STATUS seq;
	LimitBucket *b;
	long		room;
	bool		ok;

	lock_all();
	room = limiter->max_keys - hash_get_num_entries(buckets);
	if (room < need)
	{
		/* drop up to a tenth of the table, so this stays rare */
		long		goal = Max(need - room, limiter->max_keys / 10);

		/* a scan that runs to its end ends itself; one we stop, we end */
		hash_seq_init(&seq, buckets);
		while ((b = hash_seq_search(&seq)) != NULL)
		{
			bool		idle;

			/*
			 * A backend may still point at it: it finds it dead.  One just
			 * made is about to be set up by the call that made it: it goes
			 * only if a pass has seen it so before (that call failed).
			 */
			SpinLockAcquire(&b->mutex);
			if (b->fresh == 1)
			{
				b->fresh = 2;
				idle = false;
			}
			else
				idle = b->fresh == 2 || bucket_idle(b, now);
			if (idle)
				b->live = false;
			SpinLockRelease(&b->mutex);
			if (!idle)
				continue;
			hash_search(buckets, b->key, HASH_REMOVE, NULL);
			if (--goal == 0)
			{
				hash_seq_term(&seq);
				break;
			}
		}
		room = limiter->max_keys - hash_get_num_entries(buckets);
	}
	ok = room >= need;
	unlock_all();
	return ok;
}

/*
 * Raise the durable mark of every quota bucket that has less than cost
 * (or one step of 1% of its limit) left before it, to one step beyond
 * that; write the file, durably.  The caller holds no lock.
 */
static void
raise_marks(int64 cost)
{
	LimitBucket *snap;
	int32		n;

	LWLockAcquire(limiter->file_lock, LW_EXCLUSIVE);
	n = snapshot(&snap, true, false);

	/* the new marks, in the copies */
	for (int i = 0; i < n; i++)
	{
		LimitBucket *b = &snap[i];
		int64		step = Max(b->limit / 100, 1);

		if (b->durable_mark < Min(b->used + Max(cost, step), b->limit))
			b->durable_mark = Min(b->used + Max(cost, step) + step, b->limit);
	}
	PG_TRY();
	{
		write_limits_file(snap, n);

		/*
		 * Durable now: let memory use them (unless a window has rolled over
		 * or the limit was made anew), before file_lock goes, so that no
		 * other writer's file can hold lower marks than memory then has.
		 */
		lock_all();
		for (int i = 0; i < n; i++)
		{
			LimitBucket *b = hash_search(buckets, snap[i].key, HASH_FIND, NULL);

			if (b == NULL)
				continue;
			SpinLockAcquire(&b->mutex);
			if (b->kind == LIMIT_QUOTA && b->window_start == snap[i].window_start &&
				b->limit_created == snap[i].limit_created &&
				b->durable_mark < snap[i].durable_mark)
				b->durable_mark = snap[i].durable_mark;
			SpinLockRelease(&b->mutex);
		}
		unlock_all();
	}
	PG_FINALLY();
	{
		LWLockRelease(limiter->file_lock);
	}
	PG_END_TRY();
	pfree(snap);
}


/*
 * This backend's pointers to the buckets it has met, by key: a check goes
 * to its buckets without the partition locks, and validates each under
 * its mutex (a bucket dropped since is dead, or is another key's).
 */
#define BUCKET_CACHE_SIZE	64

typedef struct CachedBucket
{
	LimitBucket *b;
	uint32		hash;
	char		key[BEAT_KEY_MAX];
} CachedBucket;

static CachedBucket bucket_cache[BUCKET_CACHE_SIZE];

static LimitBucket *
cache_find(const char *key, uint32 hash)
{
	CachedBucket *c = &bucket_cache[hash % BUCKET_CACHE_SIZE];

	return c->b != NULL && c->hash == hash && strcmp(c->key, key) == 0 ? c->b : NULL;
}

static void
cache_forget(const char *key, uint32 hash)
{
	if (cache_find(key, hash) != NULL)
		bucket_cache[hash % BUCKET_CACHE_SIZE].b = NULL;
}

/*
 * The bucket of key, found or made under its partition lock, and kept in
 * the cache; NULL when the table is full.  A bucket made here is fresh:
 * the first check sets it up for its limit.  Its element may have been a
 * dropped bucket whose mutex another backend, still pointing at it, holds
 * for a moment: the mutex is initialized only in an element never used
 * (shared memory starts zeroed), and taken in any other.
 */
static LimitBucket *
bucket_get(const char *key, uint32 hash)
{
	slock_t    *lock = &limiter->locks[hash % LIMITER_PARTITIONS].lock;
	LimitBucket *b;
	bool		found;

	SpinLockAcquire(lock);
	b = hash_search_with_hash_value(buckets, key, hash, HASH_FIND, &found);
	if (b == NULL && hash_get_num_entries(buckets) < limiter->max_keys)
	{
		b = hash_search_with_hash_value(buckets, key, hash, HASH_ENTER_NULL, &found);
		if (b != NULL)
		{
			if (b->magic != BUCKET_MAGIC)
			{
				SpinLockInit(&b->mutex);
				b->magic = BUCKET_MAGIC;
			}
			SpinLockAcquire(&b->mutex);
			b->fresh = 1;
			b->live = true;
			SpinLockRelease(&b->mutex);
		}
	}
	SpinLockRelease(lock);
	if (b != NULL)
	{
		CachedBucket *c = &bucket_cache[hash % BUCKET_CACHE_SIZE];

		c->b = b;
		c->hash = hash;
		strlcpy(c->key, key, BEAT_KEY_MAX);
	}
	return b;
}

/* Release what lock_buckets below took. */
static void
unlock_buckets(LimitBucket **b, const int *order, int nkeys)
{
	for (int i = nkeys - 1; i >= 0; i--)
		SpinLockRelease(&b[order[i]]->mutex);
}

/*
 * Lock the buckets of keys (met before, found, or made), each mutex once,
 * in address order; each still its key's and brought in line with its
 * definition at *now, which is read under the locks.  b holds this
 * backend's pointers for the keys (NULL: none yet) and is kept up to date;
 * order gets the locking order, for unlock_buckets.  A full table raises,
 * or with error given returns false, nothing locked, with *error set.
 */
static bool
lock_buckets(const char *const *keys, const uint32 *hashes,
			 const LimitDef *const *kdefs, int nkeys, LimitBucket **b,
			 int *order, int64 *now, char **error)
{
	int64		windows[BEAT_MAX_STACKED_KEYS][2];
	bool		have_window[BEAT_MAX_STACKED_KEYS] = {false};

	for (;;)
	{
		bool		dropped[BEAT_MAX_STACKED_KEYS];
		bool		full = false;
		bool		stale = false;
		int			need_window = -1;

		/* the buckets this backend has not met yet, found or made */
		for (int i = 0; i < nkeys && !full; i++)
			if (b[i] == NULL && (b[i] = bucket_get(keys[i], hashes[i])) == NULL)
				full = true;
		if (full)
		{
			bool		room = make_room(nkeys, limiter_now());

			if (!room && error)
			{
				*error = psprintf("too many rate limit keys are in use (beat.limiter_max_keys is %d)",
								  limiter->max_keys);
				return false;
			}
			if (!room)
				ereport(ERROR,
						(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
						 errmsg("too many rate limit keys are in use"),
						 errdetail("All %d keys are busy; none is idle enough to drop.",
								   limiter->max_keys),
						 errhint("Raise beat.limiter_max_keys.")));
			continue;
		}

		/* their mutexes, in address order (at most 16: insertion sort) */
		for (int i = 0; i < nkeys; i++)
		{
			int			j = i;

			for (; j > 0 && b[order[j - 1]] > b[i]; j--)
				order[j] = order[j - 1];
			order[j] = i;
		}

		/*
		 * A pointer met before may lead to a bucket dropped since and made
		 * again for another of these keys: never take a mutex twice.  Look
		 * them all up again.
		 */
		for (int i = 1; i < nkeys && !stale; i++)
			stale = b[order[i]] == b[order[i - 1]];
		if (stale)
		{
			for (int i = 0; i < nkeys; i++)
			{
				cache_forget(keys[i], hashes[i]);
				b[i] = NULL;
			}
			continue;
		}

		for (int i = 0; i < nkeys; i++)
			SpinLockAcquire(&b[order[i]]->mutex);

		/* a bucket dropped since this backend met it is dead, or another key's */
		for (int i = 0; i < nkeys; i++)
		{
			dropped[i] = !b[i]->live || strcmp(b[i]->key, keys[i]) != 0;
			if (dropped[i])
				stale = true;
		}

		*now = limiter_now();
		for (int i = 0; i < nkeys && !stale && need_window < 0; i++)
			if (!bucket_sync(b[i], kdefs[i], *now, have_window[i] ? windows[i] : NULL))
				need_window = i;
		if (!stale && need_window < 0)
			return true;

		unlock_buckets(b, order, nkeys);
		if (stale)
		{
			for (int i = 0; i < nkeys; i++)
				if (dropped[i])
				{
					cache_forget(keys[i], hashes[i]);
					b[i] = NULL;
				}
			continue;
		}
		/* a quota entered a new window: compute it unlocked, start over */
		quota_window(kdefs[need_window], *now, &windows[need_window][0],
					 &windows[need_window][1]);
		have_window[need_window] = true;
	}
}

/*
 * The limiter itself: decide cost for every key at once, and charge all
 * of them (mode BEAT_CHARGE) or none, or only look (BEAT_PEEK), or give
 * back (BEAT_REFUND).  Raises on a key no limit matches, or a cost the
 * limit can never admit.  Needs a transaction when the definitions are
 * stale (see beat_limiter_refresh); the worker refreshes them at claim.
 */
BeatAcquireResult
beat_limiter_apply(const char *const *keys, int nkeys, int64 cost, BeatLimiterMode mode)
{
	return beat_limiter_try(keys, nkeys, cost, mode, NULL);
}

/*
 * The limit key is under, checked for a call of cost: too long a key, no
 * limit matching it, or a cost the limit never admits at once raise, or,
 * when error is given, set *error (palloc'd) and return NULL.
 */
static const LimitDef *
key_def(const char *key, int64 cost, BeatLimiterMode mode, char **error)
{
	const LimitDef *d;
	int64		most;

	if (strlen(key) >= BEAT_KEY_MAX)
	{
		if (error)
		{
			*error = psprintf("rate limit key \"%.40s...\" is too long", key);
			return NULL;
		}
		ereport(ERROR,
				(errcode(ERRCODE_NAME_TOO_LONG),
				 errmsg("rate limit key is too long"),
				 errdetail("Keys have at most %d bytes.", BEAT_KEY_MAX - 1)));
	}
	d = find_def(key);
	if (d == NULL)
	{
		if (error)
		{
			*error = psprintf("no rate limit matches key \"%s\"", key);
			return NULL;
		}
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("no rate limit matches key \"%s\"", key),
				 errhint("Define one with beat.set_limit().")));
	}
	most = d->kind == LIMIT_RATE ? d->burst + 1 : d->limit;
	if (mode != BEAT_REFUND && cost > most)
	{
		if (error)
		{
			*error = psprintf("cost " INT64_FORMAT " is more than limit \"%s\" ever admits at once",
							  cost, d->name);
			return NULL;
		}
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("cost " INT64_FORMAT " is more than limit \"%s\" ever admits at once",
						cost, d->name),
				 errdetail("It admits at most " INT64_FORMAT ".", most),
				 d->kind == LIMIT_RATE ?
				 errhint("A rate admits burst + 1 at once; raise its burst.") : 0));
	}
	return d;
}

/*
 * The same, but when error is not NULL, a key no limit matches, a cost
 * too high or a full table is reported in *error (palloc'd, and refused)
 * instead of raised: the workers fail that one task and go on.
 *
 * A key given twice counts once: the call passes each bucket once (two
 * templates of a flow may fill in to the same key).  The time is read
 * under the buckets' mutexes, on every pass: a caller whose time was read
 * before another's, which then moved a quota into its next window, would
 * otherwise take the bucket back to the window before.
 */
BeatAcquireResult
beat_limiter_try(const char *const *given, int ngiven, int64 cost, BeatLimiterMode mode,
				 char **error)
{
	BeatAcquireResult result;
	const char *keys[BEAT_MAX_STACKED_KEYS];
	int			nkeys = 0;
	const LimitDef *kdefs[BEAT_MAX_STACKED_KEYS];
	uint32		hashes[BEAT_MAX_STACKED_KEYS];
	LimitBucket *b[BEAT_MAX_STACKED_KEYS];
	int64		now;

	memset(&result, 0, sizeof(result));
	result.allowed = true;
	result.remaining = PG_INT64_MAX;
	if (error)
		*error = NULL;
	if (ngiven > BEAT_MAX_STACKED_KEYS)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("at most %d keys can be acquired together", BEAT_MAX_STACKED_KEYS)));
	for (int i = 0; i < ngiven; i++)
	{
		bool		seen = false;

		for (int j = 0; j < nkeys && !seen; j++)
			seen = strcmp(keys[j], given[i]) == 0;
		if (!seen)
			keys[nkeys++] = given[i];
	}

	for (int i = 0; i < nkeys; i++)
	{
		kdefs[i] = key_def(keys[i], cost, mode, error);
		if (kdefs[i] == NULL)
		{
			/* only with error given: nothing is charged */
			result.allowed = false;
			return result;
		}
		hashes[i] = get_hash_value(buckets, keys[i]);
		b[i] = cache_find(keys[i], hashes[i]);
	}

	for (;;)
	{
		int			order[BEAT_MAX_STACKED_KEYS];
		bool		need_mark = false;

		if (!lock_buckets(keys, hashes, kdefs, nkeys, b, order, &now, error))
		{
			result.allowed = false;
			return result;
		}

		memset(&result, 0, sizeof(result));
		result.allowed = true;
		result.remaining = PG_INT64_MAX;
		for (int i = 0; i < nkeys; i++)
		{
			Decision	d = bucket_decide(b[i], cost, now);

			if (!d.allowed && (result.allowed || d.retry_us > result.retry_us))
			{
				result.retry_us = d.retry_us;
				result.blocking_key = keys[i];
			}
			if (!d.allowed)
				result.allowed = false;
			if (d.remaining < result.remaining)
				result.remaining = d.remaining;
			if (d.reset_us > result.reset_us)
				result.reset_us = d.reset_us;
			if (result.allowed && mode == BEAT_CHARGE &&
				b[i]->kind == LIMIT_QUOTA &&
				b[i]->used + cost > b[i]->durable_mark)
				need_mark = true;
		}
		if (mode == BEAT_REFUND)
		{
			for (int i = 0; i < nkeys; i++)
				bucket_refund(b[i], cost, now);
			result.allowed = true;
			result.blocking_key = NULL;
		}
		else if (result.allowed && mode == BEAT_CHARGE && !need_mark)
			for (int i = 0; i < nkeys; i++)
				bucket_charge(b[i], cost, now);

		unlock_buckets(b, order, nkeys);

		if (need_mark && result.allowed && mode == BEAT_CHARGE)
		{
			raise_marks(cost);
			continue;
		}
		return result;
	}
}

/* At commit of a transaction that changed beat.rate_limit: tell everyone. */
static void
limiter_xact_callback(XactEvent event, void *arg)
{
	/* COMMIT PREPARED runs no callback of ours: it could tell no one */
	if (event == XACT_EVENT_PRE_PREPARE && limits_changed)
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("cannot PREPARE a transaction that changed rate limits"),
				 errdetail("Other sessions learn of a change to beat.rate_limit when the transaction that made it commits.")));
	if (event == XACT_EVENT_COMMIT && limits_changed && limiter != NULL)
		pg_atomic_fetch_add_u32(&limiter->defs_generation, 1);
	if (event == XACT_EVENT_COMMIT || event == XACT_EVENT_ABORT ||
		event == XACT_EVENT_PREPARE)
		limits_changed = false;
}

/* Define the limiter's GUCs and callbacks (from _PG_init). */
void
beat_limiter_init(void)
{
	DefineCustomIntVariable("beat.limiter_max_keys",
							"Most rate limit keys tracked at once.",
							"Sizes shared memory.  When full, idle keys are dropped.",
							&beat_limiter_max_keys,
							10000, 16, 10000000,
							PGC_POSTMASTER,
							0,
							NULL, NULL, NULL);
	DefineCustomStringVariable("beat.limiter_clock",
							   "For tests: the time the limiter uses in this session.",
							   "Empty (the default) means the real time.",
							   &beat_limiter_clock,
							   "",
							   PGC_SUSET,
							   GUC_NOT_IN_SAMPLE,
							   beat_limiter_clock_check, beat_limiter_clock_assign, NULL);
	RegisterXactCallback(limiter_xact_callback, NULL);
}

/*
 * The keys of a text[] argument as C strings in buf, which has room for
 * BEAT_MAX_STACKED_KEYS; raise on NULLs, none, too many or too long.
 * Returns how many.
 */
static int
keys_arg(ArrayType *arr, char (*buf)[BEAT_KEY_MAX], const char **keys)
{
	array_iter	it;
	int			n;

	if (ARR_NDIM(arr) > 1)
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("keys must be a one-dimensional array")));
	n = ArrayGetNItems(ARR_NDIM(arr), ARR_DIMS(arr));
	if (n == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("keys must not be empty")));
	if (n > BEAT_MAX_STACKED_KEYS)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("at most %d keys can be acquired together", BEAT_MAX_STACKED_KEYS)));
	array_iter_setup(&it, (AnyArrayType *) arr);
	for (int i = 0; i < n; i++)
	{
		bool		isnull;
		Datum		d = array_iter_next(&it, &isnull, i, -1, false, TYPALIGN_INT);
		text	   *t;
		int			len;

		if (isnull)
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("keys must not contain nulls")));
		t = DatumGetTextPP(d);
		len = VARSIZE_ANY_EXHDR(t);
		if (len >= BEAT_KEY_MAX)
			ereport(ERROR,
					(errcode(ERRCODE_NAME_TOO_LONG),
					 errmsg("rate limit key is too long"),
					 errdetail("Keys have at most %d bytes.", BEAT_KEY_MAX - 1)));
		memcpy(buf[i], VARDATA_ANY(t), len);
		buf[i][len] = '\0';
		keys[i] = buf[i];
	}
	return n;
}

/* An interval of us microseconds, in *iv. */
static Datum
interval_us(Interval *iv, int64 us)
{
	memset(iv, 0, sizeof(Interval));
	iv->time = us;
	return IntervalPGetDatum(iv);
}

/*
 * The result descriptor of beat.acquire, beat.peek and the benchmark's
 * unchecked acquire (slots 0, 1, 2), blessed once per backend: fn_extra
 * lasts one execution only, and building it was the largest cost of a
 * call after the round trip.  Kept per function oid, so a function
 * created again (by an update) gets its own.
 */
static TupleDesc
acquire_result_desc(FunctionCallInfo fcinfo, int i)
{
	static Oid	fn[3];
	static TupleDesc desc[3];

	if (desc[i] == NULL || fn[i] != fcinfo->flinfo->fn_oid)
	{
		MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);
		TupleDesc	d;

		if (get_call_result_type(fcinfo, NULL, &d) != TYPEFUNC_COMPOSITE)
			elog(ERROR, "pg_beat: acquire must return a record");
		desc[i] = BlessTupleDesc(CreateTupleDescCopy(d));
		fn[i] = fcinfo->flinfo->fn_oid;
		MemoryContextSwitchTo(old);
	}
	return desc[i];
}

/*
 * Shared body of beat.acquire and beat.peek; with check false, everything
 * but the limiter (beat_bench_acquire_unchecked).
 */
static Datum
acquire_sql(FunctionCallInfo fcinfo, BeatLimiterMode mode, bool check)
{
	TupleDesc	tupdesc;
	Datum		values[5];
	bool		nulls[5] = {false, false, false, false, false};
	char		buf[BEAT_MAX_STACKED_KEYS][BEAT_KEY_MAX];
	const char *keys[BEAT_MAX_STACKED_KEYS];
	Interval	retry;
	Interval	reset;
	int			n;
	int64		cost;
	BeatAcquireResult r;

	beat_require(fcinfo, 0, "keys");
	beat_require(fcinfo, 1, "cost");
	cost = PG_GETARG_INT32(1);
	if (cost <= 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("cost must be positive")));
	n = keys_arg(PG_GETARG_ARRAYTYPE_P(0), buf, keys);
	tupdesc = acquire_result_desc(fcinfo, !check ? 2 : mode == BEAT_PEEK ? 1 : 0);

	if (check)
	{
		beat_limiter_refresh();
		r = beat_limiter_apply(keys, n, cost, mode);
	}
	else
	{
		memset(&r, 0, sizeof(r));
		r.allowed = true;
		r.remaining = PG_INT64_MAX;
	}

	values[0] = BoolGetDatum(r.allowed);
	values[1] = interval_us(&retry, r.allowed ? 0 : r.retry_us);
	if (r.allowed)
		nulls[2] = true;
	else
		values[2] = CStringGetTextDatum(r.blocking_key);
	values[3] = Int64GetDatum(r.remaining);
	values[4] = interval_us(&reset, r.reset_us);
	/* heap_form_tuple copies the intervals out of this frame */
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}

/* beat.acquire(keys, cost): admit and charge every key, or none. */
Datum
beat_acquire(PG_FUNCTION_ARGS)
{
	return acquire_sql(fcinfo, BEAT_CHARGE, true);
}

/* beat.peek(keys, cost): what beat.acquire would answer, charging nothing. */
Datum
beat_peek(PG_FUNCTION_ARGS)
{
	return acquire_sql(fcinfo, BEAT_PEEK, true);
}

/*
 * What beat.acquire costs without its limiter: the same arguments read the
 * same way and the same result built, for an admitted call, with no limit
 * checked or charged.  No SQL function of the extension calls it:
 * bench/limiter.sh creates one on its throwaway cluster, to tell in one
 * run what acquire's check costs from what any function of acquire's
 * arguments and result costs.
 */
Datum
beat_bench_acquire_unchecked(PG_FUNCTION_ARGS)
{
	return acquire_sql(fcinfo, BEAT_CHARGE, false);
}

/* beat.refund(keys, cost): give back a charge for a call never made. */
Datum
beat_refund(PG_FUNCTION_ARGS)
{
	char		buf[BEAT_MAX_STACKED_KEYS][BEAT_KEY_MAX];
	const char *keys[BEAT_MAX_STACKED_KEYS];
	int			n;

	beat_require(fcinfo, 0, "keys");
	beat_require(fcinfo, 1, "cost");
	if (PG_GETARG_INT32(1) <= 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("cost must be positive")));
	n = keys_arg(PG_GETARG_ARRAYTYPE_P(0), buf, keys);
	beat_limiter_refresh();
	(void) beat_limiter_apply(keys, n, PG_GETARG_INT32(1), BEAT_REFUND);
	PG_RETURN_VOID();
}

/* beat.penalize(key, until): admit nothing through key before until. */
Datum
beat_penalize(PG_FUNCTION_ARGS)
{
	char	   *key;
	TimestampTz until;
	const LimitDef *d;
	uint32		hash;
	LimitBucket *b;
	int			order;
	int64		now;

	beat_require(fcinfo, 0, "key");
	beat_require(fcinfo, 1, "until");
	key = text_to_cstring(PG_GETARG_TEXT_PP(0));
	until = PG_GETARG_TIMESTAMPTZ(1);
	if (TIMESTAMP_NOT_FINITE(until))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("until must be a finite time")));
	if (strlen(key) >= BEAT_KEY_MAX)
		ereport(ERROR,
				(errcode(ERRCODE_NAME_TOO_LONG),
				 errmsg("rate limit key is too long")));
	beat_limiter_refresh();
	d = find_def(key);
	if (d == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("no rate limit matches key \"%s\"", key),
				 errhint("Define one with beat.set_limit().")));

	hash = get_hash_value(buckets, key);
	b = cache_find(key, hash);
	(void) lock_buckets((const char *const *) &key, &hash, &d, 1, &b, &order, &now, NULL);
	if (until > b->not_before)
		b->not_before = until;
	unlock_buckets(&b, &order, 1);
	PG_RETURN_VOID();
}

/* beat.limiter_status_rows(): every live key and what it admits now. */
Datum
beat_limiter_status_rows(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	LimitBucket *b;
	LimitBucket *snap;
	int			n;
	int64		now = limiter_now();

	InitMaterializedSRF(fcinfo, 0);

	/* copy under the spinlocks, format without them */
	n = snapshot(&snap, false, false);

	for (int i = 0; i < n; i++)
	{
		Datum		values[8];
		bool		nulls[8] = {false, false, false, false, false, false, false, false};
		Decision	d;
		int64		whole_us;

		b = &snap[i];
		d = bucket_decide(b, 1, now);
		/* as the bucket is now, not after a charge */
		if (b->kind == LIMIT_RATE)
		{
			int128		t = (int128) now * b->limit;

			whole_us = b->tat > t ? ceil_div(b->tat - t, b->limit) : 0;
		}
		else
			whole_us = b->used > 0 && now < b->window_end ? b->window_end - now : 0;

		values[0] = CStringGetTextDatum(b->key);
		values[1] = CStringGetTextDatum(b->limit_name);
		values[2] = CStringGetTextDatum(b->kind == LIMIT_RATE ? "rate" : "quota");
		values[3] = Int64GetDatum(b->limit);
		values[4] = Int64GetDatum(d.allowed ? d.remaining + 1 : d.remaining);
		values[5] = TimestampTzGetDatum(now + (d.allowed ? 0 : d.retry_us));
		values[6] = TimestampTzGetDatum(now + whole_us);
		values[7] = TimestampTzGetDatum(b->not_before);
		nulls[7] = b->not_before <= now;
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	pfree(snap);
	return (Datum) 0;
}

/* Trigger on beat.rate_limit: definitions change at commit. */
Datum
beat_limits_changed(PG_FUNCTION_ARGS)
{
	limits_changed = true;
	return PointerGetDatum(NULL);
}

/*
 * beat.bench_acquire(keys, iterations): time the C path a worker calls,
 * in this backend; returns checks per second and the p50 and p99 of one
 * check in nanoseconds.  Charges the keys like beat.acquire does.
 */
Datum
beat_bench_acquire(PG_FUNCTION_ARGS)
{
	TupleDesc	tupdesc;
	char		buf[BEAT_MAX_STACKED_KEYS][BEAT_KEY_MAX];
	const char *keys[BEAT_MAX_STACKED_KEYS];
	int			n;
	int			iterations = PG_GETARG_INT32(1);
	int64	   *ns;
	instr_time	start;
	instr_time	total;
	Datum		values[4];
	bool		nulls[4] = {false, false, false, false};
	int64		admitted = 0;

	beat_require(fcinfo, 0, "keys");
	beat_check_range(iterations, 1, 100000000, "iterations");
	n = keys_arg(PG_GETARG_ARRAYTYPE_P(0), buf, keys);
	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "pg_beat: bench_acquire must return a record");
	beat_limiter_refresh();

	ns = palloc(sizeof(int64) * iterations);
	INSTR_TIME_SET_CURRENT(total);
	for (int i = 0; i < iterations; i++)
	{
		instr_time	t;

		INSTR_TIME_SET_CURRENT(start);
		if (beat_limiter_apply(keys, n, 1, BEAT_CHARGE).allowed)
			admitted++;
		INSTR_TIME_SET_CURRENT(t);
		INSTR_TIME_SUBTRACT(t, start);
		ns[i] = (int64) (INSTR_TIME_GET_DOUBLE(t) * 1e9);
	}
	{
		instr_time	end;

		INSTR_TIME_SET_CURRENT(end);
		INSTR_TIME_SUBTRACT(end, total);
		values[0] = Float8GetDatum(iterations / INSTR_TIME_GET_DOUBLE(end));
	}
	qsort(ns, iterations, sizeof(int64), beat_cmp_int64);
	values[1] = Float8GetDatum((double) ns[iterations / 2]);
	values[2] = Float8GetDatum((double) ns[(int) (iterations * 0.99)]);
	values[3] = Int64GetDatum(admitted);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(BlessTupleDesc(tupdesc),
													  values, nulls)));
}

/* Check a limit name: 1-127 bytes of ':'-separated segments, a segment
 * being literal text without braces or exactly one {{placeholder}}. */
static void
check_limit_name(const char *name)
{
	const char *p = name;
	size_t		len = strlen(name);

	if (len == 0 || len >= BEAT_KEY_MAX)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_NAME),
				 errmsg("a rate limit name must have 1 to %d bytes", BEAT_KEY_MAX - 1)));
	while (p)
	{
		const char *end = strchr(p, ':');
		size_t		n = end ? (size_t) (end - p) : strlen(p);
		bool		placeholder = n >= 5 && strncmp(p, "{{", 2) == 0 &&
			strncmp(p + n - 2, "}}", 2) == 0;
		bool		ok = n > 0;

		for (size_t i = placeholder ? 2 : 0; ok && i < (placeholder ? n - 2 : n); i++)
			if (p[i] == '{' || p[i] == '}')
				ok = false;
		if (!ok)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_NAME),
					 errmsg("invalid rate limit name \"%s\"", name),
					 errdetail("A name is ':'-separated segments, each literal text or one {{placeholder}}, for example \"handle:{{handle}}\".")));
		p = end ? end + 1 : NULL;
	}
}

static SPIPlanPtr plan_set_limit = NULL;
static SPIPlanPtr plan_drop_limit = NULL;
static SPIPlanPtr plan_check_zone = NULL;

/*
 * beat.set_limit(name, limit, per, burst, quota, time_zone): create or
 * change a limit: a rate (limit per interval, plus burst) or a quota
 * (limit per calendar hour, day, week or month in time_zone).
 */
Datum
beat_set_limit(PG_FUNCTION_ARGS)
{
	Oid			argtypes[7] = {TEXTOID, TEXTOID, INT8OID, INTERVALOID, INT8OID,
	TEXTOID, TEXTOID};
	Datum		values[7];
	char		nulls[8] = "       ";
	char	   *name;
	bool		is_quota;
	Datum		row;

	beat_require(fcinfo, 0, "name");
	beat_require(fcinfo, 1, "limit");
	name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	check_limit_name(name);
	if (PG_GETARG_INT64(1) <= 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("limit must be positive")));
	if (PG_ARGISNULL(2) == PG_ARGISNULL(4))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("give either per (a rate) or quota (a calendar window), not both or neither"),
				 errhint("For example beat.set_limit('api:minute', 60, per => '1 minute') or beat.set_limit('api:day', 20000, quota => 'day').")));
	is_quota = !PG_ARGISNULL(4);
	if (!is_quota)
	{
		/* the limiter counts in microseconds, in 64 bits: keep far from the edge */
		Interval	longest = {.day = LIMIT_MAX_PERIOD_DAYS};

		beat_check_interval(PG_GETARG_INTERVAL_P(2), "per", false);
		beat_check_interval_max(PG_GETARG_INTERVAL_P(2), &longest, "per", "10 years");
	}
	else
	{
		char	   *window = text_to_cstring(PG_GETARG_TEXT_PP(4));

		if (strcmp(window, "hour") != 0 && strcmp(window, "day") != 0 &&
			strcmp(window, "week") != 0 && strcmp(window, "month") != 0)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("quota must be hour, day, week or month")));
	}
	if (!PG_ARGISNULL(3) && PG_GETARG_INT64(3) < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("burst must be zero or positive")));
	if (!PG_ARGISNULL(3) && PG_GETARG_INT64(3) > LIMIT_MAX_BURST)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("burst must be at most " INT64_FORMAT, (int64) LIMIT_MAX_BURST)));
	if (is_quota && !PG_ARGISNULL(3) && PG_GETARG_INT64(3) != 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("a quota has no burst")));
	if (!is_quota && !PG_ARGISNULL(5))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("time_zone applies to quotas only")));

	values[0] = PG_GETARG_DATUM(0);
	values[1] = CStringGetTextDatum(is_quota ? "quota" : "rate");
	values[2] = PG_GETARG_DATUM(1);
	values[3] = PG_GETARG_DATUM(2);
	nulls[3] = is_quota ? 'n' : ' ';
	values[4] = PG_ARGISNULL(3) ? Int64GetDatum(0) : PG_GETARG_DATUM(3);
	values[5] = PG_GETARG_DATUM(4);
	nulls[5] = is_quota ? ' ' : 'n';
	values[6] = PG_ARGISNULL(5) ? CStringGetTextDatum("UTC") : PG_GETARG_DATUM(5);

	beat_spi_connect();
	if (is_quota)
	{
		/* an unknown zone fails here, with PostgreSQL's own message */
		beat_prepare(&plan_check_zone,
					 "SELECT date_trunc('day', now(), $1)", 1, &argtypes[6]);
		beat_execute(plan_check_zone, &values[6], " ", SPI_OK_SELECT);
	}
	beat_prepare(&plan_set_limit,
				 "INSERT INTO beat.rate_limit (name, kind, \"limit\", period, burst,"
				 " quota_window, time_zone) VALUES ($1, $2, $3, $4, $5, $6, $7)"
				 " ON CONFLICT (name) DO UPDATE SET kind = EXCLUDED.kind,"
				 " \"limit\" = EXCLUDED.\"limit\", period = EXCLUDED.period,"
				 " burst = EXCLUDED.burst, quota_window = EXCLUDED.quota_window,"
				 " time_zone = EXCLUDED.time_zone, updated_at = now()"
				 " RETURNING *",
				 7, argtypes);
	beat_execute(plan_set_limit, values, nulls, SPI_OK_INSERT_RETURNING);
	row = PointerGetDatum(SPI_returntuple(SPI_tuptable->vals[0], SPI_tuptable->tupdesc));
	beat_spi_finish();
	PG_RETURN_DATUM(row);
}

/* beat.drop_limit(name): forget a limit; its keys go with it. */
Datum
beat_drop_limit(PG_FUNCTION_ARGS)
{
	Oid			argtypes[1] = {TEXTOID};
	Datum		v = PG_GETARG_DATUM(0);

	beat_spi_connect();
	beat_prepare(&plan_drop_limit, "DELETE FROM beat.rate_limit WHERE name = $1",
				 1, argtypes);
	beat_execute(plan_drop_limit, &v, " ", SPI_OK_DELETE);
	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("rate limit \"%s\" does not exist", TextDatumGetCString(v))));
	beat_spi_finish();
	PG_RETURN_VOID();
}
