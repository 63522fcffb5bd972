-- pg_beat 0.6.0 -> 0.7.0: one WAL record fewer per finished task.

-- task_finished becomes an AFTER trigger.  A BEFORE ROW UPDATE trigger
-- makes PostgreSQL lock the old row before it evaluates the trigger's
-- WHEN, so every UPDATE of state wrote a row lock to the WAL beside the
-- update itself (one record per completed task).  An AFTER trigger's WHEN
-- is evaluated when the row is updated, and only rows it passes (a state
-- becoming succeeded, dead or cancelled) queue an event; firing it reads
-- the row without locking it.
DROP TRIGGER task_finished ON beat.task;
CREATE TRIGGER task_finished AFTER UPDATE OF state ON beat.task
    FOR EACH ROW
    WHEN (NEW.state IN ('succeeded', 'dead', 'cancelled') AND OLD.state IS DISTINCT FROM NEW.state)
    EXECUTE FUNCTION beat.task_finished();
