-- Rate limits and quotas: beat.set_limit, acquire, peek, refund, penalize,
-- limiter_status, every error, and the arithmetic of GCRA and of calendar
-- quotas, on a clock the test sets (beat.limiter_clock).
CREATE EXTENSION pg_beat;

CREATE FUNCTION pg_temp.err(sql text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE sql;
    RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || SQLERRM;
END
$$;

-- Acquire n times at the current clock; how many were admitted.
CREATE FUNCTION pg_temp.take(keys text[], n int) RETURNS int LANGUAGE plpgsql AS $$
DECLARE
    admitted int := 0;
BEGIN
    FOR i IN 1..n LOOP
        IF (beat.acquire(keys)).allowed THEN
            admitted := admitted + 1;
        END IF;
    END LOOP;
    RETURN admitted;
END
$$;

-- Admissions when a caller tries every step over span, always waiting
-- exactly the retry_after it is told: the clock moves only by answers.
CREATE FUNCTION pg_temp.follow(keys text[], span interval) RETURNS int LANGUAGE plpgsql AS $$
DECLARE
    t timestamptz := current_setting('beat.limiter_clock')::timestamptz;
    stop timestamptz := t + span;
    r record;
    admitted int := 0;
BEGIN
    LOOP
        EXIT WHEN t >= stop;
        PERFORM set_config('beat.limiter_clock', t::text, false);
        r := beat.acquire(keys);
        IF r.allowed THEN
            admitted := admitted + 1;
        ELSE
            t := t + r.retry_after;
        END IF;
    END LOOP;
    RETURN admitted;
END
$$;

SET beat.limiter_clock = '2026-01-01 00:00:00+00';

-- Defining limits -----------------------------------------------------

SELECT name, kind, "limit", period, burst, quota_window, time_zone
FROM beat.set_limit('api:second', 10, per => '1 second');
SELECT name, kind, "limit", period, burst FROM beat.set_limit('api:30s', 100, per => '30 seconds', burst => 5);
SELECT name, kind, "limit", quota_window, time_zone FROM beat.set_limit('api:day', 20000, quota => 'day');
SELECT name, kind, "limit", period, burst FROM beat.set_limit('handle:{{handle}}', 1, per => '1 second');
SELECT name, kind, "limit", quota_window, time_zone
FROM beat.set_limit('tenant:{{t}}:month', 3, quota => 'month', time_zone => 'America/New_York');

-- Changing a limit replaces it.
SELECT "limit", period FROM beat.set_limit('api:second', 20, per => '1 second');

SELECT pg_temp.err($$SELECT beat.set_limit(NULL, 1, per => '1 s')$$);
SELECT pg_temp.err($$SELECT beat.set_limit('', 1, per => '1 s')$$);
SELECT pg_temp.err($$SELECT beat.set_limit('a:{{b', 1, per => '1 s')$$);
SELECT pg_temp.err($$SELECT beat.set_limit('a::b', 1, per => '1 s')$$);
SELECT pg_temp.err($$SELECT beat.set_limit('x', 0, per => '1 s')$$);
SELECT pg_temp.err($$SELECT beat.set_limit('x', NULL, per => '1 s')$$);
SELECT pg_temp.err($$SELECT beat.set_limit('x', 1)$$);
SELECT pg_temp.err($$SELECT beat.set_limit('x', 1, per => '1 s', quota => 'day')$$);
SELECT pg_temp.err($$SELECT beat.set_limit('x', 1, per => '0')$$);
SELECT pg_temp.err($$SELECT beat.set_limit('x', 1, per => '-1 s')$$);
SELECT pg_temp.err($$SELECT beat.set_limit('x', 1, per => '10 years 60 days')$$);
SELECT pg_temp.err($$SELECT beat.set_limit('x', 1, per => '3654 days')$$);
SELECT pg_temp.err($$SELECT beat.set_limit('x', 1, per => '1 s', burst => 1000000000000001)$$);
SELECT (beat.set_limit('x:longest', 1, per => '10 years', burst => 1000000000000000)).name;
SELECT allowed, remaining, reset_after FROM beat.acquire('{x:longest}');
SELECT beat.drop_limit('x:longest');
SELECT pg_temp.err($$SELECT beat.set_limit('x', 1, quota => 'fortnight')$$);
SELECT pg_temp.err($$SELECT beat.set_limit('x', 1, quota => 'day', burst => 3)$$);
SELECT pg_temp.err($$SELECT beat.set_limit('x', 1, per => '1 s', burst => -1)$$);
SELECT pg_temp.err($$SELECT beat.set_limit('x', 1, per => '1 s', time_zone => 'UTC')$$);
SELECT pg_temp.err($$SELECT beat.set_limit('x', 1, quota => 'day', time_zone => 'Mars/Olympus')$$);
SELECT pg_temp.err($$SELECT beat.drop_limit('nope')$$);
SELECT count(*) AS no_x FROM beat.rate_limit WHERE name = 'x';

-- The same refusal read in full.
SELECT beat.set_limit('x', 1, per => '1 s', quota => 'day');

-- Errors of acquire ---------------------------------------------------

SELECT pg_temp.err($$SELECT beat.acquire(NULL)$$);
SELECT pg_temp.err($$SELECT beat.acquire('{}')$$);
SELECT pg_temp.err($$SELECT beat.acquire(ARRAY['api:second', NULL])$$);
SELECT pg_temp.err($$SELECT beat.acquire('{api:second}', 0)$$);
SELECT pg_temp.err($$SELECT beat.acquire('{api:second}', -1)$$);
SELECT pg_temp.err($$SELECT beat.acquire('{api:second}', NULL)$$);
SELECT pg_temp.err($$SELECT beat.acquire('{nope}')$$);
SELECT pg_temp.err($$SELECT beat.acquire('{api:30s}', 7)$$);
SELECT pg_temp.err($$SELECT beat.acquire('{api:day}', 20001)$$);
SELECT pg_temp.err($$SELECT beat.acquire(ARRAY[repeat('k', 200)])$$);
SELECT pg_temp.err($$SELECT beat.peek('{nope}')$$);
SELECT pg_temp.err($$SELECT beat.refund('{api:second}', 0)$$);
SELECT pg_temp.err($$SELECT beat.penalize('nope', now())$$);
SELECT pg_temp.err($$SELECT beat.penalize('api:second', 'infinity')$$);
SELECT pg_temp.err($$SET beat.limiter_clock = 'not a time'$$);
SELECT beat.acquire('{nope}');
SELECT beat.acquire('{api:30s}', 7);

-- GCRA: even spacing, exact retry_after ------------------------------

-- 20 a second: one every 50 ms; a second at once is refused for exactly 50 ms.
SELECT * FROM beat.acquire('{api:second}');
SELECT * FROM beat.acquire('{api:second}');
SET beat.limiter_clock = '2026-01-01 00:00:00.049999+00';
SELECT allowed, retry_after FROM beat.acquire('{api:second}');
SET beat.limiter_clock = '2026-01-01 00:00:00.05+00';
SELECT allowed, remaining FROM beat.acquire('{api:second}');

-- 100 per 30 s with a burst of 5: 6 at once, then one every 300 ms.
SET beat.limiter_clock = '2026-01-01 00:01:00+00';
SELECT pg_temp.take('{api:30s}', 10) AS admitted_at_once;
SELECT allowed, retry_after FROM beat.peek('{api:30s}');
-- Following the answers for 30 s admits limit + burst, never more.
SELECT pg_temp.follow('{api:30s}', '30 seconds') AS admitted_in_30s;

-- The arithmetic from 1 a day to 10,000 a second: over one period, a
-- caller that waits exactly as told gets exactly limit + burst.
SELECT (beat.set_limit('r:day', 1, per => '1 day')).name,
       (beat.set_limit('r:hour', 7, per => '1 hour')).name,
       (beat.set_limit('r:odd', 850, per => '60 s')).name,
       (beat.set_limit('r:fast', 10000, per => '1 s')).name,
       (beat.set_limit('r:burst', 2, per => '1 s', burst => 3)).name;
SET beat.limiter_clock = '2026-01-02 00:00:00+00';
SELECT pg_temp.follow('{r:day}', '1 day') AS one_a_day,
       pg_temp.follow('{r:hour}', '1 hour') AS seven_an_hour,
       pg_temp.follow('{r:odd}', '60 s') AS odd_850_a_minute,
       pg_temp.follow('{r:fast}', '1 s') AS ten_thousand_a_second,
       pg_temp.follow('{r:burst}', '1 s') AS two_a_second_burst_3;

-- peek charges nothing; refund gives back.
SET beat.limiter_clock = '2026-01-03 00:00:00+00';
SELECT allowed, remaining FROM beat.peek('{r:hour}');
SELECT allowed, remaining FROM beat.peek('{r:hour}');
SELECT allowed, remaining FROM beat.acquire('{r:hour}');
SELECT allowed FROM beat.acquire('{r:hour}');
SELECT beat.refund('{r:hour}');
SELECT allowed FROM beat.acquire('{r:hour}');

-- Stacked keys: all or nothing -----------------------------------------

SET beat.limiter_clock = '2026-01-04 00:00:00+00';
SELECT allowed, blocking_key FROM beat.acquire('{r:fast, handle:alice}');
-- handle:alice refuses: r:fast is not charged (its remaining stays).
SELECT remaining AS fast_before FROM beat.peek('{r:fast}') \gset
SELECT allowed, blocking_key, retry_after FROM beat.acquire('{r:fast, handle:alice}');
SELECT remaining = :fast_before AS fast_not_charged FROM beat.peek('{r:fast}');
-- Templates: one bucket per handle.
SELECT allowed FROM beat.acquire('{handle:bob}');
SELECT allowed FROM beat.acquire('{handle:bob}');
SELECT allowed FROM beat.acquire('{handle:carol}');
SELECT pg_temp.err($$SELECT beat.acquire('{handle:}')$$);
SELECT pg_temp.err($$SELECT beat.acquire('{handle:a:b}')$$);

-- penalize: nothing through the key before the time a provider named.
SELECT beat.penalize('handle:dave', '2026-01-04 00:05:00+00');
SELECT allowed, retry_after FROM beat.acquire('{handle:dave}');
SET beat.limiter_clock = '2026-01-04 00:05:00+00';
SELECT allowed FROM beat.acquire('{handle:dave}');

-- Changing a limit takes effect at once.
SET beat.limiter_clock = '2026-01-05 00:00:00+00';
SELECT (beat.set_limit('r:change', 1, per => '1 hour')).name;
SELECT allowed FROM beat.acquire('{r:change}');
SELECT allowed, retry_after FROM beat.acquire('{r:change}');
-- 60 an hour: the one unit owed is now worth a minute.
SELECT (beat.set_limit('r:change', 60, per => '1 hour')).name;
SELECT allowed, retry_after FROM beat.acquire('{r:change}');

-- Quotas: calendar windows in their time zone --------------------------

SET beat.limiter_clock = '2026-03-10 23:59:00+00';
SELECT (beat.set_limit('q:day', 3, quota => 'day')).name;
SELECT pg_temp.take('{q:day}', 5) AS admitted_today;
SELECT allowed, retry_after, remaining, reset_after FROM beat.acquire('{q:day}');
SET beat.limiter_clock = '2026-03-11 00:00:00+00';
SELECT allowed, remaining FROM beat.acquire('{q:day}');

-- A month in New York: the window starts at local midnight, so 04:59 UTC
-- on the 1st is still last month there, and 05:00 UTC is the new one.
SET beat.limiter_clock = '2026-03-01 04:59:00+00';
SELECT pg_temp.take('{tenant:acme:month}', 4) AS admitted;
SELECT allowed, reset_after FROM beat.acquire('{tenant:acme:month}');
SET beat.limiter_clock = '2026-03-01 05:00:00+00';
SELECT pg_temp.take('{tenant:acme:month}', 4) AS admitted_next_month;
SELECT allowed, retry_after FROM beat.peek('{tenant:acme:month}');

-- An hour quota across the DST change in New York (2026-03-08 07:00 UTC).
SELECT (beat.set_limit('q:hour', 2, quota => 'hour', time_zone => 'America/New_York')).name;
SET beat.limiter_clock = '2026-03-08 06:30:00+00';
SELECT pg_temp.take('{q:hour}', 3) AS admitted, (beat.peek('{q:hour}')).reset_after;

-- The status view -------------------------------------------------------

SET beat.limiter_clock = '2026-03-11 00:00:30+00';
SELECT key, limit_name, kind, "limit", remaining,
       next_admission - '2026-03-11 00:00:30+00'::timestamptz AS next_in,
       reset_at
FROM beat.limiter_status WHERE key IN ('q:day', 'handle:bob', 'r:day') ORDER BY key;

-- Flows name the limits their calls pass.
SELECT name, limits FROM beat.create_flow('limited', workers => 0,
    limits => ARRAY['api:day', 'handle:{{handle}}']);
SELECT limits FROM beat.alter_flow('limited', limits => '{}');
SELECT pg_temp.err($$SELECT beat.alter_flow('limited', limits => ARRAY['a', NULL])$$);
SELECT pg_temp.err($$SELECT beat.alter_flow('limited', limits => ARRAY[''])$$);
SELECT pg_temp.err($$SELECT beat.alter_flow('limited', limits => (SELECT array_agg('k' || g) FROM generate_series(1, 17) g))$$);

-- A change to the limits cannot be PREPAREd (COMMIT PREPARED could not
-- tell the other sessions).
BEGIN;
SELECT (beat.set_limit('q:prepared', 1, quota => 'day')).name;
PREPARE TRANSACTION 'beat_limits';
SELECT count(*) FROM beat.rate_limit WHERE name = 'q:prepared';

-- A quota lowered below what it has used leaves nothing (not less).
SELECT (beat.set_limit('q:lowered', 5, quota => 'day')).name;
SELECT allowed FROM beat.acquire('{q:lowered}', 3);
SELECT (beat.set_limit('q:lowered', 2, quota => 'day')).name;
SELECT allowed, remaining FROM beat.peek('{q:lowered}');

-- A key given twice counts once.
SELECT (beat.set_limit('q:twice', 3, quota => 'day')).name;
SELECT allowed FROM beat.acquire('{q:twice, q:twice}');
SELECT allowed, remaining FROM beat.peek('{q:twice}');

-- A day whose midnight comes twice (the Azores put their clocks back from
-- 01:00 to 00:00 on 2025-10-26, at 01:00 UTC): the first hour after
-- midnight still counts toward the day before, whose window ends at the
-- second midnight, 01:00 UTC; a check and a penalty there return.
SELECT (beat.set_limit('q:azores', 3, quota => 'day', time_zone => 'Atlantic/Azores')).name;
SET beat.limiter_clock = '2025-10-25 12:00:00+00';
SELECT allowed, remaining FROM beat.acquire('{q:azores}');
SET beat.limiter_clock = '2025-10-26 00:30:00+00';
SELECT allowed, remaining, reset_after FROM beat.acquire('{q:azores}');
SELECT beat.penalize('q:azores', '2025-10-26 00:40:00+00');
SELECT remaining, reset_at FROM beat.limiter_status WHERE key = 'q:azores';
SET beat.limiter_clock = '2025-10-26 01:30:00+00';
SELECT allowed, remaining, reset_after FROM beat.acquire('{q:azores}');
SELECT reset_at FROM beat.limiter_status WHERE key = 'q:azores';
SET beat.limiter_clock = '2026-03-11 00:00:30+00';

-- Dropping a limit leaves its keys unknown.
SELECT beat.drop_limit('r:change');
SELECT pg_temp.err($$SELECT beat.acquire('{r:change}')$$);

RESET beat.limiter_clock;
DROP EXTENSION pg_beat;
