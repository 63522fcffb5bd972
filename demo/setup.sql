-- demo/setup.sql — what `make demo` configures; run by demo/run with
--   psql -v base=http://127.0.0.1:PORT -v dead=http://127.0.0.1:1
-- Two platforms.  "social" has four providers with different JSON shapes:
-- acme and charlie (steady), bravo (flaky: 5xx and 429 with Retry-After)
-- and zulu (dead: nothing listens there).  "video" has delta.  Every provider has two keys; stacked limits hold every call.
\set ON_ERROR_STOP on
\set QUIET on
CREATE EXTENSION pg_beat;

-- Stacked limits: a daily quota and a per-minute rate for everything, one
-- call per second (burst 2) per handle, and a rate per provider key.
SELECT name FROM beat.set_limit('global:day', 1000000, quota => 'day');
SELECT name FROM beat.set_limit('global:minute', 60000, per => '1 minute', burst => 2000);
SELECT name FROM beat.set_limit('handle:{{handle}}', 1, per => '1 second', burst => 2);
SELECT name FROM beat.set_limit('key:{{credential}}', 500, per => '1 second', burst => 200);

-- Providers -------------------------------------------------------------------
SELECT name FROM beat.set_provider('acme', base_url => :'base' || '/acme/v1',
    operations => '{"profile": {"url": "/profiles/{{handle}}"},
                    "posts": {"url": "/profiles/{{handle}}/posts",
                              "query": {"limit": "12", "cursor": "{{cursor?}}"},
                              "cursor": {"path": "$.paging.next_cursor",
                                         "more": "$.paging.has_more", "param": "cursor"},
                              "max_pages": 1}}',
    limits => ARRAY['key:{{credential}}']);
SELECT name FROM beat.set_provider('bravo', base_url => :'base' || '/bravo/api',
    operations => '{"profile": {"url": "/user", "query": {"username": "{{handle}}",
                                "fail_pct": "4", "limit_pct": "6", "limit_retry_after": "1"}}}',
    limits => ARRAY['key:{{credential}}'], rest_cap => '3 seconds');
SELECT name FROM beat.set_provider('zulu', base_url => :'dead' || '/v2',
    operations => '{"profile": {"url": "/people/{{handle}}"}}',
    breaker_failures => 3, breaker_min_calls => 5, breaker_cooldown => '20 seconds',
    timeout => '2 seconds');
SELECT name FROM beat.set_provider('charlie', base_url => :'base' || '/charlie',
    operations => '{"profile": {"url": "/graph", "query": {"fields": "profile", "id": "{{handle}}"}}}',
    limits => ARRAY['key:{{credential}}']);
SELECT name FROM beat.set_provider('delta', base_url => :'base' || '/delta',
    operations => '{"channel": {"url": "/channels/{{handle}}"}}',
    limits => ARRAY['key:{{credential}}']);

-- Two keys each (the upstream accepts any; it counts calls per key).
SELECT count(beat.add_credential(p, jsonb_build_object('headers',
           jsonb_build_object('X-Api-Key', p || '-key-' || k)), 'key ' || k))
FROM unnest(ARRAY['acme', 'bravo', 'zulu', 'charlie', 'delta']) AS p, generate_series(1, 2) AS k;

-- Routes: acme, bravo, charlie and zulu share the profile traffic by
-- weight; a call that fails on one (zulu always, bravo at times) goes on to
-- another in the same attempt, and zulu's breaker opens.
SELECT provider FROM beat.set_route('profile', 'acme', rank => 1, weight => 4);
SELECT provider FROM beat.set_route('profile', 'bravo', rank => 1, weight => 3);
SELECT provider FROM beat.set_route('profile', 'charlie', rank => 1, weight => 2);
SELECT provider FROM beat.set_route('profile', 'zulu', rank => 1, weight => 1);
SELECT provider FROM beat.set_route('posts', 'acme');
SELECT provider FROM beat.set_route('channel', 'delta');

