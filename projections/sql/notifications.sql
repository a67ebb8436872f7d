-- Notifications read model: what a customer's app (and the notification webhook) is told, one
-- record per customer and causing event; plus what the projection remembers of each order, and
-- the webhook delivery log.
CREATE SCHEMA IF NOT EXISTS notifications;

-- Order → customer (and its current total), from `OrderPlaced` / `OrderModified`: the later
-- events of an order do not name its customer.
CREATE TABLE IF NOT EXISTS notifications.orders
(
    order_id    text PRIMARY KEY,
    customer_id uuid   NOT NULL,
    total_minor bigint NOT NULL,
    currency    text   NOT NULL
);

-- One notification. `id` is the cursor of lists and streams (assigned in event order within a
-- projector batch); at most one record per customer and causing event.
CREATE TABLE IF NOT EXISTS notifications.records
(
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer_id     uuid        NOT NULL,
    -- `NotificationKind::as_str` of projections::notifications (the projection writes nothing
    -- else; the list grows with the kinds, so it is not repeated in a CHECK here).
    kind            text        NOT NULL,
    order_id        text,
    event_id        uuid        NOT NULL,
    payload         jsonb       NOT NULL,
    -- When the causing event was recorded in the event store (a function of the event, so a
    -- replay writes the same value).
    created_at      timestamptz NOT NULL,
    -- Set (once) by the webhook worker when it claims the record; never by the projection.
    webhook_claimed boolean     NOT NULL DEFAULT false,
    UNIQUE (customer_id, event_id)
);

CREATE INDEX IF NOT EXISTS notifications_records_customer ON notifications.records (customer_id, id);
-- The webhook worker's queue: records not claimed yet, in id order.
CREATE INDEX IF NOT EXISTS notifications_records_unclaimed ON notifications.records (id)
    WHERE NOT webhook_claimed;

-- Webhook delivery log, keyed like the records (customer, causing event), so that even a
-- read model rebuilt from scratch never sends a notification a second time. A row is written
-- and committed *before* the POST (status `sending`): at most once per notification.
--   sending   → claimed; the POST is under way (left over after a crash: outcome unknown,
--               turned into `failed` by the next worker round once older than the timeout)
--   delivered → the receiver answered 2xx
--   failed    → non-2xx, timeout, connection error or unknown outcome; never resent
CREATE TABLE IF NOT EXISTS notifications.webhook_deliveries
(
    customer_id     uuid        NOT NULL,
    event_id        uuid        NOT NULL,
    notification_id bigint      NOT NULL,
    status          text        NOT NULL CHECK (status IN ('sending', 'delivered', 'failed')),
    attempted_at    timestamptz NOT NULL,
    http_status     integer,
    error           text,
    delivered_at    timestamptz,
    finished_at     timestamptz,
    PRIMARY KEY (customer_id, event_id)
);

CREATE INDEX IF NOT EXISTS notifications_webhook_failed
    ON notifications.webhook_deliveries (notification_id) WHERE status = 'failed';
CREATE INDEX IF NOT EXISTS notifications_webhook_sending
    ON notifications.webhook_deliveries (attempted_at) WHERE status = 'sending';

-- The first release checked the four kinds it knew; order_rejected, order_cancelled and
-- delivery_failed came later.
ALTER TABLE notifications.records DROP CONSTRAINT IF EXISTS records_kind_check;

-- A delivery failure applied before its order's placement (the deliveries and orders topics
-- are read side by side): told to the customer once the placement is applied.
CREATE TABLE IF NOT EXISTS notifications.pending_delivery_failures
(
    order_id   text        NOT NULL,
    event_id   uuid        NOT NULL,
    payload    jsonb       NOT NULL,
    created_at timestamptz NOT NULL,
    PRIMARY KEY (order_id, event_id)
);
