-- Tamper evidence: every event is chained to the one before it in its aggregate.
--
--   chain_hash = SHA-256(chain_prev || digest)
--   chain_prev = chain_hash of (aggregate_type, aggregate_id, sequence - 1), or 32 zero bytes for
--                the first event of an aggregate
--   digest     = SHA-256 of the canonical encoding of the stored event:
--                text(aggregate_type) text(aggregate_id) int8(sequence) text(event_type)
--                text(event_version) text(payload as stored) text(metadata as stored)
--                uuid(event_id) int8(recorded_at in microseconds since 1970-01-01 UTC)
--                where int8 = 8 bytes big-endian, text(s) = int8(byte length of s in UTF-8) || the
--                UTF-8 bytes, uuid = its 16 bytes. The length prefixes make the encoding
--                unambiguous; payload and metadata are `json` columns, which keep their text
--                exactly as written, so `replay-tools verify` recomputes the same bytes in Rust.
--
-- The hash is computed here, by a BEFORE INSERT trigger, so nothing that writes events can
-- skip it. The relay sends chain_prev and chain_hash with every record (headers `chain_prev`,
-- `chain_hash`, hex) so a copy of the topics can be checked too.
--
-- Anchors: `replay-tools anchor` records, at an instant when no write is in flight, the root
-- hash over every aggregate's chain head (`chain_heads`, kept as of the latest anchor) and
-- chains the anchors themselves; deleting an aggregate's last events, or a whole aggregate,
-- then shows against the anchor.

ALTER TABLE events
    ADD COLUMN IF NOT EXISTS chain_prev bytea,
    ADD COLUMN IF NOT EXISTS chain_hash bytea;

-- The digest of one event's canonical encoding (used by the trigger and the backfill below).
CREATE OR REPLACE FUNCTION backbone_chain_digest(p_aggregate_type text, p_aggregate_id text,
                                                 p_sequence bigint, p_event_type text,
                                                 p_event_version text, p_payload json,
                                                 p_metadata json, p_event_id uuid,
                                                 p_recorded_at timestamptz) RETURNS bytea
    LANGUAGE plpgsql
    STABLE
    STRICT
AS
$$
DECLARE
    v_type       bytea := convert_to(p_aggregate_type, 'UTF8');
    v_id         bytea := convert_to(p_aggregate_id, 'UTF8');
    v_event_type bytea := convert_to(p_event_type, 'UTF8');
    v_version    bytea := convert_to(p_event_version, 'UTF8');
    v_payload    bytea := convert_to(p_payload::text, 'UTF8');
    v_metadata   bytea := convert_to(p_metadata::text, 'UTF8');
BEGIN
    RETURN sha256(int8send(octet_length(v_type)::bigint) || v_type
                      || int8send(octet_length(v_id)::bigint) || v_id
                      || int8send(p_sequence)
                      || int8send(octet_length(v_event_type)::bigint) || v_event_type
                      || int8send(octet_length(v_version)::bigint) || v_version
                      || int8send(octet_length(v_payload)::bigint) || v_payload
                      || int8send(octet_length(v_metadata)::bigint) || v_metadata
                      || uuid_send(p_event_id)
                      || int8send((extract(epoch FROM p_recorded_at) * 1000000)::bigint));
END;
$$;

CREATE OR REPLACE FUNCTION backbone_chain_event() RETURNS trigger
    LANGUAGE plpgsql AS
$$
DECLARE
    previous bytea;
BEGIN
    SELECT e.chain_hash
    INTO previous
    FROM events e
    WHERE e.aggregate_type = NEW.aggregate_type
      AND e.aggregate_id = NEW.aggregate_id
      AND e.sequence = NEW.sequence - 1;
    IF NOT FOUND THEN
        -- The first event of its aggregate, unless events before it exist (a gap would make
        -- the chain skip events: refused).
        IF NEW.sequence > 1 AND EXISTS (SELECT 1
                                        FROM events e
                                        WHERE e.aggregate_type = NEW.aggregate_type
                                          AND e.aggregate_id = NEW.aggregate_id
                                          AND e.sequence < NEW.sequence) THEN
            RAISE EXCEPTION 'event % of % % would leave a gap in its hash chain (no sequence %)',
                NEW.sequence, NEW.aggregate_type, NEW.aggregate_id, NEW.sequence - 1;
        END IF;
        previous := decode(repeat('00', 32), 'hex');
    END IF;
    NEW.chain_prev := previous;
    NEW.chain_hash := sha256(previous || backbone_chain_digest(
            NEW.aggregate_type, NEW.aggregate_id, NEW.sequence, NEW.event_type,
            NEW.event_version, NEW.payload, NEW.metadata, NEW.event_id, NEW.recorded_at));
    RETURN NEW;
