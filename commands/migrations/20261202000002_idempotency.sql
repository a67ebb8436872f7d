-- Idempotent retries of mutating HTTP requests (`Idempotency-Key`, see api/src/idempotency.rs).
--
-- One row per (scope, key): the scope is the caller (role and id, or `anonymous`), so two
-- callers never share a key. A request claims its key with one statement (insert, or take
-- over a row that expired or whose owner died); the owner stores the final response
-- (`done`), or deletes the claim when the outcome is not final (5xx, 401, 403, 404, 408,
-- 409, 429, a panic or a timeout) so that a retry acts. Others with the same key and the same
-- fingerprint get the stored response; with a different fingerprint, a 422.
CREATE TABLE IF NOT EXISTS idempotency_keys
(
    scope       text        NOT NULL,
    key         text        NOT NULL,
    -- SHA-256 over method, path, query and body (canonical JSON when it parses).
    fingerprint bytea       NOT NULL,
    state       text        NOT NULL CHECK (state IN ('in_flight', 'done')),
    -- The stored response (set when `done`): status, the headers a client needs, body.
    status      smallint,
    headers     jsonb,
    body        bytea,
    -- When the current claim was taken (identifies the owner; an old `in_flight` row is
    -- one whose process died).
    created_at  timestamptz NOT NULL,
    -- After this instant the key is forgotten: never replayed, taken over by the next request
    -- and purged.
    expires_at  timestamptz NOT NULL,
    PRIMARY KEY (scope, key)
);

CREATE INDEX IF NOT EXISTS idempotency_keys_expires_at ON idempotency_keys (expires_at);
