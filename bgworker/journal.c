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
 * recorded.  The file is written, not flushed: it has to outlive a crash
 * of Postgres, not of the machine, and the page cache does that.
 *
 * The first launcher after the server starts (or restarts after a crash),
 * before it starts any worker, reads every journal and gives each task
 * whose attempt the crash undid that attempt back (attempts < the
 * journal's): out of attempts, the task is dead.  Then it removes the
 * files.  A journal that does not check out (magic, CRC) is skipped with
 * a warning: a write cut short by the crash itself.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <fcntl.h>
#include <unistd.h>

#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "common/file_perm.h"
#include "executor/spi.h"
#include "nodes/pg_list.h"
#include "port/pg_crc32c.h"
#include "storage/fd.h"
#include "utils/array.h"
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

static int	journal_fd = -1;
static JournalHeader *journal_buf = NULL;	/* header, then entries */
static int	journal_cap = 0;	/* entries journal_buf holds */
static SPIPlanPtr plan_recover = NULL;

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

void
beat_journal_open(int slot_no, const char *worker, Oid task_relid)
{
	char		path[MAXPGPATH];

	snprintf(path, sizeof(path), JOURNAL_DIR "/" JOURNAL_PREFIX "%d", slot_no);
	journal_fd = BasicOpenFilePerm(path, O_WRONLY | O_CREAT | O_TRUNC | PG_BINARY,
								   pg_file_create_mode);
	if (journal_fd < 0)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("pg_beat: could not open claim journal \"%s\": %m", path)));
	journal_cap = 64;
	journal_buf = MemoryContextAllocZero(TopMemoryContext,
										 sizeof(JournalHeader) + sizeof(JournalEntry) * journal_cap);
	journal_buf->magic = JOURNAL_MAGIC;
	journal_buf->task_relid = task_relid;
	strlcpy(journal_buf->worker, worker, sizeof(journal_buf->worker));
}

bool
beat_journal_write(const int64 *task_ids, const int32 *attempts, int n)
{
	JournalEntry *e;
	size_t		len;

	if (n > journal_cap)
	{
		journal_cap = Max(n, journal_cap * 2);
		journal_buf = repalloc(journal_buf,
							   sizeof(JournalHeader) + sizeof(JournalEntry) * journal_cap);
	}
	e = (JournalEntry *) (journal_buf + 1);
	for (int i = 0; i < n; i++)
	{
		e[i].task_id = task_ids[i];
		e[i].attempt = attempts[i];
		e[i].unused = 0;
	}
	journal_buf->count = n;
	journal_buf->crc = journal_crc(journal_buf, e);
	len = sizeof(JournalHeader) + sizeof(JournalEntry) * n;
	return pwrite(journal_fd, journal_buf, len, 0) == (ssize_t) len;
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

/* Read one journal into the arrays; false (and a warning) if it is damaged. */
static bool
journal_read(const char *path, Oid task_relid, Datum **ids, Datum **atts,
			 Datum **owners, int *n, int *cap)
{
	FILE	   *f = AllocateFile(path, PG_BINARY_R);
	JournalHeader h;
	JournalEntry *e = NULL;
	bool		ok = false;

	if (f == NULL)
	{
		ereport(WARNING,
				(errcode_for_file_access(),
				 errmsg("pg_beat: could not read claim journal \"%s\": %m", path)));
		return false;
	}
	if (fread(&h, sizeof(h), 1, f) == 1 && h.magic == JOURNAL_MAGIC &&
		h.count <= JOURNAL_MAX)
	{
		e = palloc(sizeof(JournalEntry) * Max(h.count, 1));
		if (fread(e, sizeof(JournalEntry), h.count, f) == h.count &&
			journal_crc(&h, e) == h.crc)
			ok = true;
	}
	else if (ferror(f) == 0 && feof(f) && ftell(f) == 0)
	{
		/* an empty file: a worker that had not claimed yet */
		FreeFile(f);
		return true;
	}
	FreeFile(f);
	if (!ok)
	{
		ereport(WARNING,
				(errmsg("pg_beat: claim journal \"%s\" is damaged; skipped", path)));
		return false;
	}

	/* left by an earlier installation of pg_beat: other tasks */
	if (h.task_relid != task_relid)
		return true;
	h.worker[sizeof(h.worker) - 1] = '\0';
	if (*n + (int) h.count > *cap)
	{
		*cap = Max(*n + (int) h.count, *cap * 2);
		*ids = repalloc(*ids, sizeof(Datum) * *cap);
		*atts = repalloc(*atts, sizeof(Datum) * *cap);
		*owners = repalloc(*owners, sizeof(Datum) * *cap);
	}
	for (uint32 i = 0; i < h.count; i++)
	{
		(*ids)[*n] = Int64GetDatum(e[i].task_id);
		(*atts)[*n] = Int32GetDatum(e[i].attempt);
		(*owners)[(*n)++] = CStringGetTextDatum(h.worker);
	}
	return true;
}

uint64
beat_journal_recover(void)
{
	ListCell   *lc;
	int			n = 0;
	int			cap = 64;
	Datum	   *ids = palloc(sizeof(Datum) * cap);
	Datum	   *atts = palloc(sizeof(Datum) * cap);
	Datum	   *owners = palloc(sizeof(Datum) * cap);
	Oid			argtypes[3] = {INT8ARRAYOID, INT4ARRAYOID, TEXTARRAYOID};
	Datum		args[3];
	Oid			task_relid = get_relname_relid("task", get_namespace_oid("beat", false));

	foreach(lc, journal_paths())
		(void) journal_read(lfirst(lc), task_relid, &ids, &atts, &owners, &n, &cap);
	if (n == 0)
		return 0;

	args[0] = PointerGetDatum(construct_array(ids, n, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
	args[1] = PointerGetDatum(construct_array(atts, n, INT4OID, 4, true, TYPALIGN_INT));
	args[2] = PointerGetDatum(construct_array(owners, n, TEXTOID, -1, false, TYPALIGN_INT));

	/*
	 * Only an attempt the crash undid: the claim is not there (the task is
	 * as it was before it, attempts lower).  A claim that survived left the
	 * task running, and the launcher hands that lease back as usual.
	 */
	beat_prepare(&plan_recover,
				 "UPDATE beat.task t SET attempts = j.attempt,"
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
				 " WHERE t.id = j.id AND t.attempts < j.attempt"
				 "   AND t.state IN ('pending', 'scheduled', 'failed')",
				 3, argtypes);
	beat_execute(plan_recover, args, "   ", SPI_OK_UPDATE);
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
