-- Crypto-shredding of customer personal data (commands::pii). Events keep personal strings only
-- as `pii:v1:<customer>:<nonce||ciphertext>` envelopes sealed with the customer's data key;
-- erasing a customer deletes the key, so every copy (store, topics, exports) becomes unreadable
-- while no event row changes (the hash chain stays valid).

-- One AES-256-GCM data key per customer, created at their first sealed string.
CREATE TABLE IF NOT EXISTS pii_keys
(
    customer_id uuid PRIMARY KEY,
    data_key    bytea       NOT NULL CHECK (octet_length(data_key) = 32),
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Who erased which customer, when and why. A customer listed here gets no key again: sealing
-- for them is refused, and a key that appears anyway is never used to reveal.
CREATE TABLE IF NOT EXISTS pii_erasures
(
    customer_id uuid PRIMARY KEY,
    erased_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    erased_by   text        NOT NULL,
    reason      text        NOT NULL
);
