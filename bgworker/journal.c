/*-------------------------------------------------------------------------
 *
 * journal.c
 *		The claim journal: which attempts a flow worker has under way.
 *
 * A worker's claim commits without waiting for the disk (its flush would
 * sit between a task's enqueue and its request); the result's commit,
 * which waits, flushes the claim with it.  A claim lost in a crash only
 * leaves its tasks as they were before, to be claimed again, with one
 * exception that matters: a task whose answer crashes the server must
 * still run out of attempts.  So before a worker starts the transfers of
 * a claim, it writes the tasks and attempts it has under way to a file of
 * its own, pg_stat/pg_beat_claims.<slot>, and rewrites it as they are
 * recorded (a task that gives its attempt back leaves it before that
 * commit, the others after it).  The file is written, not flushed: it has
 * to outlive a crash of Postgres, not of the machine, and the page cache
 * does that.  A worker that exits, on purpose or on an error, flushes its
 * claims and removes its journal; only a crash leaves one behind.
 *
 * The first launcher after the server starts (or restarts after a crash),
 * before it starts any worker, reads every journal and gives each task
 * whose attempt the crash undid that attempt back (the task is one attempt
 * short of the journal's, and pending, scheduled or failed): out of
 * attempts, the task is dead.  Then it removes the files.  A journal that
 * does not check out (magic, CRC) is skipped with a warning: a write cut
 * short by the crash itself.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <fcntl.h>
#include <unistd.h>

#include "access/xact.h"
#include "access/xlog.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "common/file_perm.h"
#include "executor/spi.h"
#include "nodes/pg_list.h"
#include "port/pg_crc32c.h"
#include "storage/fd.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"

#include "pg_beat.h"
#include "journal.h"

#define JOURNAL_DIR		"pg_stat"
#define JOURNAL_PREFIX	"pg_beat_claims."
#define JOURNAL_MAGIC	0x42434c4d	/* "BCLM" */
#define JOURNAL_MAX		(1 << 20)	/* entries: more means a damaged file */

typedef struct JournalHeader
{
	uint32		magic;
	uint32		count;
	Oid			task_relid;		/* beat.task of the installation it is for */
	char		worker[128];	/* the lease owner, for the task's last_error */
	pg_crc32c	crc;			/* of the fields above and the entries */
} JournalHeader;

typedef struct JournalEntry
{
	int64		task_id;
	int32		attempt;
	int32		unused;
} JournalEntry;

static int	journal_fd = -1;	/* -1: could not be opened; writes fail */
static char journal_path[MAXPGPATH];
static JournalHeader *journal_buf = NULL;	/* header, then entries */
static int	journal_cap = 0;	/* entries journal_buf holds */

static pg_crc32c
journal_crc(const JournalHeader *h, const JournalEntry *e)
{
	pg_crc32c	crc;

	INIT_CRC32C(crc);
	COMP_CRC32C(crc, h, offsetof(JournalHeader, crc));
	COMP_CRC32C(crc, e, sizeof(JournalEntry) * h->count);
	FIN_CRC32C(crc);
	return crc;
}

/* beat.task's oid: it tells an installation of pg_beat from the next one. */
static Oid
task_relid(bool missing_ok)
{
	return get_relname_relid("task", get_namespace_oid("beat", missing_ok));
}

void
beat_journal_open(int slot_no, const char *worker)
{
	snprintf(journal_path, sizeof(journal_path), JOURNAL_DIR "/" JOURNAL_PREFIX "%d", slot_no);
	journal_fd = BasicOpenFilePerm(journal_path, O_WRONLY | O_CREAT | O_TRUNC | PG_BINARY,
								   pg_file_create_mode);
	/* without a journal, every write fails and the worker flushes its claims */
	if (journal_fd < 0)
		ereport(WARNING,
				(errcode_for_file_access(),
				 errmsg("pg_beat: could not open claim journal \"%s\": %m", journal_path)));
	journal_cap = 64;
	journal_buf = MemoryContextAllocZero(TopMemoryContext,
										 sizeof(JournalHeader) + sizeof(JournalEntry) * journal_cap);
	journal_buf->magic = JOURNAL_MAGIC;
	journal_buf->task_relid = task_relid(true);
	strlcpy(journal_buf->worker, worker, sizeof(journal_buf->worker));
}

