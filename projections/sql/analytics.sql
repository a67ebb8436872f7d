-- Analytics read model: a fact row per order (and its lines, as last modified), an additive
-- hourly rollup, and the points movements of the rewards ledgers. Every order figure belongs to
-- the UTC hour in which the order was placed (cohort by placement).
CREATE SCHEMA IF NOT EXISTS analytics;

-- One row per order: where and when it was placed, its current total (after modifications),
-- how far it got, and how it ended.
CREATE TABLE IF NOT EXISTS analytics.orders
(
    order_id         text PRIMARY KEY,
    customer_id      uuid        NOT NULL,
    store_id         uuid        NOT NULL,
    region           text        NOT NULL,
    currency         text        NOT NULL,
    placed_at        timestamptz NOT NULL,
    -- The UTC hour of placed_at: the bucket of the rollup.
    hour             timestamptz NOT NULL,
    total_minor      bigint      NOT NULL,
    points_redeemed  bigint      NOT NULL,
    status           text        NOT NULL,
    accepted_at      timestamptz,
    delivered_at     timestamptz,
    completed_at     timestamptz,
    cancelled_at     timestamptz,
    cancelled_by     text,
    cancel_reason    text,
    rejected_at      timestamptz,
    rejection_reason text
);

-- A day's query reads one index range, whatever the filter.
CREATE INDEX IF NOT EXISTS analytics_orders_placed ON analytics.orders (placed_at);
CREATE INDEX IF NOT EXISTS analytics_orders_region ON analytics.orders (region, placed_at);
CREATE INDEX IF NOT EXISTS analytics_orders_store ON analytics.orders (store_id, placed_at);

-- The lines of each order as placed, or as last modified.
CREATE TABLE IF NOT EXISTS analytics.order_lines
(
    order_id         text   NOT NULL,
    line_no          int    NOT NULL,
    item_id          text   NOT NULL,
    name             text   NOT NULL,
    category         text   NOT NULL,
    quantity         int    NOT NULL,
    unit_price_minor bigint NOT NULL,
    -- The line total (unit price with options times quantity), before order-level discounts,
    -- tax and delivery fee.
    revenue_minor    bigint NOT NULL,
    currency         text   NOT NULL,
    PRIMARY KEY (order_id, line_no)
);

-- Additive counters per placement hour, region, store and currency, maintained by the handler
-- with `x = x + excluded.x`: an event applied twice would show here (the crash tests compare
-- this table with the facts). `cancelled` counts cancellations and store rejections;
-- `rejected` the rejections alone; `revenue_minor` the final totals of completed orders.
CREATE TABLE IF NOT EXISTS analytics.hourly
(
    hour          timestamptz NOT NULL,
    region        text        NOT NULL,
    store_id      uuid        NOT NULL,
    currency      text        NOT NULL,
    orders        bigint      NOT NULL DEFAULT 0,
    completed     bigint      NOT NULL DEFAULT 0,
    cancelled     bigint      NOT NULL DEFAULT 0,
    rejected      bigint      NOT NULL DEFAULT 0,
    revenue_minor bigint      NOT NULL DEFAULT 0,
    PRIMARY KEY (hour, region, store_id, currency)
);

-- Points earned, redeemed, restored and donated, one row per rewards event (a ledger is a
-- customer). Rewards events carry no region: a redemption is joined to its order's region
-- through analytics.orders at query time, since the two topics are consumed independently.
CREATE TABLE IF NOT EXISTS analytics.points_movements
(
    customer_id  text        NOT NULL,
    sequence     bigint      NOT NULL,
    kind         text        NOT NULL CHECK (kind IN ('earned', 'redeemed', 'restored', 'donated')),
    points       bigint      NOT NULL,
    order_id     text,
    charity      text,
    amount_minor bigint,
    currency     text,
    at           timestamptz NOT NULL,
    PRIMARY KEY (customer_id, sequence)
);

CREATE INDEX IF NOT EXISTS analytics_points_kind ON analytics.points_movements (kind, at);
