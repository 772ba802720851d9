-- One row per projection (and per rebuild in progress, named `<name>~rebuild`):
-- how far it has folded the log, with which spec, and who is folding it.
-- The aggregate tables themselves (agg_<name>_<granularity>) are created from
-- the specs in projections/ at start-up, not here.
CREATE TABLE projection_checkpoints (
    name           TEXT PRIMARY KEY,
    spec_hash      TEXT NOT NULL,
    spec           TEXT NOT NULL,
    -- cursor_tx is always 0 on SQLite: seq (rowid) order is commit order.
    cursor_tx      INTEGER NOT NULL DEFAULT 0,
    cursor_seq     INTEGER NOT NULL DEFAULT 0,
    as_of          TEXT,
    events_folded  INTEGER NOT NULL DEFAULT 0,
    leader         TEXT,
    lease_until_ms INTEGER NOT NULL DEFAULT 0,
    created_at     TEXT NOT NULL,
    updated_at     TEXT NOT NULL
);
