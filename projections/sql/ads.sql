-- Ads read model: per-customer profiles for targeting, exposures to experiments, and the
-- conversions attributed to them. Every row is a pure function of the events applied.
CREATE SCHEMA IF NOT EXISTS ads;

-- What the projection keeps of each order: the facts that profiles and attribution need.
CREATE TABLE IF NOT EXISTS ads.orders
(
    order_id    text PRIMARY KEY,
    customer_id uuid        NOT NULL,
    region      text        NOT NULL,
    placed_at   timestamptz NOT NULL,
    -- The total as placed, or as last modified.
    total_minor bigint      NOT NULL,
    currency    text        NOT NULL,
    -- Units ordered per menu category, from the lines as placed or last modified.
    categories  jsonb       NOT NULL,
    status      text        NOT NULL CHECK (status IN ('placed', 'cancelled', 'rejected'))
);

CREATE INDEX IF NOT EXISTS ads_orders_customer ON ads.orders (customer_id, placed_at);

-- One row per customer with an order or a subscription. The order figures count the orders
-- that were not cancelled or rejected; they are recomputed from ads.orders for the customers a
-- batch touched.
CREATE TABLE IF NOT EXISTS ads.profiles
(
    customer_id         uuid PRIMARY KEY,
    orders_count        bigint NOT NULL DEFAULT 0,
    cancelled_orders    bigint NOT NULL DEFAULT 0,
    first_order_at      timestamptz,
    last_order_at       timestamptz,
    -- Region of the customer's most recent order (cancelled ones included).
    region              text,
    subscription_status text   NOT NULL DEFAULT 'none'
        CHECK (subscription_status IN ('none', 'active', 'cancelled', 'lapsed')),
    subscription_tier   text,
    -- End of the paid period (the end of the benefits once cancelled).
    subscription_until  timestamptz
);

CREATE TABLE IF NOT EXISTS ads.profile_spend
(
    customer_id uuid   NOT NULL,
    currency    text   NOT NULL,
    total_minor bigint NOT NULL,
    PRIMARY KEY (customer_id, currency)
);

CREATE TABLE IF NOT EXISTS ads.profile_categories
(
    customer_id uuid   NOT NULL,
    category    text   NOT NULL,
    units       bigint NOT NULL,
    PRIMARY KEY (customer_id, category)
);

-- Per experiment and customer: the assignment (from the first exposure) and the exposure count.
CREATE TABLE IF NOT EXISTS ads.exposures
(
    experiment_id            text        NOT NULL,
    customer_id              uuid        NOT NULL,
    layer                    text        NOT NULL,
    variant                  text        NOT NULL,
    promotion_code           text,
    region                   text        NOT NULL,
    first_exposed_at         timestamptz NOT NULL,
    last_exposed_at          timestamptz NOT NULL,
    exposures                bigint      NOT NULL,
    attribution_window_hours int         NOT NULL,
    PRIMARY KEY (experiment_id, customer_id)
);

CREATE INDEX IF NOT EXISTS ads_exposures_customer ON ads.exposures (customer_id);

-- An order placed within the attribution window after the customer's first exposure. The
-- order and ads topics are consumed independently, so attribution runs whenever either side
-- arrives; the key makes it idempotent.
CREATE TABLE IF NOT EXISTS ads.conversions
(
    experiment_id text        NOT NULL,
    customer_id   uuid        NOT NULL,
    order_id      text        NOT NULL,
    variant       text        NOT NULL,
    placed_at     timestamptz NOT NULL,
    PRIMARY KEY (experiment_id, customer_id, order_id)
);

CREATE INDEX IF NOT EXISTS ads_conversions_order ON ads.conversions (order_id);
