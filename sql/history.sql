-- History of served lists, stored once and in integers: `publishes` holds one row per
-- publish (run, times, counts, the scale predicted_rating is derived with), and
-- `publish_lists` the rows as (publish_id, origin, user_idx, item_idx, rank, score, source
-- code). `recommendation_history` and `recommendations` are views with raw ids, the layout
-- every reader (export-lists, diff, recommend, read_lists, the report) has always read.
-- Two VARCHAR ids, a run id and two timestamps on every row cost ~3x the bytes and the
-- write time of the lists themselves (2M rows: 40 MB against 13 MB a night).

-- name: create_publishes
CREATE TABLE IF NOT EXISTS publishes (
    publish_id       INTEGER   NOT NULL,  -- 1, 2, ... in publishing order; < 0: see migration
    published_at     TIMESTAMP NOT NULL,
    run_id           VARCHAR   NOT NULL,  -- the run that scored this publish's own rows
    created_at       TIMESTAMP NOT NULL,  -- when that score started
    dataset_sha256   VARCHAR,             -- the dataset scored
    mapping          INTEGER   NOT NULL,  -- the id dictionary its indices refer to
    partial          BOOLEAN   NOT NULL,  -- a `--users` update (the rest carried over)
    kept             BOOLEAN   NOT NULL,  -- its lists are still in publish_lists
    users            BIGINT,
    rows             BIGINT,
    popularity_users BIGINT,
    fold_in_users    BIGINT,
    objective        VARCHAR   NOT NULL,  -- 'rating': predicted_rating is derived from score
    rating_min       DOUBLE    NOT NULL,
    rating_max       DOUBLE    NOT NULL
);

-- name: create_publish_lists
CREATE TABLE IF NOT EXISTS publish_lists (
    publish_id INTEGER  NOT NULL,
    origin     INTEGER  NOT NULL,  -- the publish that scored the row (a `--users` carry-over
                                   -- keeps its run and time)
    user_idx   INTEGER  NOT NULL,
    item_idx   INTEGER  NOT NULL,
    rank       INTEGER  NOT NULL,
    score      FLOAT    NOT NULL,  -- the graph's float32, exactly
    source     TINYINT  NOT NULL   -- 0 model, 1 popularity, 2 fold-in
);

-- name: create_list_users
-- The raw ids the lists' indices name, per dataset mapping: kept with the history, so a
-- database preprocessed again (new ids) still reads its earlier publishes as they were.
-- An append only adds ids, at the end.
CREATE TABLE IF NOT EXISTS list_users (
    mapping INTEGER NOT NULL, user_idx INTEGER NOT NULL, user_id VARCHAR NOT NULL
);

-- name: create_list_items
CREATE TABLE IF NOT EXISTS list_items (
    mapping INTEGER NOT NULL, item_idx INTEGER NOT NULL, item_id VARCHAR NOT NULL
);

-- name: current_mapping
-- The dictionary of the dataset the database holds now (a new one after a preprocess).
SELECT coalesce(
    (SELECT mapping FROM publishes
     WHERE dataset_sha256 = (SELECT any_value(dataset_sha256) FROM dataset_meta)
     ORDER BY publish_id DESC LIMIT 1),
    (SELECT coalesce(max(mapping), 0) + 1 FROM publishes)
) AS mapping;

-- name: extend_list_users
INSERT INTO list_users
SELECT $mapping, user_idx, user_id FROM users
WHERE user_idx > (SELECT coalesce(max(user_idx), -1) FROM list_users WHERE mapping = $mapping);

-- name: extend_list_items
INSERT INTO list_items
SELECT $mapping, item_idx, item_id FROM items
WHERE item_idx > (SELECT coalesce(max(item_idx), -1) FROM list_items WHERE mapping = $mapping);

-- name: mappings_in_use
SELECT count(DISTINCT mapping) AS n FROM list_users;

-- name: prune_list_users
DELETE FROM list_users WHERE mapping NOT IN (
    SELECT mapping FROM publishes
    WHERE publish_id IN (SELECT DISTINCT origin FROM publish_lists)
);

