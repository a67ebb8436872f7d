-- The catalogue (regions, menu items, stores, promotions) that administrators manage. Each
-- entry is one JSON document; pricing reads a snapshot of all of them.
CREATE TABLE IF NOT EXISTS catalogue_entries
(
    kind       text        NOT NULL CHECK (kind IN ('region', 'item', 'store', 'promotion')),
    key        text        NOT NULL,
    value      jsonb       NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_by text        NOT NULL,
    PRIMARY KEY (kind, key)
);
