-- pg_beat 0.3.0 -> 0.4.0: providers, routes, credentials and fallback.
--
-- A flow may name an operation (say 'profile_by_handle') instead of a fixed
-- request.  beat.route lists the providers that serve the operation, in
-- ranks (lower first) with weights (a weighted random choice within a
-- rank).  For each transfer the worker walks the route, skips a provider
-- whose circuit breaker is open, and takes the least recently used
-- credential of the provider that is enabled, not resting after a 429, and
-- whose limits admit the call.  What a provider's answer means is decided
-- by its rules (beat.provider.rules).  See bgworker/route.c.

\echo Use "ALTER EXTENSION pg_beat UPDATE TO '0.4.0'" to load this file. \quit

CREATE TABLE beat.provider (
    name                text COLLATE "C" PRIMARY KEY,
    base_url            text NOT NULL,
    allowed_hosts       text[] NOT NULL,
    operations          jsonb NOT NULL DEFAULT '{}',
    limits              text[] NOT NULL DEFAULT '{}',
    rules               jsonb NOT NULL DEFAULT '[]',
    cost                numeric NOT NULL DEFAULT 0 CHECK (cost >= 0),
    timeout             interval NOT NULL DEFAULT '30 seconds'
                        CHECK (timeout > '0' AND timeout <= '1 hour'),
    rest_base           interval NOT NULL DEFAULT '1 second' CHECK (rest_base > '0'),
    rest_cap            interval NOT NULL DEFAULT '10 minutes' CHECK (rest_cap > '0'),
    breaker_failures    integer NOT NULL DEFAULT 5 CHECK (breaker_failures BETWEEN 1 AND 1000),
    breaker_rate        real NOT NULL DEFAULT 0.5 CHECK (breaker_rate > 0 AND breaker_rate <= 1),
    breaker_min_calls   integer NOT NULL DEFAULT 20 CHECK (breaker_min_calls BETWEEN 1 AND 100000),
    breaker_window      interval NOT NULL DEFAULT '1 minute' CHECK (breaker_window > '0'),
    breaker_cooldown    interval NOT NULL DEFAULT '30 seconds' CHECK (breaker_cooldown > '0'),
    breaker_probes      integer NOT NULL DEFAULT 1 CHECK (breaker_probes BETWEEN 1 AND 100),
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    CHECK (name ~ '^[a-z0-9][a-z0-9_.-]{0,62}$'),
    CHECK (base_url ~* '^https?://[^/?#{}]+'),
    CHECK (rest_base <= rest_cap)
);

COMMENT ON TABLE beat.provider IS 'A third-party API: base URL, the hosts it may contact, a request template per operation, the limits its calls pass, the rules that classify its answers, cost per call, timeout, credential rest after a 429 and circuit breaker settings.  Change with beat.set_provider and beat.drop_provider.';

CREATE TABLE beat.route (
    operation   text COLLATE "C" NOT NULL CHECK (operation ~ '^[a-z0-9][a-z0-9_.-]{0,62}$'),
    provider    text COLLATE "C" NOT NULL REFERENCES beat.provider ON DELETE CASCADE,
    rank        integer NOT NULL DEFAULT 1 CHECK (rank BETWEEN 1 AND 100),
    weight      integer NOT NULL DEFAULT 1 CHECK (weight BETWEEN 1 AND 1000000),
    PRIMARY KEY (operation, provider)
);

COMMENT ON TABLE beat.route IS 'The providers that serve an operation: lower rank first, higher ranks as fallback; a weighted random choice among providers of equal rank.  Change with beat.set_route and beat.drop_route.';

CREATE TABLE beat.credential (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    provider        text COLLATE "C" NOT NULL REFERENCES beat.provider ON DELETE CASCADE,
    label           text NOT NULL CHECK (length(label) BETWEEN 1 AND 200),
    secret          jsonb NOT NULL,
    enabled         boolean NOT NULL DEFAULT true,
    disabled_until  timestamptz,
    disabled_reason text,
    failure_streak  integer NOT NULL DEFAULT 0,
    last_status     integer,
    uses            bigint NOT NULL DEFAULT 0,
    last_used_at    timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (provider, label)
);

