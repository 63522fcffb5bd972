-- beat.wait(task_id, timeout): the state once the task has finished, or at
-- the timeout.  (A wait woken by another session's commit is in
-- regress/t/004_workers.pl.)
CREATE EXTENSION pg_beat;
SELECT count(*) FROM beat.create_flow('wt');

-- A task that has finished: the answer at once.
SELECT beat.enqueue('wt', '{}') AS done_id \gset
SELECT count(*) FROM beat.claim('wt', 'w1', 1);
SELECT beat.complete(:done_id, 'w1', '{"ok": true}');
SELECT beat.wait(:done_id), clock_timestamp() - statement_timestamp() < '1 s' AS at_once;
SELECT beat.enqueue('wt', '{}') AS cancelled_id \gset
SELECT beat.cancel(:cancelled_id);
SELECT beat.wait(:cancelled_id, '10 s'), clock_timestamp() - statement_timestamp() < '1 s' AS at_once;

-- A task that has not: its state when the timeout has passed, no sooner.
SELECT beat.enqueue('wt', '{}') AS pending_id \gset
SELECT beat.wait(:pending_id, '0 s');
SELECT beat.wait(:pending_id, '200 ms') AS state,
       clock_timestamp() - statement_timestamp() >= '200 ms' AS waited_the_timeout;

-- Bad input.
SELECT beat.wait(NULL);
SELECT beat.wait(:pending_id, NULL);
SELECT beat.wait(:pending_id, '-1 s');
SELECT beat.wait(-1);
SELECT beat.wait(9223372036854775807);

-- A task this transaction enqueued (or changed) cannot finish while it waits.
BEGIN;
SELECT beat.enqueue('wt', '{}') AS mine_id \gset
SELECT beat.wait(:mine_id, '1 s');
ROLLBACK;
BEGIN;
SELECT beat.cancel(:pending_id);
SELECT beat.wait(:pending_id, '1 s');
ROLLBACK;

-- One snapshot for the whole transaction would never see the task finish.
BEGIN ISOLATION LEVEL REPEATABLE READ;
SELECT beat.wait(:pending_id, '1 s');
ROLLBACK;

-- beat_user may wait; a role without it may not.
CREATE ROLE regress_wait_user IN ROLE beat_user;
CREATE ROLE regress_wait_nobody;
-- (with the schema usable, so that it is the function that refuses)
GRANT USAGE ON SCHEMA beat TO regress_wait_nobody;
SET ROLE regress_wait_user;
SELECT beat.wait(:done_id);
RESET ROLE;
SET ROLE regress_wait_nobody;
SELECT beat.wait(:done_id);
RESET ROLE;
REVOKE USAGE ON SCHEMA beat FROM regress_wait_nobody;
DROP ROLE regress_wait_user;
DROP ROLE regress_wait_nobody;

-- Finishing a task writes its update, and no lock of the row: the
-- trigger that notes it for the waiters runs AFTER the update (a BEFORE
-- ROW trigger makes PostgreSQL lock each row it is given, in the WAL too).
CREATE EXTENSION pg_walinspect;
SELECT count(*) FROM beat.create_flow('wl');
SELECT beat.enqueue('wl', '{}') AS wal_id \gset
SELECT count(*) FROM beat.claim('wl', 'w1', 1);
SELECT pg_current_wal_insert_lsn() AS before_lsn \gset
SELECT beat.complete(:wal_id, 'w1');
SELECT record_type, count(*)
FROM pg_get_wal_records_info(:'before_lsn', pg_current_wal_flush_lsn())
WHERE resource_manager = 'Heap'
  AND block_ref LIKE '%/' || pg_relation_filenode('beat.task') || ' %'
GROUP BY record_type ORDER BY record_type;
SELECT beat.wait(:wal_id, '0 s');
DROP EXTENSION pg_walinspect;

DROP EXTENSION pg_beat;
