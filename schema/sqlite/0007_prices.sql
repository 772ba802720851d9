-- Issue 21: the price catalog. Amounts are integer nano-units (1e-9 of the
-- currency unit): token prices per million tokens. `api` is '' for a price
-- of the model on any api. A price applies from `effective_from_us` (Unix
-- microseconds) until the next one of the same (api, model).
CREATE TABLE prices (
    id                   TEXT PRIMARY KEY,
    api                  TEXT NOT NULL DEFAULT '',
    model                TEXT NOT NULL,
    effective_from_us    INTEGER NOT NULL,
    input_nanos          INTEGER NOT NULL,
    output_nanos         INTEGER NOT NULL,
    cached_input_nanos   INTEGER,
    per_request_nanos    INTEGER,
    created_at_ms        INTEGER NOT NULL,
    updated_at_ms        INTEGER NOT NULL,
    updated_by           TEXT NOT NULL,
    UNIQUE (api, model, effective_from_us)
);

-- Who changed which price, when, from what to what (append-only; JSON).
CREATE TABLE price_audit (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms   INTEGER NOT NULL,
    actor   TEXT NOT NULL,
    action  TEXT NOT NULL,
    target  TEXT NOT NULL,
    before  TEXT,
    after   TEXT
);
CREATE INDEX price_audit_target ON price_audit (target, id);

-- What a restatement may narrow itself to (JSON; NULL: whole buckets):
-- `{"correction": "<id>"}` (the groups of that correction's events) or
-- `{"models": [...]}` (the groups of those models' events).
ALTER TABLE restatements ADD COLUMN scope TEXT;
