-- pg_beat 0.4.0 -> 0.5.0: from response to data.
--
-- A mapping (beat.mapping) turns a provider's answer to an operation into
-- one model: an entity (platform, kind, key) with dimensions and metrics,
-- and its child items (the posts of a profile page), each read with a
-- JSONPath.  In the same transaction as the task's completion the worker
-- upserts the entities (beat.entity), appends their metrics to the time
-- series (beat.observation) and writes one event per change (beat.event),
-- and NOTIFY beat_events tells listeners after commit.  Consumers catch up
-- by event id (beat.events_since) or keep a position (beat.consume).
-- beat.refresh enqueues the entities not seen for a while: pg_cron calls it.

\echo Use "ALTER EXTENSION pg_beat UPDATE TO '0.5.0'" to load this file. \quit

-- Mappings ------------------------------------------------------------------

CREATE TABLE beat.mapping (
    provider    text COLLATE "C" NOT NULL REFERENCES beat.provider ON DELETE CASCADE,
    operation   text COLLATE "C" NOT NULL,
    platform    text COLLATE "C" NOT NULL CHECK (platform ~ '^[a-z0-9][a-z0-9_.-]{0,62}$'),
    kind        text COLLATE "C" NOT NULL CHECK (kind ~ '^[a-z0-9][a-z0-9_.-]{0,62}$'),
    spec        jsonb,
    parser      text,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, operation),
    CHECK ((spec IS NULL) <> (parser IS NULL))
);

COMMENT ON TABLE beat.mapping IS 'How a provider''s answer to an operation becomes entities: the platform and kind of the entity, and either a spec of JSONPaths (key, dimensions, metrics, items) or a parser function (body jsonb, result jsonb) -> jsonb.  Change with beat.set_mapping and beat.drop_mapping; try with beat.parse.';
COMMENT ON COLUMN beat.mapping.parser IS 'A function f(body jsonb, result jsonb) returning the model, for answers no spec can express; stored as its signature.';

-- The entity model ------------------------------------------------------------

CREATE TABLE beat.entity (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    platform    text COLLATE "C" NOT NULL,
    kind        text COLLATE "C" NOT NULL,
    key         text COLLATE "C" NOT NULL,
    parent_id   bigint REFERENCES beat.entity ON DELETE SET NULL,
    dimensions  jsonb NOT NULL DEFAULT '{}',
    metrics     jsonb NOT NULL DEFAULT '{}',
    first_seen  timestamptz NOT NULL DEFAULT now(),
    last_seen   timestamptz NOT NULL DEFAULT now(),
    provider    text COLLATE "C",
    task_id     bigint,
    UNIQUE (platform, kind, key)
);
CREATE INDEX entity_parent ON beat.entity (parent_id) WHERE parent_id IS NOT NULL;
-- for beat.refresh; not (platform, kind, last_seen): the planner would pick
-- it for the lookups by (platform, kind, key) and filter on key
CREATE INDEX entity_last_seen ON beat.entity (last_seen);

COMMENT ON TABLE beat.entity IS 'The current state of everything collected: one row per (platform, kind, key) with its dimensions and metrics (merged from every mapping that wrote them), when it was first and last seen, and the provider and task that last wrote it.  Child items link to their parent.';

CREATE TABLE beat.observation (
    entity_id   bigint NOT NULL REFERENCES beat.entity ON DELETE CASCADE,
    observed_at timestamptz NOT NULL,
    metrics     jsonb NOT NULL,
    task_id     bigint,
    provider    text COLLATE "C"
);
CREATE INDEX observation_entity ON beat.observation (entity_id, observed_at);
CREATE INDEX observation_time ON beat.observation (observed_at);

COMMENT ON TABLE beat.observation IS 'The time series: one row per entity per successful fetch that gave metrics, with the metrics as fetched.  Kept for beat.observation_retention.';

CREATE SEQUENCE beat.event_id_seq;

