-- The event store of postgres-es (its db/init.sql), plus what the backbone adds:
--   * event_id:    a stable UUID per event, carried to Kafka and used for idempotency downstream;
--   * recorded_at: when the row was written, by the database clock;
--   * the outbox:  filled by a trigger in the same transaction as the events, so an event can
--                  never be committed without being recorded for publication, nor the reverse.

CREATE TABLE IF NOT EXISTS events
(
    aggregate_type text                         NOT NULL,
    aggregate_id   text                         NOT NULL,
    sequence       bigint CHECK (sequence >= 0) NOT NULL,
    event_type     text                         NOT NULL,
    event_version  text                         NOT NULL,
    payload        json                         NOT NULL,
    metadata       json                         NOT NULL,
    event_id       uuid                         NOT NULL DEFAULT gen_random_uuid(),
    recorded_at    timestamptz                  NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
);

CREATE UNIQUE INDEX IF NOT EXISTS events_event_id ON events (event_id);

CREATE TABLE IF NOT EXISTS snapshots
(
    aggregate_type   text                                 NOT NULL,
    aggregate_id     text                                 NOT NULL,
    last_sequence    bigint CHECK (last_sequence >= 0)    NOT NULL,
    current_snapshot bigint CHECK (current_snapshot >= 0) NOT NULL,
    payload          json                                 NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, last_sequence)
);

-- One row per event to publish. The relay reads unpublished rows in id order and marks them
-- published only after the broker acknowledged them. Reading "all unpublished rows" on every
-- round (instead of "ids above the last one seen") is what makes a row whose transaction commits
-- after rows with higher ids impossible to skip.
CREATE TABLE IF NOT EXISTS outbox
(
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    aggregate_type text        NOT NULL,
    aggregate_id   text        NOT NULL,
    sequence       bigint      NOT NULL,
    event_id       uuid        NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    published_at   timestamptz
);

CREATE INDEX IF NOT EXISTS outbox_unpublished ON outbox (id) WHERE published_at IS NULL;
CREATE INDEX IF NOT EXISTS outbox_published_at ON outbox (published_at) WHERE published_at IS NOT NULL;

CREATE OR REPLACE FUNCTION backbone_record_in_outbox() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    INSERT INTO outbox (aggregate_type, aggregate_id, sequence, event_id)
    VALUES (NEW.aggregate_type, NEW.aggregate_id, NEW.sequence, NEW.event_id);
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS events_to_outbox ON events;
CREATE TRIGGER events_to_outbox
    AFTER INSERT ON events
    FOR EACH ROW
EXECUTE FUNCTION backbone_record_in_outbox();
