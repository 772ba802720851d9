-- Issue 17 (hardening).

-- Alert rules whose evaluation fails (a read error, a rule that no longer
-- validates): one row per failing rule, deleted when it evaluates again. The
-- other rules keep being evaluated; GET /v1/alert-rules and /metrics show these.
CREATE TABLE alert_rule_status (
    uid           TEXT PRIMARY KEY,
    rule          TEXT NOT NULL,
    error         TEXT NOT NULL,
    since_ms      BIGINT NOT NULL,
    checked_at_ms BIGINT NOT NULL
);

-- Settings that outlive a process. `auth` = `on` once a token was ever
-- created: revoking the last token then closes the API instead of opening it
-- (only `tally tokens disable-auth` turns it off).
CREATE TABLE settings (
    name          TEXT PRIMARY KEY,
    value         TEXT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);
INSERT INTO settings (name, value, updated_at_ms)
SELECT 'auth', 'on', (extract(epoch FROM now()) * 1000)::bigint
WHERE EXISTS (SELECT 1 FROM api_tokens);
