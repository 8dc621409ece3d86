-- The prepared dataset: what `mfbatch preprocess` writes and every later stage reads.
-- The preprocess stage runs drop_* / create_* / insert_* inside one transaction, reading
-- the staged_* relations it registers from Arrow, so a failure keeps the previous dataset.

-- name: drop_ratings
DROP TABLE IF EXISTS ratings;

-- name: drop_users
DROP TABLE IF EXISTS users;

-- name: drop_items
DROP TABLE IF EXISTS items;

-- name: drop_item_metadata
DROP TABLE IF EXISTS item_metadata;

-- name: drop_dataset_meta
DROP TABLE IF EXISTS dataset_meta;

-- name: drop_dataset_versions
DROP TABLE IF EXISTS dataset_versions;

-- name: create_users
-- user_idx is dense 0..n_users-1, assigned in sorted order of the raw id (numeric order
-- when every raw id is an integer, else byte order), so the same input maps the same way.
CREATE TABLE users (
    user_idx  INTEGER PRIMARY KEY,
    user_id   VARCHAR NOT NULL UNIQUE,
    n_ratings INTEGER NOT NULL,
    n_train   INTEGER NOT NULL
);

-- name: create_items
CREATE TABLE items (
    item_idx  INTEGER PRIMARY KEY,
    item_id   VARCHAR NOT NULL UNIQUE,
    title     VARCHAR,
    genres    VARCHAR,
    n_ratings INTEGER NOT NULL,
    n_train   INTEGER NOT NULL
);

-- name: create_ratings
CREATE TABLE ratings (
    user_idx    INTEGER NOT NULL,
    item_idx    INTEGER NOT NULL,
    rating      DOUBLE  NOT NULL,  -- original scale (stars)
    rating_norm DOUBLE  NOT NULL,  -- (rating - rating_min) / (rating_max - rating_min), in [0,1]
    ts          TIMESTAMP,         -- UTC; NULL when the source has no time column
    -- 'append': added by `preprocess --append` after the split was made, so 'train' and
    -- 'val' keep meaning the split every validated run was trained and measured on.
    split       VARCHAR NOT NULL CHECK (split IN ('train', 'val', 'append')),
    cold_user   BOOLEAN NOT NULL,  -- a val row whose user has no train rating
    cold_item   BOOLEAN NOT NULL,  -- a val row whose item has no train rating
    version     INTEGER NOT NULL DEFAULT 0, -- dataset_versions.version that last wrote it
    -- The interaction's weight in the softmax losses, after --weight-transform (1.0 with
    -- no --weight-col; implicit duplicates add up before the transform).
    weight      DOUBLE  NOT NULL DEFAULT 1.0
);

-- name: create_dataset_meta
CREATE TABLE dataset_meta (
    dataset_sha256     VARCHAR   NOT NULL,  -- identifies source + preprocessing; runs cite it
    source             VARCHAR   NOT NULL,
    source_sha256      VARCHAR   NOT NULL,
    loader             VARCHAR   NOT NULL,
    layout             VARCHAR   NOT NULL,
    rating_min         DOUBLE    NOT NULL,
    rating_max         DOUBLE    NOT NULL,
    rows_in            BIGINT    NOT NULL,
    duplicates_dropped BIGINT    NOT NULL,
    n_users            INTEGER   NOT NULL,
    n_items            INTEGER   NOT NULL,
    n_ratings          BIGINT    NOT NULL,
    n_train            BIGINT    NOT NULL,
    n_val              BIGINT    NOT NULL,
    n_val_cold_user    BIGINT    NOT NULL,
    n_val_cold_item    BIGINT    NOT NULL,
    split_kind         VARCHAR   NOT NULL,
    val_fraction       DOUBLE    NOT NULL,
    split_seed         INTEGER   NOT NULL,
    time_cutoff        TIMESTAMP,          -- first val timestamp of a `time` split
    config             JSON      NOT NULL,
    mfbatch_version    VARCHAR   NOT NULL,
    seconds            DOUBLE    NOT NULL,
    created_at         TIMESTAMP NOT NULL,
    -- 'implicit' (no rating column: each row one positive, rating 1 on [0, 1]) or 'explicit'
    feedback           VARCHAR   NOT NULL DEFAULT 'explicit'
);

