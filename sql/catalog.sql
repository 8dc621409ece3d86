-- Catalog look-ups shared by every stage.

-- name: table_exists
SELECT count(*) > 0
FROM information_schema.tables
WHERE table_schema = 'main' AND table_name = $table;

-- name: table_type
-- 'BASE TABLE' or 'VIEW' (`recommendations` was a table before it became a view).
SELECT table_type
FROM information_schema.tables
WHERE table_schema = 'main' AND table_name = $table;

-- name: dataset_meta
SELECT * FROM dataset_meta;