-- name: prune_list_items
DELETE FROM list_items WHERE mapping NOT IN (
    SELECT mapping FROM publishes
    WHERE publish_id IN (SELECT DISTINCT origin FROM publish_lists)
);

-- name: create_history_view
-- Raw ids, the columns and types the history always had. predicted_rating is a rating
-- model's score on the star scale, computed exactly as the scorer once stored it
-- (clip to [0, 1], then scale); null for ranking scores and popularity rows.
CREATE OR REPLACE VIEW recommendation_history AS
SELECT l.publish_id, p.published_at, o.run_id, u.user_id, i.item_id, l.rank,
       l.score::DOUBLE AS score,
       CASE WHEN o.objective = 'rating' AND l.source <> 1
            THEN greatest(least(l.score::DOUBLE, 1.0), 0.0) * (o.rating_max - o.rating_min)
                 + o.rating_min
       END AS predicted_rating,
       CASE l.source WHEN 0 THEN 'model' WHEN 1 THEN 'popularity' ELSE 'fold-in' END
           AS source,
       o.created_at
FROM publish_lists AS l
JOIN publishes AS p ON p.publish_id = l.publish_id
JOIN publishes AS o ON o.publish_id = l.origin
JOIN list_users AS u ON u.mapping = o.mapping AND u.user_idx = l.user_idx
JOIN list_items AS i ON i.mapping = o.mapping AND i.item_idx = l.item_idx;

-- name: serve_newest_publish
-- What `recommendations` means: the newest publish (a rolled-back publish never commits
-- its rows, so the newest committed one is always the served one).
CREATE OR REPLACE VIEW recommendations AS
SELECT run_id, user_id, item_id, rank, score, predicted_rating, source, created_at
FROM recommendation_history
WHERE publish_id = (SELECT max(publish_id) FROM publishes);

-- name: history_layout
-- Which layout the served lists are in: 'lean' (publishes), 'rows' (the history as one
-- table with raw ids on every row, up to 0.2), 'table' (0.1.0: recommendations, no
-- history) or 'none'.
SELECT CASE
    WHEN count(*) FILTER (WHERE table_name = 'publishes') > 0 THEN 'lean'
    WHEN count(*) FILTER (WHERE table_name = 'recommendation_history'
                          AND table_type = 'BASE TABLE') > 0 THEN 'rows'
    WHEN count(*) FILTER (WHERE table_name = 'recommendations'
                          AND table_type = 'BASE TABLE') > 0 THEN 'table'
    ELSE 'none' END AS layout
FROM information_schema.tables
WHERE table_schema = 'main';

-- name: next_publish_id
SELECT coalesce(max(publish_id), 0) + 1 AS publish_id FROM publishes;

-- name: insert_publish
-- The in-process scorer's spool, already in integers: written once, as this publish.
INSERT INTO publish_lists
SELECT $publish_id, $publish_id, user_idx, item_idx, rank, score, source
FROM spooled_recommendations;