COMMENT ON TABLE beat.credential IS 'API keys of a provider.  secret ({"headers": {...}, "query": {...}}) is readable by beat_admin only; the other columns show the key''s state: disabled by a person or an auth failure (enabled), resting after a 429 (disabled_until), uses and last status.';
COMMENT ON COLUMN beat.credential.secret IS 'Headers and query parameters the key adds to each request.  Never logged, never copied into beat.http_log, results, errors or events.';

-- Which provider and key served a task, and which a transfer used.
ALTER TABLE beat.task
    ADD COLUMN provider      text COLLATE "C",
    ADD COLUMN credential_id bigint;
COMMENT ON COLUMN beat.task.provider IS 'The provider that last served the task.  A continuation page is enqueued with it and runs only there: its cursor belongs to that provider.';

ALTER TABLE beat.http_log
    ADD COLUMN provider      text,
    ADD COLUMN credential_id bigint,
    DROP CONSTRAINT http_log_outcome_check,
    ADD CONSTRAINT http_log_outcome_check CHECK (outcome IN
        ('ok', 'retry', 'permanent', 'lost', 'rate_limited', 'auth_failed', 'fallback', 'refused'));

-- A flow serves an operation through its route instead of a fixed request.
ALTER TABLE beat.flow
    ADD COLUMN operation text COLLATE "C"
        CHECK (operation ~ '^[a-z0-9][a-z0-9_.-]{0,62}$'),
    ADD CONSTRAINT flow_request_or_operation CHECK (request IS NULL OR operation IS NULL);
COMMENT ON COLUMN beat.flow.operation IS 'The operation the flow''s tasks call through beat.route; NULL for a flow with a fixed request (or none).';

-- Workers reread providers, routes and keys when a change commits.  A
-- worker's own bookkeeping (uses, last status, rests) changes no setting.
CREATE TRIGGER provider_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON beat.provider
    FOR EACH STATEMENT EXECUTE FUNCTION beat.flow_changed();
CREATE TRIGGER route_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON beat.route
    FOR EACH STATEMENT EXECUTE FUNCTION beat.flow_changed();
CREATE TRIGGER credential_changed
    AFTER INSERT OR DELETE OR TRUNCATE OR UPDATE OF provider, secret, enabled ON beat.credential
    FOR EACH STATEMENT EXECUTE FUNCTION beat.flow_changed();

-- What is wrong with a request template (the one check of extension/flow.c,
-- which also checks beat.flow.request), or NULL.
CREATE FUNCTION beat.request_problem(tmpl jsonb, operation boolean)
RETURNS text
AS 'MODULE_PATHNAME', 'beat_request_problem'
LANGUAGE C STABLE STRICT;

-- Check an operation's request template; raise naming what is wrong.
CREATE FUNCTION beat.check_operation(provider text, operation text, tmpl jsonb)
RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    problem text;
    where_ text := format('provider %s, operation %s', provider, operation);
