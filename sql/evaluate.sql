-- Evaluation: every figure `mfbatch evaluate` reports is computed here, by DuckDB, from the
-- tables the pipeline wrote. eval_recs is a temp table holding the lists being judged
-- (the model's recommendations, then the popularity baseline), so one metrics query
-- serves both and they are measured identically.

-- name: val_pairs
SELECT user_idx, item_idx, rating FROM ratings WHERE split = 'val' ORDER BY user_idx, item_idx;

-- name: create_val_predictions
CREATE TABLE IF NOT EXISTS val_predictions (
    run_id           VARCHAR NOT NULL,
    user_idx         INTEGER NOT NULL,
    item_idx         INTEGER NOT NULL,
    rating           DOUBLE  NOT NULL,  -- stars
    predicted_rating DOUBLE  NOT NULL   -- stars, from the exported model, clipped to the scale
);

-- name: delete_val_predictions
DELETE FROM val_predictions WHERE run_id = $run_id;

-- name: insert_val_predictions
INSERT INTO val_predictions
SELECT run_id, user_idx, item_idx, rating, predicted_rating FROM staged_predictions;

-- name: rating_metrics
SELECT
    sqrt(avg((predicted_rating - rating) ^ 2)) AS rmse,
    avg(abs(predicted_rating - rating)) AS mae,
    count(*) AS n
FROM val_predictions
WHERE run_id = $run_id;

-- name: create_evaluation_lists
-- The lists `evaluate` measured, built from the validated run (recommender 'model') and
-- the popularity baseline, for one K: every figure in `evaluations` is computed from
-- these rows. `source` says how a user's model list was made ('popularity' for a user
-- with no train rating).
CREATE TABLE IF NOT EXISTS evaluation_lists (
    run_id      VARCHAR NOT NULL,
    recommender VARCHAR NOT NULL,  -- 'model' | 'popularity'
    k           INTEGER NOT NULL,
    user_id     VARCHAR NOT NULL,
    item_id     VARCHAR NOT NULL,
    rank        INTEGER NOT NULL,
    score       DOUBLE  NOT NULL,
    source      VARCHAR NOT NULL,
    created_at  TIMESTAMP NOT NULL
);

-- name: delete_evaluation_lists
DELETE FROM evaluation_lists WHERE run_id = $run_id AND k = $k;

-- name: insert_evaluation_lists
INSERT INTO evaluation_lists
SELECT $run_id, recommender, $k, user_id::VARCHAR, item_id::VARCHAR, rank, score,
       source::VARCHAR, now()::TIMESTAMP
FROM staged_lists;

-- name: stage_eval_recs
CREATE OR REPLACE TEMP TABLE eval_recs AS
SELECT user_id, item_id, rank
FROM evaluation_lists
WHERE run_id = $run_id AND recommender = $recommender AND k = $k AND rank <= $k;

-- name: ranking_metrics
-- Averages over users with at least one relevant validation item; users with none are
-- left out and counted. A relevant item is a validation rating >= $min_rating (stars).
WITH relevant AS (
    SELECT u.user_id, i.item_id
    FROM ratings AS r
    JOIN users AS u USING (user_idx)
    JOIN items AS i USING (item_idx)
    WHERE r.split = 'val' AND r.rating >= $min_rating
),
n_relevant AS (
    SELECT user_id, count(*) AS n FROM relevant GROUP BY user_id
),
hits AS (
    SELECT e.user_id, e.rank,
           row_number() OVER (PARTITION BY e.user_id ORDER BY e.rank) AS hit_no
    FROM eval_recs AS e
    JOIN relevant AS r USING (user_id, item_id)
),
ideal AS (
    SELECT m, sum(1.0 / log2(m + 1)) OVER (ORDER BY m) AS idcg
    FROM range(1, $k + 1) AS t(m)
),
per_user AS (
    SELECT n.user_id, n.n,
           count(h.rank) AS hits,
           coalesce(sum(1.0 / log2(h.rank + 1)), 0) AS dcg,
           coalesce(sum(h.hit_no / h.rank), 0) AS precision_sum
    FROM n_relevant AS n
    LEFT JOIN hits AS h USING (user_id)
    GROUP BY n.user_id, n.n
)
SELECT
    avg(hits / $k) AS precision,
    -- Recall@K as LensKit (with a cutoff) and the EASE / Mult-VAE papers define it: a user
    -- with more relevant items than K can still reach 1.
    avg(hits / least(n, $k)) AS recall,
    avg(hits / n) AS recall_uncapped,
    avg(dcg / ideal.idcg) AS ndcg,
    avg(precision_sum / least(n, $k)) AS map,
    avg(CASE WHEN hits > 0 THEN 1.0 ELSE 0.0 END) AS hit_rate,
    (SELECT count(DISTINCT item_id) FROM eval_recs) / (SELECT count(*) FROM items) AS coverage,
    count(*) AS users_evaluated,
    (SELECT count(*) FROM users) - count(*) AS users_without_relevant
