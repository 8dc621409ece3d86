-- Appending ratings to a prepared dataset (`mfbatch preprocess --append`). The stage runs
-- these inside one transaction, reading the staged_append / staged_new_users /
-- staged_new_items relations it registers from Arrow, so a failure changes nothing.

-- name: append_lineage
-- The newest version; NULL when the database was preprocessed before lineage existed.
SELECT max(version) AS version, arg_max(sha256, version) AS sha256 FROM dataset_versions;

-- name: append_stored_config
SELECT config FROM dataset_meta;

-- name: append_user_ids
SELECT user_idx, user_id FROM users;

-- name: append_item_ids
SELECT item_idx, item_id FROM items;

-- name: append_counts
-- What the append will do, counted before it does it.
SELECT
    count(*) FILTER (WHERE r.user_idx IS NULL) AS added,
    count(*) FILTER (
        WHERE r.user_idx IS NOT NULL AND (s.ts IS NULL OR r.ts IS NULL OR s.ts >= r.ts)
          AND (s.rating IS DISTINCT FROM r.rating OR s.ts IS DISTINCT FROM r.ts)
    ) AS replaced,
    count(*) FILTER (WHERE r.user_idx IS NOT NULL AND s.ts < r.ts) AS stale,
    count(*) FILTER (
        WHERE r.user_idx IS NOT NULL AND s.rating IS NOT DISTINCT FROM r.rating
          AND s.ts IS NOT DISTINCT FROM r.ts
    ) AS unchanged
FROM staged_append s
LEFT JOIN ratings r USING (user_idx, item_idx);

-- name: append_insert_users
INSERT INTO users SELECT user_idx, user_id, 0, 0 FROM staged_new_users;

-- name: append_insert_items
-- BY NAME: items may carry metadata attributes after its own columns (NULL here; an
-- append with metadata fills them when it rebuilds items).
INSERT INTO items BY NAME
SELECT item_idx, item_id, title, genres, 0 AS n_ratings, 0 AS n_train FROM staged_new_items;

-- name: append_replace_ratings
-- A pair already stored takes the appended rating unless the stored one is newer by
-- timestamp (preprocess's rule for duplicates). It keeps its split: the validation
-- split stays the set of pairs it was; `version` marks the rating as unseen by older models.
UPDATE ratings AS r
SET rating = s.rating, rating_norm = s.rating_norm, ts = s.ts, version = $version,
    weight = s.weight,
    -- A given split (held_out not NULL) puts the pair where the file says.
    split = CASE WHEN s.held_out IS NULL THEN r.split WHEN s.held_out THEN 'val' ELSE 'train' END
FROM staged_append AS s
WHERE r.user_idx = s.user_idx AND r.item_idx = s.item_idx
  AND (s.ts IS NULL OR r.ts IS NULL OR s.ts >= r.ts)
  -- The same rating appended again (the same file twice) is no news: its user stays trained.
  AND (s.rating IS DISTINCT FROM r.rating OR s.ts IS DISTINCT FROM r.ts);

-- name: append_insert_ratings
INSERT INTO ratings
SELECT s.user_idx, s.item_idx, s.rating, s.rating_norm, s.ts,
    CASE WHEN s.held_out IS NULL THEN 'append' WHEN s.held_out THEN 'val' ELSE 'train' END,
    false, false, $version, s.weight
FROM staged_append s
ANTI JOIN ratings r USING (user_idx, item_idx)
ORDER BY s.user_idx, s.item_idx;

-- name: append_recount_users
UPDATE users SET n_ratings = c.n
FROM (SELECT user_idx, count(*)::INTEGER AS n FROM ratings GROUP BY user_idx) c
WHERE users.user_idx = c.user_idx;

-- name: append_recount_items
UPDATE items SET n_ratings = c.n
FROM (SELECT item_idx, count(*)::INTEGER AS n FROM ratings GROUP BY item_idx) c
WHERE items.item_idx = c.item_idx;

-- name: append_given_train_users
-- A given split's appended rows joined train and val: the train counts, the cold flags
-- (a val row whose user / item has no train row) and dataset_meta's split figures follow.
UPDATE users SET n_train = c.n
FROM (SELECT user_idx, count(*) FILTER (WHERE split = 'train')::INTEGER AS n
      FROM ratings GROUP BY user_idx) c
WHERE users.user_idx = c.user_idx;

-- name: append_given_train_items
UPDATE items SET n_train = c.n
FROM (SELECT item_idx, count(*) FILTER (WHERE split = 'train')::INTEGER AS n
      FROM ratings GROUP BY item_idx) c
WHERE items.item_idx = c.item_idx;

-- name: append_given_cold
UPDATE ratings SET
    cold_user = split = 'val' AND user_idx IN (SELECT user_idx FROM users WHERE n_train = 0),
    cold_item = split = 'val' AND item_idx IN (SELECT item_idx FROM items WHERE n_train = 0);

-- name: append_given_meta
UPDATE dataset_meta SET
    n_train = (SELECT count(*) FROM ratings WHERE split = 'train'),
    n_val = (SELECT count(*) FROM ratings WHERE split = 'val'),
    n_val_cold_user = (SELECT count(*) FROM ratings WHERE cold_user),
    n_val_cold_item = (SELECT count(*) FROM ratings WHERE cold_item);

-- name: append_update_meta
-- dataset_sha256 stays the base's: it names the id mapping and split models were trained on.
UPDATE dataset_meta SET
    n_users = (SELECT count(*) FROM users),
    n_items = (SELECT count(*) FROM items),
    n_ratings = (SELECT count(*) FROM ratings);

-- name: append_insert_version
INSERT INTO dataset_versions VALUES (
    $version, $parent, $sha256, $source, $rows_in, $rows_added, $new_users, $new_items,
    $replaced, $created_at
);

-- name: append_record_items_source
-- `--append --items-source`: dataset_meta.config's [preprocess] names the newest metadata
-- file and its id column (the next append's file is read by that column).
UPDATE dataset_meta SET config = $config;
