-- Runs and dataset identity: what runs.py reads to answer "which run", "does this model
-- belong to this database" and "where are its files". Columns are selected by name and
-- read back as records, never unpacked by position.

-- name: dataset_identity
SELECT dataset_sha256, n_users, n_items, rating_min, rating_max, n_train, n_val
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