-- name: insert_publish_raw
-- Lists with raw ids (the Ray engine's Parquet parts): mapped to indices on the way in.
INSERT INTO publish_lists
SELECT $publish_id, $publish_id, u.user_idx, i.item_idx, s.rank, s.score::FLOAT,
       CASE s.source::VARCHAR WHEN 'model' THEN 0 WHEN 'popularity' THEN 1 ELSE 2 END
FROM spooled_recommendations AS s
JOIN users AS u ON u.user_id = s.user_id::VARCHAR
JOIN items AS i ON i.item_id = s.item_id::VARCHAR;

-- name: carry_over_users
-- `--users`: everyone the update leaves out keeps the list the previous publish served,
-- with the run and time that scored it (origin). Lists of another dataset (preprocessed
-- again since) name other users: nothing is carried over from them.
INSERT INTO publish_lists
SELECT $publish_id, origin, user_idx, item_idx, rank, score, source
FROM publish_lists
WHERE publish_id = $previous
  AND (SELECT mapping FROM publishes WHERE publish_id = $previous) = $mapping
  AND user_idx NOT IN (SELECT user_idx FROM publish_lists WHERE publish_id = $publish_id);

-- name: insert_publish_row
INSERT INTO publishes
SELECT $publish_id, now()::TIMESTAMP, $run_id, $created_at,
       (SELECT any_value(dataset_sha256) FROM dataset_meta), $mapping, $partial, true,
       -- Every listed user has exactly one rank-1 row: counting those is the distinct
       -- users without a hash of 2M keys (0.13 CPU-s a night).
       count(*) FILTER (WHERE rank = 1), count(*),
       count(*) FILTER (WHERE rank = 1 AND source = 1),
       count(*) FILTER (WHERE rank = 1 AND source = 2),
       $objective, $rating_min, $rating_max
FROM publish_lists
WHERE publish_id = $publish_id;

-- name: prune_history
DELETE FROM publish_lists WHERE publish_id <= $publish_id - $keep;

-- name: mark_pruned
-- A pruned publish keeps its row (a few bytes) while carried-over rows name it as origin.
UPDATE publishes SET kept = false
WHERE kept AND publish_id NOT IN (SELECT DISTINCT publish_id FROM publish_lists);

-- name: migrate_publishes
-- Once, from the one-table history (raw ids on every row): a publish's own run and time
-- are its newest rows'; a run and time only carried over (its publish pruned) gets a
-- negative id that is never listed. The scale is the dataset's; a rating model is one
-- whose rows had a predicted_rating.
INSERT INTO publishes
WITH own AS (
    SELECT publish_id, min(published_at) AS published_at,
           arg_max(run_id, created_at) AS run_id, max(created_at) AS created_at,
           count(DISTINCT user_id) AS users, count(*) AS rows,
           count(DISTINCT user_id) FILTER (WHERE source = 'popularity') AS popularity_users,
           count(DISTINCT user_id) FILTER (WHERE source = 'fold-in') AS fold_in_users
    FROM recommendation_history_rows GROUP BY publish_id
),
groups AS (
    SELECT run_id, created_at, min(published_at) AS published_at,
           bool_or(predicted_rating IS NOT NULL) AS rated
    FROM recommendation_history_rows GROUP BY run_id, created_at
),
origins AS (
    SELECT g.*, o.publish_id AS own_id,
           -row_number() OVER (ORDER BY g.created_at, g.run_id) AS orphan_id
    FROM groups AS g
    LEFT JOIN (SELECT run_id, created_at, min(publish_id) AS publish_id FROM own
               GROUP BY run_id, created_at) AS o USING (run_id, created_at)
),
meta AS (SELECT any_value(dataset_sha256) AS sha, any_value(rating_min) AS lo,
                any_value(rating_max) AS hi FROM dataset_meta)
SELECT own.publish_id, own.published_at, own.run_id, own.created_at, meta.sha, 1, false, true,
       own.users, own.rows, own.popularity_users, own.fold_in_users,
       CASE WHEN g.rated THEN 'rating' ELSE 'ranking' END, meta.lo, meta.hi
FROM own JOIN groups AS g USING (run_id, created_at), meta
UNION ALL
SELECT orphan_id, published_at, run_id, created_at, meta.sha, 1, false, false,
       NULL, NULL, NULL, NULL, CASE WHEN rated THEN 'rating' ELSE 'ranking' END, meta.lo, meta.hi
FROM origins, meta
WHERE own_id IS NULL;

-- name: migrate_publish_lists
INSERT INTO publish_lists
SELECT h.publish_id, o.publish_id, u.user_idx, i.item_idx, h.rank, h.score::FLOAT,
       CASE coalesce(h.source, 'model') WHEN 'model' THEN 0 WHEN 'popularity' THEN 1 ELSE 2 END
FROM recommendation_history_rows AS h
JOIN (SELECT run_id, created_at, min(publish_id) AS publish_id
      FROM publishes WHERE publish_id < 0 OR kept GROUP BY run_id, created_at
     ) AS o USING (run_id, created_at)
JOIN list_users AS u ON u.mapping = 1 AND u.user_id = h.user_id
JOIN list_items AS i ON i.mapping = 1 AND i.item_id = h.item_id;

-- name: migrate_list_users
-- Dictionary 1: today's ids, then any id the old rows name that the dataset no longer has.
INSERT INTO list_users
SELECT 1, user_idx, user_id FROM users
UNION ALL
SELECT 1, (SELECT coalesce(max(user_idx), -1) FROM users) + row_number() OVER (ORDER BY user_id),
       user_id
FROM (SELECT DISTINCT user_id FROM recommendation_history_rows
      WHERE user_id NOT IN (SELECT user_id FROM users));

-- name: migrate_list_items
INSERT INTO list_items
SELECT 1, item_idx, item_id FROM items
UNION ALL
SELECT 1, (SELECT coalesce(max(item_idx), -1) FROM items) + row_number() OVER (ORDER BY item_id),
       item_id
FROM (SELECT DISTINCT item_id FROM recommendation_history_rows
      WHERE item_id NOT IN (SELECT item_id FROM items));

-- name: migrate_rename_rows
ALTER TABLE recommendation_history RENAME TO recommendation_history_rows;

-- name: migrate_drop_rows
DROP TABLE recommendation_history_rows;

-- name: drop_served_view
DROP VIEW IF EXISTS recommendations;

-- name: publishes
SELECT publish_id, published_at, run_id AS runs, users, rows
FROM publishes
WHERE kept
ORDER BY publish_id DESC;

-- name: diff_users
-- Per user present in either publish: whether the top-K changed, and how many items the
-- two lists share.
WITH a AS (
    SELECT user_id, list(item_id ORDER BY rank) AS items
    FROM recommendation_history WHERE publish_id = $before GROUP BY user_id
),
b AS (
    SELECT user_id, list(item_id ORDER BY rank) AS items
    FROM recommendation_history WHERE publish_id = $after GROUP BY user_id
)
SELECT
    count(*) FILTER (WHERE a.user_id IS NOT NULL AND b.user_id IS NOT NULL) AS users_compared,
    count(*) FILTER (WHERE a.items <> b.items) AS users_changed,
    count(*) FILTER (WHERE a.user_id IS NULL) AS users_added,
    count(*) FILTER (WHERE b.user_id IS NULL) AS users_removed,
    avg(len(list_intersect(a.items, b.items)) / greatest(len(a.items), 1))
        FILTER (WHERE a.user_id IS NOT NULL AND b.user_id IS NOT NULL) AS mean_overlap
FROM a FULL OUTER JOIN b USING (user_id);

-- name: diff_items
-- Items recommended to anyone in one publish and to no one in the other.
WITH a AS (SELECT DISTINCT item_id FROM recommendation_history WHERE publish_id = $before),
b AS (SELECT DISTINCT item_id FROM recommendation_history WHERE publish_id = $after)
SELECT 'entered' AS change, item_id FROM b WHERE item_id NOT IN (SELECT item_id FROM a)
UNION ALL
SELECT 'left' AS change, item_id FROM a WHERE item_id NOT IN (SELECT item_id FROM b)
ORDER BY change, item_id;

-- name: served_lists
-- The current served lists as a warehouse reads them: raw ids, typed columns.
SELECT run_id, user_id, item_id, rank::INTEGER AS rank, score, predicted_rating,
       coalesce(source, 'model') AS source, created_at
FROM recommendations
ORDER BY user_id, rank;

-- name: published_lists
SELECT run_id, user_id, item_id, rank, score, predicted_rating, source, created_at
FROM recommendation_history
WHERE publish_id = $publish_id
ORDER BY user_id, rank;

-- name: publishes_rows
-- The kept publishes of a database still in the one-table layout (until its next publish).
SELECT publish_id, min(published_at) AS published_at, string_agg(DISTINCT run_id, ',') AS runs,
       count(DISTINCT user_id) AS users, count(*) AS rows
FROM recommendation_history
GROUP BY publish_id
ORDER BY publish_id DESC;
