-- beat.create_flow, beat.alter_flow, beat.drop_flow and their errors.
CREATE EXTENSION pg_beat;

CREATE FUNCTION pg_temp.err(sql text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE sql;
    RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || SQLERRM;
END
$$;

-- Defaults, then every setting given.
SELECT name, max_attempts, backoff_base, backoff_cap, lease, priority, retention,
       paused, workers, concurrency
FROM beat.create_flow('scrape');
SELECT name, max_attempts, backoff_base, backoff_cap, lease, priority, retention,
       paused, workers, concurrency
FROM beat.create_flow('profiles.v2', max_attempts => 3, backoff_base => '2 s',
                      backoff_cap => '1 min', lease => '30 s', priority => -5,
                      retention => '1 day', workers => 2, concurrency => 64,
                      paused => true);

-- alter_flow changes what is given and keeps the rest.
SELECT name, max_attempts, lease, paused, concurrency
FROM beat.alter_flow('profiles.v2', lease => '45 s', paused => false);
SELECT updated_at > created_at OR updated_at = created_at AS stamped
FROM beat.flow WHERE name = 'profiles.v2';

-- Errors: each with its errcode; none leaves a flow behind.
SELECT pg_temp.err($$SELECT beat.create_flow('scrape')$$);
SELECT pg_temp.err($$SELECT beat.create_flow(NULL)$$);
SELECT pg_temp.err($$SELECT beat.create_flow('')$$);
SELECT pg_temp.err($$SELECT beat.create_flow('Bad Name')$$);
SELECT pg_temp.err($$SELECT beat.create_flow('_x')$$);
SELECT pg_temp.err($$SELECT beat.create_flow(repeat('a', 64))$$);
SELECT pg_temp.err($$SELECT beat.create_flow('f1', max_attempts => 0)$$);
SELECT pg_temp.err($$SELECT beat.create_flow('f1', max_attempts => 1001)$$);
SELECT pg_temp.err($$SELECT beat.create_flow('f1', backoff_base => '0')$$);
SELECT pg_temp.err($$SELECT beat.create_flow('f1', backoff_base => '-1 s')$$);
SELECT pg_temp.err($$SELECT beat.create_flow('f1', backoff_base => '1 h', backoff_cap => '1 min')$$);
SELECT pg_temp.err($$SELECT beat.create_flow('f1', lease => '0')$$);
SELECT pg_temp.err($$SELECT beat.create_flow('f1', priority => 1001)$$);
SELECT pg_temp.err($$SELECT beat.create_flow('f1', priority => -1001)$$);
SELECT pg_temp.err($$SELECT beat.create_flow('f1', retention => '-1 day')$$);
SELECT pg_temp.err($$SELECT beat.create_flow('f1', workers => -1)$$);
SELECT pg_temp.err($$SELECT beat.create_flow('f1', workers => 65)$$);
SELECT pg_temp.err($$SELECT beat.create_flow('f1', concurrency => 0)$$);
SELECT pg_temp.err($$SELECT beat.alter_flow('nope', paused => true)$$);
SELECT pg_temp.err($$SELECT beat.alter_flow('scrape', backoff_cap => '100 ms')$$);
SELECT pg_temp.err($$SELECT beat.drop_flow('nope')$$);
SELECT name FROM beat.flow ORDER BY 1;

-- The same errors read in full.
SELECT beat.create_flow('scrape');
SELECT beat.create_flow('Bad Name');
SELECT beat.alter_flow('scrape', backoff_cap => '100 ms');
SELECT beat.create_flow('f1', lease => '-5 min');

-- A flow with unfinished tasks is kept unless forced; finished ones go with it.
SELECT beat.enqueue('scrape', '{"n": 1}') AS t1 \gset
SELECT beat.enqueue('scrape', '{"n": 2}') AS t2 \gset
SELECT beat.drop_flow('scrape');
SELECT count(*) FROM beat.claim('scrape', 'w', 2);
SELECT beat.complete(:t1, 'w');
SELECT beat.complete(:t2, 'w');
SELECT beat.drop_flow('scrape') AS deleted_tasks;
SELECT count(*) AS tasks_left FROM beat.task WHERE flow = 'scrape';

SELECT beat.enqueue('profiles.v2', '{}') IS NOT NULL AS enqueued;
SELECT beat.drop_flow('profiles.v2', force => true) AS deleted_tasks;
SELECT count(*) AS flows_left FROM beat.flow;

-- drop_flow needs READ COMMITTED to see every committed task.
SELECT name FROM beat.create_flow('rr');
BEGIN ISOLATION LEVEL REPEATABLE READ;
SELECT beat.drop_flow('rr');
ROLLBACK;
SELECT beat.drop_flow('rr');

DROP EXTENSION pg_beat;