-- Mappings: every shape to one model -----------------------------------------
SELECT provider FROM beat.set_mapping('acme', 'profile', 'social', 'profile', '{
    "key": "$.data.username",
    "dimensions": {"name": "$.data.full_name",
                   "bio": {"path": "$.data.biography", "optional": true},
                   "verified": {"path": "$.data.is_verified", "type": "boolean"},
                   "avatar": "$.data.profile_pic"},
    "metrics": {"followers": {"path": "$.data.follower_count", "type": "integer"},
                "following": {"path": "$.data.following_count", "type": "integer"},
                "posts": {"path": "$.data.media_count", "type": "integer"},
                "engagement": "$.data.engagement"}}');
SELECT provider FROM beat.set_mapping('bravo', 'profile', 'social', 'profile', '{
    "key": "$.user.handle",
    "dimensions": {"name": "$.user.name",
                   "bio": {"path": "$.user.bio", "optional": true},
                   "verified": {"path": "$.user.verified", "type": "boolean"},
                   "avatar": "$.user.avatar"},
    "metrics": {"followers": {"path": "$.user.stats.followers", "type": "integer"},
                "following": {"path": "$.user.stats.following", "type": "integer"},
                "posts": {"path": "$.user.stats.posts", "type": "integer"},
                "engagement": "$.user.engagement_rate"}}');
SELECT provider FROM beat.set_mapping('zulu', 'profile', 'social', 'profile', '{"key": "$.login"}');
SELECT provider FROM beat.set_mapping('charlie', 'profile', 'social', 'profile', '{
    "key": "$.result[*] ? (@.type == \"profile\").attributes.screen_name",
    "dimensions": {"bio": {"path": "$.result[*] ? (@.type == \"profile\").attributes.description", "optional": true},
                   "verified": {"path": "$.result[*] ? (@.type == \"profile\").attributes.verified", "type": "boolean"},
                   "avatar": "$.result[*] ? (@.type == \"profile\").attributes.image"},
    "metrics": {"followers": {"path": "$.result[*] ? (@.type == \"profile\").attributes.counts.followers", "type": "integer"},
                "following": {"path": "$.result[*] ? (@.type == \"profile\").attributes.counts.friends", "type": "integer"},
                "posts": {"path": "$.result[*] ? (@.type == \"profile\").attributes.counts.statuses", "type": "integer"},
                "engagement": "$.result[*] ? (@.type == \"profile\").attributes.er"}}');
SELECT provider FROM beat.set_mapping('acme', 'posts', 'social', 'profile', '{
    "key": "$params.handle",
    "items": {"path": "$.data[*]", "kind": "post", "key": "$.id",
              "dimensions": {"caption": "$.caption", "taken_at": "$.taken_at"},
              "metrics": {"likes": {"path": "$.like_count", "type": "integer"},
                          "comments": {"path": "$.comment_count", "type": "integer"}}}}');
SELECT provider FROM beat.set_mapping('delta', 'channel', 'video', 'channel', '{
    "key": "$.channel.slug",
    "dimensions": {"title": "$.channel.title"},
    "metrics": {"subscribers": {"path": "$.channel.subscribers", "type": "integer"},
                "videos": {"path": "$.channel.videos", "type": "integer"},
                "views": {"path": "$.channel.views", "type": "integer"}}}');

-- Flows: created paused, so that everything is enqueued before they start.
SELECT name FROM beat.create_flow('profiles', operation => 'profile', workers => 1,
    concurrency => 48, max_attempts => 4, backoff_base => '200 ms', backoff_cap => '2 s',
    limits => ARRAY['global:day', 'global:minute', 'handle:{{handle}}'], paused => true);
SELECT name FROM beat.create_flow('posts', operation => 'posts', workers => 1,
    concurrency => 32, max_attempts => 4, backoff_base => '200 ms', backoff_cap => '2 s',
    limits => ARRAY['global:day', 'global:minute', 'handle:{{handle}}'], paused => true);
SELECT name FROM beat.create_flow('channels', operation => 'channel', workers => 1,
    concurrency => 16, max_attempts => 4, backoff_base => '200 ms', backoff_cap => '2 s',
    limits => ARRAY['global:day', 'global:minute'], paused => true);
