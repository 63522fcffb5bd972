-- pg_beat 0.2.0 -> 0.3.0: rate limits and quotas in shared memory.
--
-- Limits are rows of beat.rate_limit; their state lives in shared memory
-- (see extension/limiter.c), so a check costs about a microsecond.  Flows
-- name the limits their calls pass in beat.flow.limits.

\echo Use "ALTER EXTENSION pg_beat UPDATE TO '0.3.0'" to load this file. \quit

-- A named limit: a rate (limit per period, plus burst, GCRA) or a quota
-- (limit per calendar window in a time zone).  A name may be a template,
-- 'handle:{{handle}}', with one bucket per key that matches it.
CREATE TABLE beat.rate_limit (
    name            text PRIMARY KEY,
    kind            text NOT NULL CHECK (kind IN ('rate', 'quota')),
    "limit"         bigint NOT NULL CHECK ("limit" > 0),
    period          interval CHECK (period > '0'),
    burst           bigint NOT NULL DEFAULT 0 CHECK (burst >= 0),
    quota_window    text CHECK (quota_window IN ('hour', 'day', 'week', 'month')),
    time_zone       text NOT NULL DEFAULT 'UTC',
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CHECK ((kind = 'rate') = (period IS NOT NULL)),
    CHECK ((kind = 'quota') = (quota_window IS NOT NULL))
);

COMMENT ON TABLE beat.rate_limit IS 'Rate limits (GCRA: limit per period, plus burst) and quotas (limit per calendar window); change them with beat.set_limit and beat.drop_limit.';

SELECT pg_catalog.pg_extension_config_dump('beat.rate_limit', '');

-- Definitions change for every backend when the change commits.
CREATE FUNCTION beat.limits_changed()
RETURNS trigger
AS 'MODULE_PATHNAME', 'beat_limits_changed'
LANGUAGE C;

CREATE TRIGGER limits_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON beat.rate_limit
    FOR EACH STATEMENT EXECUTE FUNCTION beat.limits_changed();

-- The limits a flow's calls pass, as key templates filled from each
-- task's params, e.g. '{global:day, global:minute, handle:{{handle}}}'.
ALTER TABLE beat.flow ADD COLUMN limits text[] NOT NULL DEFAULT '{}';

-- Create or change a limit.
CREATE FUNCTION beat.set_limit(
    name        text,
    "limit"     bigint,
    per         interval DEFAULT NULL,
    burst       bigint DEFAULT NULL,
    quota       text DEFAULT NULL,
    time_zone   text DEFAULT NULL)
RETURNS beat.rate_limit
AS 'MODULE_PATHNAME', 'beat_set_limit'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- Forget a limit.
CREATE FUNCTION beat.drop_limit(name text)
RETURNS void
AS 'MODULE_PATHNAME', 'beat_drop_limit'
LANGUAGE C VOLATILE STRICT SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- Admit cost through every key, charging all of them, or refuse and charge none.
-- The limiter functions run no SQL but a rare read of beat.rate_limit, so
-- they run as the caller: no SECURITY DEFINER, no per-call search_path.
CREATE FUNCTION beat.acquire(keys text[], cost integer DEFAULT 1,
    OUT allowed boolean, OUT retry_after interval, OUT blocking_key text,
    OUT remaining bigint, OUT reset_after interval)
RETURNS record
AS 'MODULE_PATHNAME', 'beat_acquire'
LANGUAGE C VOLATILE;

-- What beat.acquire would answer, charging nothing.
CREATE FUNCTION beat.peek(keys text[], cost integer DEFAULT 1,
    OUT allowed boolean, OUT retry_after interval, OUT blocking_key text,
    OUT remaining bigint, OUT reset_after interval)
RETURNS record
AS 'MODULE_PATHNAME', 'beat_peek'
LANGUAGE C VOLATILE;

