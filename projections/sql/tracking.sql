-- Tracking read model: one row per order, and its timeline of status changes.
CREATE SCHEMA IF NOT EXISTS tracking;

CREATE TABLE IF NOT EXISTS tracking.orders
(
    order_id      text PRIMARY KEY,
    customer_id   uuid        NOT NULL,
    store_id      uuid        NOT NULL,
    region        text        NOT NULL,
    status        text        NOT NULL,
    items         jsonb       NOT NULL,
    total_minor   bigint      NOT NULL,
    currency      text        NOT NULL,
    placed_at     timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL,
    last_sequence bigint      NOT NULL
);

CREATE INDEX IF NOT EXISTS tracking_orders_customer ON tracking.orders (customer_id, placed_at DESC);

CREATE TABLE IF NOT EXISTS tracking.timeline
(
    order_id   text        NOT NULL,
    sequence   bigint      NOT NULL,
    event_type text        NOT NULL,
    status     text        NOT NULL,
    at         timestamptz NOT NULL,
    PRIMARY KEY (order_id, sequence)
);

-- The delivery of an order, as the customer's app shows it: kept apart from `orders` because
-- the deliveries topic is consumed independently of the orders topic (a delivery event may be
-- applied before its order's), and joined when read.
CREATE TABLE IF NOT EXISTS tracking.deliveries
(
    order_id         text PRIMARY KEY,
    status           text        NOT NULL,
    courier_id       uuid,
    latitude         double precision,
    longitude        double precision,
    position_at      timestamptz,
    eta_expected_at  timestamptz,
    eta_earliest_at  timestamptz,
    eta_latest_at    timestamptz,
    remaining_meters integer,
    eta_estimated_at timestamptz,
    updated_at       timestamptz NOT NULL,
    last_sequence    bigint      NOT NULL
);

CREATE INDEX IF NOT EXISTS tracking_orders_store ON tracking.orders (store_id, placed_at DESC);
CREATE INDEX IF NOT EXISTS tracking_orders_placed ON tracking.orders (placed_at DESC, order_id DESC);
