-- What SQL sees of the HTTP workers: request templates and the other
-- 0.2.0 flow settings, pause and resume, drain, the transfer log's
-- retention, and beat.worker_status.  (The workers themselves are tested
-- against the local upstream in regress/t.)
CREATE EXTENSION pg_beat;

CREATE FUNCTION pg_temp.err(sql text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE sql;
    RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || SQLERRM;
END
$$;

-- A request template with every part; defaults for the rest.
SELECT name, request, timeout, ok_statuses, retry_statuses, max_redirects
FROM beat.create_flow('profiles', workers => 0, request => '{
    "method": "POST",
    "url": "https://api.example.com/v1/users/{{handle}}",
    "query": {"fields": "followers,bio", "limit": 10},
    "headers": {"Accept": "application/json", "X-Trace": "{{trace}}"},
    "body": {"handle": "{{handle}}", "deep": [1, "{{n}}"]}
}');

-- Every setting can change, alone; NULL keeps it.
SELECT name, request->>'url' AS url, timeout, ok_statuses, retry_statuses, max_redirects
FROM beat.alter_flow('profiles', request => '{"url": "http://127.0.0.1/{{id}}"}',
                     timeout => '5 s', ok_statuses => '{[200,300),[404,405)}',
                     retry_statuses => '{[500,600)}', max_redirects => 0);
SELECT timeout, max_redirects FROM beat.alter_flow('profiles', paused => false);

-- Bad templates and settings: each with its errcode; nothing changes.
SELECT pg_temp.err($$SELECT beat.alter_flow('profiles', request => '[]')$$);
SELECT pg_temp.err($$SELECT beat.alter_flow('profiles', request => '{"method": "GET"}')$$);
SELECT pg_temp.err($$SELECT beat.alter_flow('profiles', request => '{"url": 42}')$$);
SELECT pg_temp.err($$SELECT beat.alter_flow('profiles', request => '{"url": "ftp://x/y"}')$$);
SELECT pg_temp.err($$SELECT beat.alter_flow('profiles', request => '{"url": "http://"}')$$);
SELECT pg_temp.err($$SELECT beat.alter_flow('profiles', request => '{"url": "http://x", "method": "FETCH"}')$$);
SELECT pg_temp.err($$SELECT beat.alter_flow('profiles', request => '{"url": "http://x", "query": []}')$$);
SELECT pg_temp.err($$SELECT beat.alter_flow('profiles', request => '{"url": "http://x", "query": {"a": {"b": 1}}}')$$);
SELECT pg_temp.err($$SELECT beat.alter_flow('profiles', request => '{"url": "http://x", "headers": {"Bad Name": "v"}}')$$);
SELECT pg_temp.err($$SELECT beat.alter_flow('profiles', request => '{"url": "http://x", "headers": {"A": null}}')$$);
SELECT pg_temp.err($$SELECT beat.alter_flow('profiles', request => '{"url": "http://x", "cookies": {}}')$$);
SELECT pg_temp.err($$SELECT beat.alter_flow('profiles', timeout => '0')$$);
SELECT pg_temp.err($$SELECT beat.alter_flow('profiles', timeout => '2 hours')$$);
SELECT pg_temp.err($$SELECT beat.alter_flow('profiles', max_redirects => -1)$$);
SELECT pg_temp.err($$SELECT beat.alter_flow('profiles', max_redirects => 51)$$);
SELECT pg_temp.err($$SELECT beat.create_flow('bad', request => '{"url": "gopher://x"}')$$);
SELECT request->>'url' AS url, timeout, max_redirects FROM beat.flow WHERE name = 'profiles';
SELECT count(*) AS bad_flows FROM beat.flow WHERE name = 'bad';

-- One error read in full, with its hint.
SELECT beat.alter_flow('profiles', request => '{"url": "ftp://x/y"}');

-- pause and resume.
SELECT beat.enqueue('profiles', '{"id": 1}') AS t1 \gset
SELECT beat.pause('profiles');
SELECT paused FROM beat.flow WHERE name = 'profiles';
SELECT count(*) AS claimed_while_paused FROM beat.claim('profiles', 'w');
SELECT beat.resume('profiles');
SELECT count(*) AS claimed_after_resume FROM beat.claim('profiles', 'w');
SELECT beat.pause('nope');
SELECT beat.resume('nope');

-- drain with no workers running: nothing in flight; then undrain.
SELECT * FROM beat.drain('0');
SELECT * FROM beat.drain('10 ms');
SELECT beat.undrain();
SELECT pg_temp.err($$SELECT * FROM beat.drain(NULL)$$);
SELECT pg_temp.err($$SELECT * FROM beat.drain('-1 s')$$);

-- The transfer log keeps beat.http_log_retention, or what purge is told.
INSERT INTO beat.http_log (task_id, flow, attempt, worker, method, url, status, outcome, created_at)
VALUES (:t1, 'profiles', 1, 'w', 'GET', 'http://127.0.0.1/1', 200, 'ok', now() - interval '2 days'),
       (:t1, 'profiles', 2, 'w', 'GET', 'http://127.0.0.1/1', 200, 'ok', now() - interval '1 hour'),
       (:t1, 'profiles', 3, 'w', 'GET', 'http://127.0.0.1/1', 200, 'ok', now());
SELECT beat.purge_http_log() AS past_retention;
SELECT beat.purge_http_log('30 min') AS older_than_30_min;
SELECT count(*) AS left_in_log FROM beat.http_log;
SELECT pg_temp.err($$SELECT beat.purge_http_log('-1 s')$$);
SELECT pg_temp.err($$INSERT INTO beat.http_log (task_id, flow, attempt, worker, method, url, outcome) VALUES (1, 'f', 1, 'w', 'GET', 'u', 'maybe')$$);

-- The launcher is always there; no flow here has workers.
SELECT state, flow, pid > 0 AS has_pid FROM beat.worker_status;

-- Privileges: users read the log and the workers; admins pause and drain.
CREATE ROLE regress_beat_user2 IN ROLE beat_user;
CREATE ROLE regress_beat_admin2 IN ROLE beat_admin;
SET ROLE regress_beat_user2;
SELECT pg_temp.err($$SELECT count(*) FROM beat.http_log$$);
SELECT pg_temp.err($$SELECT count(*) FROM beat.worker_status$$);
SELECT pg_temp.err($$SELECT beat.pause('profiles')$$);
SELECT pg_temp.err($$SELECT * FROM beat.drain('0')$$);
SELECT pg_temp.err($$SELECT beat.purge_http_log()$$);
RESET ROLE;
SET ROLE regress_beat_admin2;
SELECT pg_temp.err($$SELECT beat.pause('profiles')$$);
SELECT pg_temp.err($$SELECT beat.resume('profiles')$$);
SELECT pg_temp.err($$SELECT count(*) FROM beat.drain('0')$$);
SELECT pg_temp.err($$SELECT beat.undrain()$$);
SELECT pg_temp.err($$SELECT beat.purge_http_log()$$);
RESET ROLE;
DROP ROLE regress_beat_user2, regress_beat_admin2;

DROP EXTENSION pg_beat;