BEGIN
    IF operation IS NULL OR operation !~ '^[a-z0-9][a-z0-9_.-]{0,62}$' THEN
        problem := format('invalid operation name "%s"', operation);
    ELSE
        problem := beat.request_problem(tmpl, true);
    END IF;
    IF problem IS NULL AND tmpl ? 'max_pages' AND (jsonb_typeof(tmpl->'max_pages') <> 'number'
          OR (tmpl->>'max_pages')::numeric NOT BETWEEN 1 AND 100000
          OR (tmpl->>'max_pages')::numeric <> trunc((tmpl->>'max_pages')::numeric)) THEN
        problem := 'max_pages must be an integer from 1 to 100000';
    END IF;
    IF problem IS NULL AND tmpl ? 'cursor' THEN
        DECLARE
            c jsonb := tmpl->'cursor';
        BEGIN
            IF jsonb_typeof(c) <> 'object'
               OR EXISTS (SELECT FROM jsonb_object_keys(c) k WHERE k NOT IN ('path', 'more', 'link', 'param'))
               OR (c ? 'path') = (c ? 'link')
               OR jsonb_typeof(c->'param') IS DISTINCT FROM 'string'
               OR c->>'param' !~ '^[A-Za-z_][A-Za-z0-9_]*$' THEN
                problem := 'cursor must be {"path": JSONPath, "param": name} or {"link": query parameter, "param": name}, with an optional "more" JSONPath';
            ELSIF (c ? 'path' AND jsonb_typeof(c->'path') <> 'string')
                  OR (c ? 'link' AND jsonb_typeof(c->'link') <> 'string')
                  OR (c ? 'more' AND jsonb_typeof(c->'more') <> 'string') THEN
                problem := 'cursor.path, cursor.link and cursor.more must be strings';
            ELSE
                BEGIN
                    PERFORM (c->>'path')::jsonpath, (c->>'more')::jsonpath;
                EXCEPTION WHEN syntax_error OR invalid_text_representation THEN
                    problem := 'cursor.path and cursor.more must be JSONPath expressions';
                END;
            END IF;
        END;
    END IF;
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION '%: %', where_, problem
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'An operation looks like {"url": "/users/{{handle}}", "query": {"cursor": "{{cursor?}}"}, "cursor": {"path": "$.next", "param": "cursor"}}.';
    END IF;
END;
$$;

-- Check a provider's outcome rules.
CREATE FUNCTION beat.check_rules(provider text, rules jsonb)
RETURNS void
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r jsonb;
    problem text;
    n int := 0;
BEGIN
    IF jsonb_typeof(rules) <> 'array' THEN
        problem := 'rules must be a JSON array';
    ELSIF jsonb_array_length(rules) > 32 THEN
        problem := 'a provider has at most 32 rules';
    ELSE
        FOR r IN SELECT * FROM jsonb_array_elements(rules) LOOP
            n := n + 1;
            IF jsonb_typeof(r) <> 'object'
               OR EXISTS (SELECT FROM jsonb_object_keys(r) k
                          WHERE k NOT IN ('status', 'path', 'equals', 'outcome', 'wait')) THEN
                problem := 'a rule is an object with status, outcome and optional path, equals and wait';
            ELSIF NOT (jsonb_typeof(r->'status') = 'number'
                       OR (jsonb_typeof(r->'status') = 'array' AND jsonb_array_length(r->'status') = 2
                           AND jsonb_typeof(r->'status'->0) = 'number'
                           AND jsonb_typeof(r->'status'->1) = 'number')) THEN
                problem := 'status must be a status or a [low, high] range';
            ELSIF jsonb_typeof(r->'outcome') IS DISTINCT FROM 'string'
                  OR r->>'outcome' NOT IN ('ok', 'rate_limited', 'auth_failed', 'transient', 'permanent') THEN
                problem := 'outcome must be one of ok, rate_limited, auth_failed, transient, permanent';
            ELSIF r ? 'equals' AND NOT r ? 'path' THEN
                problem := 'equals needs a path';
            ELSIF r ? 'path' AND jsonb_typeof(r->'path') <> 'string' THEN
                problem := 'path must be a JSONPath string';
            ELSIF r ? 'wait' AND (r->>'outcome' <> 'rate_limited'
                  OR jsonb_typeof(r->'wait') <> 'object'
                  OR (SELECT count(*) FROM jsonb_object_keys(r->'wait')) <> 1
                  OR NOT (r->'wait' ? 'header' OR r->'wait' ? 'path')
                  OR jsonb_typeof(coalesce(r->'wait'->'header', r->'wait'->'path')) <> 'string') THEN
                problem := 'wait belongs to a rate_limited rule and is {"header": name} or {"path": JSONPath}';
            ELSE
                BEGIN
                    PERFORM (r->>'path')::jsonpath, (r->'wait'->>'path')::jsonpath;
                EXCEPTION WHEN syntax_error OR invalid_text_representation THEN
                    problem := 'path must be a JSONPath expression';
                END;
            END IF;
            EXIT WHEN problem IS NOT NULL;
        END LOOP;
    END IF;
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION 'provider %, %', provider,
            CASE WHEN n = 0 THEN problem ELSE format('rule %s: %s', n, problem) END
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'A rule looks like {"status": 403, "path": "$.error.reason", "equals": "quotaExceeded", "outcome": "rate_limited", "wait": {"header": "x-quota-reset"}}.';
    END IF;
