-- Mappings, entities, events, consumers and refreshes (0.5.0): the SQL API
-- and its errors.  What the workers do with them is tested in
-- regress/t/008_data.pl.
CREATE EXTENSION pg_beat;
\set VERBOSITY terse

SELECT name FROM beat.set_provider('acme', base_url => 'https://api.acme.example/v1',
    operations => '{"profile": {"url": "/profiles/{{handle}}"},
                    "posts": {"url": "/profiles/{{handle}}/posts"}}');
SELECT name FROM beat.set_provider('bravo', base_url => 'https://bravo.example/api',
    operations => '{"profile": {"url": "/user", "query": {"username": "{{handle}}"}}}');

-- Two providers' shapes, one model.
SELECT provider, operation, platform, kind
FROM beat.set_mapping('acme', 'profile', 'social', 'profile', '{
    "key": "$.data.username",
    "dimensions": {"name": "$.data.full_name",
                   "bio": {"path": "$.data.biography", "optional": true}},
    "metrics": {"followers": {"path": "$.data.follower_count", "type": "integer"},
                "engagement": "$.data.engagement"}}');
SELECT provider, operation FROM beat.set_mapping('bravo', 'profile', 'social', 'profile', '{
    "key": "$.user.handle",
    "dimensions": {"name": "$.user.name", "bio": {"path": "$.user.bio", "optional": true},
                   "verified": {"path": "$.user.verified", "type": "boolean", "optional": true}},
    "metrics": {"followers": {"path": "$.user.stats.followers", "type": "integer"},
                "engagement": "$.user.engagement_rate"}}');
SELECT provider, operation FROM beat.set_mapping('acme', 'posts', 'social', 'profile', '{
    "key": "$params.handle",
    "items": {"path": "$.data[*]", "kind": "post", "key": "$.id",
              "dimensions": {"caption": {"path": "$.caption", "optional": true}},
              "metrics": {"likes": {"path": "$.like_count", "type": "integer"},
                          "comments": {"path": "$.comment_count", "type": "integer"}}}}');

SELECT beat.parse('acme', 'profile', '{"status": 200, "body": {"data": {"username": "alice",
    "full_name": "Alice", "follower_count": 1200, "engagement": 3.5, "biography": "hi"}}}');
-- numbers as strings are cast; an absent optional field is null, never 0
SELECT beat.parse('bravo', 'profile', '{"status": 200, "body": {"user": {"handle": "alice",
    "name": "Alice", "verified": "true", "stats": {"followers": "1200"}, "engagement_rate": "3.5"}}}');
SELECT beat.parse('acme', 'posts', '{"status": 200, "body": {"data": [
    {"id": "p1", "caption": "one", "like_count": 10, "comment_count": "2"},
    {"id": 2, "like_count": 7, "comment_count": 0}]}}', '{"handle": "alice"}');
SELECT beat.parse('acme', 'posts', '{"status": 200, "body": {"data": []}}', '{"handle": "alice"}');

-- One spelling per key: numbers normalised, strings trimmed.  "data": null
-- is no items; a path to the list itself means its elements.
SELECT beat.parse('acme', 'posts', '{"body": {"data": [{"id": 1.50, "like_count": 1, "comment_count": 1},
    {"id": " p2 ", "like_count": 1, "comment_count": 1}, {"id": 3e2, "like_count": 1, "comment_count": 1}]}}',
    '{"handle": 42.0}')->'items' @? '$[*] ? (@.key == "1.5")' AS normalised,
    beat.parse('acme', 'posts', '{"body": {"data": [{"id": " p2 ", "like_count": 1, "comment_count": 1}]}}',
    '{"handle": 42.0}') #>> '{items,0,key}' AS trimmed,
    beat.parse('acme', 'posts', '{"body": {"data": []}}', '{"handle": 4.20e1}')->>'key' AS number_key;
SELECT beat.parse('acme', 'posts', '{"body": {"data": null}}', '{"handle": "a"}')->'items' AS null_list;
SELECT provider FROM beat.set_mapping('acme', 'posts', 'social', 'profile', '{"key": "$params.handle",
    "items": {"path": "$.data", "kind": "post", "key": "$.id"}}');
SELECT jsonb_array_length(beat.parse('acme', 'posts', '{"body": {"data": [{"id": 1}, {"id": 2}]}}',
    '{"handle": "a"}')->'items') AS unwrapped;
