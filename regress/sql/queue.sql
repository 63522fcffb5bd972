-- The queue API: enqueue, enqueue_batch, claim, complete, fail, heartbeat,
-- cancel, requeue, reap, purge; every error path and its errcode.
CREATE EXTENSION pg_beat;

CREATE FUNCTION pg_temp.err(sql text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE sql;
    RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || SQLERRM;
END
$$;

SELECT count(*) FROM beat.create_flow('q', max_attempts => 3, backoff_base => '10 s',
                                      backoff_cap => '35 s', lease => '1 min',
                                      priority => 5);

-- enqueue ---------------------------------------------------------------

-- Defaults come from the flow; a correlation id is generated.
SELECT beat.enqueue('q', '{"handle": "alice"}') AS a \gset
SELECT flow, state, priority, attempts, max_attempts, params, result, last_error,
       correlation_id IS NOT NULL AS has_correlation,
       run_at <= now() AS due, created_at = updated_at AS fresh,
       lease_owner, started_at, finished_at
FROM beat.task WHERE id = :a;

-- Every argument given.
SELECT beat.enqueue('q', '{"handle": "bob"}', priority => -3,
                    run_at => now() + interval '1 hour',
                    idempotency_key => 'bob', max_attempts => 7,
                    correlation_id => '00000000-0000-4000-8000-000000000001') AS b \gset
SELECT state, priority, run_at > now() AS later, idempotency_key, max_attempts, correlation_id
FROM beat.task WHERE id = :b;

-- The params default is an empty object.
SELECT beat.enqueue('q') AS e \gset
SELECT params FROM beat.task WHERE id = :e;

-- A live duplicate key returns the existing task; another flow is separate.
SELECT beat.enqueue('q', '{"handle": "bob again"}', idempotency_key => 'bob') = :b AS same;
SELECT count(*) FROM beat.create_flow('other');
SELECT beat.enqueue('other', '{}', idempotency_key => 'bob') <> :b AS separate;

-- Errors: nothing is written by any of them.
SELECT count(*) AS before FROM beat.task \gset
SELECT pg_temp.err($$SELECT beat.enqueue('nope', '{}')$$);
SELECT pg_temp.err($$SELECT beat.enqueue(NULL, '{}')$$);
SELECT pg_temp.err($$SELECT beat.enqueue('q', NULL)$$);
SELECT pg_temp.err($$SELECT beat.enqueue('q', '[1, 2]')$$);
SELECT pg_temp.err($$SELECT beat.enqueue('q', '"text"')$$);
SELECT pg_temp.err($$SELECT beat.enqueue('q', '42')$$);
SELECT pg_temp.err($$SELECT beat.enqueue('q', '{}', priority => 1001)$$);
SELECT pg_temp.err($$SELECT beat.enqueue('q', '{}', priority => -1001)$$);
SELECT pg_temp.err($$SELECT beat.enqueue('q', '{}', max_attempts => 0)$$);
SELECT pg_temp.err($$SELECT beat.enqueue('q', '{}', run_at => 'infinity')$$);
SELECT pg_temp.err($$SELECT beat.enqueue('q', '{}', idempotency_key => '')$$);
SELECT pg_temp.err($$SELECT beat.enqueue('q', '{}', idempotency_key => repeat('k', 201))$$);
SELECT count(*) = :before AS nothing_written FROM beat.task;

-- The same errors read in full.
SELECT beat.enqueue('nope', '{}');
SELECT beat.enqueue('q', '[1, 2]');
SELECT beat.enqueue('q', '{}', priority => 5000);

-- Oversized params: the limit is beat.max_params_size.
SET beat.max_params_size = 100;
SELECT beat.enqueue('q', jsonb_build_object('blob', repeat('x', 200)));
SELECT pg_temp.err($$SELECT beat.enqueue('q', jsonb_build_object('blob', repeat('x', 200)))$$);
SELECT beat.enqueue('q', '{"small": true}') > 0 AS small_fits;
RESET beat.max_params_size;
SELECT count(*) = :before + 1 AS only_the_small_one FROM beat.task;

-- enqueue_batch -----------------------------------------------------------

TRUNCATE beat.task;

-- Both forms; ids come back in input order.
SELECT array_agg(id) AS ids
FROM beat.enqueue_batch('q', ARRAY['{"n": 1}', '{"n": 2}', '{"n": 3}']::jsonb[]) AS id \gset
SELECT t.params->>'n' AS n, t.id = (:'ids'::bigint[])[i] AS in_order
FROM unnest(:'ids'::bigint[]) WITH ORDINALITY AS u(id, i) JOIN beat.task t USING (id)
ORDER BY i;
-- (A query sees rows its own functions insert only from the next statement.)
CREATE TEMP TABLE b AS
SELECT * FROM beat.enqueue_batch('q', '[{"n": 4}, {"n": 5}, {"n": 6}]'::jsonb)
    WITH ORDINALITY AS u(id, i);
SELECT array_agg(t.params->>'n' ORDER BY b.i) AS order_of_params
FROM b JOIN beat.task t USING (id);

-- Shared arguments apply to every task.
TRUNCATE b;
INSERT INTO b SELECT * FROM beat.enqueue_batch('q', '[{}, {}]'::jsonb, priority => 9,
    max_attempts => 2, run_at => now() + interval '1 day') WITH ORDINALITY;
SELECT count(*) FILTER (WHERE t.priority = 9 AND t.max_attempts = 2 AND t.run_at > now())
FROM b JOIN beat.task t USING (id);

-- An empty batch makes nothing (but still checks the flow).
SELECT count(*) FROM beat.enqueue_batch('q', '{}'::jsonb[]);
SELECT count(*) FROM beat.enqueue_batch('q', '[]'::jsonb);

-- Keys: duplicates inside the batch and against live tasks map to one task.
SELECT beat.enqueue('q', '{"k": "existing"}', idempotency_key => 'k0') AS k0 \gset
TRUNCATE b;
INSERT INTO b SELECT * FROM beat.enqueue_batch('q', '[{}, {}, {}, {}, {}]'::jsonb,
    idempotency_keys => ARRAY['k0', 'k1', 'k1', NULL, NULL]) WITH ORDINALITY;
SELECT b.i, b.id = :k0 AS is_existing, t.idempotency_key,
       CASE WHEN t.idempotency_key IS NOT NULL
            THEN b.id = first_value(b.id) OVER (PARTITION BY t.idempotency_key ORDER BY b.i)
       END AS same_as_first
FROM b JOIN beat.task t USING (id)
ORDER BY b.i;
-- The same batch again adds only the two unkeyed tasks.
SELECT count(*) AS before FROM beat.task \gset
SELECT count(DISTINCT id) AS distinct_ids
FROM beat.enqueue_batch('q', '[{}, {}, {}, {}, {}]'::jsonb,
                        idempotency_keys => ARRAY['k0', 'k1', 'k1', NULL, NULL]) AS id;
SELECT count(*) - :before AS added FROM beat.task;

-- Errors, all or nothing.
SELECT count(*) AS before FROM beat.task \gset
SELECT pg_temp.err($$SELECT beat.enqueue_batch('nope', '[{}]'::jsonb)$$);
SELECT pg_temp.err($$SELECT beat.enqueue_batch('q', NULL::jsonb)$$);
SELECT pg_temp.err($$SELECT beat.enqueue_batch('q', '{"not": "an array"}'::jsonb)$$);
SELECT pg_temp.err($$SELECT beat.enqueue_batch('q', '[{}, 1, {}]'::jsonb)$$);
SELECT pg_temp.err($$SELECT beat.enqueue_batch('q', ARRAY['{}', NULL]::jsonb[])$$);
SELECT pg_temp.err($$SELECT beat.enqueue_batch('q', ARRAY['{}', '[]']::jsonb[])$$);
SELECT pg_temp.err($$SELECT beat.enqueue_batch('q', ARRAY[['{}'], ['{}']]::jsonb[])$$);
SELECT pg_temp.err($$SELECT beat.enqueue_batch('q', '[{}, {}]'::jsonb, idempotency_keys => ARRAY['a'])$$);
SELECT pg_temp.err($$SELECT beat.enqueue_batch('q', '[{}]'::jsonb, idempotency_keys => ARRAY[''])$$);
SELECT pg_temp.err($$SELECT beat.enqueue_batch('q', '[{}]'::jsonb, priority => 2000)$$);
SELECT count(*) = :before AS nothing_written FROM beat.task;

-- claim -----------------------------------------------------------------

TRUNCATE beat.task;
-- Claim order is priority, then run_at, then id; future tasks wait.
SELECT beat.enqueue('q', '{"n": "p5-old"}', run_at => now() - interval '2 min') AS c1 \gset
SELECT beat.enqueue('q', '{"n": "p5-new"}', run_at => now() - interval '1 min') AS c2 \gset
SELECT beat.enqueue('q', '{"n": "p1"}', priority => 1) AS c3 \gset
SELECT beat.enqueue('q', '{"n": "p5-same-time-a"}', run_at => now() - interval '1 min') AS c4 \gset
SELECT beat.enqueue('q', '{"n": "p-9-future"}', priority => -9,
                    run_at => now() + interval '1 hour') AS c5 \gset

SELECT params->>'n' AS n, priority, attempt, max_attempts,
       lease_expires_at > now() + interval '59 s' AS default_lease
FROM beat.claim('q', 'w1', 3);
SELECT id, state, lease_owner, attempts FROM beat.task WHERE state = 'running' ORDER BY id;
SELECT params->>'n' AS n,
       lease_expires_at < now() + interval '11 s' AS short_lease
FROM beat.claim('q', 'w2', 10, lease => '10 s');
-- Nothing is due now: the future task stays scheduled ...
SELECT count(*) FROM beat.claim('q', 'w2', 10);
SELECT state FROM beat.task WHERE id = :c5;
-- ... until its time comes: then claim promotes it and takes it first.
UPDATE beat.task SET run_at = now() - interval '1 s' WHERE id = :c5;
SELECT params->>'n' AS n, priority FROM beat.claim('q', 'w2', 10);

-- A paused flow hands out nothing.
SELECT beat.enqueue('q', '{}') AS c6 \gset
SELECT count(*) FROM beat.alter_flow('q', paused => true);
SELECT count(*) AS claimed_while_paused FROM beat.claim('q', 'w1', 10);
SELECT count(*) FROM beat.alter_flow('q', paused => false);
SELECT count(*) AS claimed_after_resume FROM beat.claim('q', 'w1', 10);

SELECT pg_temp.err($$SELECT beat.claim('nope', 'w')$$);
SELECT pg_temp.err($$SELECT beat.claim(NULL, 'w')$$);
SELECT pg_temp.err($$SELECT beat.claim('q', NULL)$$);
SELECT pg_temp.err($$SELECT beat.claim('q', '')$$);
SELECT pg_temp.err($$SELECT beat.claim('q', 'w', 0)$$);
SELECT pg_temp.err($$SELECT beat.claim('q', 'w', -1)$$);
SELECT pg_temp.err($$SELECT beat.claim('q', 'w', 10001)$$);
SELECT pg_temp.err($$SELECT beat.claim('q', 'w', NULL)$$);
SELECT pg_temp.err($$SELECT beat.claim('q', 'w', 1, '0')$$);
SELECT pg_temp.err($$SELECT beat.claim('q', 'w', 1, '-1 s')$$);
SELECT beat.claim('q', 'w', 0);

-- complete --------------------------------------------------------------

SELECT beat.complete(:c1, 'w1', '{"followers": 10}');
SELECT state, result, lease_owner, lease_expires_at, finished_at IS NOT NULL AS finished
FROM beat.task WHERE id = :c1;
-- Completing what another worker holds, or what is finished, is refused.
SELECT beat.complete(:c3, 'w2');
SELECT beat.complete(:c1, 'w1');
SELECT beat.complete(:c5, 'w1');
SELECT beat.complete(-1, 'w1');
SELECT pg_temp.err($$SELECT beat.complete(NULL, 'w1')$$);
SELECT pg_temp.err($$SELECT beat.complete(1, NULL)$$);
SELECT state, lease_owner FROM beat.task WHERE id = :c3;

-- complete_batch: all held, or an error and nothing changed.
SELECT beat.enqueue('q', '{}', priority => -100) AS d1 \gset
SELECT beat.enqueue('q', '{}', priority => -100) AS d2 \gset
SELECT count(*) FROM beat.claim('q', 'wb', 2);
SELECT beat.complete_batch(ARRAY[:d1, :d2, :c3], 'wb');
SELECT pg_temp.err(format('SELECT beat.complete_batch(ARRAY[%s, %s], %L, ARRAY[%L]::jsonb[])', :d1, :d2, 'wb', '{}'));
SELECT pg_temp.err(format('SELECT beat.complete_batch(ARRAY[%s, %s], %L)', :d1, :d1, 'wb'));
SELECT pg_temp.err($$SELECT beat.complete_batch(ARRAY[1, NULL]::bigint[], 'wb')$$);
SELECT count(*) AS still_running FROM beat.task WHERE id IN (:d1, :d2) AND state = 'running';
SELECT beat.complete_batch(ARRAY[:d1, :d2], 'wb', ARRAY['{"r": 1}', NULL]::jsonb[]);
SELECT id = :d1 AS first, state, result FROM beat.task WHERE id IN (:d1, :d2) ORDER BY id;
SELECT beat.complete_batch('{}', 'wb'), beat.complete_batch(NULL, 'wb');

-- fail ------------------------------------------------------------------

TRUNCATE beat.task;
SELECT beat.enqueue('q', '{}') AS f1 \gset
SELECT attempt FROM beat.claim('q', 'w', 1);
-- First retry: full jitter in [0, base]; the state says it will retry.
SELECT beat.fail(:f1, 'w', 'timeout');
SELECT state, attempts, last_error, lease_owner,
       run_at - updated_at BETWEEN interval '0' AND interval '10 s' AS within_backoff
FROM beat.task WHERE id = :f1;
-- Not due yet, so not claimable; once due it is claimed again.
UPDATE beat.task SET run_at = now() WHERE id = :f1;
SELECT attempt FROM beat.claim('q', 'w', 1);
-- A provider's retry_after wins when it is longer than the backoff.
SELECT beat.fail(:f1, 'w', '429', retry_after => '5 min');
SELECT state, run_at - updated_at >= interval '5 min' AS waits_retry_after
FROM beat.task WHERE id = :f1;
UPDATE beat.task SET run_at = now() WHERE id = :f1;
SELECT attempt FROM beat.claim('q', 'w', 1);
-- Out of attempts: dead.
SELECT beat.fail(:f1, 'w', 'still broken');
SELECT state, attempts, last_error, finished_at IS NOT NULL AS finished
FROM beat.task WHERE id = :f1;

-- The backoff grows and is capped: 10 s, 20 s, then the 35 s cap.
SELECT count(*) FROM beat.alter_flow('q', max_attempts => 10);
SELECT beat.enqueue('q', '{}') AS f2 \gset
CREATE TEMP TABLE delays (attempt int, delay interval);
DO $$
DECLARE
    task bigint := (SELECT max(t.id) FROM beat.task t);
    n int;
BEGIN
    FOR i IN 1..4 LOOP
        SELECT attempt INTO n FROM beat.claim('q', 'w', 1);
        PERFORM beat.fail(task, 'w', 'again');
        INSERT INTO delays SELECT n, t.run_at - t.updated_at FROM beat.task t WHERE t.id = task;
        UPDATE beat.task t SET run_at = now() WHERE t.id = task;
    END LOOP;
END
$$;
SELECT attempt,
       delay >= '0' AND delay <= (CASE attempt WHEN 1 THEN '10 s' WHEN 2 THEN '20 s' ELSE '35 s' END)::interval AS within_cap
FROM delays ORDER BY attempt;
SELECT beat.cancel(:f2);

-- permanent: dead at once, whatever attempts are left.
SELECT beat.enqueue('q', '{}') AS f3 \gset
SELECT count(*) FROM beat.claim('q', 'w', 1);
SELECT beat.fail(:f3, 'w', 'HTTP 404', permanent => true);

SELECT beat.enqueue('q', '{}') AS f4 \gset
SELECT count(*) FROM beat.claim('q', 'w', 1);
SELECT pg_temp.err(format('SELECT beat.fail(%s, %L, NULL)', :f4, 'w'));
SELECT pg_temp.err(format('SELECT beat.fail(%s, %L, %L, %L)', :f4, 'w', 'x', '-1 s'));
SELECT beat.fail(:f4, 'other', 'not mine');
SELECT beat.fail(:f3, 'w', 'again');
SELECT state FROM beat.task WHERE id = :f4;

-- heartbeat -------------------------------------------------------------

SELECT beat.heartbeat(:f4, 'w', '2 hours') > now() + interval '119 min' AS extended;
SELECT lease_expires_at > now() + interval '119 min' AS stored FROM beat.task WHERE id = :f4;
SELECT beat.heartbeat(:f4, 'w') < now() + interval '61 s' AS flow_default;
SELECT beat.heartbeat(:f4, 'other');
SELECT pg_temp.err(format('SELECT beat.heartbeat(%s, %L, %L)', :f4, 'w', '0'));

-- cancel and requeue ----------------------------------------------------

-- Cancelling a running task takes the lease away from its worker.
SELECT beat.cancel(:f4);
SELECT state, lease_owner FROM beat.task WHERE id = :f4;
SELECT beat.complete(:f4, 'w');
SELECT beat.cancel(:f4);
SELECT beat.cancel(-1);
SELECT beat.enqueue('q', '{}') AS g1 \gset
SELECT beat.cancel(:g1);

-- requeue: dead or cancelled back to pending with fresh attempts.
SELECT beat.requeue(:f3);
SELECT state, attempts, finished_at, last_error FROM beat.task WHERE id = :f3;
SELECT beat.requeue(:f3);
SELECT beat.requeue(-1);
-- A live task with the same key blocks it.
SELECT beat.enqueue('q', '{}', idempotency_key => 'once') AS h1 \gset
SELECT beat.cancel(:h1);
SELECT beat.enqueue('q', '{}', idempotency_key => 'once') <> :h1 AS key_free_after_cancel;
SELECT beat.requeue(:h1);

-- reap ------------------------------------------------------------------

TRUNCATE beat.task;
SELECT count(*) FROM beat.alter_flow('q', max_attempts => 2);
SELECT beat.enqueue('q', '{}') AS r1 \gset
SELECT beat.enqueue('q', '{}') AS r2 \gset
SELECT beat.enqueue('q', '{}') AS r3 \gset
-- r1 and r2 get a lease that expires at once; r3 keeps a long one.
SELECT count(*) FROM beat.claim('q', 'gone', 2, lease => '1 ms');
SELECT count(*) FROM beat.claim('q', 'alive', 1, lease => '1 hour');
-- r2 is on its last attempt: its expiry makes it dead.
UPDATE beat.task SET attempts = 2 WHERE id = :r2;
SELECT pg_sleep(0.05);
SELECT * FROM beat.reap();
SELECT id = :r1 AS r1, state, attempts, lease_owner, last_error
FROM beat.task ORDER BY id;
SELECT * FROM beat.reap();
-- The old owner cannot complete what was reaped.
SELECT beat.complete(:r1, 'gone');

-- purge -----------------------------------------------------------------

TRUNCATE beat.task;
SELECT count(*) FROM beat.alter_flow('q', retention => '1 hour');
SELECT count(*) FROM beat.enqueue_batch('q', '[{}, {}, {}, {}]'::jsonb);
SELECT count(*) FROM beat.claim('q', 'w', 3);
SELECT beat.complete(id, 'w') FROM beat.task WHERE state = 'running' AND id = (SELECT min(id) FROM beat.task);
SELECT beat.fail(id, 'w', 'x', permanent => true) FROM beat.task WHERE state = 'running' AND id = (SELECT min(id) FROM beat.task WHERE state = 'running');
SELECT beat.cancel(id) FROM beat.task WHERE state = 'running';
-- Within retention: kept.  Past it: deleted, and only finished tasks go.
SELECT beat.purge();
UPDATE beat.task SET finished_at = now() - interval '2 hours' WHERE finished_at IS NOT NULL;
SELECT beat.purge();
SELECT state, count(*) FROM beat.task GROUP BY state;
SELECT beat.purge('0');
SELECT pg_temp.err($$SELECT beat.purge('-1 s')$$);

-- queue_stats -----------------------------------------------------------

TRUNCATE beat.task;
SELECT count(*) FROM beat.enqueue_batch('q', '[{}, {}, {}]'::jsonb);
SELECT count(*) FROM beat.enqueue_batch('q', '[{}]'::jsonb, run_at => now() + interval '1 day');
SELECT count(*) FROM beat.claim('q', 'w', 1);
SELECT flow, paused, pending, scheduled, running, failed, succeeded, dead, cancelled,
       oldest_due_age >= '0' AS has_due
FROM beat.queue_stats ORDER BY flow;

-- enqueue_batch, written directly ----------------------------------------

-- A batch without keys is written directly (as COPY writes), not by an
-- INSERT; it must make the same rows: defaults from the flow, a fresh
-- correlation id each, scheduled when run_at is to come.
SELECT count(*) FROM beat.create_flow('qd', max_attempts => 3, priority => 5);
CREATE TEMP TABLE d (id bigint);
INSERT INTO d SELECT * FROM beat.enqueue_batch('qd', '[{"n": 1}, {"n": 2}]'::jsonb);
INSERT INTO d SELECT * FROM beat.enqueue_batch('qd', '[{"n": 3}]'::jsonb,
    run_at => now() + interval '1 hour', correlation_id => '00000000-0000-4000-8000-000000000001');
SELECT t.flow, t.state, t.priority, t.attempts, t.max_attempts, t.params,
       t.run_at = t.created_at AS due_at_creation, t.updated_at = t.created_at AS fresh,
       t.idempotency_key, t.result, t.last_error, t.lease_owner, t.lease_expires_at,
       t.provider, t.credential_id, t.started_at, t.finished_at
FROM d JOIN beat.task t USING (id) ORDER BY t.id;
SELECT count(DISTINCT correlation_id) AS distinct_correlation_ids,
       count(*) FILTER (WHERE correlation_id = '00000000-0000-4000-8000-000000000001') AS given
FROM beat.task t JOIN d USING (id);
-- The rows are in the indexes: claim finds the due ones, in order.
SELECT array_agg(params->>'n' ORDER BY id) AS claimed FROM beat.claim('qd', 'w-direct', 10);
-- The direct write is what wrote them: the WAL (read with pg_walinspect)
-- holds multi-row heap inserts into beat.task for a batch of 200 and not
-- one one-row insert, which is what the INSERT would have written.
CREATE EXTENSION pg_walinspect;
SELECT pg_current_wal_insert_lsn() AS l0 \gset
SELECT count(*) FROM beat.enqueue_batch('qd', (SELECT array_agg('{"w": 1}'::jsonb) FROM generate_series(1, 200)));
SELECT count(*) FILTER (WHERE resource_manager = 'Heap2' AND record_type LIKE 'MULTI_INSERT%') > 0
         AS multi_row_inserts,
       count(*) FILTER (WHERE resource_manager = 'Heap' AND record_type LIKE 'INSERT%')
         AS one_row_inserts
FROM pg_get_wal_records_info(:'l0', pg_current_wal_flush_lsn())
WHERE block_ref ~ ('/' || pg_relation_filenode('beat.task') || ' ');
DROP EXTENSION pg_walinspect;
DELETE FROM beat.task WHERE flow = 'qd' AND params = '{"w": 1}';
-- A CHECK constraint added to the table holds for every row of the direct
-- write, here row 150, in its second chunk of 100 (the first chunk is
-- checked and written before it).
ALTER TABLE beat.task ADD CONSTRAINT no_bad CHECK (NOT params ? 'bad') NOT VALID;
SELECT count(*) AS before FROM beat.task \gset
SELECT pg_temp.err($$SELECT beat.enqueue_batch('qd', (SELECT array_agg(CASE WHEN g = 150
    THEN '{"bad": 1}' ELSE '{}' END::jsonb) FROM generate_series(1, 200) g))$$);
SELECT count(*) = :before AS nothing_written FROM beat.task;
ALTER TABLE beat.task DROP CONSTRAINT no_bad;
-- A column of another type, a default on a column the direct write leaves
-- NULL, a rule: each sends the batch back to the INSERT, which honours it.
ALTER TABLE beat.task ALTER COLUMN params TYPE json;
SELECT id AS j FROM beat.enqueue_batch('qd', '[{"j": 1}]'::jsonb) AS id \gset
SELECT params::text AS params_as_json FROM beat.task WHERE id = :j;
ALTER TABLE beat.task ALTER COLUMN params TYPE jsonb USING params::jsonb;
ALTER TABLE beat.task ALTER COLUMN last_error SET DEFAULT 'from the default';
SELECT id AS d FROM beat.enqueue_batch('qd', '[{"d": 1}]'::jsonb) AS id \gset
SELECT last_error FROM beat.task WHERE id = :d;
ALTER TABLE beat.task ALTER COLUMN last_error DROP DEFAULT;
CREATE TABLE rule_seen (params jsonb);
CREATE RULE seen AS ON INSERT TO beat.task DO ALSO INSERT INTO rule_seen VALUES (NEW.params);
SELECT count(*) FROM beat.enqueue_batch('qd', '[{"r": 1}, {"r": 2}]'::jsonb);
DROP RULE seen ON beat.task;
SELECT array_agg(params->>'r' ORDER BY params->>'r') AS rule_saw FROM rule_seen;
DROP TABLE rule_seen;
-- An insert trigger on the table sends the batch back to the INSERT,
-- which fires it for every row.
CREATE TABLE pg_temp.seen (params jsonb);
CREATE FUNCTION pg_temp.seen() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO pg_temp.seen VALUES (NEW.params); RETURN NEW; END $$;
CREATE TRIGGER seen BEFORE INSERT ON beat.task FOR EACH ROW EXECUTE FUNCTION pg_temp.seen();
SELECT count(*) FROM beat.enqueue_batch('qd', '[{"t": 1}, {"t": 2}]'::jsonb);
DROP TRIGGER seen ON beat.task;
SELECT array_agg(params->>'t' ORDER BY params->>'t') AS trigger_saw FROM pg_temp.seen;

-- claim, written directly -----------------------------------------------

-- A claim updates each task where it finds it in task_claim_idx, without
-- the claim statement, which would lock it and then look it up again
-- through the primary key.  (The scans counted are this transaction's:
-- the flush before it empties what this backend had not yet reported.)
SELECT count(*) FROM beat.create_flow('qc', workers => 0);
SELECT count(*) FROM beat.enqueue_batch('qc', (SELECT array_agg(jsonb_build_object('n', g)) FROM generate_series(1, 6) g));
SELECT pg_stat_force_next_flush();
BEGIN;
SELECT array_agg(params->>'n' ORDER BY id) AS claimed FROM beat.claim('qc', 'w-c', 2);
SELECT pg_stat_get_xact_numscans('beat.task_pkey'::regclass) AS pkey_scans;
COMMIT;
-- AFTER ROW update triggers fire for each task it claims, as the
-- statement's would: a column list and a WHEN are honoured.
CREATE TABLE pg_temp.fired (trig text, id bigint, old_state text, new_state text);
CREATE FUNCTION pg_temp.fired() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO pg_temp.fired VALUES (TG_NAME, NEW.id, OLD.state, NEW.state); RETURN NEW; END $$;
CREATE TRIGGER of_state AFTER UPDATE OF state ON beat.task
    FOR EACH ROW EXECUTE FUNCTION pg_temp.fired();
CREATE TRIGGER of_result AFTER UPDATE OF result ON beat.task
    FOR EACH ROW EXECUTE FUNCTION pg_temp.fired();
CREATE TRIGGER retried AFTER UPDATE ON beat.task
    FOR EACH ROW WHEN (NEW.attempts > 1) EXECUTE FUNCTION pg_temp.fired();
SELECT pg_stat_force_next_flush();
BEGIN;
SELECT array_agg(params->>'n' ORDER BY id) AS claimed FROM beat.claim('qc', 'w-c', 2);
SELECT pg_stat_get_xact_numscans('beat.task_pkey'::regclass) AS pkey_scans;
COMMIT;
-- A BEFORE update trigger sends the claim back to the statement, which
-- fires it too.
CREATE TRIGGER before_claim BEFORE UPDATE ON beat.task
    FOR EACH ROW EXECUTE FUNCTION pg_temp.fired();
SELECT pg_stat_force_next_flush();
BEGIN;
SELECT array_agg(params->>'n' ORDER BY id) AS claimed FROM beat.claim('qc', 'w-c', 1);
SELECT pg_stat_get_xact_numscans('beat.task_pkey'::regclass) AS pkey_scans;
COMMIT;
DROP TRIGGER of_state ON beat.task;
DROP TRIGGER of_result ON beat.task;
DROP TRIGGER retried ON beat.task;
DROP TRIGGER before_claim ON beat.task;
SELECT f.trig, t.params->>'n' AS n, f.old_state, f.new_state
FROM pg_temp.fired f JOIN beat.task t USING (id) ORDER BY n, f.trig;
-- The CHECK constraints hold: a claim that would break one fails whole,
-- here at its second task, and leaves the first one pending.
ALTER TABLE beat.task ADD CONSTRAINT not_held CHECK (state <> 'running' OR NOT params ? 'hold') NOT VALID;
SELECT count(*) FROM beat.enqueue('qc', '{"hold": true}');
SELECT pg_temp.err($$SELECT * FROM beat.claim('qc', 'w-c', 5)$$);
SELECT params, state FROM beat.task WHERE flow = 'qc' AND state = 'pending' ORDER BY id;
ALTER TABLE beat.task DROP CONSTRAINT not_held;
-- An attempt count that would pass its type's limit is an error, as in
-- the statement (integer out of range).
UPDATE beat.task SET attempts = 2147483647 WHERE flow = 'qc' AND params = '{"n": 6}';
SELECT pg_temp.err($$SELECT * FROM beat.claim('qc', 'w-c', 1)$$);
-- A read-only transaction cannot claim (promoting, the claim's first
-- write, refuses it), and nothing changes.
BEGIN READ ONLY;
SELECT pg_temp.err($$SELECT * FROM beat.claim('qc', 'w-c', 1)$$);
ROLLBACK;
SELECT count(*) FILTER (WHERE state = 'pending') AS pending FROM beat.task WHERE flow = 'qc';

-- complete_batch, written directly ----------------------------------------

-- complete_batch too updates each task where it finds it (through the
-- primary key), without the statement; the checks of "complete_batch"
-- above ran that way.  AFTER ROW triggers fire for each task, a CHECK
-- that one task would break fails the whole batch, and a read-only
-- transaction is refused.  A BEFORE trigger sends it to the statement,
-- which gives the same errors.
TRUNCATE beat.task;
SELECT count(*) FROM beat.enqueue_batch('qc', (SELECT array_agg(jsonb_build_object('n', g)) FROM generate_series(1, 4) g));
CREATE TEMP TABLE cb AS SELECT id, params->>'n' AS n FROM beat.claim('qc', 'w-cb', 4);
TRUNCATE pg_temp.fired;
CREATE TRIGGER of_state AFTER UPDATE OF state ON beat.task
    FOR EACH ROW EXECUTE FUNCTION pg_temp.fired();
CREATE TRIGGER with_result AFTER UPDATE OF result ON beat.task
    FOR EACH ROW WHEN (NEW.result IS NOT NULL) EXECUTE FUNCTION pg_temp.fired();
SELECT beat.complete_batch(ARRAY(SELECT id FROM cb WHERE n IN ('1', '2') ORDER BY n DESC),
                           'w-cb', ARRAY['{"r": 2}', NULL]::jsonb[]);
DROP TRIGGER of_state ON beat.task;
DROP TRIGGER with_result ON beat.task;
SELECT f.trig, cb.n, f.old_state, f.new_state FROM pg_temp.fired f JOIN cb USING (id) ORDER BY cb.n, f.trig;
SELECT cb.n, t.state, t.result, t.lease_owner, t.lease_expires_at, t.finished_at IS NOT NULL AS finished
FROM beat.task t JOIN cb USING (id) WHERE cb.n IN ('1', '2') ORDER BY cb.n;
SELECT id AS t3 FROM cb WHERE n = '3' \gset
SELECT id AS t4 FROM cb WHERE n = '4' \gset
ALTER TABLE beat.task ADD CONSTRAINT not_four CHECK (state <> 'succeeded' OR NOT params @> '{"n": 4}') NOT VALID;
SELECT pg_temp.err(format('SELECT beat.complete_batch(ARRAY[%s, %s], %L)', :t3, :t4, 'w-cb'));
ALTER TABLE beat.task DROP CONSTRAINT not_four;
BEGIN READ ONLY;
SELECT pg_temp.err(format('SELECT beat.complete_batch(ARRAY[%s], %L)', :t3, 'w-cb'));
ROLLBACK;
SELECT cb.n, t.state FROM beat.task t JOIN cb USING (id) WHERE cb.n IN ('3', '4') ORDER BY cb.n;
CREATE FUNCTION pg_temp.noop() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
CREATE TRIGGER noop BEFORE UPDATE ON beat.task FOR EACH ROW EXECUTE FUNCTION pg_temp.noop();
SELECT id AS t1 FROM cb WHERE n = '1' \gset
SELECT replace(pg_temp.err(format('SELECT beat.complete_batch(ARRAY[%s, %s], %L)', :t3, :t1, 'w-cb')),
               :'t1', 't1') AS err;
SELECT pg_temp.err(format('SELECT beat.complete_batch(ARRAY[%s, %s], %L)', :t3, :t3, 'w-cb'));
SELECT beat.complete_batch(ARRAY[:t3, :t4], 'w-cb', ARRAY[NULL, '{"r": 4}']::jsonb[]);
DROP TRIGGER noop ON beat.task;
SELECT cb.n, t.state, t.result FROM beat.task t JOIN cb USING (id) WHERE cb.n IN ('3', '4') ORDER BY cb.n;

-- claim, planned once ----------------------------------------------------

-- Promote and the claim statement keep one generic plan per session,
-- made with sequential scans off: made while beat.task is empty, it still
-- goes through the indexes once the table holds 3,000 tasks.  So does
-- reap, which the launcher calls every second.  (A BEFORE trigger that
-- does nothing sends the claims here to the statement.)
SELECT count(*) FROM beat.create_flow('qs', workers => 0);
TRUNCATE beat.task;
CREATE TRIGGER noop BEFORE UPDATE ON beat.task FOR EACH ROW EXECUTE FUNCTION pg_temp.noop();
SELECT count(*) FROM beat.claim('qs', 'w-plan', 10);
SELECT * FROM beat.reap();
SELECT count(*) FROM beat.enqueue_batch('qs', (SELECT array_agg('{}'::jsonb) FROM generate_series(1, 3000)));
SELECT pg_stat_force_next_flush();
SELECT seq_scan AS seq0 FROM pg_stat_user_tables WHERE relid = 'beat.task'::regclass \gset
SELECT count(*) FROM beat.claim('qs', 'w-plan', 10);
SELECT count(*) FROM beat.claim('qs', 'w-plan', 10);
SELECT pg_stat_force_next_flush();
SELECT seq_scan - :seq0 AS claim_seq_scans FROM pg_stat_user_tables WHERE relid = 'beat.task'::regclass;
SELECT * FROM beat.reap();
SELECT * FROM beat.reap();
SELECT pg_stat_force_next_flush();
SELECT seq_scan - :seq0 AS reap_seq_scans FROM pg_stat_user_tables WHERE relid = 'beat.task'::regclass;
DROP TRIGGER noop ON beat.task;

-- complete, complete_batch, heartbeat and fail find their tasks through
-- the primary key, also in a generic plan made while the statistics say
-- that no task runs: none reads task_lease_idx, which holds every
-- running task.  (The BEFORE trigger that does nothing
-- sends complete_batch to its statements.)
TRUNCATE beat.task;
SELECT count(*) FROM beat.enqueue_batch('qs', (SELECT array_agg('{}'::jsonb) FROM generate_series(1, 3000)));
ANALYZE beat.task;
CREATE TEMP TABLE held AS SELECT id FROM beat.claim('qs', 'w-idx', 5);
SET plan_cache_mode = force_generic_plan;
CREATE TRIGGER noop BEFORE UPDATE ON beat.task FOR EACH ROW EXECUTE FUNCTION pg_temp.noop();
SELECT pg_stat_force_next_flush();
SELECT idx_scan AS lease0 FROM pg_stat_user_indexes WHERE indexrelname = 'task_lease_idx' \gset
SELECT count(beat.heartbeat(id, 'w-idx')) AS heartbeats FROM held;
SELECT beat.complete(min(id), 'w-idx') FROM held;
SELECT beat.complete_batch(array_agg(id), 'w-idx')
FROM (SELECT id FROM held ORDER BY id OFFSET 1 LIMIT 1) h;
SELECT beat.complete_batch(array_agg(id), 'w-idx', ARRAY['{"r": 1}']::jsonb[])
FROM (SELECT id FROM held ORDER BY id OFFSET 2 LIMIT 1) h;
SELECT beat.fail(max(id), 'w-idx', 'test', permanent => true) FROM held;
SELECT pg_stat_force_next_flush();
SELECT idx_scan - :lease0 AS lease_idx_scans FROM pg_stat_user_indexes WHERE indexrelname = 'task_lease_idx';
DROP TRIGGER noop ON beat.task;
SELECT state, count(*) FROM beat.task WHERE id IN (SELECT id FROM held) GROUP BY state ORDER BY state;
RESET plan_cache_mode;

DROP EXTENSION pg_beat;
