-- A counter every change to the alert rules or the key quotas moves, in the
-- changing transaction: the evaluator reads it before the rules each round
-- and loads the rules again only when it moved (a round used to read and
-- compare every rule and quota). Triggers, so a change by any path (the
-- API, a restore, SQL by hand) moves it.
CREATE TABLE alert_rules_version (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    n  INTEGER NOT NULL
);
INSERT INTO alert_rules_version (id, n) VALUES (1, 0);

CREATE TRIGGER alert_rules_inserted AFTER INSERT ON alert_rules
BEGIN UPDATE alert_rules_version SET n = n + 1 WHERE id = 1; END;
CREATE TRIGGER alert_rules_updated AFTER UPDATE ON alert_rules
BEGIN UPDATE alert_rules_version SET n = n + 1 WHERE id = 1; END;
CREATE TRIGGER alert_rules_deleted AFTER DELETE ON alert_rules
BEGIN UPDATE alert_rules_version SET n = n + 1 WHERE id = 1; END;
CREATE TRIGGER key_quotas_inserted AFTER INSERT ON key_quotas
BEGIN UPDATE alert_rules_version SET n = n + 1 WHERE id = 1; END;
CREATE TRIGGER key_quotas_updated AFTER UPDATE ON key_quotas
BEGIN UPDATE alert_rules_version SET n = n + 1 WHERE id = 1; END;
CREATE TRIGGER key_quotas_deleted AFTER DELETE ON key_quotas
BEGIN UPDATE alert_rules_version SET n = n + 1 WHERE id = 1; END;
