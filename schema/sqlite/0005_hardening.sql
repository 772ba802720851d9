-- Issue 17 (hardening).

-- The log position never goes back. Without AUTOINCREMENT, SQLite reuses the
-- largest rowid once retention deleted it (or emptied the log), so a new event
-- could get a seq at or below a projection's checkpoint and never be folded.
-- The table is rebuilt with AUTOINCREMENT, and the counter starts past every
-- position ever folded.
CREATE TABLE usage_events_v5 (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
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
INSERT INTO usage_events_v5 SELECT * FROM usage_events;
DROP TABLE usage_events;
ALTER TABLE usage_events_v5 RENAME TO usage_events;
CREATE INDEX usage_events_ts_idx ON usage_events (ts);
DELETE FROM sqlite_sequence WHERE name IN ('usage_events', 'usage_events_v5');
INSERT INTO sqlite_sequence (name, seq)
SELECT 'usage_events', max(
    (SELECT coalesce(max(seq), 0) FROM usage_events),
    (SELECT coalesce(max(cursor_seq), 0) FROM projection_checkpoints));

CREATE TABLE alert_rule_status (
    uid           TEXT PRIMARY KEY,
    rule          TEXT NOT NULL,
    error         TEXT NOT NULL,
    since_ms      INTEGER NOT NULL,
    checked_at_ms INTEGER NOT NULL
);

CREATE TABLE settings (
    name          TEXT PRIMARY KEY,
    value         TEXT NOT NULL,
    updated_at_ms INTEGER NOT NULL
);
INSERT INTO settings (name, value, updated_at_ms)
SELECT 'auth', 'on', CAST(strftime('%s', 'now') AS INTEGER) * 1000
WHERE EXISTS (SELECT 1 FROM api_tokens);
