-- Training runs: what `mfbatch train` reads and records.

-- name: training_ratings
-- Sorted so per-user structures (CSR of rated items) are built without another sort.
-- Appended ratings are fitted only by a refit on all data: a validated run trains on the
-- preprocess's train split alone, so `evaluate` measures what it always measured.
-- ts_ms orders each user's ratings for --recency-half-life (NULL when the source has none).
-- weight: each interaction's weight in the softmax losses (1.0 unless --weight-col or
-- merged implicit duplicates).
SELECT user_idx, item_idx, rating_norm, epoch_ms(ts) AS ts_ms, split = 'val' AS is_val, weight
FROM ratings
WHERE $all_splits OR split <> 'append'
ORDER BY user_idx, item_idx;

-- name: create_training_runs
CREATE TABLE IF NOT EXISTS training_runs (
    run_id              VARCHAR PRIMARY KEY,
    parent_run_id       VARCHAR,            -- the validated run a refit (--on all) copies
    started_at          TIMESTAMP NOT NULL,
    finished_at         TIMESTAMP NOT NULL,
    status              VARCHAR   NOT NULL, -- completed | early_stopped | diverged
    config              JSON      NOT NULL,
    dataset_sha256      VARCHAR   NOT NULL,
    data_seen           VARCHAR   NOT NULL, -- 'train' or 'train+val'
    device              VARCHAR   NOT NULL,
    objective           VARCHAR   NOT NULL,
    epochs_run          INTEGER   NOT NULL,
    best_epoch          INTEGER   NOT NULL,
    train_loss          DOUBLE,
    val_rmse            DOUBLE,             -- stars; NULL for a refit on all data
    val_mae             DOUBLE,
    val_recall          DOUBLE,             -- Recall@top_k on the validation split
    val_ndcg            DOUBLE,
    top_k               INTEGER   NOT NULL,
    n_train             BIGINT    NOT NULL,
    seconds             DOUBLE    NOT NULL,
    examples_per_second DOUBLE    NOT NULL,
    export_path         VARCHAR   NOT NULL
);

-- name: create_training_epochs
CREATE TABLE IF NOT EXISTS training_epochs (
    run_id     VARCHAR NOT NULL,
    epoch      INTEGER NOT NULL,
    train_loss DOUBLE  NOT NULL,
    val_rmse   DOUBLE,
    val_mae    DOUBLE,
    val_recall DOUBLE,
    val_ndcg   DOUBLE,
    seconds    DOUBLE  NOT NULL
);

-- name: add_training_plan_columns
-- How `train` chose its loss and what it saw in validation, on databases made before
-- these columns existed too.
ALTER TABLE training_runs ADD COLUMN IF NOT EXISTS train_path VARCHAR;

-- name: add_training_reason_column
ALTER TABLE training_runs ADD COLUMN IF NOT EXISTS train_path_reason VARCHAR;

-- name: add_training_warning_column
ALTER TABLE training_runs ADD COLUMN IF NOT EXISTS validation_warning VARCHAR;

-- name: record_training_plan
-- train_path: softmax | sampled | rating, the loss the run trained with (mfbatch.training.steps
-- `plan`); train_path_reason: the cost rule's figures behind it, as printed before
-- training; validation_warning: the one-line warning of a decaying validation curve.
UPDATE training_runs
SET train_path = $train_path, train_path_reason = $reason, validation_warning = $warning
WHERE run_id = $run_id;

-- name: insert_training_run
-- Columns named: later ones (train_path, ...) are added by ALTER and filled by
-- record_training_plan.
INSERT INTO training_runs (
    run_id, parent_run_id, started_at, finished_at, status, config, dataset_sha256,
    data_seen, device, objective, epochs_run, best_epoch, train_loss, val_rmse, val_mae,
    val_recall, val_ndcg, top_k, n_train, seconds, examples_per_second, export_path
) VALUES (
    $run_id, $parent_run_id, $started_at, $finished_at, $status, $config, $dataset_sha256,
    $data_seen, $device, $objective, $epochs_run, $best_epoch, $train_loss, $val_rmse,
    $val_mae, $val_recall, $val_ndcg, $top_k, $n_train, $seconds, $examples_per_second,
    $export_path
);

-- name: insert_training_epochs
INSERT INTO training_epochs
SELECT run_id, epoch, train_loss, val_rmse, val_mae, val_recall, val_ndcg, seconds
FROM staged_epochs;
