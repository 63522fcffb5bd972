-- Installing from nothing, what it creates, and dropping it cleanly.
-- (There is one install script, 0.1.0, and upgrades: CREATE EXTENSION runs
-- them all, so a fresh install and an updated one run the same scripts;
-- below, the update is tested with data in the tables.)
CREATE EXTENSION pg_beat;
SELECT extversion FROM pg_extension WHERE extname = 'pg_beat';

-- Every object the extension owns.
SELECT pg_describe_object(classid, objid, objsubid) AS object
FROM pg_depend
WHERE refclassid = 'pg_extension'::regclass
  AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'pg_beat')
  AND deptype = 'e'
ORDER BY 1;

-- The roles exist and nothing is granted to PUBLIC.
SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname LIKE 'beat\_%' ORDER BY 1;
SELECT p.oid::regprocedure AS function
FROM pg_proc p
WHERE p.pronamespace = 'beat'::regnamespace
  AND has_function_privilege('public', p.oid, 'EXECUTE');
SELECT c.relname
FROM pg_class c
WHERE c.relnamespace = 'beat'::regnamespace AND c.relkind IN ('r', 'v', 'S')
  AND has_table_privilege('public', c.oid, 'SELECT');
SELECT has_schema_privilege('public', 'beat', 'USAGE') AS public_usage;

-- Functions that write run as the extension owner with a pinned search_path.
SELECT p.oid::regprocedure AS function, p.prosecdef, p.proconfig
FROM pg_proc p
WHERE p.pronamespace = 'beat'::regnamespace
ORDER BY p.oid::regprocedure::text;

-- The GUCs, with their units and contexts.
SELECT name, setting, unit, context FROM pg_settings WHERE name LIKE 'beat.%' ORDER BY 1;

-- An unknown beat.* setting is refused: the prefix is reserved.
SET beat.no_such_setting = 1;

-- Dropping and creating again works, leaving the roles in place.
DROP EXTENSION pg_beat;
SELECT count(*) AS roles_left FROM pg_roles WHERE rolname LIKE 'beat\_%';
CREATE EXTENSION pg_beat;
SELECT count(*) AS flows FROM beat.flow;
DROP EXTENSION pg_beat;

-- The upgrade path: 0.1.0, with a flow and a task, updated to the default
-- version in one ALTER EXTENSION UPDATE (every step on the way runs);
-- the flow and the task come out of it whole.
CREATE EXTENSION pg_beat VERSION '0.1.0';
SELECT count(*) FROM beat.create_flow('kept', max_attempts => 3);
SELECT beat.enqueue('kept', '{"survives": true}') AS kept_task \gset
ALTER EXTENSION pg_beat UPDATE;
SELECT extversion FROM pg_extension WHERE extname = 'pg_beat';
SELECT name, max_attempts, request, timeout, ok_statuses, retry_statuses, max_redirects
FROM beat.flow;
SELECT params FROM beat.task WHERE id = :kept_task;
SELECT count(*) AS objects FROM pg_depend
WHERE refobjid = (SELECT oid FROM pg_extension WHERE extname = 'pg_beat') AND deptype = 'e';
DROP EXTENSION pg_beat;
