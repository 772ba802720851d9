-- The event log: the source of truth. Append-only; one row per accepted event.
CREATE TABLE usage_events (
    -- Arrival order within a transaction; assigned at insert, *not* commit order.
    seq            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Writing transaction id: the projector's commit-safe cursor is (tx, seq),
    -- reading only tx < pg_snapshot_xmin(pg_current_snapshot()).
    tx             XID8 NOT NULL DEFAULT pg_current_xact_id(),
    id             TEXT NOT NULL,
    ts             TIMESTAMPTZ NOT NULL,
    api            TEXT NOT NULL,
    endpoint       TEXT,
    method         TEXT,
    key            TEXT,
    "user"         TEXT,
    model          TEXT,
    status         INTEGER,
    success        BOOLEAN NOT NULL,
    error_type     TEXT,
    error_message  TEXT,
    latency_ms     DOUBLE PRECISION,
    request_bytes  BIGINT,
    response_bytes BIGINT,
    tokens_in      BIGINT,
    tokens_out     BIGINT,
    cost_nanos     BIGINT,
    cached         BOOLEAN NOT NULL DEFAULT FALSE,
    metadata       JSONB,
    ingested_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- Exact deduplication with no time window.
    CONSTRAINT usage_events_id_key UNIQUE (id),
    CONSTRAINT usage_events_error_type_check
        CHECK (error_type IN ('rate_limit', 'timeout', 'server_error', 'client_error', 'other')),
    CONSTRAINT usage_events_failure_has_type CHECK (success = (error_type IS NULL)),
    CONSTRAINT usage_events_cost_check CHECK (cost_nanos >= 0)
);

CREATE INDEX usage_events_ts_idx ON usage_events (ts);
CREATE INDEX usage_events_tx_seq_idx ON usage_events (tx, seq);

-- Everything that was not accepted, raw bytes kept, so nothing is silently lost.
CREATE TABLE rejected_events (
    seq          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    received_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    source       TEXT NOT NULL,          -- http | nats | import
    subject      TEXT,                   -- NATS subject or HTTP path
    kind         TEXT NOT NULL,          -- unparseable | invalid | conflict
    event_id     TEXT,
    item_index   INTEGER,
    reason       TEXT NOT NULL,
    content_type TEXT,
    payload      BYTEA NOT NULL
);

CREATE INDEX rejected_events_received_at_idx ON rejected_events (received_at);
CREATE INDEX rejected_events_event_id_idx ON rejected_events (event_id);
