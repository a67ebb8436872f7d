-- Promotion limits: a promotion with `once_per_customer` is claimed by one order per customer.
--
-- The claim is taken before the order's events are appended, and names the order. A claim whose
-- order was appended is that customer's use for good. A claim whose order never appeared (the
-- placement was refused, or the process died between the claim and the append) is released by
-- the refused placement itself, or may be taken over by another order once it is older than the
-- claim's grace period (longer than any request may run), so a crash never burns the use.
CREATE TABLE IF NOT EXISTS promotion_claims
(
    code        text        NOT NULL,
    customer_id text        NOT NULL,
    order_id    text        NOT NULL,
    claimed_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (code, customer_id)
);
