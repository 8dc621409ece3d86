-- Scoring: what `mfbatch score` reads (the publish itself is in history.sql).

-- name: seen_all
-- Served lists exclude every rated item, whatever split it is in and whatever run serves.
-- No ORDER BY: preprocess stores ratings by user already; the scorer checks and sorts
-- only if that ever stops being true.
SELECT user_idx, item_idx FROM ratings;

-- name: seen_train
-- What a validated run trained on: the only items `evaluate`'s lists exclude.
SELECT user_idx, item_idx FROM ratings WHERE split = 'train';

-- name: trained_counts
-- Ratings per user and per item in the data a run was fitted on (train, or every split
-- for a refit): a user with none gets the popularity list, an item with none is never
-- offered (its vector was never trained).
SELECT 'user' AS kind, user_idx AS idx, count(*) AS n
FROM ratings WHERE $all_splits OR split = 'train' GROUP BY user_idx
UNION ALL
SELECT 'item' AS kind, item_idx AS idx, count(*) AS n
FROM ratings WHERE $all_splits OR split = 'train' GROUP BY item_idx;

-- name: user_ids
SELECT user_idx, user_id FROM users ORDER BY user_idx;

-- name: item_ids
SELECT item_idx, item_id FROM items ORDER BY item_idx;

-- name: items_table
-- Every column of items, for score --where (a predicate evaluated by Polars, never SQL text).
SELECT * FROM items ORDER BY item_idx;

-- name: unordered_inserts
-- Rows of recommendations carry their order in `rank`, so DuckDB may insert in parallel.
SET preserve_insertion_order = false;

-- name: count_recommendations
SELECT count(*), count(DISTINCT user_id) FROM recommendations;

-- name: run_data_version
-- The newest dataset version that existed when the run started: every version it could
-- have read. Train reads the data after it records started_at and an append can't commit
-- while train holds the database, so this errs only towards folding in more users.
SELECT coalesce(max(v.version), 0) AS version
FROM dataset_versions v, training_runs r
WHERE r.run_id = $run_id AND v.created_at <= r.started_at;

-- name: untrained_versioned
-- The ratings a run was NOT fitted on, on a database with a lineage: a 'train' row was
-- fitted by every run (replaced or not, it was there at version 0); 'val' rows by a refit;
-- appended rows by a refit that started after they were added. `score` counts what the
-- run was fitted on as every rating (seen_all, read anyway) less these: usually none or
-- few, where grouping every rating by user and by item cost 0.2 s of a 100k-user score.
SELECT user_idx, item_idx
FROM ratings
WHERE NOT (split = 'train' OR ($all_splits AND (split = 'val' OR version <= $version)));

-- name: fold_in_ratings
-- Every rating of the users the run has not seen all of: ratings added or replaced after
-- the run's data version, or appended ratings under a run that fits the train split only.
-- All their ratings, old ones included, go into the solve.
WITH fresh AS (
    SELECT DISTINCT user_idx FROM ratings
    WHERE version > $version OR (split = 'append' AND NOT $all_splits)
)
-- ts_ms: the run's recency weights are recomputed over them (NULL when the source has none).
SELECT r.user_idx, r.item_idx, r.rating_norm, epoch_ms(r.ts) AS ts_ms
FROM ratings r SEMI JOIN fresh USING (user_idx)
ORDER BY r.user_idx, r.item_idx;

-- name: fold_in_weights
-- The per-interaction weight of the same rows in the same order, where ratings has one.
WITH fresh AS (
    SELECT DISTINCT user_idx FROM ratings
    WHERE version > $version OR (split = 'append' AND NOT $all_splits)
)
SELECT r.weight
FROM ratings r SEMI JOIN fresh USING (user_idx)
ORDER BY r.user_idx, r.item_idx;
