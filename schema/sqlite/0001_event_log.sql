-- The event log: the source of truth. Append-only; one row per accepted event.
-- Timestamps are TEXT in fixed-width RFC 3339 UTC with microseconds
-- ("2026-11-24T10:00:00.123000Z"): text order is time order, and SQLite's date
-- functions read it.
CREATE TABLE usage_events (
    -- rowid alias. SQLite has one writer at a time, so seq order is commit order:
    -- the projector's cursor is simply seq.
    seq            INTEGER PRIMARY KEY,
    id             TEXT NOT NULL UNIQUE,
    ts             TEXT NOT NULL,
    api            TEXT NOT NULL,
    endpoint       TEXT,
    method         TEXT,
    key            TEXT,
    "user"         TEXT,
    model          TEXT,
    status         INTEGER,
    success        INTEGER NOT NULL CHECK (success IN (0, 1)),
    error_type     TEXT CHECK (error_type IN ('rate_limit', 'timeout', 'server_error', 'client_error', 'other')),
    error_message  TEXT,
    latency_ms     REAL,
    request_bytes  INTEGER,
    response_bytes INTEGER,
    tokens_in      INTEGER,
    tokens_out     INTEGER,
    cost_nanos     INTEGER CHECK (cost_nanos >= 0),
    cached         INTEGER NOT NULL DEFAULT 0 CHECK (cached IN (0, 1)),
    metadata       TEXT,
    ingested_at    TEXT NOT NULL,
    CHECK (success = (error_type IS NULL))
);

CREATE INDEX usage_events_ts_idx ON usage_events (ts);

-- Everything that was not accepted, raw bytes kept, so nothing is silently lost.
CREATE TABLE rejected_events (
    seq          INTEGER PRIMARY KEY,
    received_at  TEXT NOT NULL,
    source       TEXT NOT NULL,          -- http | nats | import
    subject      TEXT,                   -- NATS subject or HTTP path
    kind         TEXT NOT NULL,          -- unparseable | invalid | conflict
    event_id     TEXT,
    item_index   INTEGER,
    reason       TEXT NOT NULL,
    content_type TEXT,
    payload      BLOB NOT NULL
);

CREATE INDEX rejected_events_received_at_idx ON rejected_events (received_at);
CREATE INDEX rejected_events_event_id_idx ON rejected_events (event_id);
