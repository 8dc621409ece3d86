-- History of served lists: every publish is kept whole, numbered, for as many publishes
-- as the retention says (at least one: the view `recommendations` is the newest); the
-- diff and the exports read from here.

-- name: create_recommendation_history
CREATE TABLE IF NOT EXISTS recommendation_history (
    publish_id   INTEGER   NOT NULL,  -- 1, 2, ... in publishing order
    published_at TIMESTAMP NOT NULL,
    run_id       VARCHAR   NOT NULL,
    user_id      VARCHAR   NOT NULL,
    item_id      VARCHAR   NOT NULL,
    rank         INTEGER   NOT NULL,
    score        DOUBLE    NOT NULL,
    predicted_rating DOUBLE,
    source       VARCHAR   NOT NULL,
    created_at   TIMESTAMP NOT NULL
);

-- name: next_publish_id
SELECT coalesce(max(publish_id), 0) + 1 AS publish_id FROM recommendation_history;

-- name: carry_over_users
-- `--users`: everyone the update leaves out keeps the list the previous publish served
-- (`recommendations` is still that publish, or the table an older version served from).
INSERT INTO recommendation_history
SELECT $publish_id, now()::TIMESTAMP, run_id, user_id, item_id, rank, score,
       predicted_rating, coalesce(source, 'model'), created_at
FROM recommendations
WHERE user_id NOT IN (SELECT DISTINCT user_id::VARCHAR FROM spooled_recommendations);

-- name: insert_publish
-- The scorer's lists (an Arrow spool or Parquet parts, registered as a view) written once,
-- as this publish: `recommendations` is a view of the newest publish, not a second copy.
INSERT INTO recommendation_history
SELECT $publish_id, now()::TIMESTAMP, $run_id::VARCHAR, user_id::VARCHAR, item_id::VARCHAR,
       rank::INTEGER, score::DOUBLE, predicted_rating::DOUBLE, source::VARCHAR,
       $created_at::TIMESTAMP
FROM spooled_recommendations;

-- name: serve_newest_publish
-- What `recommendations` means: the newest publish (a rolled-back publish never commits
-- its rows, so the newest committed one is always the served one).
CREATE OR REPLACE VIEW recommendations AS
SELECT run_id, user_id, item_id, rank, score, predicted_rating, source, created_at
FROM recommendation_history
WHERE publish_id = (SELECT max(publish_id) FROM recommendation_history);

-- name: prune_history
DELETE FROM recommendation_history WHERE publish_id <= $publish_id - $keep;

-- name: publishes
SELECT publish_id, min(published_at) AS published_at, string_agg(DISTINCT run_id, ',') AS runs,
       count(DISTINCT user_id) AS users, count(*) AS rows
FROM recommendation_history
GROUP BY publish_id
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