END;
$$;

-- Create or change a provider; NULL leaves a setting as it is (or its default).
CREATE FUNCTION beat.set_provider(
    name                text,
    base_url            text DEFAULT NULL,
    operations          jsonb DEFAULT NULL,
    allowed_hosts       text[] DEFAULT NULL,
    limits              text[] DEFAULT NULL,
    rules               jsonb DEFAULT NULL,
    cost                numeric DEFAULT NULL,
    timeout             interval DEFAULT NULL,
    rest_base           interval DEFAULT NULL,
    rest_cap            interval DEFAULT NULL,
    breaker_failures    integer DEFAULT NULL,
    breaker_rate        real DEFAULT NULL,
    breaker_min_calls   integer DEFAULT NULL,
    breaker_window      interval DEFAULT NULL,
    breaker_cooldown    interval DEFAULT NULL,
    breaker_probes      integer DEFAULT NULL)
RETURNS beat.provider
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p beat.provider;
    op record;
    h text;
BEGIN
    IF name IS NULL OR name !~ '^[a-z0-9][a-z0-9_.-]{0,62}$' THEN
        RAISE EXCEPTION 'invalid provider name "%"', name
            USING ERRCODE = 'invalid_name',
                  DETAIL = 'A provider name starts with a lower-case letter or digit and continues with lower-case letters, digits, ''_'', ''.'' or ''-''; at most 63 characters.';
    END IF;
    SELECT * INTO p FROM beat.provider WHERE beat.provider.name = set_provider.name FOR UPDATE;
    IF NOT FOUND AND base_url IS NULL THEN
        RAISE EXCEPTION 'provider "%" does not exist', name
            USING ERRCODE = 'undefined_object',
                  HINT = 'A new provider needs a base_url.';
    END IF;
    IF base_url IS NOT NULL AND base_url !~* '^https?://[^/?#{}]+$|^https?://[^/?#{}]+/[^?#{}]*$' THEN
        RAISE EXCEPTION 'base_url must be an http or https URL with a host and no query'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF operations IS NOT NULL THEN
        IF jsonb_typeof(operations) <> 'object' THEN
            RAISE EXCEPTION 'operations must be a JSON object of operation templates'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        FOR op IN SELECT * FROM jsonb_each(operations) LOOP
            PERFORM beat.check_operation(name, op.key, op.value);
        END LOOP;
    END IF;
    IF allowed_hosts IS NOT NULL THEN
        IF cardinality(allowed_hosts) = 0 OR array_position(allowed_hosts, NULL) IS NOT NULL THEN
            RAISE EXCEPTION 'allowed_hosts must list at least one host, and no nulls'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        FOREACH h IN ARRAY allowed_hosts LOOP
            IF h !~ '^(\*\.)?[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$' AND h !~ '^\[[0-9A-Fa-f:.]+\]$' THEN
                RAISE EXCEPTION 'invalid host "%" in allowed_hosts', h
                    USING ERRCODE = 'invalid_parameter_value',
                          HINT = 'A host is a name (api.example.com), *.example.com for its subdomains, an IPv4 address or an [IPv6] address; no scheme, port or path.';
            END IF;
        END LOOP;
    END IF;
    IF limits IS NOT NULL AND (cardinality(limits) > 16 OR array_position(limits, NULL) IS NOT NULL) THEN
        RAISE EXCEPTION 'limits must be a list of at most 16 keys, and no nulls'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF rules IS NOT NULL THEN
        PERFORM beat.check_rules(name, rules);
    END IF;

    IF p.name IS NULL THEN
        INSERT INTO beat.provider (name, base_url, allowed_hosts)
        VALUES (name, base_url,
                ARRAY[lower(substring(base_url FROM '^[A-Za-z]+://([^/:?#]+|\[[^]]+\])'))]);
    END IF;
    UPDATE beat.provider v SET
        base_url = coalesce(set_provider.base_url, v.base_url),
        allowed_hosts = CASE
            WHEN set_provider.allowed_hosts IS NOT NULL THEN set_provider.allowed_hosts
            WHEN set_provider.base_url IS NOT NULL AND p.name IS NOT NULL
                 AND p.allowed_hosts = ARRAY[lower(substring(p.base_url FROM '^[A-Za-z]+://([^/:?#]+|\[[^]]+\])'))]
            THEN ARRAY[lower(substring(set_provider.base_url FROM '^[A-Za-z]+://([^/:?#]+|\[[^]]+\])'))]
            ELSE v.allowed_hosts END,
        operations = coalesce(set_provider.operations, v.operations),
        limits = coalesce(set_provider.limits, v.limits),
        rules = coalesce(set_provider.rules, v.rules),
        cost = coalesce(set_provider.cost, v.cost),
        timeout = coalesce(set_provider.timeout, v.timeout),
        rest_base = coalesce(set_provider.rest_base, v.rest_base),
        rest_cap = coalesce(set_provider.rest_cap, v.rest_cap),
        breaker_failures = coalesce(set_provider.breaker_failures, v.breaker_failures),
        breaker_rate = coalesce(set_provider.breaker_rate, v.breaker_rate),
        breaker_min_calls = coalesce(set_provider.breaker_min_calls, v.breaker_min_calls),
        breaker_window = coalesce(set_provider.breaker_window, v.breaker_window),
        breaker_cooldown = coalesce(set_provider.breaker_cooldown, v.breaker_cooldown),
        breaker_probes = coalesce(set_provider.breaker_probes, v.breaker_probes),
        updated_at = now()
    WHERE v.name = set_provider.name
    RETURNING * INTO p;
    RETURN p;