SELECT beat.parse('acme', 'posts', '{"body": {"data": [{"id": 1}, 7]}}', '{"handle": "a"}');
SELECT provider FROM beat.set_mapping('acme', 'posts', 'social', 'profile', '{
    "key": "$params.handle",
    "items": {"path": "$.data[*]", "kind": "post", "key": "$.id",
              "dimensions": {"caption": {"path": "$.caption", "optional": true}},
              "metrics": {"likes": {"path": "$.like_count", "type": "integer"},
                          "comments": {"path": "$.comment_count", "type": "integer"}}}}');

-- Answers that do not match: each error names the provider and the path.
SELECT beat.parse('bravo', 'profile', '{"body": {"user": {"handle": "a", "name": "A",
    "stats": {"followers": "12k"}, "engagement_rate": "1"}}}');
SELECT beat.parse('bravo', 'profile', '{"body": {"user": {"handle": "a", "name": "A",
    "stats": {"followers": "12.5"}, "engagement_rate": "1"}}}');
SELECT beat.parse('bravo', 'profile', '{"body": {"user": {"handle": "a", "name": "A",
    "stats": {"followers": true}, "engagement_rate": "1"}}}');
SELECT beat.parse('acme', 'profile', '{"body": {"data": {"username": "a", "full_name": "A",
    "engagement": 1}}}');
SELECT beat.parse('acme', 'profile', '{"body": {"data": [{"username": "a"}, {"username": "b"}]}}');
SELECT beat.parse('acme', 'profile', '{"body": {"data": {"username": "", "full_name": "A",
    "follower_count": 1, "engagement": 1}}}');
SELECT beat.parse('bravo', 'profile', '{"body": {"user": {"handle": "a", "name": "A",
    "verified": "maybe", "stats": {"followers": "1"}, "engagement_rate": "1"}}}');
SELECT beat.parse('acme', 'posts', '{"body": {"data": [{"id": "p1", "like_count": 1,
    "comment_count": 1}, {"like_count": 2, "comment_count": 1}]}}', '{"handle": "a"}');
SELECT beat.parse('acme', 'profile', '{"body": "<html>busy</html>"}');
SELECT beat.parse('acme', 'nope', '{"body": {}}');

-- Bad mappings, each refused whole.
SELECT beat.set_mapping('ghost', 'profile', 'social', 'profile', '{"key": "$.a"}');
SELECT beat.set_mapping('acme', 'nope', 'social', 'profile', '{"key": "$.a"}');
SELECT beat.set_mapping('acme', 'profile', 'Social', 'profile', '{"key": "$.a"}');
SELECT beat.set_mapping('acme', 'profile', 'social', 'a kind', '{"key": "$.a"}');
SELECT beat.set_mapping('acme', 'profile', 'social', 'profile');
SELECT beat.set_mapping('acme', 'profile', 'social', 'profile', '[]');
SELECT beat.set_mapping('acme', 'profile', 'social', 'profile', '{"dimensions": {}}');
SELECT beat.set_mapping('acme', 'profile', 'social', 'profile', '{"key": "$.a", "extra": 1}');
SELECT beat.set_mapping('acme', 'profile', 'social', 'profile', '{"key": "$.a["}');
SELECT beat.set_mapping('acme', 'profile', 'social', 'profile', '{"key": "$.a", "metrics": {"m": 1}}');
SELECT beat.set_mapping('acme', 'profile', 'social', 'profile', '{"key": "$.a", "metrics": {"m": {"path": "$.m", "type": "text"}}}');
SELECT beat.set_mapping('acme', 'profile', 'social', 'profile', '{"key": "$.a", "metrics": {"m": {"path": "$.m", "optional": "yes"}}}');
SELECT beat.set_mapping('acme', 'profile', 'social', 'profile', '{"key": "$.a", "metrics": {"m": {"path": "$.m", "default": 0}}}');
SELECT beat.set_mapping('acme', 'profile', 'social', 'profile', '{"key": "$.a", "dimensions": {"bad name": "$.x"}}');
SELECT beat.set_mapping('acme', 'profile', 'social', 'profile', '{"key": "$.a", "items": {"path": "$.x[*]", "key": "$.id"}}');
SELECT beat.set_mapping('acme', 'profile', 'social', 'profile', '{"key": "$.a", "items": {"path": "$.x[*]", "kind": "post"}}');
-- the mapping that was there is unchanged
SELECT spec->>'key' FROM beat.mapping WHERE provider = 'acme' AND operation = 'profile';

