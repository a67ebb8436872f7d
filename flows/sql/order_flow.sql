-- State of the order flow process manager (schema order_flow, next to its runtime bookkeeping).
CREATE SCHEMA IF NOT EXISTS order_flow;

-- What the flow remembers of an order to act on its later events.
CREATE TABLE IF NOT EXISTS order_flow.orders
(
    order_id       text PRIMARY KEY,
    customer_id    uuid   NOT NULL,
    region         text   NOT NULL,
    total_minor    bigint NOT NULL,
    currency       text   NOT NULL,
    correlation_id text   NOT NULL
);

-- Durable deadlines: a row per pending deadline, fired by the scheduler after a restart too.
CREATE TABLE IF NOT EXISTS order_flow.deadlines
(
    key            text PRIMARY KEY,
    order_id       text        NOT NULL,
    due_at         timestamptz NOT NULL,
    correlation_id text        NOT NULL,
    fired_at       timestamptz
);

-- Where the order is picked up and delivered (added after the first release of the table).
ALTER TABLE order_flow.orders ADD COLUMN IF NOT EXISTS store_id uuid;
ALTER TABLE order_flow.orders ADD COLUMN IF NOT EXISTS dropoff_latitude double precision;
ALTER TABLE order_flow.orders ADD COLUMN IF NOT EXISTS dropoff_longitude double precision;
ALTER TABLE order_flow.orders ADD COLUMN IF NOT EXISTS points_redeemed bigint NOT NULL DEFAULT 0;

CREATE INDEX IF NOT EXISTS deadlines_due ON order_flow.deadlines (due_at) WHERE fired_at IS NULL;

-- Everything refunded on the order's payment so far (points earned after a refund are taken
-- back at once).
ALTER TABLE order_flow.orders ADD COLUMN IF NOT EXISTS refunded_minor bigint NOT NULL DEFAULT 0;
