-- Stuck flows: a step of the order flow process manager that could not proceed (the target
-- aggregate refused the command, or the catalogue lacks what the step needs). The process
-- manager records them in the transaction of its checkpoint; operators list them (API,
-- `replay-tools stuck-flows`) and ask for a retry or a resolution, which the process manager
-- carries out (see commands::stuck). Created here rather than by the process manager so that
-- the API and the tools can read it before the process manager first starts.
CREATE SCHEMA IF NOT EXISTS order_flow;

CREATE TABLE IF NOT EXISTS order_flow.stuck_flows
(
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The order the flow is about (the aggregate id of the order, its payment and delivery).
    order_id        text        NOT NULL,
    -- The flow step (`request-delivery`, `earn-points`, ...).
    step            text        NOT NULL,
    -- The event the step reacted to, and that event itself (domain JSON with its metadata):
    -- a retry applies the flow's reaction to it again.
    event_id        uuid        NOT NULL,
    event_type      text        NOT NULL,
    cause           jsonb       NOT NULL,
    -- The command that was refused (domain JSON; null when the step could not even build it).
    command         jsonb,
    command_type    text        NOT NULL,
    -- Why: the aggregate's refusal or what the catalogue lacks.
    reason          text        NOT NULL,
    --   open              → waiting for an operator
    --   retry_requested   → an operator asked for a retry; the process manager applies the
    --                       reaction again within a second (refused again: back to open)
    --   resolve_requested → an operator asked to cancel the order with compensation
    --   retried           → the retry went through
    --   resolved          → the order was cancelled (or was already over)
    status          text        NOT NULL DEFAULT 'open'
        CHECK (status IN ('open', 'retry_requested', 'resolve_requested', 'retried', 'resolved')),
    attempts        integer     NOT NULL DEFAULT 1,
    -- Since when the step is stuck, and its latest refusal.
    since           timestamptz NOT NULL DEFAULT now(),
    last_refused_at timestamptz NOT NULL DEFAULT now(),
    -- Who asked for the retry or resolution, and the resolution's reason.
    requested_by    text,
    requested_at    timestamptz,
    note            text,
    resolution      text,
    resolved_at     timestamptz,
    UNIQUE (event_id, step)
);

CREATE INDEX IF NOT EXISTS stuck_flows_status ON order_flow.stuck_flows (status, id);
CREATE INDEX IF NOT EXISTS stuck_flows_order ON order_flow.stuck_flows (order_id);