void
beat_journal_reset(void)
{
	journal_buf->count = 0;
}

void
beat_journal_add(int64 task_id, int32 attempt)
{
	JournalEntry *e;

	if (journal_buf->count == journal_cap)
	{
		journal_cap *= 2;
		journal_buf = repalloc(journal_buf,
							   sizeof(JournalHeader) + sizeof(JournalEntry) * journal_cap);
	}
	e = (JournalEntry *) (journal_buf + 1) + journal_buf->count++;
	e->task_id = task_id;
	e->attempt = attempt;
	e->unused = 0;
}

bool
beat_journal_write(void)
{
	size_t		len = sizeof(JournalHeader) + sizeof(JournalEntry) * journal_buf->count;
	ssize_t		written;

	if (journal_fd < 0)
	{
		errno = EBADF;
		return false;
	}
	journal_buf->crc = journal_crc(journal_buf, (JournalEntry *) (journal_buf + 1));
	written = pwrite(journal_fd, journal_buf, len, 0);
	if (written >= 0 && written != (ssize_t) len)
		errno = ENOSPC;			/* a short write sets no errno */
	return written == (ssize_t) len;
}

void
beat_journal_remove(void)
{
	/*
	 * Whatever this worker claimed is in the WAL now, out of the journal's
	 * reach: a later crash cannot undo it, and the journal, left behind,
	 * could only count attempts that were given back since.  (A crash of
	 * the worker runs no exit callbacks: its journal stays.)
	 */
	if (XactLastCommitEnd != InvalidXLogRecPtr)
		XLogFlush(XactLastCommitEnd);
	if (journal_fd < 0)
		return;
	close(journal_fd);
	journal_fd = -1;
	if (unlink(journal_path) != 0 && errno != ENOENT)
		ereport(WARNING,
				(errcode_for_file_access(),
				 errmsg("pg_beat: could not remove claim journal \"%s\": %m", journal_path)));
}

/* The paths of every claim journal there is (palloc'd). */
static List *
journal_paths(void)
{
	List	   *paths = NIL;
	DIR		   *dir = AllocateDir(JOURNAL_DIR);
	struct dirent *de;

	while ((de = ReadDir(dir, JOURNAL_DIR)) != NULL)
		if (strncmp(de->d_name, JOURNAL_PREFIX, strlen(JOURNAL_PREFIX)) == 0)
			paths = lappend(paths, psprintf(JOURNAL_DIR "/%s", de->d_name));
	FreeDir(dir);
	return paths;
}

/* One journal that checked out: its worker and its entries. */
typedef struct JournalRead
{
	Datum		owner;
	uint32		count;
	JournalEntry *entries;
} JournalRead;

/*
 * Read one journal; NULL if it is empty or belongs to an earlier
 * installation, and (with a warning) if it is damaged.
 */
static JournalRead *
journal_read(const char *path, Oid relid)
{
	FILE	   *f = AllocateFile(path, PG_BINARY_R);
	JournalHeader h;
	JournalRead *r;
	bool		ok = false;

	if (f == NULL)
	{
		ereport(WARNING,
				(errcode_for_file_access(),
				 errmsg("pg_beat: could not read claim journal \"%s\": %m", path)));
		return NULL;
	}
	r = palloc0(sizeof(JournalRead));
	if (fread(&h, sizeof(h), 1, f) == 1 && h.magic == JOURNAL_MAGIC &&
		h.count <= JOURNAL_MAX)
	{
		r->entries = palloc(sizeof(JournalEntry) * Max(h.count, 1));
		if (fread(r->entries, sizeof(JournalEntry), h.count, f) == h.count &&
			journal_crc(&h, r->entries) == h.crc)
			ok = true;
	}
	else if (ferror(f) == 0 && feof(f) && ftell(f) == 0)
	{
		/* empty: a worker that had not claimed yet */
		h.count = 0;
		ok = true;
	}
	FreeFile(f);
	if (!ok)
	{
		ereport(WARNING,
				(errmsg("pg_beat: claim journal \"%s\" is damaged; skipped", path)));
		return NULL;
	}

	/* nothing under way, or other tasks: an earlier installation of pg_beat */
	if (h.count == 0 || h.task_relid != relid)
		return NULL;
	h.worker[sizeof(h.worker) - 1] = '\0';
	r->owner = CStringGetTextDatum(h.worker);
	r->count = h.count;
	return r;
}