END;
$$;

-- Forget a provider, its routes and its keys.  A provider that serves a
-- route is dropped only with force.
CREATE FUNCTION beat.drop_provider(name text, force boolean DEFAULT false)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    ops text;
BEGIN
    PERFORM FROM beat.provider p WHERE p.name = drop_provider.name FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'provider "%" does not exist', name USING ERRCODE = 'undefined_object';
    END IF;
    SELECT string_agg(DISTINCT r.operation, ', ') INTO ops
    FROM beat.route r WHERE r.provider = drop_provider.name;
    IF ops IS NOT NULL AND NOT coalesce(force, false) THEN
        RAISE EXCEPTION 'provider "%" serves operations: %', name, ops
            USING ERRCODE = 'dependent_objects_still_exist',
                  HINT = 'Drop its routes first, or call beat.drop_provider(name, force => true).';
    END IF;
    DELETE FROM beat.provider p WHERE p.name = drop_provider.name;
END;
$$;

-- Put a provider on an operation's route, or change its rank and weight.
CREATE FUNCTION beat.set_route(operation text, provider text,
                               rank integer DEFAULT 1, weight integer DEFAULT 1)
RETURNS beat.route
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r beat.route;
BEGIN
    IF operation IS NULL OR operation !~ '^[a-z0-9][a-z0-9_.-]{0,62}$' THEN
        RAISE EXCEPTION 'invalid operation name "%"', operation USING ERRCODE = 'invalid_name';
    END IF;
    IF rank IS NULL OR rank NOT BETWEEN 1 AND 100 THEN
        RAISE EXCEPTION 'rank must be between 1 and 100' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF weight IS NULL OR weight NOT BETWEEN 1 AND 1000000 THEN
        RAISE EXCEPTION 'weight must be between 1 and 1000000' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM FROM beat.provider p WHERE p.name = set_route.provider FOR KEY SHARE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'provider "%" does not exist', provider USING ERRCODE = 'undefined_object';
    END IF;
    PERFORM FROM beat.provider p WHERE p.name = set_route.provider AND p.operations ? set_route.operation;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'provider "%" has no template for operation "%"', provider, operation
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Add it to the provider''s operations with beat.set_provider().';
    END IF;
    INSERT INTO beat.route AS t (operation, provider, rank, weight)
    VALUES (operation, provider, rank, weight)
    ON CONFLICT ON CONSTRAINT route_pkey
    DO UPDATE SET rank = excluded.rank, weight = excluded.weight
    RETURNING * INTO r;
    RETURN r;
