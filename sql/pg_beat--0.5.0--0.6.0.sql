-- pg_beat 0.5.0 -> 0.6.0: beat.wait.

-- Block until a task has succeeded, is dead or was cancelled, and return
-- its state; after timeout, return the state it has then.  Sleeps on the
-- backend's latch: the commit that finishes the task wakes it.  Runs as
-- the caller, who needs SELECT on beat.task.
CREATE FUNCTION beat.wait(task_id bigint, timeout interval DEFAULT '30 seconds')
RETURNS text
AS 'MODULE_PATHNAME', 'beat_wait'
LANGUAGE C VOLATILE SET search_path = pg_catalog, pg_temp;

-- Whichever path finishes a task (a worker, the SQL functions, the
-- launcher, an UPDATE by hand), the task's id is noted for the commit,
-- which then wakes whoever waits for it in beat.wait.  BEFORE, so that no
-- event is queued per row; it changes nothing in the row.
CREATE FUNCTION beat.task_finished()
RETURNS trigger
AS 'MODULE_PATHNAME', 'beat_task_finished'
LANGUAGE C;

CREATE TRIGGER task_finished BEFORE UPDATE OF state ON beat.task
    FOR EACH ROW
    WHEN (NEW.state IN ('succeeded', 'dead', 'cancelled') AND OLD.state IS DISTINCT FROM NEW.state)
    EXECUTE FUNCTION beat.task_finished();

REVOKE ALL ON FUNCTION beat.wait(bigint, interval), beat.task_finished() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION beat.wait(bigint, interval) TO beat_user, beat_admin;
