-- Bookkeeping of one projector, in the projector's own schema ({schema} is replaced).
CREATE SCHEMA IF NOT EXISTS {schema};

-- Per-aggregate dedup: the last sequence applied. An event at or below it is a redelivery.
CREATE TABLE IF NOT EXISTS {schema}.applied
(
    aggregate_type text   NOT NULL,
    aggregate_id   text   NOT NULL,
    last_sequence  bigint NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id)
);

-- Where the projector stands in each partition, committed with the read-model changes.
CREATE TABLE IF NOT EXISTS {schema}.checkpoints
(
    topic       text        NOT NULL,
    partition   int         NOT NULL,
    next_offset bigint      NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (topic, partition)
);

-- Events the projector could not apply, with the error; the projector went on without them.
CREATE TABLE IF NOT EXISTS {schema}.dead_letters
(
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topic        text        NOT NULL,
    partition    int         NOT NULL,
    "offset"     bigint      NOT NULL,
    event_id     text,
    aggregate_id text,
    error        text        NOT NULL,
    failed_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    UNIQUE (topic, partition, "offset")
);

-- What a dead letter needs to be re-driven: the record as it was (key, value, headers), its
-- identity when known, and where it stands: `dead` (waiting for a fix), `redrive_requested`
-- (an operator asked; the projector applies it next), `redriven` (applied once, for good).
ALTER TABLE {schema}.dead_letters
    ADD COLUMN IF NOT EXISTS aggregate_type       text,
    ADD COLUMN IF NOT EXISTS sequence             bigint,
    ADD COLUMN IF NOT EXISTS event_type           text,
    ADD COLUMN IF NOT EXISTS record_key           bytea,
    ADD COLUMN IF NOT EXISTS payload              bytea,
    ADD COLUMN IF NOT EXISTS header_names         text[]  NOT NULL DEFAULT '{}',
    ADD COLUMN IF NOT EXISTS header_values        bytea[] NOT NULL DEFAULT '{}',
    ADD COLUMN IF NOT EXISTS timestamp_ms         bigint,
    ADD COLUMN IF NOT EXISTS status               text    NOT NULL DEFAULT 'dead'
        CHECK (status IN ('dead', 'redrive_requested', 'redriven')),
    ADD COLUMN IF NOT EXISTS attempts             int     NOT NULL DEFAULT 1,
    ADD COLUMN IF NOT EXISTS redrive_requested_at timestamptz,
    ADD COLUMN IF NOT EXISTS resolved_at          timestamptz;

CREATE INDEX IF NOT EXISTS dead_letters_requested ON {schema}.dead_letters (id)
    WHERE status = 'redrive_requested';

-- When the newest event applied from a partition was recorded in the event store.
ALTER TABLE {schema}.checkpoints ADD COLUMN IF NOT EXISTS last_recorded_at timestamptz;

-- Lag per partition, measured by the instance that owns it (every second).
CREATE TABLE IF NOT EXISTS {schema}.lag
(
    topic          text             NOT NULL,
    partition      int              NOT NULL,
    high_watermark bigint           NOT NULL,
    next_offset    bigint           NOT NULL,
    lag_events     bigint           NOT NULL,
    lag_seconds    double precision NOT NULL,
    measured_at    timestamptz      NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (topic, partition)
);
-- Which projector instance (`host/pid`) owns the partition.
ALTER TABLE {schema}.lag ADD COLUMN IF NOT EXISTS owner text NOT NULL DEFAULT '';