-- Give back a charge for a call that was never made.
CREATE FUNCTION beat.refund(keys text[], cost integer DEFAULT 1)
RETURNS void
AS 'MODULE_PATHNAME', 'beat_refund'
LANGUAGE C VOLATILE;

-- Admit nothing through key before until (a provider's Retry-After).
CREATE FUNCTION beat.penalize(key text, until timestamptz)
RETURNS void
AS 'MODULE_PATHNAME', 'beat_penalize'
LANGUAGE C VOLATILE;

-- Time the limiter's C path in this backend.
CREATE FUNCTION beat.bench_acquire(keys text[], iterations integer DEFAULT 1000000,
    OUT checks_per_second double precision, OUT p50_ns double precision,
    OUT p99_ns double precision, OUT admitted bigint)
RETURNS record
AS 'MODULE_PATHNAME', 'beat_bench_acquire'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- Every live key, from shared memory.
CREATE FUNCTION beat.limiter_status_rows(
    OUT key text, OUT limit_name text, OUT kind text, OUT "limit" bigint,
    OUT remaining bigint, OUT next_admission timestamptz, OUT reset_at timestamptz,
    OUT penalized_until timestamptz)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'beat_limiter_status_rows'
LANGUAGE C VOLATILE;

CREATE VIEW beat.limiter_status AS
    SELECT * FROM beat.limiter_status_rows();

COMMENT ON VIEW beat.limiter_status IS 'Every live rate limit key: its limit, what it admits now, when it next admits one, when it is whole again.';

-- create_flow and alter_flow learn the limits setting.
DROP FUNCTION beat.create_flow(text, integer, interval, interval, interval, integer, interval, integer, integer, boolean, jsonb, interval, int4multirange, int4multirange, integer);
DROP FUNCTION beat.alter_flow(text, integer, interval, interval, interval, integer, interval, integer, integer, boolean, jsonb, interval, int4multirange, int4multirange, integer);

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
    max_redirects   integer DEFAULT NULL,
    limits          text[] DEFAULT NULL)
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
    max_redirects   integer DEFAULT NULL,
    limits          text[] DEFAULT NULL)
RETURNS beat.flow
AS 'MODULE_PATHNAME', 'beat_alter_flow'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

REVOKE ALL ON FUNCTION
    beat.create_flow(text, integer, interval, interval, interval, integer, interval, integer, integer, boolean, jsonb, interval, int4multirange, int4multirange, integer, text[]),
    beat.alter_flow(text, integer, interval, interval, interval, integer, interval, integer, integer, boolean, jsonb, interval, int4multirange, int4multirange, integer, text[]),
    beat.limits_changed(), beat.set_limit(text, bigint, interval, bigint, text, text),
    beat.drop_limit(text), beat.acquire(text[], integer), beat.peek(text[], integer),
    beat.refund(text[], integer), beat.penalize(text, timestamptz),
    beat.bench_acquire(text[], integer), beat.limiter_status_rows()
FROM PUBLIC;
REVOKE ALL ON beat.rate_limit, beat.limiter_status FROM PUBLIC;

GRANT SELECT ON beat.rate_limit, beat.limiter_status TO beat_user;
GRANT EXECUTE ON FUNCTION beat.limiter_status_rows(), beat.peek(text[], integer) TO beat_user;
GRANT EXECUTE ON FUNCTION beat.acquire(text[], integer), beat.refund(text[], integer),
    beat.penalize(text, timestamptz) TO beat_worker;
GRANT EXECUTE ON FUNCTION
    beat.create_flow(text, integer, interval, interval, interval, integer, interval, integer, integer, boolean, jsonb, interval, int4multirange, int4multirange, integer, text[]),
    beat.alter_flow(text, integer, interval, interval, interval, integer, interval, integer, integer, boolean, jsonb, interval, int4multirange, int4multirange, integer, text[]),
    beat.set_limit(text, bigint, interval, bigint, text, text), beat.drop_limit(text),
    beat.bench_acquire(text[], integer)
TO beat_admin;
