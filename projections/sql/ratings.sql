-- Ratings read model: per menu item, store and courier, counts, sums and the distribution of
-- stars, plus what the projection remembers of each order to attribute its rating.
CREATE SCHEMA IF NOT EXISTS ratings;

CREATE TABLE IF NOT EXISTS ratings.orders
(
    order_id text PRIMARY KEY,
    store_id uuid   NOT NULL,
    items    text[] NOT NULL
);

CREATE TABLE IF NOT EXISTS ratings.subjects
(
    kind  text   NOT NULL CHECK (kind IN ('item', 'store', 'courier')),
    id    text   NOT NULL,
    count bigint NOT NULL,
    sum   bigint NOT NULL,
    -- stars1 .. stars5: how many ratings gave that many stars.
    stars bigint[] NOT NULL,
    PRIMARY KEY (kind, id)
);
