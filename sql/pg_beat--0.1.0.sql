-- pg_beat 0.1.0: the durable task queue.
--
-- Layout of this script: roles, types, tables and indexes, the C functions
-- (queue, flows, diagnostics), views, then privileges.  Every function that
-- writes runs as the extension owner (SECURITY DEFINER with a pinned
-- search_path); callers get EXECUTE through the roles below, never through
-- PUBLIC.

\echo Use "CREATE EXTENSION pg_beat" to load this file. \quit

-- Roles are cluster-wide: create them only when absent, and never drop them.
DO $roles$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'beat_user') THEN
        CREATE ROLE beat_user NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'beat_worker') THEN
        CREATE ROLE beat_worker NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'beat_admin') THEN
        CREATE ROLE beat_admin NOLOGIN;
    END IF;
END
$roles$;

-- Each role can do what the one before it can: a worker enqueues follow-up
-- work, an admin does everything.
GRANT beat_user TO beat_worker;
GRANT beat_worker TO beat_admin;

-- The life of a task.  'scheduled' waits for a future run_at; 'failed'
-- means "failed, will retry at run_at".  Both become 'pending' when due.
CREATE TYPE beat.task_state AS ENUM (
    'pending', 'scheduled', 'running', 'succeeded', 'failed', 'dead', 'cancelled'
);

