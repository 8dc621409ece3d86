-- Runs and dataset identity: what runs.py reads to answer "which run", "does this model
-- belong to this database" and "where are its files". Columns are selected by name and
-- read back as records, never unpacked by position.

-- name: dataset_identity
SELECT dataset_sha256, n_users, n_items, rating_min, rating_max, n_train, n_val, split_kind
FROM dataset_meta;

-- name: run_by_id
SELECT run_id, parent_run_id, status, data_seen, dataset_sha256, objective, best_epoch,
       epochs_run, top_k, export_path, config, finished_at
FROM training_runs
WHERE run_id = $run_id;

-- name: newest_runs
-- Newest first; the caller picks by role (a validated run to measure, a refit to serve).
SELECT run_id, parent_run_id, status, data_seen, dataset_sha256, objective, best_epoch,
       epochs_run, top_k, export_path, config, finished_at
FROM training_runs
WHERE status <> 'diverged'
ORDER BY finished_at DESC, run_id DESC;

-- name: run_listing
SELECT run_id, parent_run_id, status, data_seen, dataset_sha256, objective, best_epoch,
       epochs_run, top_k, val_recall, val_ndcg, val_rmse, n_train, seconds, finished_at
FROM training_runs
ORDER BY finished_at DESC, run_id DESC;

-- name: create_serving
-- The run `score` serves by default once someone chose one (`mfbatch serve`); without a
-- row here it serves the newest refit.
CREATE TABLE IF NOT EXISTS serving (
    run_id      VARCHAR   NOT NULL,
    promoted_at TIMESTAMP NOT NULL
);

-- name: clear_serving
DELETE FROM serving;

-- name: insert_serving
INSERT INTO serving VALUES ($run_id, now()::TIMESTAMP);

-- name: promoted_run
SELECT run_id, promoted_at FROM serving LIMIT 1;

-- name: served_runs
SELECT run_id, count(DISTINCT user_id) AS users, max(created_at) AS created_at
FROM recommendations
GROUP BY run_id;