END;
$$;

-- Take a provider off an operation's route (all providers when NULL).
CREATE FUNCTION beat.drop_route(operation text, provider text DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n integer;
BEGIN
    DELETE FROM beat.route r
    WHERE r.operation = drop_route.operation
      AND (drop_route.provider IS NULL OR r.provider = drop_route.provider);
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n = 0 THEN
        RAISE EXCEPTION 'no route of operation "%"%', operation,
            CASE WHEN provider IS NULL THEN '' ELSE format(' through provider "%s"', provider) END
            USING ERRCODE = 'undefined_object';
    END IF;
    RETURN n;
END;
$$;

-- Add an API key to a provider; returns its id.
CREATE FUNCTION beat.add_credential(provider text, secret jsonb, label text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    new_id bigint;
BEGIN
    PERFORM FROM beat.provider p WHERE p.name = add_credential.provider FOR KEY SHARE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'provider "%" does not exist', provider USING ERRCODE = 'undefined_object';
    END IF;
    -- never echo the secret in a message
    IF jsonb_typeof(secret) IS DISTINCT FROM 'object'
       OR EXISTS (SELECT FROM jsonb_object_keys(secret) k WHERE k NOT IN ('headers', 'query'))
       OR NOT (secret ? 'headers' OR secret ? 'query')
       OR EXISTS (SELECT FROM jsonb_each(secret) s
                  WHERE jsonb_typeof(s.value) <> 'object' OR s.value = '{}'
                     OR EXISTS (SELECT FROM jsonb_each(s.value) e
                                WHERE jsonb_typeof(e.value) <> 'string' OR e.value->>0 = ''
                                   OR e.value->>0 ~ '[\r\n]'))
       OR EXISTS (SELECT FROM jsonb_object_keys(secret->'headers') k
                  WHERE k !~ '^[A-Za-z0-9!#$%&''*+.^_`|~-]+$') THEN
        RAISE EXCEPTION 'secret must be {"headers": {name: value}, "query": {name: value}} with at least one non-empty string value'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'For example {"headers": {"X-Api-Key": "..."}} or {"query": {"api_key": "..."}}.';
    END IF;
    IF label IS NOT NULL AND length(label) NOT BETWEEN 1 AND 200 THEN
        RAISE EXCEPTION 'label must have 1 to 200 characters' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO beat.credential (provider, label, secret)
    VALUES (provider,
            coalesce(label, provider || '-' || (SELECT count(*) + 1 FROM beat.credential c
                                                WHERE c.provider = add_credential.provider)),
            secret)
    RETURNING id INTO new_id;
    RETURN new_id;
EXCEPTION WHEN unique_violation THEN
    RAISE EXCEPTION 'provider "%" already has a credential labelled "%"', provider, label
        USING ERRCODE = 'duplicate_object';
END;
$$;

-- The shared-memory side of credential state (bgworker/route.c).
CREATE FUNCTION beat.forget_credential_state(id bigint)
RETURNS void
AS 'MODULE_PATHNAME', 'beat_forget_credential_state'
LANGUAGE C VOLATILE STRICT;

-- Put a key back in service: after an auth failure, or by hand.
CREATE FUNCTION beat.enable_credential(id bigint)
RETURNS beat.credential
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    c beat.credential;
BEGIN
    UPDATE beat.credential v SET enabled = true, disabled_until = NULL, disabled_reason = NULL,
        failure_streak = 0
    WHERE v.id = enable_credential.id RETURNING * INTO c;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'credential % does not exist', id USING ERRCODE = 'undefined_object';
    END IF;
    PERFORM beat.forget_credential_state(id);
    c.secret := NULL;
    RETURN c;
END;
$$;

-- Take a key out of service until beat.enable_credential.
CREATE FUNCTION beat.disable_credential(id bigint, reason text DEFAULT 'disabled by hand')
RETURNS beat.credential
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    c beat.credential;
BEGIN
    UPDATE beat.credential v SET enabled = false, disabled_reason = coalesce(reason, 'disabled by hand')
    WHERE v.id = disable_credential.id RETURNING * INTO c;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'credential % does not exist', id USING ERRCODE = 'undefined_object';
    END IF;
    c.secret := NULL;
    RETURN c;
END;
$$;

-- Forget a key.
CREATE FUNCTION beat.drop_credential(id bigint)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    DELETE FROM beat.credential v WHERE v.id = drop_credential.id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'credential % does not exist', id USING ERRCODE = 'undefined_object';
    END IF;
    PERFORM beat.forget_credential_state(id);
END;
$$;

-- create_flow and alter_flow learn the operation setting.
DROP FUNCTION beat.create_flow(text, integer, interval, interval, interval, integer, interval, integer, integer, boolean, jsonb, interval, int4multirange, int4multirange, integer, text[]);
DROP FUNCTION beat.alter_flow(text, integer, interval, interval, interval, integer, interval, integer, integer, boolean, jsonb, interval, int4multirange, int4multirange, integer, text[]);

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
    limits          text[] DEFAULT NULL,
    operation       text DEFAULT NULL)
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
    limits          text[] DEFAULT NULL,
    operation       text DEFAULT NULL)
