-- Alert rules, quotas, alert instances and the alert outbox.
-- Times are Unix milliseconds (BIGINT) so both backends share one set of queries.

-- A rule, as canonical JSON (see README "Alert rules"). `uid` is fixed when the
-- name is first created: it is part of every alert fingerprint, so a rule
-- deleted and created again never reuses an old rule's message ids.
CREATE TABLE alert_rules (
    name          TEXT PRIMARY KEY,
    uid           TEXT NOT NULL,
    spec          TEXT NOT NULL,
    version       BIGINT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL,
    updated_by    TEXT NOT NULL
);

-- Who changed which rule or quota, when, from what to what (append-only).
CREATE TABLE alert_audit (
    id     BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at_ms  BIGINT NOT NULL,
    actor  TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    before TEXT,
    after  TEXT
);
CREATE INDEX alert_audit_target ON alert_audit (target, id);

-- One rolling-window quota per API key (evaluated as the rule `quota_exceeded`).
CREATE TABLE key_quotas (
    key           TEXT PRIMARY KEY,
    uid           TEXT NOT NULL,
    spec          TEXT NOT NULL,
    updated_at_ms BIGINT NOT NULL,
    updated_by    TEXT NOT NULL
);

-- One row per alert instance (rule + level + group) that ever left `inactive`.
-- `version` is a compare-and-set guard: two evaluators can never both move an
-- instance from the same state.
CREATE TABLE alert_instances (
    fingerprint     TEXT PRIMARY KEY,
    rule            TEXT NOT NULL,
    rule_uid        TEXT NOT NULL,
    level           TEXT NOT NULL,
    grp             TEXT NOT NULL,
    severity        TEXT NOT NULL,
    state           TEXT NOT NULL,
    value           DOUBLE PRECISION,
    threshold       DOUBLE PRECISION,
    active_since_ms BIGINT,
    firing_since_ms BIGINT,
    last_true_ms    BIGINT,
    last_sent_ms    BIGINT,
    resolved_at_ms  BIGINT,
    sequence        BIGINT NOT NULL DEFAULT 0,
    version         BIGINT NOT NULL DEFAULT 0,
    updated_at_ms   BIGINT NOT NULL
);
CREATE INDEX alert_instances_rule ON alert_instances (rule);

-- Every notification (one per transition), written in the same transaction as
-- the state change. The relay publishes rows with sent_at_ms NULL and then
-- sets it. The unique (fingerprint, sequence) makes a second copy of a
-- transition impossible whatever evaluators race. Also the alert history.
CREATE TABLE alert_outbox (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    fingerprint   TEXT NOT NULL,
    sequence      BIGINT NOT NULL,
    rule          TEXT NOT NULL,
    state         TEXT NOT NULL,
    severity      TEXT NOT NULL,
    subject       TEXT NOT NULL,
    payload       TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    sent_at_ms    BIGINT,
    UNIQUE (fingerprint, sequence)
);
CREATE INDEX alert_outbox_unsent ON alert_outbox (id) WHERE sent_at_ms IS NULL;
CREATE INDEX alert_outbox_created ON alert_outbox (created_at_ms);

-- Named leases: which instance runs a singleton task (the alert evaluator and relay).
CREATE TABLE leases (
    name     TEXT PRIMARY KEY,
    holder   TEXT NOT NULL,
    until_ms BIGINT NOT NULL
);
