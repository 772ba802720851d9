-- Operations: API tokens and the record of scheduled job runs.
-- Times are Unix milliseconds, as in 0003, so both backends share one set of queries.

-- An API token. Only the SHA-256 of the secret is stored: the token itself is
-- printed once by `tally tokens create` and cannot be recovered.
-- `scopes` is a comma-separated subset of ingest, read, admin.
CREATE TABLE api_tokens (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    scopes        TEXT NOT NULL,
    token_sha256  TEXT NOT NULL UNIQUE,
    created_at_ms INTEGER NOT NULL,
    created_by    TEXT NOT NULL,
    revoked_at_ms INTEGER
);
CREATE UNIQUE INDEX api_tokens_active_name ON api_tokens (name) WHERE revoked_at_ms IS NULL;

-- One row per run of a scheduled job. `slot` is the cron occurrence the run
-- belongs to (or the start of a manual run): the unique (job, slot) is what
-- makes a scheduled job run once across all Tally instances.
CREATE TABLE job_runs (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    job             TEXT NOT NULL,
    slot_ms         INTEGER NOT NULL,
    trigger         TEXT NOT NULL,
    instance        TEXT NOT NULL,
    started_at_ms   INTEGER NOT NULL,
    finished_at_ms  INTEGER,
    outcome         TEXT NOT NULL,
    rows_affected   INTEGER NOT NULL DEFAULT 0,
    detail          TEXT,
    -- Readable copies of the two times, for analysts.
    started         TEXT GENERATED ALWAYS AS (strftime('%Y-%m-%dT%H:%M:%fZ', started_at_ms / 1000.0, 'unixepoch')) VIRTUAL,
    finished        TEXT GENERATED ALWAYS AS (strftime('%Y-%m-%dT%H:%M:%fZ', finished_at_ms / 1000.0, 'unixepoch')) VIRTUAL,
    UNIQUE (job, slot_ms)
);
CREATE INDEX job_runs_started ON job_runs (job, started_at_ms);
