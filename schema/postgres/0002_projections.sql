-- One row per projection (and per rebuild in progress, named `<name>~rebuild`):
-- how far it has folded the log, with which spec, and who is folding it.
-- The aggregate tables themselves (agg_<name>_<granularity>) are created from
-- the specs in projections/ at start-up, not here.
CREATE TABLE projection_checkpoints (
    name           TEXT PRIMARY KEY,
    spec_hash      TEXT NOT NULL,
    spec           TEXT NOT NULL,
    -- Commit-safe cursor: (usage_events.tx, usage_events.seq) of the last folded event.
    cursor_tx      BIGINT NOT NULL DEFAULT 0,
    cursor_seq     BIGINT NOT NULL DEFAULT 0,
    -- Every event committed before as_of is folded in.
    as_of          TIMESTAMPTZ,
    events_folded  BIGINT NOT NULL DEFAULT 0,
    -- Projector lease: one instance folds a projection at a time.
    leader         TEXT,
    lease_until_ms BIGINT NOT NULL DEFAULT 0,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);