-- A named kind of work and the defaults its tasks take.
-- Names, keys and owners compare byte by byte (COLLATE "C"): they are
-- only ever matched for equality or a fixed alphabet, and the indexes on
-- them need no locale rules.
CREATE TABLE beat.flow (
    name            text COLLATE "C" PRIMARY KEY
                    CHECK (name ~ '^[a-z0-9][a-z0-9_.-]{0,62}$'),
    max_attempts    integer NOT NULL DEFAULT 5
                    CHECK (max_attempts BETWEEN 1 AND 1000),
    backoff_base    interval NOT NULL DEFAULT '1 second'
                    CHECK (backoff_base > '0'),
    backoff_cap     interval NOT NULL DEFAULT '10 minutes'
                    CHECK (backoff_cap >= backoff_base),
    lease           interval NOT NULL DEFAULT '5 minutes'
                    CHECK (lease > '0'),
    priority        integer NOT NULL DEFAULT 0
                    CHECK (priority BETWEEN -1000 AND 1000),
    retention       interval NOT NULL DEFAULT '7 days'
                    CHECK (retention >= '0'),
    paused          boolean NOT NULL DEFAULT false,
    workers         integer NOT NULL DEFAULT 1
                    CHECK (workers BETWEEN 0 AND 64),
    concurrency     integer NOT NULL DEFAULT 16
                    CHECK (concurrency BETWEEN 1 AND 1024),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE beat.flow IS 'A named kind of work with the defaults its tasks take; change it with beat.create_flow, beat.alter_flow and beat.drop_flow.';

-- One unit of work.  There is deliberately no foreign key to beat.flow: the
-- check would lock the flow row once per enqueued task.  beat.enqueue checks
-- the flow in the INSERT itself, and beat.drop_flow locks this table against
-- writers before it deletes a flow's tasks, so no task outlives its flow.
CREATE TABLE beat.task (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    flow                text COLLATE "C" NOT NULL,
    state               beat.task_state NOT NULL DEFAULT 'pending',
    priority            integer NOT NULL DEFAULT 0,
    run_at              timestamptz NOT NULL DEFAULT now(),
    attempts            integer NOT NULL DEFAULT 0,
    max_attempts        integer NOT NULL,
    idempotency_key     text COLLATE "C",
    params              jsonb NOT NULL,
    result              jsonb,
    last_error          text,
    correlation_id      uuid NOT NULL,
    lease_owner         text COLLATE "C",
    lease_expires_at    timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    started_at          timestamptz,
    finished_at         timestamptz,
    CHECK ((state = 'running') = (lease_owner IS NOT NULL AND lease_expires_at IS NOT NULL)),
    CHECK ((state IN ('succeeded', 'dead', 'cancelled')) = (finished_at IS NOT NULL))
) WITH (
    -- A queue table turns over all the time: vacuum it early and often.
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_insert_scale_factor = 0.01,
    autovacuum_analyze_scale_factor = 0.02
);

COMMENT ON TABLE beat.task IS 'One unit of work: its state, attempts, lease, params and result.';

-- The claim query walks this index in claim order.  Only due tasks are in
-- it, so a claim stops after the rows it takes, however many wait for later.
CREATE INDEX task_claim_idx ON beat.task (flow, priority, run_at, id)
    WHERE state = 'pending';

-- Tasks waiting for their run_at (scheduled, or failed and due to retry):
-- claim promotes the due ones to pending, and a worker with nothing to do
-- sleeps until the first one here.
CREATE INDEX task_waiting_idx ON beat.task (flow, run_at)
    WHERE state IN ('scheduled', 'failed');

-- Idempotency: one live task per (flow, key).
CREATE UNIQUE INDEX task_idempotency_idx ON beat.task (flow, idempotency_key)
    WHERE idempotency_key IS NOT NULL
      AND state IN ('pending', 'scheduled', 'running', 'failed');

-- The reaper finds expired leases here.
CREATE INDEX task_lease_idx ON beat.task (lease_expires_at)
    WHERE state = 'running';

-- Retention finds finished tasks here.
CREATE INDEX task_finished_idx ON beat.task (flow, finished_at)
    WHERE state IN ('succeeded', 'dead', 'cancelled');

-- What beat.claim returns for each task it leases.
CREATE TYPE beat.claimed_task AS (
    id                  bigint,
    flow                text,
    params              jsonb,
    priority            integer,
    attempt             integer,
    max_attempts        integer,
    idempotency_key     text COLLATE "C",
    correlation_id      uuid,
    run_at              timestamptz,
    created_at          timestamptz,
    lease_expires_at    timestamptz
);

-- Flows -------------------------------------------------------------------

-- Create a flow; any argument left NULL takes the column default.
CREATE FUNCTION beat.create_flow(
    name            text,
    max_attempts    integer DEFAULT NULL,
    backoff_base    interval DEFAULT NULL,
    backoff_cap     interval DEFAULT NULL,
    lease           interval DEFAULT NULL,
    priority        integer DEFAULT NULL,
    retention       interval DEFAULT NULL,
    workers         integer DEFAULT NULL,
    concurrency     integer DEFAULT NULL,
    paused          boolean DEFAULT NULL)
RETURNS beat.flow
AS 'MODULE_PATHNAME', 'beat_create_flow'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- Change a flow's settings; NULL leaves a setting as it is.
CREATE FUNCTION beat.alter_flow(
    name            text,
    max_attempts    integer DEFAULT NULL,
    backoff_base    interval DEFAULT NULL,
    backoff_cap     interval DEFAULT NULL,
    lease           interval DEFAULT NULL,
    priority        integer DEFAULT NULL,
    retention       interval DEFAULT NULL,
    workers         integer DEFAULT NULL,
    concurrency     integer DEFAULT NULL,
    paused          boolean DEFAULT NULL)
RETURNS beat.flow
AS 'MODULE_PATHNAME', 'beat_alter_flow'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- Drop a flow and its finished tasks; live tasks need force => true.
CREATE FUNCTION beat.drop_flow(name text, force boolean DEFAULT false)
RETURNS bigint
AS 'MODULE_PATHNAME', 'beat_drop_flow'
LANGUAGE C VOLATILE STRICT SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- Queue -------------------------------------------------------------------

-- Enqueue one task; a live duplicate idempotency key returns the existing id.
CREATE FUNCTION beat.enqueue(
    flow            text,
    params          jsonb DEFAULT '{}',
    priority        integer DEFAULT NULL,
    run_at          timestamptz DEFAULT NULL,
    idempotency_key text DEFAULT NULL,
    correlation_id  uuid DEFAULT NULL,
    max_attempts    integer DEFAULT NULL)
RETURNS bigint
AS 'MODULE_PATHNAME', 'beat_enqueue'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- Enqueue many tasks in one statement; ids come back in input order.
CREATE FUNCTION beat.enqueue_batch(
    flow             text,
    params           jsonb[],
    priority         integer DEFAULT NULL,
    run_at           timestamptz DEFAULT NULL,
    idempotency_keys text[] DEFAULT NULL,
    correlation_id   uuid DEFAULT NULL,
    max_attempts     integer DEFAULT NULL)
RETURNS SETOF bigint
AS 'MODULE_PATHNAME', 'beat_enqueue_batch'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- The same, taking the params as one JSON array of objects.
CREATE FUNCTION beat.enqueue_batch(
    flow             text,
    params           jsonb,
    priority         integer DEFAULT NULL,
    run_at           timestamptz DEFAULT NULL,
    idempotency_keys text[] DEFAULT NULL,
    correlation_id   uuid DEFAULT NULL,
    max_attempts     integer DEFAULT NULL)
RETURNS SETOF bigint
AS 'MODULE_PATHNAME', 'beat_enqueue_batch'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- Lease up to max_tasks due tasks of a flow to a worker, in claim order.
CREATE FUNCTION beat.claim(
    flow        text,
    worker      text,
    max_tasks   integer DEFAULT 1,
    lease       interval DEFAULT NULL)
RETURNS SETOF beat.claimed_task
AS 'MODULE_PATHNAME', 'beat_claim'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- Mark a task the worker holds as succeeded, storing its result.
CREATE FUNCTION beat.complete(task_id bigint, worker text, result jsonb DEFAULT NULL)
RETURNS void
AS 'MODULE_PATHNAME', 'beat_complete'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- Complete many held tasks at once; all or nothing.
CREATE FUNCTION beat.complete_batch(task_ids bigint[], worker text, results jsonb[] DEFAULT NULL)
RETURNS bigint
AS 'MODULE_PATHNAME', 'beat_complete_batch'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- Record a failure: retry later with backoff, or dead when out of attempts.
CREATE FUNCTION beat.fail(
    task_id     bigint,
    worker      text,
    error       text,
    retry_after interval DEFAULT NULL,
    permanent   boolean DEFAULT false)
RETURNS beat.task_state
AS 'MODULE_PATHNAME', 'beat_fail'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- Extend the lease of a held task; returns the new expiry.
CREATE FUNCTION beat.heartbeat(task_id bigint, worker text, extend interval DEFAULT NULL)
RETURNS timestamptz
AS 'MODULE_PATHNAME', 'beat_heartbeat'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- Cancel a task that has not finished.
CREATE FUNCTION beat.cancel(task_id bigint)
RETURNS void
AS 'MODULE_PATHNAME', 'beat_cancel'
LANGUAGE C VOLATILE STRICT SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- Put a dead or cancelled task back to pending with fresh attempts.
CREATE FUNCTION beat.requeue(task_id bigint)
RETURNS void
AS 'MODULE_PATHNAME', 'beat_requeue'
LANGUAGE C VOLATILE STRICT SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- Return expired leases to pending (or dead when out of attempts).
CREATE FUNCTION beat.reap(OUT requeued bigint, OUT dead bigint)
RETURNS record
AS 'MODULE_PATHNAME', 'beat_reap'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- Delete finished tasks older than older_than, or than each flow's retention.
CREATE FUNCTION beat.purge(older_than interval DEFAULT NULL)
RETURNS bigint
AS 'MODULE_PATHNAME', 'beat_purge'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- Diagnostics -------------------------------------------------------------

-- How many committed transactions have signalled the workers since start.
CREATE FUNCTION beat.wakeups()
RETURNS bigint
AS 'MODULE_PATHNAME', 'beat_wakeups'
LANGUAGE C VOLATILE;

-- Tasks per flow and state, with the age of the oldest due task.
CREATE VIEW beat.queue_stats AS
SELECT f.name AS flow,
       f.paused,
       count(*) FILTER (WHERE t.state = 'pending')    AS pending,
       count(*) FILTER (WHERE t.state = 'scheduled')  AS scheduled,
       count(*) FILTER (WHERE t.state = 'running')    AS running,
       count(*) FILTER (WHERE t.state = 'failed')     AS failed,
       count(*) FILTER (WHERE t.state = 'succeeded')  AS succeeded,
       count(*) FILTER (WHERE t.state = 'dead')       AS dead,
       count(*) FILTER (WHERE t.state = 'cancelled')  AS cancelled,
       now() - min(t.run_at) FILTER (WHERE t.state IN ('pending', 'scheduled', 'failed')
                                       AND t.run_at <= now()) AS oldest_due_age
FROM beat.flow f
LEFT JOIN beat.task t ON t.flow = f.name
GROUP BY f.name, f.paused;

COMMENT ON VIEW beat.queue_stats IS 'Tasks per flow and state, and how long the oldest due task has waited.';

-- pg_dump keeps the rows of these tables (the extension's objects it recreates).
SELECT pg_catalog.pg_extension_config_dump('beat.flow', '');
SELECT pg_catalog.pg_extension_config_dump('beat.task', '');
SELECT pg_catalog.pg_extension_config_dump('beat.task_id_seq', '');

-- Privileges --------------------------------------------------------------
-- Functions are executable by PUBLIC by default: take that back everywhere.

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA beat FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA beat FROM PUBLIC;
REVOKE ALL ON SCHEMA beat FROM PUBLIC;

GRANT USAGE ON SCHEMA beat TO beat_user, beat_worker, beat_admin;
GRANT SELECT ON beat.flow, beat.task, beat.queue_stats TO beat_user, beat_worker;

GRANT EXECUTE ON FUNCTION
    beat.enqueue(text, jsonb, integer, timestamptz, text, uuid, integer),
    beat.enqueue_batch(text, jsonb[], integer, timestamptz, text[], uuid, integer),
    beat.enqueue_batch(text, jsonb, integer, timestamptz, text[], uuid, integer),
    beat.wakeups()
TO beat_user;

GRANT EXECUTE ON FUNCTION
    beat.claim(text, text, integer, interval),
    beat.complete(bigint, text, jsonb),
    beat.complete_batch(bigint[], text, jsonb[]),
    beat.fail(bigint, text, text, interval, boolean),
    beat.heartbeat(bigint, text, interval)
TO beat_worker;

GRANT EXECUTE ON FUNCTION
    beat.create_flow(text, integer, interval, interval, interval, integer, interval, integer, integer, boolean),
    beat.alter_flow(text, integer, interval, interval, interval, integer, interval, integer, integer, boolean),
    beat.drop_flow(text, boolean),
    beat.cancel(bigint),
    beat.requeue(bigint),
    beat.reap(),
    beat.purge(interval)
TO beat_admin;
