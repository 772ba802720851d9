-- A counter every change to the alert rules or the key quotas moves, in the
-- changing transaction: the evaluator reads it before the rules each round
-- and loads the rules again only when it moved (a round used to read and
-- compare every rule and quota). Triggers, so a change by any path (the
-- API, a restore, SQL by hand) moves it.
CREATE TABLE alert_rules_version (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    n  BIGINT NOT NULL
);
INSERT INTO alert_rules_version (id, n) VALUES (1, 0);

CREATE FUNCTION tally_alert_rules_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE alert_rules_version SET n = n + 1 WHERE id = 1;
    RETURN NULL;
END
$$;

CREATE TRIGGER alert_rules_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON alert_rules
    FOR EACH STATEMENT EXECUTE FUNCTION tally_alert_rules_changed();
CREATE TRIGGER key_quotas_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON key_quotas
    FOR EACH STATEMENT EXECUTE FUNCTION tally_alert_rules_changed();
