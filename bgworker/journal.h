/*-------------------------------------------------------------------------
 *
 * journal.h
 *		The claim journal: which attempts a flow worker has under way, kept
 *		in a file so that a crash of the server cannot make them uncounted.
 *
 *-------------------------------------------------------------------------
 */
#ifndef BEAT_JOURNAL_H
#define BEAT_JOURNAL_H

/* worker, in a transaction: open (and empty) the journal of slot slot_no */
extern void beat_journal_open(int slot_no, const char *worker);

/*
 * worker: the journal's next content is built with reset and add, then
 * written over the file (false, errno set, when it could not be)
 */
extern void beat_journal_reset(void);
extern void beat_journal_add(int64 task_id, int32 attempt);
extern bool beat_journal_write(void);

/* worker, as it exits: its claims are flushed; the journal goes */
extern void beat_journal_remove(void);

/*
 * launcher, once per start of the server (inside a transaction, SPI
 * connected): count the attempts the journals hold that the crash undid;
 * returns how many tasks it changed.  beat_journal_remove_all() after the
 * transaction has committed.
 */
extern uint64 beat_journal_recover(void);
extern void beat_journal_remove_all(void);

#endif							/* BEAT_JOURNAL_H */