-- A parser function, for answers no spec can express.
CREATE FUNCTION first_user(body jsonb, result jsonb) RETURNS jsonb LANGUAGE sql AS $$
    SELECT jsonb_build_object('key', body->'users'->0->>'name',
                              'metrics', jsonb_build_object('n', jsonb_array_length(body->'users')))
$$;
SELECT provider, operation, parser FROM beat.set_mapping('bravo', 'profile', 'social', 'profile', parser => 'first_user(jsonb, jsonb)');
SELECT beat.parse('bravo', 'profile', '{"body": {"users": [{"name": "zed"}, {"name": "ann"}]}}');
SELECT beat.parse('bravo', 'profile', '{"body": {"users": []}}');
CREATE FUNCTION wrong_args(body jsonb) RETURNS jsonb LANGUAGE sql AS $$ SELECT body $$;
SELECT beat.set_mapping('bravo', 'profile', 'social', 'profile', parser => 'wrong_args(jsonb)');
SELECT beat.set_mapping('bravo', 'profile', 'social', 'profile', spec => '{"key": "$.a"}', parser => 'first_user(jsonb, jsonb)');
-- a parser owned by a role that is not a superuser must be SECURITY DEFINER
CREATE ROLE mapping_author;
ALTER FUNCTION first_user(jsonb, jsonb) OWNER TO mapping_author;
SELECT beat.set_mapping('bravo', 'profile', 'social', 'profile', parser => 'first_user(jsonb, jsonb)');
SELECT beat.parse('bravo', 'profile', '{"body": {"users": [{"name": "zed"}]}}');
ALTER FUNCTION first_user(jsonb, jsonb) SECURITY DEFINER;
SELECT beat.parse('bravo', 'profile', '{"body": {"users": [{"name": "zed"}]}}')->>'key';
DROP FUNCTION first_user(jsonb, jsonb);
SELECT beat.parse('bravo', 'profile', '{"body": {"users": []}}');
-- a parser the mapping role may not execute is refused
CREATE FUNCTION private_parser(body jsonb, result jsonb) RETURNS jsonb LANGUAGE sql AS $$ SELECT body $$;
REVOKE EXECUTE ON FUNCTION private_parser(jsonb, jsonb) FROM PUBLIC;
CREATE ROLE mapping_admin IN ROLE beat_admin;
SET SESSION AUTHORIZATION mapping_admin;
SELECT beat.set_mapping('bravo', 'profile', 'social', 'profile', parser => 'private_parser(jsonb, jsonb)');
RESET SESSION AUTHORIZATION;
DROP FUNCTION private_parser(jsonb, jsonb);
-- only a parser's answer is kept: what it set or wrote is rolled back
CREATE TABLE parser_writes (n int);
CREATE FUNCTION meddler(body jsonb, result jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('search_path', 'public, pg_catalog', false);
    INSERT INTO parser_writes VALUES (1);
    RETURN jsonb_build_object('key', 1.50);
END $$;
SELECT provider FROM beat.set_mapping('bravo', 'profile', 'social', 'profile', parser => 'meddler(jsonb, jsonb)');
SELECT current_setting('search_path') AS path_before \gset
SELECT ord, model->>'key' AS key, error FROM beat.parse_results(ARRAY['bravo', 'bravo'], 'profile',
    ARRAY['{"body": {}}', '{"body": {}}']::jsonb[], ARRAY['{}', '{}']);
SELECT current_setting('search_path') = :'path_before' AS path_unchanged,
       (SELECT count(*) FROM parser_writes) AS writes_kept;
DROP FUNCTION meddler(jsonb, jsonb);
DROP TABLE parser_writes;
SELECT beat.drop_mapping('bravo', 'profile');
SELECT beat.drop_mapping('bravo', 'profile');
-- datetime comparisons across time zones work (the _tz JSONPath functions)
SELECT provider FROM beat.set_mapping('bravo', 'profile', 'social', 'profile', '{"key": "$.h",
    "dimensions": {"recent": {"path": "$.at ? (@.datetime() > \"2020-01-01T00:00:00+00:00\".datetime())",
                              "optional": true}}}');
SELECT beat.parse('bravo', 'profile', '{"body": {"h": "a", "at": "2024-05-01T10:00:00"}}')->'dimensions' AS recent,
       beat.parse('bravo', 'profile', '{"body": {"h": "a", "at": "2019-05-01T10:00:00"}}')->'dimensions' AS old;
-- errors from JSONPath itself name the provider too
SELECT provider FROM beat.set_mapping('bravo', 'profile', 'social', 'profile', '{"key": "$nope.x"}');
SELECT ord, error FROM beat.parse_results(ARRAY['bravo'], 'profile', ARRAY['{"body": {}}']::jsonb[], ARRAY['{}']);
SELECT beat.drop_mapping('bravo', 'profile');

-- The worker's entry points: parse_results gives a row per mapped answer.
SELECT * FROM beat.parse_results(ARRAY['acme', 'bravo', 'acme'], 'profile',
    ARRAY['{"body": {"data": {"username": "a", "full_name": "A", "follower_count": 1, "engagement": 1}}}',
          '{"body": {}}', '{"body": {"data": {}}}']::jsonb[], ARRAY['{}', '{}', '{}']);

-- Ingest: a profile, then a page of its posts, then a changed profile.
SELECT name FROM beat.create_flow('profiles', operation => 'profile');
SELECT beat.enqueue('profiles', '{"handle": "alice"}', correlation_id => '00000000-0000-0000-0000-00000000000a') AS t1 \gset
SELECT beat.ingest(ARRAY[:t1], ARRAY['acme'], ARRAY[beat.parse('acme', 'profile',
    '{"body": {"data": {"username": "alice", "full_name": "Alice", "follower_count": 1200, "engagement": 3.5}}}')]);
SELECT beat.ingest(ARRAY[:t1], ARRAY['acme'], ARRAY[beat.parse('acme', 'posts',
    '{"body": {"data": [{"id": "p1", "like_count": 10, "comment_count": 2}, {"id": "p2", "caption": "two", "like_count": 7, "comment_count": 0}]}}',
    '{"handle": "alice"}')]);
-- the same answer twice in one batch, and the changed one last: last wins
SELECT beat.ingest(ARRAY[:t1, :t1], ARRAY['acme', 'acme'], ARRAY[
    beat.parse('acme', 'profile', '{"body": {"data": {"username": "alice", "full_name": "Alice", "follower_count": 1200, "engagement": 3.5}}}'),
    beat.parse('acme', 'profile', '{"body": {"data": {"username": "alice", "full_name": "Alice B.", "follower_count": 1250, "engagement": 3.5, "biography": "new"}}}')]);
-- nothing changed: no event, but seen again
SELECT beat.ingest(ARRAY[:t1], ARRAY['acme'], ARRAY[beat.parse('acme', 'profile',
    '{"body": {"data": {"username": "alice", "full_name": "Alice B.", "follower_count": 1250, "engagement": 3.5, "biography": "new"}}}')]);
SELECT e.platform, e.kind, e.key, p.key AS parent, e.dimensions, e.metrics, e.provider,
       e.first_seen <= e.last_seen AS seen_in_order
FROM beat.entity e LEFT JOIN beat.entity p ON p.id = e.parent_id ORDER BY e.kind, e.key;
SELECT e.key, count(*) AS observations FROM beat.observation o JOIN beat.entity e ON e.id = o.entity_id
GROUP BY e.key ORDER BY e.key;
SELECT id, topic, platform, kind, key, correlation_id, changes FROM beat.event ORDER BY id;

-- task.dead and credential.disabled, whichever path made them, at commit.
SELECT id AS t2 FROM beat.claim('profiles', 'w1') \gset
SELECT beat.fail(:t2, 'w1', 'gone for good', permanent => true);
SELECT beat.add_credential('acme', '{"headers": {"X-Api-Key": "s3cret"}}', 'main') AS k1 \gset
BEGIN;
SELECT enabled FROM beat.disable_credential(:k1, 'revoked');
SELECT count(*) AS events_before_commit FROM beat.event WHERE topic = 'credential.disabled';
COMMIT;
SELECT topic, key, changes FROM beat.event WHERE topic IN ('task.dead', 'credential.disabled') ORDER BY id;
SELECT count(*) AS secrets_in_events FROM beat.event WHERE changes::text LIKE '%s3cret%';
-- a rolled-back change writes no event
BEGIN;
SELECT enabled FROM beat.enable_credential(:k1);
SELECT enabled FROM beat.disable_credential(:k1, 'again');
ROLLBACK;
SELECT count(*) FROM beat.event WHERE topic = 'credential.disabled';

-- Catching up: by id, and by a named consumer whose position moves on commit.
SELECT id, topic, key FROM beat.events_since(5, 2);
SELECT count(*) FROM beat.events_since(0);
SELECT beat.events_since(-1);
SELECT beat.events_since(0, 0);
BEGIN;
SELECT id, topic FROM beat.consume('dash', 3);
ROLLBACK;
SELECT id, topic FROM beat.consume('dash', 3);
SELECT id, topic FROM beat.consume('dash', 3);
SELECT name, last_id FROM beat.consumer;
SELECT name, last_id FROM beat.seek_consumer('dash', 2);
SELECT id FROM beat.consume('dash', 1);
SELECT beat.consume('bad name', 1);
SELECT beat.consume('dash', 0);
SELECT beat.seek_consumer('dash', -1);

-- Refresh what was not seen for a while; a second run adds nothing.
UPDATE beat.entity SET last_seen = now() - interval '2 hours' WHERE kind = 'profile';
SELECT beat.refresh('profiles', 'social', 'profile', '1 hour');
SELECT beat.refresh('profiles', 'social', 'profile', '1 hour');
SELECT params, idempotency_key FROM beat.task WHERE idempotency_key LIKE 'beat:refresh:%';
-- a refresh that died is not tried again before stale_after
UPDATE beat.task SET state = 'dead', finished_at = now(), last_error = 'gone'
WHERE idempotency_key LIKE 'beat:refresh:%';
SELECT beat.refresh('profiles', 'social', 'profile', '1 hour');
UPDATE beat.task SET finished_at = now() - interval '2 hours' WHERE idempotency_key LIKE 'beat:refresh:%';
SELECT beat.refresh('profiles', 'social', 'profile', '1 hour');
SELECT beat.refresh('profiles', 'social', 'post', '1 hour');
SELECT beat.refresh('nope', 'social', 'profile', '1 hour');
SELECT beat.refresh('profiles', 'social', 'profile', '-1 hour');
SELECT beat.refresh('profiles', 'social', 'profile', '1 hour', max_tasks => 0);

-- Retention follows beat.observation_retention (30 days) and
-- beat.event_retention (7 days).
SHOW beat.observation_retention;
SHOW beat.event_retention;
UPDATE beat.observation o SET observed_at = now() - interval '29 days' FROM beat.entity e
WHERE e.id = o.entity_id AND e.kind = 'post';
UPDATE beat.observation o SET observed_at = now() - interval '31 days' FROM beat.entity e
WHERE e.id = o.entity_id AND e.kind = 'profile';
UPDATE beat.event SET created_at = now() - interval '8 days' WHERE id <= 2;
SELECT * FROM beat.purge_data();
SELECT count(*) AS observations_left FROM beat.observation;
SELECT min(id) AS oldest_event_left FROM beat.event;

-- Who may do what: beat_user reads and consumes; beat_admin maps.
CREATE ROLE data_reader IN ROLE beat_user;
SET ROLE data_reader;
SELECT count(*) > 0 AS reads_entities FROM beat.entity;
-- beat_user may call events_since (it runs as its caller: install.out lists it without SECURITY DEFINER)
SELECT count(*) > 0 AS reads_events FROM beat.events_since(0);
SELECT count(*) FROM beat.consume('reader', 2);
SELECT beat.diff('{}', '{}');
SELECT beat.set_mapping('acme', 'profile', 'social', 'profile', '{"key": "$.a"}');
SELECT beat.ingest(ARRAY[1], ARRAY['acme'], ARRAY['{}'::jsonb]);
SELECT beat.publish('[{"topic": "fake"}]');
RESET ROLE;
CREATE ROLE data_admin IN ROLE beat_admin;
SET ROLE data_admin;
SELECT provider FROM beat.set_mapping('acme', 'profile', 'social', 'profile', '{"key": "$.data.username"}');
SELECT beat.parse('acme', 'profile', '{"body": {"data": {"username": "z"}}}')->>'key';
RESET ROLE;

DROP EXTENSION pg_beat;
DROP ROLE data_reader, data_admin, mapping_author, mapping_admin;
