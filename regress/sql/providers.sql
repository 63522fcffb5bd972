-- Providers, routes and credentials (0.4.0): the SQL API and its errors.
-- What the workers do with them is tested in regress/t/007_providers.pl.
CREATE EXTENSION pg_beat;
\set VERBOSITY terse

-- A provider: the base URL's host is its allowlist unless one is given.
SELECT name, base_url, allowed_hosts, operations, timeout, breaker_failures
FROM beat.set_provider('acme', base_url => 'https://api.acme.example/v1',
    operations => '{"profile": {"url": "/users/{{handle}}", "headers": {"Accept": "application/json"}}}');
-- NULL keeps a setting; a new base URL moves a default allowlist with it.
SELECT base_url, allowed_hosts, cost, timeout
FROM beat.set_provider('acme', base_url => 'https://api2.acme.example', cost => 0.002, timeout => '5 s');
SELECT allowed_hosts FROM beat.set_provider('acme', allowed_hosts => ARRAY['api2.acme.example', '*.cdn.acme.example']);

-- Bad providers, each refused whole.
SELECT beat.set_provider('Bad Name', base_url => 'https://x.example');
SELECT beat.set_provider('nobase');
SELECT beat.set_provider('p', base_url => 'ftp://x.example');
SELECT beat.set_provider('p', base_url => 'https://x.example/?q=1');
SELECT beat.set_provider('p', base_url => 'https://x.example', operations => '[]');
SELECT beat.set_provider('p', base_url => 'https://x.example', operations => '{"op": {"url": "users"}}');
SELECT beat.set_provider('p', base_url => 'https://x.example', operations => '{"op": {"url": "/u", "verb": "GET"}}');
SELECT beat.set_provider('p', base_url => 'https://x.example', operations => '{"op": {"url": "/u", "method": "FETCH"}}');
SELECT beat.set_provider('p', base_url => 'https://x.example', operations => '{"Op": {"url": "/u"}}');
SELECT beat.set_provider('p', base_url => 'https://x.example', operations => '{"op": {"url": "/u", "cursor": {"path": "$.next"}}}');
SELECT beat.set_provider('p', base_url => 'https://x.example', operations => '{"op": {"url": "/u", "cursor": {"path": "$$$", "param": "c"}}}');
SELECT beat.set_provider('p', base_url => 'https://x.example', operations => '{"op": {"url": "/u", "max_pages": 0}}');
SELECT beat.set_provider('p', base_url => 'https://x.example', allowed_hosts => '{}');
SELECT beat.set_provider('p', base_url => 'https://x.example', allowed_hosts => ARRAY['https://x.example']);
SELECT beat.set_provider('p', base_url => 'https://x.example', rules => '{}');
SELECT beat.set_provider('p', base_url => 'https://x.example', rules => '[{"status": 403, "outcome": "sad"}]');
SELECT beat.set_provider('p', base_url => 'https://x.example', rules => '[{"status": "403", "outcome": "permanent"}]');
SELECT beat.set_provider('p', base_url => 'https://x.example', rules => '[{"status": 403, "equals": 1, "outcome": "permanent"}]');
SELECT beat.set_provider('p', base_url => 'https://x.example', rules => '[{"status": 403, "path": "$.", "outcome": "permanent"}]');
SELECT beat.set_provider('p', base_url => 'https://x.example', rules => '[{"status": 403, "outcome": "permanent", "wait": {"header": "x"}}]');
SELECT beat.set_provider('p', base_url => 'https://x.example', timeout => '2 hours');
SELECT beat.set_provider('p', base_url => 'https://x.example', rest_base => '1 hour', rest_cap => '1 minute');
SELECT beat.set_provider('p', base_url => 'https://x.example', breaker_rate => 1.5);
SELECT count(*) AS providers FROM beat.provider;

-- Rules that real APIs need: quota exhaustion as 403 with a reason.
SELECT jsonb_array_length(rules) AS rules FROM beat.set_provider('acme', rules => '[
    {"status": 403, "path": "$.error.reason", "equals": "quotaExceeded",
     "outcome": "rate_limited", "wait": {"header": "x-quota-reset"}},
    {"status": [400, 499], "path": "$.error.code", "equals": "RATE", "outcome": "rate_limited",
     "wait": {"path": "$.error.retry_in"}},
    {"status": 404, "outcome": "permanent"}]');