-- name: create_dataset_versions
-- The lineage: version 0 is the preprocess, each `preprocess --append` adds the next. Ids
-- and the split of version 0 never change, so a model trained on any version of this
-- lineage (same dataset_sha256) is still valid for the ids it knows.
CREATE TABLE dataset_versions (
    version    INTEGER   PRIMARY KEY,
    parent     INTEGER,             -- the version it extends; NULL for the preprocess
    sha256     VARCHAR   NOT NULL,  -- version 0: dataset_sha256; then hash(parent, file)
    source     VARCHAR   NOT NULL,
    rows_in    BIGINT    NOT NULL,
    rows_added BIGINT    NOT NULL,  -- new (user, item) pairs, split 'append'
    new_users  INTEGER   NOT NULL,
    new_items  INTEGER   NOT NULL,
    replaced   BIGINT    NOT NULL,  -- stored ratings that took the appended value
    created_at TIMESTAMP NOT NULL
);

-- name: insert_base_version
INSERT INTO dataset_versions VALUES (
    0, NULL, $dataset_sha256, $source, $rows_in, $rows_added, $new_users, $new_items, 0,
    $created_at
);

-- name: insert_users
INSERT INTO users
SELECT user_idx, user_id, n_ratings, n_train FROM staged_users;

-- name: insert_items
INSERT INTO items
SELECT item_idx, item_id, title, genres, n_ratings, n_train FROM staged_items;

-- name: create_described_items
-- Item metadata (--items-source): items again, from the staged frame of its own columns
-- followed by the file's attribute columns, whose names and types are the file's; so the
-- table is made from the frame, then given the keys create_items declares.
CREATE TABLE items AS SELECT * FROM staged_described_items ORDER BY item_idx;

-- name: key_items
ALTER TABLE items ADD PRIMARY KEY (item_idx);

-- name: unique_item_ids
CREATE UNIQUE INDEX items_item_id ON items (item_id);

-- name: require_item_ids
ALTER TABLE items ALTER COLUMN item_id SET NOT NULL;

-- name: require_item_ratings
ALTER TABLE items ALTER COLUMN n_ratings SET NOT NULL;

-- name: require_item_train
ALTER TABLE items ALTER COLUMN n_train SET NOT NULL;

-- name: create_item_metadata
-- Every row of the metadata files read, by raw item id: those of items nobody has rated
-- yet too (never served: they are not in items), which an append that brings the item
-- fills its attributes from.
CREATE TABLE item_metadata AS SELECT * FROM staged_item_metadata ORDER BY item_id;

-- name: key_item_metadata
ALTER TABLE item_metadata ADD PRIMARY KEY (item_id);

-- name: item_metadata_rows
SELECT * FROM item_metadata ORDER BY item_id;

-- name: items_own_columns
-- items without its metadata attributes: what the attributes are joined onto again.
SELECT item_idx, item_id, title, genres, n_ratings, n_train FROM items ORDER BY item_idx;

-- name: insert_ratings
INSERT INTO ratings
SELECT user_idx, item_idx, rating, rating_norm, ts, split, cold_user, cold_item, 0, weight
FROM staged_ratings;

-- name: insert_ratings_from_parquet
-- One bucket of the out-of-core path, through a Parquet file: DuckDB kept the memory of
-- every Arrow relation it had scanned (25M rows in 20 parts: ~1 GB), a file scan does not.
INSERT INTO ratings
SELECT user_idx, item_idx, rating, rating_norm, ts, split, cold_user, cold_item, 0, weight
FROM read_parquet($path);

-- name: insert_dataset_meta
INSERT INTO dataset_meta VALUES (
    $dataset_sha256, $source, $source_sha256, $loader, $layout, $rating_min, $rating_max,
    $rows_in, $duplicates_dropped, $n_users, $n_items, $n_ratings, $n_train, $n_val,
    $n_val_cold_user, $n_val_cold_item, $split_kind, $val_fraction, $split_seed,
    $time_cutoff, $config, $mfbatch_version, $seconds, now()::TIMESTAMP, $feedback
);

-- name: limit_memory
-- Out-of-core preprocess (--memory-mb): DuckDB's share of the budget; what does not fit
-- while the ratings are appended spills to the temp directory.
SET memory_limit = $memory_limit;

-- name: spill_to
SET temp_directory = $folder;

-- name: dataset_feedback
-- Whether the ratings carry a weight (databases made before weights did not) and how the
-- dataset's feedback was read.
SELECT
    (SELECT count(*) FROM information_schema.columns
     WHERE table_name = 'ratings' AND column_name = 'weight') > 0 AS has_weight,
    (SELECT count(*) FROM information_schema.columns
     WHERE table_name = 'dataset_meta' AND column_name = 'feedback') > 0 AS has_feedback;

-- name: dataset_feedback_value
SELECT feedback FROM dataset_meta;
