-- `mfbatch tune`: every trial of a search, and the settings it chose for `train`.

-- name: create_tuning_trials
CREATE TABLE IF NOT EXISTS tuning_trials (
    study       VARCHAR NOT NULL,
    trial       INTEGER NOT NULL,   -- Optuna's trial number, from 0
    params      JSON    NOT NULL,   -- the TrainConfig fields the trial set
    value       DOUBLE,             -- its best inner-validation figure (NULL unless complete)
    metric      VARCHAR NOT NULL,   -- what value measures, e.g. ndcg@20
    state       VARCHAR NOT NULL,   -- COMPLETE | PRUNED | FAIL | RUNNING
    seconds     DOUBLE,
    error       VARCHAR,            -- why a failed trial failed
    PRIMARY KEY (study, trial)
);

-- name: clear_tuning_trials
DELETE FROM tuning_trials WHERE study = $study;

-- name: insert_tuning_trial
INSERT INTO tuning_trials VALUES ($study, $trial, $params, $value, $metric, $state, $seconds, $error);

-- name: create_tuned_settings
-- What `train` applies below explicit flags (the newest row, for the same objective).
CREATE TABLE IF NOT EXISTS tuned_settings (
    study       VARCHAR   PRIMARY KEY,
    chosen_at   TIMESTAMP NOT NULL,
    objective   VARCHAR   NOT NULL,
    trial       INTEGER   NOT NULL,
    value       DOUBLE    NOT NULL,
    metric      VARCHAR   NOT NULL,
    settings    JSON      NOT NULL,
    dataset_sha256 VARCHAR NOT NULL
);

-- name: replace_tuned_settings
INSERT OR REPLACE INTO tuned_settings
VALUES ($study, $chosen_at, $objective, $trial, $value, $metric, $settings, $dataset_sha256);

-- name: latest_tuned_settings
SELECT study, objective, settings, dataset_sha256
FROM tuned_settings
ORDER BY chosen_at DESC
LIMIT 1;

-- name: tuning_trials_of
SELECT trial, params, value, state, error FROM tuning_trials WHERE study = $study ORDER BY trial;
