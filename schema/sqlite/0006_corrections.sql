-- Issue 21: corrections and restatement. The event log stays append-only: a
-- correction is recorded here, and the events it voids are listed, never
-- deleted or updated. Times are Unix milliseconds, as in the ops tables.

-- One row per accepted correction (POST /v1/corrections), with the request
-- as sent (canonical JSON, for idempotency) and what it did.
CREATE TABLE corrections (
    id               TEXT PRIMARY KEY,
    reason           TEXT NOT NULL,
    request          TEXT NOT NULL,
    voided           INTEGER NOT NULL DEFAULT 0,
    already_voided   INTEGER NOT NULL DEFAULT 0,
    not_found        TEXT NOT NULL DEFAULT '[]',
    actor            TEXT NOT NULL,
    created_at_ms    INTEGER NOT NULL,
    reverted_at_ms   INTEGER,
    reverted_by      TEXT,
    revert_reason    TEXT
);

-- What each correction voided (kept after a revert: the history).
CREATE TABLE correction_events (
    correction_id  TEXT NOT NULL REFERENCES corrections (id),
    event_id       TEXT NOT NULL,
    ts             TEXT NOT NULL,
    PRIMARY KEY (correction_id, event_id)
);

-- The events voided now: every projection read of the log skips these.
-- `event_tx`, `event_seq` are the event's log position (PostgreSQL: its
-- transaction id as a number; SQLite: 0 and its seq), so a read of the log
-- finds the voided events among the ones it read with one range lookup.
-- A revert deletes its correction's rows.
CREATE TABLE voided_events (
    event_id       TEXT PRIMARY KEY,
    correction_id  TEXT NOT NULL REFERENCES corrections (id),
    event_tx       INTEGER NOT NULL,
    event_seq      INTEGER NOT NULL,
    voided_at_ms   INTEGER NOT NULL
);
CREATE INDEX voided_events_position_idx ON voided_events (event_tx, event_seq);

-- Restatements still to do: recompute `projection`'s buckets that overlap
-- [from_ms, to_ms) of event time. Inserted with the change that needs them,
-- deleted in the transaction that does them, so a crash in between redoes it.
CREATE TABLE restatements (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    projection     TEXT NOT NULL,
    from_ms        INTEGER NOT NULL,
    to_ms          INTEGER NOT NULL,
    cause          TEXT NOT NULL,
    created_at_ms  INTEGER NOT NULL
);
CREATE INDEX restatements_projection_idx ON restatements (projection, id);

-- Bumped by every restatement: a projector batch read before it carries the
-- old value and is refused by the apply's compare-and-set, then re-read.
ALTER TABLE projection_checkpoints ADD COLUMN generation INTEGER NOT NULL DEFAULT 0;
