-- Roles: beat_user enqueues and reads, beat_worker also claims and
-- completes, beat_admin also manages flows; PUBLIC gets nothing.
CREATE EXTENSION pg_beat;
SELECT count(*) FROM beat.create_flow('p');
SELECT beat.enqueue('p', '{}') AS t1 \gset

CREATE ROLE regress_beat_nobody;
CREATE ROLE regress_beat_user IN ROLE beat_user;
CREATE ROLE regress_beat_worker IN ROLE beat_worker;
CREATE ROLE regress_beat_admin IN ROLE beat_admin;

CREATE FUNCTION pg_temp.err(sql text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE sql;
    RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || SQLERRM;
END
$$;

-- A role with no grant can do nothing.
SET ROLE regress_beat_nobody;
SELECT pg_temp.err($$SELECT beat.enqueue('p', '{}')$$);
SELECT pg_temp.err($$SELECT count(*) FROM beat.task$$);
SELECT pg_temp.err($$SELECT count(*) FROM beat.claim('p', 'w')$$);
RESET ROLE;

-- beat_user: enqueue and read; not claim, not manage, not write tables.
SET ROLE regress_beat_user;
SELECT pg_temp.err($$SELECT beat.enqueue('p', '{"from": "user"}')$$);
SELECT pg_temp.err($$SELECT count(*) FROM beat.enqueue_batch('p', '[{}]'::jsonb)$$);
SELECT pg_temp.err($$SELECT count(*) FROM beat.task$$);
SELECT pg_temp.err($$SELECT count(*) FROM beat.queue_stats$$);
SELECT pg_temp.err($$SELECT beat.wakeups()$$);
SELECT pg_temp.err($$SELECT count(*) FROM beat.claim('p', 'w')$$);
SELECT pg_temp.err($$SELECT beat.create_flow('mine')$$);
SELECT pg_temp.err($$SELECT beat.cancel(1)$$);
SELECT pg_temp.err($$INSERT INTO beat.task (flow, params, max_attempts, correlation_id) VALUES ('p', '{}', 1, gen_random_uuid())$$);
SELECT pg_temp.err($$UPDATE beat.task SET state = 'succeeded'$$);
SELECT pg_temp.err($$DELETE FROM beat.task$$);
SELECT pg_temp.err($$UPDATE beat.flow SET paused = true$$);
RESET ROLE;

-- beat_worker: also claim, complete, fail, heartbeat; not manage.
SET ROLE regress_beat_worker;
SELECT pg_temp.err($$SELECT beat.enqueue('p', '{"from": "worker"}')$$);
SELECT count(*) AS claimed FROM beat.claim('p', 'w', 1);
SELECT pg_temp.err(format('SELECT beat.heartbeat(%s, %L)', :t1, 'w'));
SELECT pg_temp.err(format('SELECT beat.complete(%s, %L)', :t1, 'w'));
SELECT pg_temp.err($$SELECT beat.alter_flow('p', paused => true)$$);
SELECT pg_temp.err($$SELECT * FROM beat.reap()$$);
SELECT pg_temp.err($$SELECT beat.purge()$$);
RESET ROLE;

-- beat_admin: everything.
SET ROLE regress_beat_admin;
SELECT pg_temp.err($$SELECT beat.create_flow('admins')$$);
SELECT pg_temp.err($$SELECT beat.alter_flow('admins', paused => true)$$);
SELECT pg_temp.err($$SELECT * FROM beat.reap()$$);
SELECT pg_temp.err($$SELECT beat.purge()$$);
SELECT pg_temp.err($$SELECT beat.cancel(max(id)) FROM beat.task WHERE state = 'pending'$$);
SELECT pg_temp.err($$SELECT beat.drop_flow('admins')$$);
RESET ROLE;

SELECT params->>'from' AS enqueued_by, state FROM beat.task ORDER BY id;

DROP EXTENSION pg_beat;
DROP ROLE regress_beat_nobody, regress_beat_user, regress_beat_worker, regress_beat_admin;