uint64
beat_journal_recover(void)
{
	Oid			relid = task_relid(false);
	List	   *reads = NIL;
	ListCell   *lc;
	int			n = 0;
	BeatColumn	ids;
	BeatColumn	atts;
	BeatColumn	owners;
	Oid			argtypes[3] = {INT8ARRAYOID, INT4ARRAYOID, TEXTARRAYOID};
	Datum		args[3];

	foreach(lc, journal_paths())
	{
		JournalRead *r = journal_read(lfirst(lc), relid);

		if (r != NULL)
		{
			reads = lappend(reads, r);
			n += r->count;
		}
	}
	if (n == 0)
		return 0;

	ids = beat_column(n, INT8OID);
	atts = beat_column(n, INT4OID);
	owners = beat_column(n, TEXTOID);
	n = 0;
	foreach(lc, reads)
	{
		JournalRead *r = lfirst(lc);

		for (uint32 i = 0; i < r->count; i++, n++)
		{
			beat_column_set(&ids, n, Int64GetDatum(r->entries[i].task_id), false);
			beat_column_set(&atts, n, Int32GetDatum(r->entries[i].attempt), false);
			beat_column_set(&owners, n, r->owner, false);
		}
	}
	args[0] = beat_column_array(&ids, n);
	args[1] = beat_column_array(&atts, n);
	args[2] = beat_column_array(&owners, n);

	/*
	 * Only an attempt the crash undid: the claim is not there, so the task
	 * is as it was before it, one attempt short.  (A claim that survived
	 * left the task running, and the launcher hands that lease back as
	 * usual.)  Runs once per server start: not worth a saved plan.
	 */
	if (SPI_execute_with_args("UPDATE beat.task t SET attempts = j.attempt,"
							  " state = CASE WHEN j.attempt >= t.max_attempts"
							  "   THEN 'dead'::beat.task_state ELSE t.state END,"
							  " finished_at = CASE WHEN j.attempt >= t.max_attempts"
							  "   THEN statement_timestamp() ELSE t.finished_at END,"
							  " last_error = 'the server crashed while worker ' || j.worker"
							  "   || ' held the task (attempt ' || j.attempt || ')',"
							  " updated_at = statement_timestamp()"
							  " FROM (SELECT DISTINCT ON (u.id) u.id, u.attempt, u.worker"
							  "       FROM unnest($1, $2, $3) AS u(id, attempt, worker)"
							  "       ORDER BY u.id, u.attempt DESC) j"
							  " WHERE t.id = j.id AND t.attempts = j.attempt - 1"
							  "   AND t.state IN ('pending', 'scheduled', 'failed')",
							  3, argtypes, args, NULL, false, 0) != SPI_OK_UPDATE)
		elog(ERROR, "pg_beat: counting the attempts of the claim journals failed");
	return SPI_processed;
}

void
beat_journal_remove_all(void)
{
	ListCell   *lc;

	foreach(lc, journal_paths())
	{
		const char *path = lfirst(lc);

		if (unlink(path) != 0 && errno != ENOENT)
			ereport(WARNING,
					(errcode_for_file_access(),
					 errmsg("pg_beat: could not remove claim journal \"%s\": %m", path)));
	}
}
