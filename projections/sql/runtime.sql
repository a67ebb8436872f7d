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