RETURNS beat.flow
AS 'MODULE_PATHNAME', 'beat_alter_flow'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- Breakers and resting keys, from shared memory.
CREATE FUNCTION beat.provider_state_rows(
    OUT provider text, OUT breaker text, OUT open_until timestamptz,
    OUT consecutive_failures integer, OUT window_calls integer, OUT window_failures integer,
    OUT limited_until timestamptz, OUT calls bigint, OUT failures bigint, OUT fallbacks bigint,
    OUT last_error text)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'beat_provider_state_rows'
LANGUAGE C VOLATILE;

CREATE FUNCTION beat.credential_state_rows(
    OUT id bigint, OUT resting_until timestamptz, OUT streak integer,
    OUT auth_failed boolean, OUT last_used_at timestamptz)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'beat_credential_state_rows'
LANGUAGE C VOLATILE;

CREATE VIEW beat.provider_health AS
WITH c AS (
    SELECT c.provider,
           count(*) AS credentials,
           count(*) FILTER (WHERE c.enabled AND NOT coalesce(s.auth_failed, false)
                            AND coalesce(s.resting_until, c.disabled_until, '-infinity') <= now())
               AS available,
           min(coalesce(s.resting_until, c.disabled_until))
               FILTER (WHERE c.enabled AND NOT coalesce(s.auth_failed, false)
                       AND coalesce(s.resting_until, c.disabled_until) > now()) AS next_rested,
           count(*) FILTER (WHERE NOT c.enabled OR coalesce(s.auth_failed, false)) AS disabled
    FROM beat.credential c
    LEFT JOIN beat.credential_state_rows() s ON s.id = c.id
    GROUP BY c.provider
)
SELECT p.name AS provider,
       coalesce(s.breaker, 'closed') AS breaker,
       s.open_until,
       coalesce(c.credentials, 0) AS credentials,
       coalesce(c.available, 0) AS available_credentials,
       coalesce(s.calls, 0) AS calls,
       coalesce(s.failures, 0) AS failures,
       coalesce(s.fallbacks, 0) AS fallbacks,
       coalesce(s.consecutive_failures, 0) AS consecutive_failures,
       s.limited_until,
       CASE
           WHEN s.breaker = 'open' THEN s.open_until
           WHEN s.limited_until > now() THEN s.limited_until
           WHEN c.credentials > 0 AND c.available = 0 THEN c.next_rested
       END AS serves_again_at,
       CASE
           WHEN s.breaker = 'open' THEN format('circuit breaker open after %s consecutive failures (%s/%s in the window); last error: %s',
                                               s.consecutive_failures, s.window_failures, s.window_calls, s.last_error)
           WHEN s.breaker = 'half-open' THEN 'circuit breaker half-open: probing'
           WHEN s.limited_until > now() THEN 'every credential got 429: the provider''s own limit'
           WHEN c.credentials > 0 AND c.available = 0 AND c.next_rested IS NOT NULL
               THEN format('%s of %s credentials resting after 429, %s disabled', c.credentials - c.disabled, c.credentials, c.disabled)
           WHEN c.credentials > 0 AND c.available = 0 THEN 'every credential is disabled; beat.enable_credential() puts one back'
       END AS reason,
       s.last_error