FROM per_user
JOIN ideal ON ideal.m = least(per_user.n, $k);

-- name: create_evaluations
CREATE TABLE IF NOT EXISTS evaluations (
    run_id         VARCHAR   NOT NULL,
    metric         VARCHAR   NOT NULL,
    k              INTEGER,            -- NULL for RMSE / MAE
    value          DOUBLE,
    baseline_value DOUBLE,             -- the popularity baseline's figure, where one exists
    min_rating     DOUBLE,
    created_at     TIMESTAMP NOT NULL
);

-- name: delete_evaluations
DELETE FROM evaluations WHERE run_id = $run_id AND (k = $k OR k IS NULL);

-- name: insert_evaluations
INSERT INTO evaluations
SELECT run_id, metric, k, value, baseline_value, min_rating, now()::TIMESTAMP
FROM staged_evaluations;

-- name: user_by_id
SELECT user_idx, user_id, n_ratings FROM users WHERE user_id = $user_id;

-- name: users_near_id
-- The ids closest to one that is not there ("did you mean"), for the error message.
SELECT user_id FROM users ORDER BY levenshtein(user_id, $user_id), user_id LIMIT 3;

-- name: run_dataset
SELECT dataset_sha256 FROM training_runs WHERE run_id = $run_id;

-- name: user_recommendations
SELECT r.run_id, r.rank, r.item_id, i.title, i.genres, r.score, r.predicted_rating, r.source
FROM recommendations AS r
LEFT JOIN items AS i USING (item_id)
WHERE r.user_id = $user_id
ORDER BY r.rank;

-- name: user_top_rated
SELECT i.item_id, i.title, r.rating, r.split
FROM ratings AS r
JOIN items AS i USING (item_idx)
WHERE r.user_idx = $user_idx
ORDER BY r.rating DESC, r.ts DESC NULLS LAST, i.item_id
LIMIT $limit;

-- name: run_epochs
SELECT epoch, train_loss, val_rmse, val_recall, val_ndcg, seconds
FROM training_epochs WHERE run_id = $run_id ORDER BY epoch;

-- name: latest_evaluation
-- The run's figures at the K it was evaluated at most recently.
SELECT metric, k, value, baseline_value
FROM evaluations
WHERE run_id = $run_id
  AND (k IS NULL OR k = (SELECT k FROM evaluations WHERE run_id = $run_id AND k IS NOT NULL
                         ORDER BY created_at DESC LIMIT 1));

-- name: list_item_counts
-- How often each item appears in the run's measured model lists, beside its train count.
SELECT i.item_id, i.n_train, count(l.item_id) AS listed
FROM items AS i
LEFT JOIN evaluation_lists AS l
  ON l.item_id = i.item_id AND l.run_id = $run_id AND l.k = $k AND l.recommender = 'model'
GROUP BY i.item_id, i.n_train;

-- name: list_scores
SELECT score FROM evaluation_lists
WHERE run_id = $run_id AND k = $k AND recommender = 'model' AND source = 'model';

-- name: served_scores
SELECT run_id, score, coalesce(source, 'model') AS source FROM recommendations;
