-- pg_beat 0.5.0 -> 0.6.0: beat.wait.

-- Block until a task has succeeded, is dead or was cancelled, and return
-- its state; after timeout, return the state it has then.  Sleeps on the
-- backend's latch: the commit that finishes the task wakes it.  Runs as
-- the caller, who needs SELECT on beat.task.
CREATE FUNCTION beat.wait(task_id bigint, timeout interval DEFAULT '30 seconds')
RETURNS text
AS 'MODULE_PATHNAME', 'beat_wait'
LANGUAGE C VOLATILE SET search_path = pg_catalog, pg_temp;

REVOKE ALL ON FUNCTION beat.wait(bigint, interval) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION beat.wait(bigint, interval) TO beat_user, beat_admin;
