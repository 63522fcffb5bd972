-- pg_beat 0.1.0 -> 0.2.0: background workers that fetch over HTTP.
--
-- A flow with a request template gets in-database workers: the launcher
-- starts beat.flow.workers processes for it, each keeping up to
-- beat.flow.concurrency transfers in flight.  Every transfer is logged in
-- beat.http_log; beat.worker_status shows the processes.

\echo Use "ALTER EXTENSION pg_beat UPDATE TO '0.2.0'" to load this file. \quit

-- What a flow's workers send, and how they judge the answer.
ALTER TABLE beat.flow
    ADD COLUMN request        jsonb,
    ADD COLUMN timeout        interval NOT NULL DEFAULT '30 seconds'
                              CHECK (timeout > '0' AND timeout <= '1 hour'),
    ADD COLUMN ok_statuses    int4multirange NOT NULL DEFAULT '{[200,300)}',
    ADD COLUMN retry_statuses int4multirange NOT NULL DEFAULT '{[408,409),[429,430),[500,600)}',
    ADD COLUMN max_redirects  integer NOT NULL DEFAULT 5
                              CHECK (max_redirects BETWEEN 0 AND 50);

COMMENT ON COLUMN beat.flow.request IS 'Request template for the in-database workers: {"method", "url", "query", "headers", "body"} with {{param}} placeholders; NULL for a flow served only by external workers.';

-- The new settings join create_flow and alter_flow.
DROP FUNCTION beat.create_flow(text, integer, interval, interval, interval, integer, interval, integer, integer, boolean);
DROP FUNCTION beat.alter_flow(text, integer, interval, interval, interval, integer, interval, integer, integer, boolean);

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
    paused          boolean DEFAULT NULL,
    request         jsonb DEFAULT NULL,
    timeout         interval DEFAULT NULL,
    ok_statuses     int4multirange DEFAULT NULL,
    retry_statuses  int4multirange DEFAULT NULL,
    max_redirects   integer DEFAULT NULL)
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
    paused          boolean DEFAULT NULL,
    request         jsonb DEFAULT NULL,
    timeout         interval DEFAULT NULL,
    ok_statuses     int4multirange DEFAULT NULL,
    retry_statuses  int4multirange DEFAULT NULL,
    max_redirects   integer DEFAULT NULL)
RETURNS beat.flow
AS 'MODULE_PATHNAME', 'beat_alter_flow'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- Stop or restart handing out a flow's tasks.
CREATE FUNCTION beat.pause(flow text)
RETURNS void
AS 'MODULE_PATHNAME', 'beat_pause'
LANGUAGE C VOLATILE STRICT SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

CREATE FUNCTION beat.resume(flow text)
RETURNS void
AS 'MODULE_PATHNAME', 'beat_resume'
LANGUAGE C VOLATILE STRICT SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- Tell the launcher at commit that flows changed (trigger on beat.flow).
CREATE FUNCTION beat.flow_changed()
RETURNS trigger
AS 'MODULE_PATHNAME', 'beat_flow_changed'
LANGUAGE C;

CREATE TRIGGER flow_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON beat.flow
    FOR EACH STATEMENT EXECUTE FUNCTION beat.flow_changed();

-- One row per HTTP transfer the workers made.
CREATE TABLE beat.http_log (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id         bigint NOT NULL,
    flow            text NOT NULL,
    attempt         integer NOT NULL,
    worker          text NOT NULL,
    method          text NOT NULL,
    url             text NOT NULL,
    status          integer,
    bytes           bigint NOT NULL DEFAULT 0,
    dns_ms          double precision,
    connect_ms      double precision,
    tls_ms          double precision,
    first_byte_ms   double precision,
    total_ms        double precision,
    outcome         text NOT NULL
                    CHECK (outcome IN ('ok', 'retry', 'permanent', 'lost')),
    error           text,
    created_at      timestamptz NOT NULL DEFAULT now()
) WITH (autovacuum_vacuum_insert_scale_factor = 0.02);

COMMENT ON TABLE beat.http_log IS 'One row per HTTP transfer made by the workers: URL (secret query values redacted), status, bytes, curl timings in milliseconds, outcome and error.  Kept for beat.http_log_retention.';

CREATE INDEX http_log_task_idx ON beat.http_log (task_id);
CREATE INDEX http_log_created_idx ON beat.http_log USING brin (created_at);

SELECT pg_catalog.pg_extension_config_dump('beat.http_log', '');
SELECT pg_catalog.pg_extension_config_dump('beat.http_log_id_seq', '');

-- The workers as shared memory sees them.
CREATE FUNCTION beat.worker_status_rows(
    OUT pid integer, OUT flow text, OUT slot integer, OUT state text,
    OUT in_flight integer, OUT done bigint, OUT failed bigint,
    OUT started_at timestamptz, OUT last_activity timestamptz)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'beat_worker_status_rows'
LANGUAGE C VOLATILE;

CREATE VIEW beat.worker_status AS
    SELECT * FROM beat.worker_status_rows();

COMMENT ON VIEW beat.worker_status IS 'One row per pg_beat background process: the launcher and each flow worker, with transfers in flight, done and failed since it started.';

-- Stop claiming everywhere and wait for in-flight transfers to finish.
CREATE FUNCTION beat.drain(timeout interval DEFAULT '30 seconds',
                           OUT flow text, OUT pid integer, OUT in_flight integer)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'beat_drain'
LANGUAGE C VOLATILE;

-- Let the workers claim again after beat.drain().
CREATE FUNCTION beat.undrain()
RETURNS void
AS 'MODULE_PATHNAME', 'beat_undrain'
LANGUAGE C VOLATILE;

-- Delete transfer log rows older than beat.http_log_retention (or older_than).
CREATE FUNCTION beat.purge_http_log(older_than interval DEFAULT NULL)
RETURNS bigint
AS 'MODULE_PATHNAME', 'beat_purge_http_log'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

REVOKE ALL ON FUNCTION
    beat.create_flow(text, integer, interval, interval, interval, integer, interval, integer, integer, boolean, jsonb, interval, int4multirange, int4multirange, integer),
    beat.alter_flow(text, integer, interval, interval, interval, integer, interval, integer, integer, boolean, jsonb, interval, int4multirange, int4multirange, integer),
    beat.pause(text), beat.resume(text), beat.flow_changed(),
    beat.worker_status_rows(), beat.drain(interval), beat.undrain(),
    beat.purge_http_log(interval)
FROM PUBLIC;
REVOKE ALL ON beat.http_log, beat.worker_status FROM PUBLIC;

GRANT SELECT ON beat.http_log, beat.worker_status TO beat_user;
GRANT EXECUTE ON FUNCTION beat.worker_status_rows() TO beat_user;
GRANT EXECUTE ON FUNCTION
    beat.create_flow(text, integer, interval, interval, interval, integer, interval, integer, integer, boolean, jsonb, interval, int4multirange, int4multirange, integer),
    beat.alter_flow(text, integer, interval, interval, interval, integer, interval, integer, integer, boolean, jsonb, interval, int4multirange, int4multirange, integer),
    beat.pause(text), beat.resume(text),
    beat.drain(interval), beat.undrain(),
    beat.purge_http_log(interval)
TO beat_admin;