CREATE TABLE beat.event (
    id              bigint PRIMARY KEY,
    topic           text NOT NULL,
    platform        text COLLATE "C",
    kind            text COLLATE "C",
    key             text COLLATE "C",
    entity_id       bigint,
    task_id         bigint,
    correlation_id  uuid,
    changes         jsonb NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX event_time ON beat.event (created_at);

COMMENT ON TABLE beat.event IS 'One row per change, written in the transaction that made it: entity.created, entity.updated (changes: per metric old, new and delta; per dimension old and new), task.dead, credential.disabled.  Ids grow in commit order: a reader that saw id N has seen every event below N that will ever be visible.  Kept for beat.event_retention.';

-- Taken (EXCLUSIVE) by every writer of events just before it takes ids, and
-- held to its commit: ids are given out in commit order, so a reader never
-- sees id N before an id below N.  Never has rows.
CREATE TABLE beat.event_clock ();
COMMENT ON TABLE beat.event_clock IS 'No rows: its lock orders the writers of beat.event (see beat.publish).';

CREATE TABLE beat.consumer (
    name        text COLLATE "C" PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}$'),
    last_id     bigint NOT NULL DEFAULT 0,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE beat.consumer IS 'The position of each named consumer of beat.event: the last event id beat.consume returned to it in a committed transaction.';

-- Events ----------------------------------------------------------------------

-- Write events (a JSON array of {topic, platform, kind, key, entity_id,
-- task_id, correlation_id, changes}) and NOTIFY beat_events for each after
-- commit.  Call it last in a transaction: the clock's lock is held to the
-- commit, and a writer that waited for another lock while holding it could
-- deadlock.
CREATE FUNCTION beat.publish(events jsonb)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n integer;
    notified integer;
    -- NOTIFY reaches the queue at commit: its usage cannot change meanwhile
    room boolean := pg_notification_queue_usage() < 0.9;
BEGIN
    IF events IS NULL OR jsonb_typeof(events) <> 'array' OR jsonb_array_length(events) = 0 THEN
        RETURN 0;
    END IF;
    LOCK TABLE beat.event_clock IN EXCLUSIVE MODE;
    WITH ins AS (
        INSERT INTO beat.event (id, topic, platform, kind, key, entity_id, task_id,
                                correlation_id, changes)
        SELECT nextval('beat.event_id_seq'), e->>'topic', e->>'platform', e->>'kind', e->>'key',
               (e->>'entity_id')::bigint, (e->>'task_id')::bigint,
               (e->>'correlation_id')::uuid, coalesce(e->'changes', '{}')
        FROM jsonb_array_elements(events) WITH ORDINALITY AS x(e, ord)
        ORDER BY x.ord
        RETURNING id, topic, key)
    -- The payload stays far below NOTIFY's 8000 bytes: no changes, a short
    -- key.  When the notification queue is nearly full (a listener that
    -- stopped reading in an open transaction holds it), the events are
    -- still written but not notified: a full queue would make the commit
    -- fail, and every worker with it.  Readers catch up by id.
    SELECT count(CASE WHEN room THEN
                     pg_notify('beat_events', json_build_object('id', s.id, 'topic', s.topic,
                                                                'key', left(s.key, 200))::text) END),
           count(*)
    INTO notified, n
    FROM (SELECT * FROM ins ORDER BY id) s;
    IF notified < n THEN
        RAISE LOG 'pg_beat: the notification queue is nearly full: % of % events not notified (read them with beat.events_since)',
            n - notified, n;
    END IF;
    RETURN n;
END;
$$;

-- task.dead and credential.disabled: deferred to commit, so whichever path
-- made the change (a worker, the reaper, beat.fail, beat.disable_credential)
-- publishes last in its transaction.
CREATE FUNCTION beat.task_died()
RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM beat.publish(jsonb_build_array(jsonb_build_object(
        'topic', 'task.dead', 'key', NEW.id::text, 'task_id', NEW.id,
        'correlation_id', NEW.correlation_id,
        'changes', jsonb_build_object('flow', NEW.flow, 'attempts', NEW.attempts,
                                      'provider', NEW.provider,
                                      'error', left(NEW.last_error, 1000)))));
    RETURN NULL;
END;
$$;

CREATE CONSTRAINT TRIGGER task_dead AFTER UPDATE OF state ON beat.task
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (NEW.state = 'dead' AND OLD.state IS DISTINCT FROM 'dead')
    EXECUTE FUNCTION beat.task_died();

CREATE FUNCTION beat.credential_disabled()
RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM beat.publish(jsonb_build_array(jsonb_build_object(
        'topic', 'credential.disabled', 'key', NEW.provider || '/' || NEW.label,
        'changes', jsonb_build_object('credential_id', NEW.id, 'provider', NEW.provider,
                                      'label', NEW.label, 'reason', NEW.disabled_reason))));
    RETURN NULL;
END;
$$;

CREATE CONSTRAINT TRIGGER credential_disabled AFTER UPDATE OF enabled ON beat.credential
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (OLD.enabled AND NOT NEW.enabled)
    EXECUTE FUNCTION beat.credential_disabled();

-- The events after last_id, in id order.
CREATE FUNCTION beat.events_since(last_id bigint, max integer DEFAULT 1000)
RETURNS SETOF beat.event
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF last_id IS NULL OR last_id < 0 THEN
        RAISE EXCEPTION 'last_id must be 0 or more' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF max IS NULL OR max NOT BETWEEN 1 AND 100000 THEN
        RAISE EXCEPTION 'max must be between 1 and 100000' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY SELECT * FROM beat.event e WHERE e.id > last_id ORDER BY e.id LIMIT max;
END;
$$;

-- The next events of a named consumer; its position moves past them when
-- the caller's transaction commits (a rollback gives them again).  Two
-- sessions consuming the same name take turns.
CREATE FUNCTION beat.consume(consumer text, max integer DEFAULT 1000)
RETURNS SETOF beat.event
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    pos bigint;
BEGIN
    IF consumer IS NULL OR consumer !~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}$' THEN
        RAISE EXCEPTION 'invalid consumer name "%"', consumer USING ERRCODE = 'invalid_name';
    END IF;
    IF max IS NULL OR max NOT BETWEEN 1 AND 100000 THEN
        RAISE EXCEPTION 'max must be between 1 and 100000' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO beat.consumer AS c (name) VALUES (consumer) ON CONFLICT (name) DO NOTHING;
    SELECT c.last_id INTO pos FROM beat.consumer c WHERE c.name = consumer FOR UPDATE;
    RETURN QUERY
        WITH batch AS (SELECT * FROM beat.event e WHERE e.id > pos ORDER BY e.id LIMIT max),
        moved AS (
            UPDATE beat.consumer c SET last_id = (SELECT max(b.id) FROM batch b), updated_at = now()
            WHERE c.name = consumer AND EXISTS (SELECT 1 FROM batch))
        SELECT * FROM batch b ORDER BY b.id;
END;
$$;

-- Move a consumer's position (to replay, or to skip to the newest event).
CREATE FUNCTION beat.seek_consumer(consumer text, last_id bigint)
RETURNS beat.consumer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    c beat.consumer;
BEGIN
    IF consumer IS NULL OR consumer !~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}$' THEN
        RAISE EXCEPTION 'invalid consumer name "%"', consumer USING ERRCODE = 'invalid_name';
    END IF;
    IF last_id IS NULL OR last_id < 0 THEN
        RAISE EXCEPTION 'last_id must be 0 or more' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO beat.consumer AS k (name, last_id) VALUES (consumer, last_id)
    ON CONFLICT (name) DO UPDATE SET last_id = excluded.last_id, updated_at = now()
    RETURNING * INTO c;
    RETURN c;
END;
$$;

-- Parsing -------------------------------------------------------------------

-- Check the fields of a spec (dimensions or metrics): {name: path} or
-- {name: {"path": ..., "optional": bool, "type": ...}}.
CREATE FUNCTION beat.check_fields(fields jsonb, metrics boolean, what text)
RETURNS void
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    name text;
    f jsonb;
    path text;
    k text;