END;
$$;

DROP TRIGGER IF EXISTS events_chain ON events;
CREATE TRIGGER events_chain
    BEFORE INSERT
    ON events
    FOR EACH ROW
EXECUTE FUNCTION backbone_chain_event();

-- Events stored before this migration: chained once, in key order (the ALTER TABLE above holds
-- the table's lock until this migration commits, so no event is written meanwhile).
DO
$$
    DECLARE
        r             record;
        zero          bytea := decode(repeat('00', 32), 'hex');
        previous      bytea;
        current_type  text;
        current_id    text;
        types         text[]   := '{}';
        ids           text[]   := '{}';
        sequences     bigint[] := '{}';
        prevs         bytea[]  := '{}';
        hashes        bytea[]  := '{}';
    BEGIN
        FOR r IN SELECT aggregate_type, aggregate_id, sequence, event_type, event_version, payload,
                        metadata, event_id, recorded_at
                 FROM events
                 WHERE chain_hash IS NULL
                 ORDER BY aggregate_type, aggregate_id, sequence
            LOOP
                IF current_type IS DISTINCT FROM r.aggregate_type
                    OR current_id IS DISTINCT FROM r.aggregate_id THEN
                    previous := zero;
                    current_type := r.aggregate_type;
                    current_id := r.aggregate_id;
                END IF;
                types := types || r.aggregate_type;
                ids := ids || r.aggregate_id;
                sequences := sequences || r.sequence;
                prevs := prevs || previous;
                previous := sha256(previous || backbone_chain_digest(
                        r.aggregate_type, r.aggregate_id, r.sequence, r.event_type,
                        r.event_version, r.payload, r.metadata, r.event_id, r.recorded_at));
                hashes := hashes || previous;
                IF cardinality(types) >= 10000 THEN
                    UPDATE events e
                    SET chain_prev = u.p,
                        chain_hash = u.h
                    FROM unnest(types, ids, sequences, prevs, hashes) AS u(t, i, s, p, h)
                    WHERE e.aggregate_type = u.t
                      AND e.aggregate_id = u.i
                      AND e.sequence = u.s;
                    types := '{}';
                    ids := '{}';
                    sequences := '{}';
                    prevs := '{}';
                    hashes := '{}';
                END IF;
            END LOOP;
        UPDATE events e
        SET chain_prev = u.p,
            chain_hash = u.h
        FROM unnest(types, ids, sequences, prevs, hashes) AS u(t, i, s, p, h)
        WHERE e.aggregate_type = u.t
          AND e.aggregate_id = u.i
          AND e.sequence = u.s;
    END
$$;

ALTER TABLE events
    ALTER COLUMN chain_prev SET NOT NULL,
    ALTER COLUMN chain_hash SET NOT NULL;

-- The global checkpoints, themselves chained:
--   anchor_hash = SHA-256(prev_hash || int8(id) || int8(taken_at in µs) || int8(aggregates)
--                         || int8(events) || root_hash)
--   root_hash   = SHA-256 over every aggregate's head as of taken_at, sorted by (aggregate_type,
--                 aggregate_id) bytewise: text(aggregate_type) text(aggregate_id)
--                 int8(last_sequence) head_hash (32 bytes)
-- taken_at is an instant at which no transaction writing events was open (the anchor briefly
-- holds a SHARE lock on `events`), so "the store as of the anchor" is exactly the events with
-- recorded_at < taken_at.
CREATE TABLE IF NOT EXISTS chain_anchors
(
    id          bigint PRIMARY KEY,
    taken_at    timestamptz NOT NULL,
    aggregates  bigint      NOT NULL,
    events      bigint      NOT NULL,
    root_hash   bytea       NOT NULL,
    prev_hash   bytea       NOT NULL,
    anchor_hash bytea       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Every aggregate's chain head as of the latest anchor (anchor_id: the anchor that recorded
-- this head). Heads only move forward: an anchor refuses to record a store that lost anchored
-- events.
CREATE TABLE IF NOT EXISTS chain_heads
(
    aggregate_type text   NOT NULL,
    aggregate_id   text   NOT NULL,
    last_sequence  bigint NOT NULL,
    head_hash      bytea  NOT NULL,
    anchor_id      bigint NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id)
);