-- Routes.
SELECT beat.set_provider('bravo', base_url => 'https://bravo.example',
    operations => '{"profile": {"url": "/user", "query": {"u": "{{handle}}"}}}') IS NOT NULL AS made;
SELECT * FROM beat.set_route('profile', 'acme', weight => 70);
SELECT * FROM beat.set_route('profile', 'bravo', weight => 30);
SELECT * FROM beat.set_route('profile', 'bravo', rank => 2);
SELECT beat.set_route('profile', 'nobody');
SELECT beat.set_route('followers', 'acme');
SELECT beat.set_route('profile', 'acme', rank => 0);
SELECT beat.set_route('profile', 'acme', weight => 0);
SELECT beat.set_route('Bad', 'acme');
SELECT * FROM beat.route ORDER BY rank, provider;
SELECT beat.drop_route('profile', 'nobody');
SELECT beat.drop_provider('acme');
SELECT beat.drop_provider('nobody');

-- Credentials: the secret is checked without being echoed.
SELECT beat.add_credential('acme', '{"headers": {"X-Api-Key": "k-1"}}', 'first') > 0 AS added;
SELECT beat.add_credential('acme', '{"query": {"api_key": "k-2"}}') > 0 AS added;
SELECT beat.add_credential('acme', '{"headers": {"X-Api-Key": "k-3"}}', 'first');
SELECT beat.add_credential('acme', '{"header": {"X-Api-Key": "k-4"}}');
SELECT beat.add_credential('acme', '{"headers": {"X-Api-Key": ""}}');
SELECT beat.add_credential('acme', '{"headers": {"X-Api-Key": 12345}}');
SELECT beat.add_credential('acme', '{"headers": {"Bad Header": "k-5"}}');
SELECT beat.add_credential('acme', '{"headers": {"X-Api-Key": "k-6\r\nX: y"}}');
SELECT beat.add_credential('nobody', '{"headers": {"X-Api-Key": "k-7"}}');
SELECT provider, label, enabled, uses FROM beat.credential ORDER BY id;
SELECT label, enabled, disabled_reason FROM beat.disable_credential(
    (SELECT id FROM beat.credential WHERE label = 'first'), 'rotated out');
SELECT label, enabled, disabled_reason, secret FROM beat.enable_credential(
    (SELECT id FROM beat.credential WHERE label = 'first'));
SELECT beat.enable_credential(-1);
SELECT beat.disable_credential(-1);
SELECT beat.drop_credential(-1);
SELECT beat.drop_credential((SELECT id FROM beat.credential WHERE label = 'acme-2'));
SELECT count(*) AS credentials FROM beat.credential;

-- A flow names an operation, or has a request, not both.
SELECT name, request, operation FROM beat.create_flow('profiles', operation => 'profile', workers => 0);
SELECT beat.create_flow('both', operation => 'profile', request => '{"url": "https://x.example"}');
SELECT beat.create_flow('badop', operation => 'Profile!');
-- switching one for the other
SELECT request IS NOT NULL AS has_request, operation
FROM beat.alter_flow('profiles', request => '{"url": "https://x.example/{{id}}"}');
SELECT request IS NOT NULL AS has_request, operation
FROM beat.alter_flow('profiles', operation => 'profile');

-- Health before any call: closed breakers, keys ready.
SELECT provider, breaker, credentials, available_credentials, calls, serves_again_at, reason
FROM beat.provider_health ORDER BY provider;

-- Who may see what: beat_user reads states but not secrets.
CREATE ROLE provider_reader IN ROLE beat_user;
SET ROLE provider_reader;
SELECT label, enabled FROM beat.credential ORDER BY id;
SELECT secret FROM beat.credential;
SELECT count(*) FROM beat.provider_health;
SELECT beat.add_credential('acme', '{"headers": {"X-Api-Key": "k-8"}}');
SELECT beat.set_provider('acme', cost => 1);
RESET ROLE;
DROP ROLE provider_reader;

-- Dropping a provider that serves a route needs force, and takes its keys.
SELECT beat.drop_provider('acme', force => true);
SELECT count(*) AS routes, (SELECT count(*) FROM beat.credential) AS credentials FROM beat.route;
DROP EXTENSION pg_beat;