BEGIN
    IF fields IS NULL THEN
        RETURN;
    END IF;
    IF jsonb_typeof(fields) <> 'object' THEN
        RAISE EXCEPTION '% must be a JSON object of name: path', what
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR name, f IN SELECT * FROM jsonb_each(fields) LOOP
        IF name !~ '^[A-Za-z_][A-Za-z0-9_.-]{0,62}$' THEN
            RAISE EXCEPTION 'invalid name "%" in %', name, what USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF jsonb_typeof(f) = 'string' THEN
            path := f #>> '{}';
        ELSIF jsonb_typeof(f) = 'object' THEN
            FOR k IN SELECT jsonb_object_keys(f) LOOP
                IF k NOT IN ('path', 'optional', 'type') THEN
                    RAISE EXCEPTION '%."%": unknown setting "%" (path, optional, type)', what, name, k
                        USING ERRCODE = 'invalid_parameter_value';
                END IF;
            END LOOP;
            IF jsonb_typeof(f->'path') IS DISTINCT FROM 'string' THEN
                RAISE EXCEPTION '%."%": "path" must be a string', what, name
                    USING ERRCODE = 'invalid_parameter_value';
            END IF;
            path := f->>'path';
            IF f ? 'optional' AND jsonb_typeof(f->'optional') <> 'boolean' THEN
                RAISE EXCEPTION '%."%": "optional" must be true or false', what, name
                    USING ERRCODE = 'invalid_parameter_value';
            END IF;
            IF f ? 'type' AND (jsonb_typeof(f->'type') <> 'string' OR NOT (f->>'type' = ANY (
                    CASE WHEN metrics THEN ARRAY['integer', 'numeric']
                         ELSE ARRAY['json', 'text', 'integer', 'numeric', 'boolean'] END))) THEN
                RAISE EXCEPTION '%."%": type must be one of %', what, name,
                    CASE WHEN metrics THEN 'integer, numeric' ELSE 'json, text, integer, numeric, boolean' END
                    USING ERRCODE = 'invalid_parameter_value';
            END IF;
        ELSE
            RAISE EXCEPTION '%."%" must be a JSONPath string or an object with "path"', what, name
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        PERFORM beat.check_path(path, format('%s."%s"', what, name));
    END LOOP;
END;
$$;

CREATE FUNCTION beat.check_path(path text, what text)
RETURNS void
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM path::jsonpath;
EXCEPTION WHEN syntax_error OR invalid_text_representation THEN
    RAISE EXCEPTION '%: invalid JSONPath %', what, quote_literal(path)
        USING ERRCODE = 'invalid_parameter_value', DETAIL = SQLERRM;
END;
$$;

-- Check a mapping spec: {"key", "dimensions", "metrics", "items": {"path",
-- "kind", "key", "dimensions", "metrics"}}.
CREATE FUNCTION beat.check_spec(spec jsonb)
RETURNS void
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    k text;
    items jsonb := spec->'items';
BEGIN
    IF jsonb_typeof(spec) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION 'spec must be a JSON object' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR k IN SELECT jsonb_object_keys(spec) LOOP
        IF k NOT IN ('key', 'dimensions', 'metrics', 'items') THEN
            RAISE EXCEPTION 'spec: unknown setting "%" (key, dimensions, metrics, items)', k
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END LOOP;
    IF jsonb_typeof(spec->'key') IS DISTINCT FROM 'string' THEN
        RAISE EXCEPTION 'spec: "key" (a JSONPath to the entity''s key) is required'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM beat.check_path(spec->>'key', 'spec.key');
    PERFORM beat.check_fields(spec->'dimensions', false, 'spec.dimensions');
    PERFORM beat.check_fields(spec->'metrics', true, 'spec.metrics');
    IF items IS NOT NULL THEN
        IF jsonb_typeof(items) <> 'object' THEN
            RAISE EXCEPTION 'spec.items must be a JSON object' USING ERRCODE = 'invalid_parameter_value';
        END IF;
        FOR k IN SELECT jsonb_object_keys(items) LOOP
            IF k NOT IN ('path', 'kind', 'key', 'dimensions', 'metrics') THEN
                RAISE EXCEPTION 'spec.items: unknown setting "%" (path, kind, key, dimensions, metrics)', k
                    USING ERRCODE = 'invalid_parameter_value';
            END IF;
        END LOOP;
        IF jsonb_typeof(items->'path') IS DISTINCT FROM 'string'
           OR jsonb_typeof(items->'key') IS DISTINCT FROM 'string' THEN
            RAISE EXCEPTION 'spec.items needs "path" (to the list) and "key" (in each item)'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF coalesce(items->>'kind', '') !~ '^[a-z0-9][a-z0-9_.-]{0,62}$' THEN
            RAISE EXCEPTION 'spec.items needs a "kind" of lower-case letters, digits, _ . -'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        PERFORM beat.check_path(items->>'path', 'spec.items.path');
        PERFORM beat.check_path(items->>'key', 'spec.items.key');
        PERFORM beat.check_fields(items->'dimensions', false, 'spec.items.dimensions');
        PERFORM beat.check_fields(items->'metrics', true, 'spec.items.metrics');
    END IF;
END;
$$;

-- Create or replace the mapping of a provider's operation.
CREATE FUNCTION beat.set_mapping(provider text, operation text, platform text, kind text,
                                 spec jsonb DEFAULT NULL, parser regprocedure DEFAULT NULL)
RETURNS beat.mapping
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m beat.mapping;
    ops jsonb;
