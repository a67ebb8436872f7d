-- Waking an idle relay without polling.
--
-- While events flow, the relay reads the outbox round after round (and polls every
-- RELAY_IDLE_POLL_MS between short gaps), and writers notify nobody: NOTIFY takes a
-- database-wide lock from pre-commit to the end of the commit, which would serialize every
-- appending transaction. Once the outbox has been empty for a while, the active relay sets
-- `waiting` and sleeps on LISTEN backbone_outbox (with a slow fallback poll); the first append
-- after that notifies it, and the relay clears `waiting` as soon as it is busy again. So an idle
-- backbone costs one query a second, and a busy one no lock at all.

CREATE TABLE IF NOT EXISTS outbox_relay_state
(
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    waiting   boolean NOT NULL    DEFAULT false
);
INSERT INTO outbox_relay_state DEFAULT VALUES ON CONFLICT DO NOTHING;

CREATE OR REPLACE FUNCTION backbone_record_in_outbox() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    INSERT INTO outbox (aggregate_type, aggregate_id, sequence, event_id)
    VALUES (NEW.aggregate_type, NEW.aggregate_id, NEW.sequence, NEW.event_id);
    IF (SELECT waiting FROM outbox_relay_state) THEN
        -- Several events of one transaction send one notification (PostgreSQL folds
        -- duplicates), delivered at commit.
        PERFORM pg_notify('backbone_outbox', '');
    END IF;
    RETURN NULL;
END;
$$;