FROM beat.provider p
LEFT JOIN beat.provider_state_rows() s ON s.provider = p.name
LEFT JOIN c ON c.provider = p.name;

COMMENT ON VIEW beat.provider_health IS 'Per provider: circuit breaker state, calls and failures since start, credentials available now, and when and why it cannot serve.';

REVOKE ALL ON FUNCTION
    beat.create_flow(text, integer, interval, interval, interval, integer, interval, integer, integer, boolean, jsonb, interval, int4multirange, int4multirange, integer, text[], text),
    beat.alter_flow(text, integer, interval, interval, interval, integer, interval, integer, integer, boolean, jsonb, interval, int4multirange, int4multirange, integer, text[], text),
    beat.request_problem(jsonb, boolean),
    beat.check_operation(text, text, jsonb), beat.check_rules(text, jsonb),
    beat.set_provider(text, text, jsonb, text[], text[], jsonb, numeric, interval, interval, interval, integer, real, integer, interval, interval, integer),
    beat.drop_provider(text, boolean), beat.set_route(text, text, integer, integer),
    beat.drop_route(text, text), beat.add_credential(text, jsonb, text),
    beat.forget_credential_state(bigint), beat.enable_credential(bigint),
    beat.disable_credential(bigint, text), beat.drop_credential(bigint),
    beat.provider_state_rows(), beat.credential_state_rows()
FROM PUBLIC;
REVOKE ALL ON beat.provider, beat.route, beat.credential, beat.provider_health FROM PUBLIC;

GRANT SELECT ON beat.provider, beat.route, beat.provider_health TO beat_user;
GRANT SELECT (id, provider, label, enabled, disabled_until, disabled_reason, failure_streak,
              last_status, uses, last_used_at, created_at) ON beat.credential TO beat_user;
GRANT SELECT ON beat.credential TO beat_admin;
GRANT EXECUTE ON FUNCTION beat.provider_state_rows(), beat.credential_state_rows() TO beat_user;
GRANT EXECUTE ON FUNCTION
    beat.create_flow(text, integer, interval, interval, interval, integer, interval, integer, integer, boolean, jsonb, interval, int4multirange, int4multirange, integer, text[], text),
    beat.alter_flow(text, integer, interval, interval, interval, integer, interval, integer, integer, boolean, jsonb, interval, int4multirange, int4multirange, integer, text[], text),
    beat.set_provider(text, text, jsonb, text[], text[], jsonb, numeric, interval, interval, interval, integer, real, integer, interval, interval, integer),
    beat.drop_provider(text, boolean), beat.set_route(text, text, integer, integer),
    beat.drop_route(text, text), beat.add_credential(text, jsonb, text),
    beat.enable_credential(bigint), beat.disable_credential(bigint, text),
    beat.drop_credential(bigint)
TO beat_admin;