BEGIN
    IF platform IS NULL OR platform !~ '^[a-z0-9][a-z0-9_.-]{0,62}$' THEN
        RAISE EXCEPTION 'invalid platform "%"', platform USING ERRCODE = 'invalid_name',
            HINT = 'Use lower-case letters, digits, _ . - (up to 63).';
    END IF;
    IF kind IS NULL OR kind !~ '^[a-z0-9][a-z0-9_.-]{0,62}$' THEN
        RAISE EXCEPTION 'invalid kind "%"', kind USING ERRCODE = 'invalid_name',
            HINT = 'Use lower-case letters, digits, _ . - (up to 63).';
    END IF;
    IF (spec IS NULL) = (parser IS NULL) THEN
        RAISE EXCEPTION 'give either spec or parser' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT p.operations INTO ops FROM beat.provider p WHERE p.name = set_mapping.provider FOR KEY SHARE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'provider "%" does not exist', provider USING ERRCODE = 'undefined_object';
    END IF;
    IF NOT ops ? operation THEN
        RAISE EXCEPTION 'provider "%" has no operation "%"', provider, operation
            USING ERRCODE = 'undefined_object';
    END IF;
    IF spec IS NOT NULL THEN
        PERFORM beat.check_spec(spec);
    ELSE
        PERFORM beat.check_parser(parser);
        IF NOT has_function_privilege(session_user, parser, 'EXECUTE') THEN
            RAISE EXCEPTION 'permission denied for parser %', parser
                USING ERRCODE = 'insufficient_privilege',
                      HINT = 'The role that maps must be allowed to execute the parser.';
        END IF;
    END IF;
    INSERT INTO beat.mapping AS x (provider, operation, platform, kind, spec, parser)
    VALUES (provider, operation, platform, kind, spec, parser::text)
    ON CONFLICT ON CONSTRAINT mapping_pkey DO UPDATE
        SET platform = excluded.platform, kind = excluded.kind, spec = excluded.spec,
            parser = excluded.parser, updated_at = now()
    RETURNING * INTO m;
    RETURN m;
END;
$$;

-- A parser runs in the worker, which is a superuser: it must be SECURITY
-- DEFINER (it runs as its owner) unless a superuser owns it.
CREATE FUNCTION beat.check_parser(parser regprocedure)
RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p pg_proc;
BEGIN
    SELECT * INTO p FROM pg_proc WHERE oid = parser;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'parser function % does not exist', parser USING ERRCODE = 'undefined_function';
    END IF;
    IF p.pronargs <> 2 OR p.proargtypes[0] <> 'jsonb'::regtype OR p.proargtypes[1] <> 'jsonb'::regtype
       OR p.prorettype <> 'jsonb'::regtype OR p.proretset OR p.prokind <> 'f' THEN
        RAISE EXCEPTION 'parser % must take (body jsonb, result jsonb) and return jsonb', parser
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT p.prosecdef AND NOT (SELECT rolsuper FROM pg_roles WHERE oid = p.proowner) THEN
        RAISE EXCEPTION 'parser % must be SECURITY DEFINER (the worker that calls it is a superuser)', parser
            USING ERRCODE = 'insufficient_privilege';
    END IF;
END;
$$;

CREATE FUNCTION beat.drop_mapping(provider text, operation text)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    DELETE FROM beat.mapping m WHERE m.provider = drop_mapping.provider
                                 AND m.operation = drop_mapping.operation;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no mapping for operation "%" of provider "%"', operation, provider
            USING ERRCODE = 'undefined_object';
    END IF;
END;
$$;

-- mapped_value, mapped_fields, mapped_key, entity_key and diff run once per
-- field or entity, inside parse or ingest, which set the search_path: they
-- set none of their own (a SET clause costs a settings save per call).

-- The value of one field, typed: NULL when absent (or JSON null) and
-- optional; an error when required and absent, when the path matches more
-- than one value, or when the value is not of the field's type.
CREATE FUNCTION beat.mapped_value(doc jsonb, vars jsonb, f jsonb, metric boolean, what text)
RETURNS jsonb
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    path text;
    optional boolean := false;
    typ text;
    vals jsonb;
    v jsonb;
    s text;
    n numeric;
