-- Scoring: what `mfbatch score` reads, and the staged swap that publishes its output.

-- name: latest_run
SELECT run_id, export_path, data_seen, dataset_sha256, objective
FROM training_runs
WHERE status <> 'diverged'
ORDER BY finished_at DESC
LIMIT 1;

-- name: run_by_id
SELECT run_id, export_path, data_seen, dataset_sha256, objective
FROM training_runs
WHERE run_id = $run_id;

-- name: seen_train
-- Items each user rated in the data a validated run was trained on (the train split).
-- No ORDER BY: preprocess stores ratings by user already; the scorer checks and sorts
-- only if that ever stops being true.
SELECT user_idx, item_idx FROM ratings WHERE split = 'train';

-- name: seen_all
-- A refit (--on all) saw every rating, so every rated item is excluded.
SELECT user_idx, item_idx FROM ratings;

-- name: user_ids
SELECT user_idx, user_id FROM users ORDER BY user_idx;

-- name: item_ids
SELECT item_idx, item_id FROM items ORDER BY item_idx;

-- name: unordered_inserts
-- Rows of recommendations carry their order in `rank`, so DuckDB may insert in parallel.
SET preserve_insertion_order = false;

-- name: drop_recommendations_staging
DROP TABLE IF EXISTS recommendations_staging;

-- name: create_recommendations_staging
-- Filled from the spool the scorer wrote (registered from Arrow), while the published
-- table stays readable.
CREATE TABLE recommendations_staging AS
SELECT
    $run_id::VARCHAR AS run_id,
    user_id::VARCHAR AS user_id,
    item_id::VARCHAR AS item_id,
    rank::INTEGER AS rank,
    score::DOUBLE AS score,
    predicted_rating::DOUBLE AS predicted_rating,
    $created_at::TIMESTAMP AS created_at
FROM spooled_recommendations;

-- name: drop_recommendations
DROP TABLE IF EXISTS recommendations;

-- name: publish_recommendations
ALTER TABLE recommendations_staging RENAME TO recommendations;

-- name: count_recommendations
SELECT count(*), count(DISTINCT user_id) FROM recommendations;
