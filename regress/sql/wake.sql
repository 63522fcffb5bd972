-- The commit-time wake-up: only a commit that made work available counts,
-- never a rollback, and an aborted subtransaction takes its request with it.
CREATE EXTENSION pg_beat;
SELECT count(*) FROM beat.create_flow('w', backoff_base => '1 ms', backoff_cap => '1 ms');
SELECT beat.wakeups() AS w0 \gset

-- A committed enqueue wakes the workers once.
SELECT beat.enqueue('w', '{}') > 0 AS enqueued;
SELECT beat.wakeups() - :w0 AS woken;

-- Not before the commit, and never on rollback.
BEGIN;
SELECT beat.enqueue('w', '{}') > 0 AS enqueued;
SELECT beat.wakeups() - :w0 AS woken_before_commit;
ROLLBACK;
SELECT beat.wakeups() - :w0 AS woken_after_rollback;

-- Many enqueues in one transaction: one wake-up.
BEGIN;
SELECT beat.enqueue('w', '{}') > 0 AS enqueued;
SELECT count(*) FROM beat.enqueue_batch('w', '[{}, {}]'::jsonb);
COMMIT;
SELECT beat.wakeups() - :w0 AS woken;

-- A rolled-back savepoint takes its request with it ...
BEGIN;
SAVEPOINT s;
SELECT beat.enqueue('w', '{}') > 0 AS enqueued;
ROLLBACK TO SAVEPOINT s;
COMMIT;
SELECT beat.wakeups() - :w0 AS woken_after_savepoint_rollback;

-- ... a released one hands it to the transaction ...
BEGIN;
SAVEPOINT s;
SAVEPOINT t;
SELECT beat.enqueue('w', '{}') > 0 AS enqueued;
RELEASE SAVEPOINT t;
RELEASE SAVEPOINT s;
COMMIT;
SELECT beat.wakeups() - :w0 AS woken;

-- ... and an earlier request survives a later savepoint's rollback.
BEGIN;
SELECT beat.enqueue('w', '{}') > 0 AS enqueued;
SAVEPOINT s;
SELECT beat.enqueue('w', '{}') > 0 AS enqueued;
ROLLBACK TO SAVEPOINT s;
COMMIT;
SELECT beat.wakeups() - :w0 AS woken;

-- A released savepoint inside one that is rolled back: no wake-up.
BEGIN;
SAVEPOINT s;
SAVEPOINT t;
SELECT beat.enqueue('w', '{}') > 0 AS enqueued;
RELEASE SAVEPOINT t;
ROLLBACK TO SAVEPOINT s;
COMMIT;
SELECT beat.wakeups() - :w0 AS woken;

-- A failed enqueue does not wake; claiming and completing do not either.
SELECT beat.enqueue('no_such_flow', '{}');
SELECT count(*) FROM beat.claim('w', 'x', 100);
SELECT beat.wakeups() - :w0 AS woken;

-- A failure that schedules a retry wakes; one that kills the task does not.
SELECT beat.enqueue('w', '{}') AS t \gset
SELECT beat.wakeups() AS w1 \gset
SELECT count(*) FROM beat.claim('w', 'x', 1);
SELECT beat.fail(:t, 'x', 'boom', retry_after => '0');
SELECT beat.wakeups() - :w1 AS woken;
SELECT pg_sleep(0.01);
SELECT count(*) FROM beat.claim('w', 'x', 1);
SELECT beat.fail(:t, 'x', 'boom', permanent => true);
SELECT beat.wakeups() - :w1 AS woken;

-- A requeue and a reap that returns work wake.
SELECT beat.requeue(:t);
SELECT beat.wakeups() - :w1 AS woken;
SELECT count(*) FROM beat.claim('w', 'x', 1, lease => '1 ms');
SELECT pg_sleep(0.02);
SELECT * FROM beat.reap();
SELECT beat.wakeups() - :w1 AS woken;

DROP EXTENSION pg_beat;