BEGIN
    IF jsonb_typeof(f) = 'string' THEN
        path := f #>> '{}';
    ELSE
        path := f->>'path';
        optional := coalesce((f->>'optional')::boolean, false);
        typ := f->>'type';
    END IF;
    typ := coalesce(typ, CASE WHEN metric THEN 'numeric' ELSE 'json' END);
    vals := jsonb_path_query_array_tz(doc, path::jsonpath, vars);
    IF jsonb_array_length(vals) > 1 THEN
        RAISE EXCEPTION '%: path % matched % values where one was expected',
            what, path, jsonb_array_length(vals) USING ERRCODE = 'data_exception';
    END IF;
    v := vals->0;
    IF v IS NULL OR jsonb_typeof(v) = 'null' THEN
        IF NOT optional THEN
            RAISE EXCEPTION '%: required path % is missing', what, path
                USING ERRCODE = 'data_exception';
        END IF;
        RETURN NULL;
    END IF;
    IF typ IN ('integer', 'numeric') THEN
        IF jsonb_typeof(v) = 'number' THEN
            n := v::numeric;
        ELSIF jsonb_typeof(v) = 'string'
              AND btrim(v #>> '{}') ~ '^[-+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+)?$' THEN
            n := btrim(v #>> '{}')::numeric;
        ELSE
            RAISE EXCEPTION '%: % at path % is not a number', what, left(v::text, 100), path
                USING ERRCODE = 'invalid_text_representation';
        END IF;
        IF typ = 'integer' AND n <> trunc(n) THEN
            RAISE EXCEPTION '%: % at path % is not an integer', what, left(v::text, 100), path
                USING ERRCODE = 'invalid_text_representation';
        END IF;
        RETURN to_jsonb(n);
    ELSIF typ = 'boolean' THEN
        s := lower(v #>> '{}');
        IF jsonb_typeof(v) IN ('boolean', 'string') AND s IN ('true', 'false') THEN
            RETURN to_jsonb(s::boolean);
        END IF;
        RAISE EXCEPTION '%: % at path % is not a boolean', what, left(v::text, 100), path
            USING ERRCODE = 'invalid_text_representation';
    ELSIF typ = 'text' THEN
        IF jsonb_typeof(v) IN ('object', 'array') THEN
            RAISE EXCEPTION '%: % at path % is not a scalar', what, left(v::text, 100), path
                USING ERRCODE = 'invalid_text_representation';
        END IF;
        RETURN to_jsonb(v #>> '{}');
    END IF;
    RETURN v;
END;
$$;

-- The fields of a spec, read from doc: {name: value or null}.
CREATE FUNCTION beat.mapped_fields(doc jsonb, vars jsonb, fields jsonb, metric boolean, what text)
RETURNS jsonb
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    out jsonb := '{}';
    name text;
    f jsonb;
BEGIN
    FOR name, f IN SELECT * FROM jsonb_each(coalesce(fields, '{}')) LOOP
        out := out || jsonb_build_object(name, beat.mapped_value(doc, vars, f, metric,
            format('%s, %s "%s"', what, CASE WHEN metric THEN 'metric' ELSE 'dimension' END, name)));
    END LOOP;
    RETURN out;
END;
$$;

-- An entity's key as text, one spelling per key: 123, 123.0 and 1.23e2 are
-- "123", " alice" is "alice"; NULL when v is not a number or a non-blank
-- string.  Used for mapped and parsed keys alike.
CREATE FUNCTION beat.entity_key(v jsonb)
RETURNS text
LANGUAGE sql IMMUTABLE
AS $$
SELECT CASE jsonb_typeof(v) WHEN 'number' THEN trim_scale(v::numeric)::text
                            WHEN 'string' THEN nullif(btrim(v #>> '{}'), '') END
$$;

-- An entity's key read from doc: a non-empty string or a number, as text.
CREATE FUNCTION beat.mapped_key(doc jsonb, vars jsonb, path text, what text)
RETURNS text
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    v jsonb := beat.mapped_value(doc, vars, to_jsonb(path), false, what || ', key');
    k text := beat.entity_key(v);
BEGIN
    IF k IS NULL OR length(k) > 500 THEN
        RAISE EXCEPTION '%, key: % at path % is not a non-empty string or number (up to 500 characters)',
            what, left(v::text, 100), path USING ERRCODE = 'invalid_text_representation';
    END IF;
    RETURN k;
END;
$$;

-- A parser's model, checked and in the canonical shape.
CREATE FUNCTION beat.check_model(model jsonb, platform text, kind text, what text)
RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    items jsonb := '[]';
    item jsonb;
    i integer := 0;
    part text;
    v jsonb;
    k text := beat.entity_key(model->'key');
BEGIN
    IF jsonb_typeof(model) IS DISTINCT FROM 'object' OR k IS NULL OR length(k) > 500 THEN
        RAISE EXCEPTION '%: the parser must return an object with a "key" of 1 to 500 characters', what
            USING ERRCODE = 'data_exception';
    END IF;
    FOREACH part IN ARRAY ARRAY['dimensions', 'metrics'] LOOP
        IF model ? part AND jsonb_typeof(model->part) <> 'object' THEN
            RAISE EXCEPTION '%: the parser''s "%" must be an object', what, part
                USING ERRCODE = 'data_exception';
        END IF;
    END LOOP;
    FOR v IN SELECT value FROM jsonb_each(coalesce(model->'metrics', '{}')) LOOP
        IF jsonb_typeof(v) NOT IN ('number', 'null') THEN
            RAISE EXCEPTION '%: the parser''s metric % is not a number', what, left(v::text, 100)
                USING ERRCODE = 'data_exception';
        END IF;
    END LOOP;
    IF model ? 'items' AND jsonb_typeof(model->'items') <> 'array' THEN
        RAISE EXCEPTION '%: the parser''s "items" must be an array', what USING ERRCODE = 'data_exception';
    END IF;
    FOR item IN SELECT value FROM jsonb_array_elements(coalesce(model->'items', '[]')) LOOP
        i := i + 1;
        IF jsonb_typeof(item) <> 'object' OR coalesce(item->>'kind', '') !~ '^[a-z0-9][a-z0-9_.-]{0,62}$' THEN
            RAISE EXCEPTION '%: the parser''s item % needs a "kind"', what, i USING ERRCODE = 'data_exception';
        END IF;
        item := beat.check_model(item - 'items', platform, item->>'kind', format('%s, item %s', what, i));
        items := items || jsonb_build_array(item - 'platform' - 'items');
    END LOOP;
    RETURN jsonb_build_object('platform', platform, 'kind', kind, 'key', k,
                              'dimensions', coalesce(model->'dimensions', '{}'),
                              'metrics', coalesce(model->'metrics', '{}'),
                              'items', items);
END;
$$;

-- The model of a provider's answer: {"platform", "kind", "key",
-- "dimensions", "metrics", "items": [{"kind", "key", "dimensions",
-- "metrics"}]}.  result is a task result ({"status", "headers", "body"});
-- paths read its body and may use $params (the task's params), $headers
-- and $status.  Raises, naming the provider and the path, when the answer
-- does not match.  Try a mapping with it.
CREATE FUNCTION beat.parse(provider text, operation text, result jsonb, params jsonb DEFAULT '{}')
RETURNS jsonb
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m beat.mapping;
    what text := format('provider "%s", operation "%s"', provider, operation);
    body jsonb := result->'body';
    vars jsonb;
    spec jsonb;
    items jsonb := '[]';
    listed jsonb;
    item jsonb;
    i integer := 0;
    model jsonb;
    fn regprocedure;
BEGIN
    SELECT * INTO m FROM beat.mapping x WHERE x.provider = parse.provider AND x.operation = parse.operation;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no mapping for operation "%" of provider "%"', operation, provider
            USING ERRCODE = 'undefined_object';
    END IF;
    IF jsonb_typeof(body) IS DISTINCT FROM 'object' AND jsonb_typeof(body) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION '%: the response body is not a JSON object or array', what
            USING ERRCODE = 'data_exception';
    END IF;
    IF m.parser IS NOT NULL THEN
        fn := to_regprocedure(m.parser);
        IF fn IS NULL THEN
            RAISE EXCEPTION '%: parser % no longer exists', what, m.parser USING ERRCODE = 'undefined_function';
        END IF;
        PERFORM beat.check_parser(fn);
        -- Only the parser's answer is kept: the block always rolls back, and
        -- with it any setting the parser changed for the session (a
        -- search_path would change what the rest of the batch calls, in a
        -- superuser's worker) and anything it wrote.
        BEGIN
            EXECUTE format('SELECT %s($1, $2)', fn::oid::regproc) INTO model USING body, result;
            RAISE SQLSTATE 'PB001';
        EXCEPTION WHEN SQLSTATE 'PB001' THEN
            NULL;
        END;
        RETURN beat.check_model(model, m.platform, m.kind, what);
    END IF;

    spec := m.spec;
    vars := jsonb_build_object('params', coalesce(params, '{}'),
                               'headers', coalesce(result->'headers', '{}'),
                               'status', coalesce(result->'status', 'null'));
    IF spec ? 'items' THEN
        listed := jsonb_path_query_array_tz(body, (spec->'items'->>'path')::jsonpath, vars);
        -- a path to the list itself ($.data rather than $.data[*]) means its elements
        IF jsonb_array_length(listed) = 1 AND jsonb_typeof(listed->0) = 'array' THEN
            listed := listed->0;
        END IF;
        FOR item IN SELECT value FROM jsonb_array_elements(listed) LOOP
            i := i + 1;
            -- "data": null is no items, not an item without a key
            CONTINUE WHEN jsonb_typeof(item) = 'null';
            IF jsonb_typeof(item) <> 'object' THEN
                RAISE EXCEPTION '%, item %: % is not an object', what, i, left(item::text, 100)
                    USING ERRCODE = 'data_exception';
            END IF;
            items := items || jsonb_build_array(jsonb_build_object(
                'kind', spec->'items'->>'kind',
                'key', beat.mapped_key(item, vars, spec->'items'->>'key', format('%s, item %s', what, i)),
                'dimensions', beat.mapped_fields(item, vars, spec->'items'->'dimensions', false,
                                                 format('%s, item %s', what, i)),
                'metrics', beat.mapped_fields(item, vars, spec->'items'->'metrics', true,
                                              format('%s, item %s', what, i))));
        END LOOP;
    END IF;
    RETURN jsonb_build_object(
        'platform', m.platform, 'kind', m.kind,
        'key', beat.mapped_key(body, vars, spec->>'key', what),
        'dimensions', beat.mapped_fields(body, vars, spec->'dimensions', false, what),
        'metrics', beat.mapped_fields(body, vars, spec->'metrics', true, what),
        'items', items);
END;
$$;

-- For the workers: the model of each answer whose provider maps the
-- operation, or why it does not match.  Answers without a mapping give no
-- row.
CREATE FUNCTION beat.parse_results(providers text[], operation text, results jsonb[], params text[],
                                   OUT ord integer, OUT model jsonb, OUT error text)
RETURNS SETOF record
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    mapped text[];
BEGIN
    SELECT array_agg(m.provider) INTO mapped FROM beat.mapping m
    WHERE m.operation = parse_results.operation AND m.provider = ANY (providers);
    FOR i IN 1 .. coalesce(array_length(providers, 1), 0) LOOP
        CONTINUE WHEN NOT providers[i] = ANY (coalesce(mapped, '{}'));
        ord := i;
        model := NULL;
        error := NULL;
        BEGIN
            model := beat.parse(providers[i], operation, results[i], params[i]::jsonb);
        EXCEPTION WHEN OTHERS OR assert_failure THEN
            error := CASE WHEN SQLERRM LIKE 'provider "%' THEN SQLERRM
                          ELSE format('provider "%s", operation "%s": %s', providers[i], operation, SQLERRM) END;
        END;
        RETURN NEXT;
    END LOOP;
END;
$$;

-- Ingesting -----------------------------------------------------------------

-- What changed between two objects of fields, per field: {old, new} and,
-- for two numbers, delta.  An absent field counts as null.
CREATE FUNCTION beat.diff(old jsonb, new jsonb)
RETURNS jsonb
LANGUAGE sql IMMUTABLE
AS $$
SELECT coalesce(jsonb_object_agg(n.k, jsonb_build_object('old', o.v, 'new', n.v) ||
           CASE WHEN jsonb_typeof(o.v) = 'number' AND jsonb_typeof(n.v) = 'number'
                THEN jsonb_build_object('delta', n.v::numeric - o.v::numeric)
                ELSE '{}' END), '{}')
FROM jsonb_each(coalesce(new, '{}')) AS n(k, v)
LEFT JOIN jsonb_each(coalesce(old, '{}')) AS o(k, v) ON o.k = n.k
WHERE coalesce(o.v, 'null') IS DISTINCT FROM n.v;
$$;

-- Upsert entities (a JSON array of {platform, kind, key, parent: [platform,
-- kind, key], dimensions, metrics, task_id, provider, correlation_id}) and
-- return their events.  Dimensions and metrics merge into what is there; a
-- row with neither only makes sure the entity exists (a parent named by a
-- page of its posts).  Every entity is made to exist first, then the ones
-- with data are locked and read, so the old values the events compare with
-- are the ones replaced, also when another worker writes the same entity
-- at the same time.  Rows are inserted and locked in key order, so two
-- workers never wait for each other in a circle.  An entity gets
-- entity.created when it first gets data.
CREATE FUNCTION beat.upsert_entities(entities jsonb)
RETURNS jsonb
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    olds jsonb;
    events jsonb;
BEGIN
    IF jsonb_array_length(entities) = 0 THEN
        RETURN '[]';
    END IF;
    INSERT INTO beat.entity (platform, kind, key, parent_id, provider, task_id)
    SELECT DISTINCT ON (r->>'platform', r->>'kind', r->>'key')
           r->>'platform', r->>'kind', r->>'key', p.id, r->>'provider', (r->>'task_id')::bigint
    FROM jsonb_array_elements(entities) AS r
    LEFT JOIN beat.entity p ON p.platform = r->'parent'->>0 AND p.kind = r->'parent'->>1
                           AND p.key = r->'parent'->>2
    ORDER BY r->>'platform', r->>'kind', r->>'key'
    ON CONFLICT (platform, kind, key) DO NOTHING;

    SELECT coalesce(jsonb_object_agg(l.id::text, jsonb_build_array(l.dimensions, l.metrics)), '{}')
    INTO olds
    FROM (SELECT e.id, e.dimensions, e.metrics FROM beat.entity e
          WHERE (e.platform, e.kind, e.key) IN (
              SELECT r->>'platform', r->>'kind', r->>'key' FROM jsonb_array_elements(entities) AS r
              WHERE r->'dimensions' <> '{}' OR r->'metrics' <> '{}')
          ORDER BY e.platform, e.kind, e.key
          FOR NO KEY UPDATE) l;

    WITH src AS (
        SELECT DISTINCT ON (r->>'platform', r->>'kind', r->>'key')
               r->>'platform' AS platform, r->>'kind' AS kind, r->>'key' AS key,
               r->'parent' AS parent, r->'dimensions' AS dimensions, r->'metrics' AS metrics,
               (r->>'task_id')::bigint AS task_id, r->>'provider' AS provider,
               (r->>'correlation_id')::uuid AS correlation_id
        FROM jsonb_array_elements(entities) WITH ORDINALITY AS x(r, ord)
        WHERE r->'dimensions' <> '{}' OR r->'metrics' <> '{}'
        ORDER BY r->>'platform', r->>'kind', r->>'key', x.ord DESC),
    up AS (
        UPDATE beat.entity e SET
            parent_id = coalesce(p.id, e.parent_id),
            dimensions = e.dimensions || s.dimensions,
            metrics = e.metrics || s.metrics,
            last_seen = now(),
            provider = s.provider,
            task_id = s.task_id
        FROM src s
        LEFT JOIN beat.entity p ON p.platform = s.parent->>0 AND p.kind = s.parent->>1
                               AND p.key = s.parent->>2
        WHERE e.platform = s.platform AND e.kind = s.kind AND e.key = s.key
        RETURNING e.id, e.platform, e.kind, e.key),
    obs AS (
        INSERT INTO beat.observation (entity_id, observed_at, metrics, task_id, provider)
        SELECT up.id, now(), s.metrics, s.task_id, s.provider
        FROM up JOIN src s USING (platform, kind, key)
        WHERE s.metrics <> '{}')
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'topic', d.topic, 'platform', up.platform, 'kind', up.kind, 'key', up.key,
               'entity_id', up.id, 'task_id', s.task_id, 'correlation_id', s.correlation_id,
               'changes', d.changes) ORDER BY up.platform, up.kind, up.key), '[]')
    INTO events
    FROM up
    JOIN src s USING (platform, kind, key)
    CROSS JOIN LATERAL (
        SELECT olds->(up.id::text)->0 AS dims, olds->(up.id::text)->1 AS mets) o
    CROSS JOIN LATERAL (
        SELECT CASE WHEN coalesce(o.dims, '{}') = '{}' AND coalesce(o.mets, '{}') = '{}'
                    THEN 'entity.created' ELSE 'entity.updated' END AS topic,
               beat.diff(o.mets, s.metrics) AS dm,
               beat.diff(o.dims, s.dimensions) AS dd) c
    CROSS JOIN LATERAL (
        SELECT c.topic,
               CASE WHEN c.dm <> '{}' THEN jsonb_build_object('metrics', c.dm) ELSE '{}' END ||
               CASE WHEN c.dd <> '{}' THEN jsonb_build_object('dimensions', c.dd) ELSE '{}' END
               AS changes) d
    WHERE d.topic = 'entity.created' OR d.changes <> '{}';
    RETURN events;
END;
$$;

-- For the workers, in the transaction that completes the tasks: upsert the
-- models of succeeded tasks (parents first, then their items), append the
-- observations, publish the events.  Returns how many events.
CREATE FUNCTION beat.ingest(task_ids bigint[], providers text[], models jsonb[])
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    parents jsonb;
    children jsonb;
BEGIN
    WITH s AS (
        SELECT x.task_id, x.provider, x.m, x.ord, t.correlation_id
        FROM unnest(task_ids, providers, models) WITH ORDINALITY AS x(task_id, provider, m, ord)
        JOIN beat.task t ON t.id = x.task_id
        WHERE x.m IS NOT NULL)
    SELECT (SELECT coalesce(jsonb_agg(jsonb_build_object(
                'platform', s.m->>'platform', 'kind', s.m->>'kind', 'key', s.m->>'key',
                'dimensions', s.m->'dimensions', 'metrics', s.m->'metrics',
                'task_id', s.task_id, 'provider', s.provider,
                'correlation_id', s.correlation_id) ORDER BY s.ord), '[]')
            FROM s),
           (SELECT coalesce(jsonb_agg(jsonb_build_object(
                'platform', s.m->>'platform', 'kind', i->>'kind', 'key', i->>'key',
                'parent', jsonb_build_array(s.m->>'platform', s.m->>'kind', s.m->>'key'),
                'dimensions', i->'dimensions', 'metrics', i->'metrics',
                'task_id', s.task_id, 'provider', s.provider,
                'correlation_id', s.correlation_id) ORDER BY s.ord, x.n), '[]')
            FROM s CROSS JOIN LATERAL
                 jsonb_array_elements(coalesce(s.m->'items', '[]')) WITH ORDINALITY AS x(i, n))
    INTO parents, children;

    RETURN beat.publish(beat.upsert_entities(parents) || beat.upsert_entities(children));
END;
$$;

-- Retention -----------------------------------------------------------------

-- Delete observations older than beat.observation_retention and events
-- older than beat.event_retention (0: keep them all).  The launcher calls
-- it with beat.purge.
CREATE FUNCTION beat.purge_data(OUT observations bigint, OUT events bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    keep_obs bigint;
    keep_ev bigint;
BEGIN
    SELECT setting::bigint INTO keep_obs FROM pg_settings WHERE name = 'beat.observation_retention';
    SELECT setting::bigint INTO keep_ev FROM pg_settings WHERE name = 'beat.event_retention';
    observations := 0;
    events := 0;
    IF keep_obs > 0 THEN
        DELETE FROM beat.observation WHERE observed_at < now() - make_interval(secs => keep_obs);
        GET DIAGNOSTICS observations = ROW_COUNT;
    END IF;
    IF keep_ev > 0 THEN
        DELETE FROM beat.event WHERE created_at < now() - make_interval(secs => keep_ev);
        GET DIAGNOSTICS events = ROW_COUNT;
    END IF;
END;
$$;

-- Scheduling ------------------------------------------------------------------

-- Enqueue a refresh in flow for each entity of (platform, kind) not seen
-- for stale_after, oldest first, up to max_tasks: params {param: key}, with
-- idempotency key 'beat:refresh:<entity id>', so a run that overlaps one
-- whose tasks are still live adds nothing; an entity whose last refresh
-- died is tried again only after stale_after.  Returns how many it
-- enqueued.
-- pg_cron calls it, e.g.
--   SELECT cron.schedule('refresh-profiles', '*/5 * * * *',
--     $$SELECT beat.refresh('profiles', 'social', 'profile', '1 hour')$$);
CREATE FUNCTION beat.refresh(flow text, platform text, kind text, stale_after interval,
                             param text DEFAULT 'handle', max_tasks integer DEFAULT 10000)
RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n bigint;
    params jsonb[];
    keys text[];
BEGIN
    IF stale_after IS NULL OR stale_after < '0' THEN
        RAISE EXCEPTION 'stale_after must be 0 or more' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF max_tasks IS NULL OR max_tasks NOT BETWEEN 1 AND 1000000 THEN
        RAISE EXCEPTION 'max_tasks must be between 1 and 1000000' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF param IS NULL OR param = '' THEN
        RAISE EXCEPTION 'param must be a non-empty name' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM beat.flow f WHERE f.name = refresh.flow) THEN
        RAISE EXCEPTION 'flow "%" does not exist', flow USING ERRCODE = 'undefined_object';
    END IF;
    SELECT array_agg(jsonb_build_object(param, e.key) ORDER BY e.last_seen, e.id),
           array_agg('beat:refresh:' || e.id ORDER BY e.last_seen, e.id)
    INTO params, keys
    FROM (SELECT e.id, e.key, e.last_seen FROM beat.entity e
          WHERE e.platform = refresh.platform AND e.kind = refresh.kind
            AND e.last_seen < now() - stale_after
            AND NOT EXISTS (SELECT 1 FROM beat.task t
                            WHERE t.flow = refresh.flow
                              AND t.idempotency_key = 'beat:refresh:' || e.id
                              AND (t.state IN ('pending', 'scheduled', 'running', 'failed')
                                   OR (t.state = 'dead' AND t.finished_at > now() - stale_after)))
          ORDER BY e.last_seen, e.id
          LIMIT max_tasks) e;
    IF params IS NULL THEN
        RETURN 0;
    END IF;
    SELECT count(*) INTO n FROM beat.enqueue_batch(flow, params, idempotency_keys => keys);
    RETURN n;
END;
$$;

-- pg_dump keeps what was collected and configured.
SELECT pg_catalog.pg_extension_config_dump('beat.mapping', '');
SELECT pg_catalog.pg_extension_config_dump('beat.entity', '');
SELECT pg_catalog.pg_extension_config_dump('beat.observation', '');
SELECT pg_catalog.pg_extension_config_dump('beat.event', '');
SELECT pg_catalog.pg_extension_config_dump('beat.event_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('beat.consumer', '');

-- Privileges ------------------------------------------------------------------

REVOKE ALL ON FUNCTION
    beat.publish(jsonb), beat.task_died(), beat.credential_disabled(),
    beat.events_since(bigint, integer), beat.consume(text, integer),
    beat.seek_consumer(text, bigint),
    beat.check_fields(jsonb, boolean, text), beat.check_path(text, text), beat.check_spec(jsonb),
    beat.set_mapping(text, text, text, text, jsonb, regprocedure),
    beat.check_parser(regprocedure), beat.drop_mapping(text, text),
    beat.mapped_value(jsonb, jsonb, jsonb, boolean, text),
    beat.mapped_fields(jsonb, jsonb, jsonb, boolean, text),
    beat.mapped_key(jsonb, jsonb, text, text), beat.entity_key(jsonb),
    beat.check_model(jsonb, text, text, text),
    beat.parse(text, text, jsonb, jsonb), beat.parse_results(text[], text, jsonb[], text[]),
    beat.diff(jsonb, jsonb), beat.upsert_entities(jsonb),
    beat.ingest(bigint[], text[], jsonb[]), beat.purge_data(),
    beat.refresh(text, text, text, interval, text, integer)
FROM PUBLIC;
REVOKE ALL ON beat.mapping, beat.entity, beat.observation, beat.event, beat.event_clock,
    beat.consumer FROM PUBLIC;

GRANT SELECT ON beat.mapping, beat.entity, beat.observation, beat.event, beat.consumer
    TO beat_user;
GRANT EXECUTE ON FUNCTION
    beat.events_since(bigint, integer), beat.consume(text, integer),
    beat.seek_consumer(text, bigint),
    beat.refresh(text, text, text, interval, text, integer)
TO beat_user;
-- parse is for trying a mapping: its helpers run as the caller.  The
-- check_* behind set_mapping run as the owner (SECURITY DEFINER): no grant.
GRANT EXECUTE ON FUNCTION
    beat.set_mapping(text, text, text, text, jsonb, regprocedure), beat.drop_mapping(text, text),
    beat.check_parser(regprocedure),
    beat.mapped_value(jsonb, jsonb, jsonb, boolean, text),
    beat.mapped_fields(jsonb, jsonb, jsonb, boolean, text),
    beat.mapped_key(jsonb, jsonb, text, text), beat.entity_key(jsonb),
    beat.check_model(jsonb, text, text, text),
    beat.parse(text, text, jsonb, jsonb), beat.purge_data()
TO beat_admin;
