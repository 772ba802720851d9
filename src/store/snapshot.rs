//! The alert and token tables as one value, for `tally copy` between deployments.

use super::alerts::{
    audit, bind_instance, ms, notification_from_row, AuditRow, InstanceRow, NotificationRow,
    QuotaRow, RuleRow, OUTBOX_COLUMNS,
};
use super::db::Sql;
use super::tokens::{TokenRow, TOKEN_COLUMNS};
use super::{Store, StoreError};

/// Everything of the alert tables, for `tally copy`.
#[derive(Debug, Clone, Default)]
pub struct AlertSnapshot {
    /// `alert_rules`.
    pub rules: Vec<RuleRow>,
    /// `key_quotas`.
    pub quotas: Vec<QuotaRow>,
    /// `alert_instances`.
    pub instances: Vec<InstanceRow>,
    /// `alert_outbox` (history and unsent notifications).
    pub outbox: Vec<NotificationRow>,
    /// `alert_audit`, oldest first.
    pub audit: Vec<AuditRow>,
    /// `api_tokens`, revoked ones included.
    pub tokens: Vec<TokenRow>,
}

impl AlertSnapshot {
    /// Rows in all tables.
    pub fn rows(&self) -> usize {
        self.rules.len()
            + self.quotas.len()
            + self.instances.len()
            + self.outbox.len()
            + self.audit.len()
            + self.tokens.len()
    }
}

impl Store {
    /// Every row of the alert and token tables.
    pub async fn alert_state(&self) -> Result<AlertSnapshot, StoreError> {
        let outbox = Sql::new(format!(
            "SELECT {OUTBOX_COLUMNS} FROM alert_outbox ORDER BY id"
        ));
        let outbox = self
            .db
            .reader()
            .read_all(outbox, notification_from_row)
            .await?;
        let mut audit = self.alerts().audit_log(None, i64::MAX).await?;
        audit.reverse();
        Ok(AlertSnapshot {
            rules: self.alerts().alert_rules().await?,
            quotas: self.alerts().quotas().await?,
            instances: self.alerts().alert_instances().await?,
            outbox,
            audit,
            tokens: self.tokens().list().await?,
        })
    }

    /// Writes a snapshot into empty alert and token tables, in one transaction.
    pub async fn restore_alert_state(&self, s: &AlertSnapshot) -> Result<(), StoreError> {
        let mut tx = self.db.begin().await?;
        for r in &s.rules {
            tx.execute(
                Sql::new(
                    "INSERT INTO alert_rules (name, uid, spec, version, created_at_ms, updated_at_ms, updated_by) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7)",
                )
                .bind(&r.name)
                .bind(&r.uid)
                .bind(&r.spec)
                .bind(r.version)
                .bind(ms(r.created_at))
                .bind(ms(r.updated_at))
                .bind(&r.updated_by),
            )
            .await?;
        }
        for q in &s.quotas {
            tx.execute(
                Sql::new(
                    "INSERT INTO key_quotas (key, uid, spec, updated_at_ms, updated_by) VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(&q.key)
                .bind(&q.uid)
                .bind(&q.spec)
                .bind(ms(q.updated_at))
                .bind(&q.updated_by),
            )
            .await?;
        }
        for i in &s.instances {
            let q = Sql::new(
                "INSERT INTO alert_instances (fingerprint, rule, rule_uid, level, grp, severity, state, \
                 value, threshold, active_since_ms, firing_since_ms, last_true_ms, last_sent_ms, \
                 resolved_at_ms, sequence, version, updated_at_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)",
            );
            tx.execute(
                bind_instance(q.bind(&i.fingerprint), i)
                    .bind(i.version)
                    .bind(ms(i.updated_at)),
            )
            .await?;
        }
        // Outbox and audit rows get new ids in their old order: ids
        // only order rows, and identity columns refuse explicit values.
        for o in &s.outbox {
            tx.execute(
                Sql::new(
                    "INSERT INTO alert_outbox (fingerprint, sequence, rule, state, severity, subject, payload, created_at_ms, sent_at_ms) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                )
                .bind(&o.n.fingerprint)
                .bind(o.n.sequence)
                .bind(&o.n.rule)
                .bind(o.n.state.as_str())
                .bind(&o.n.severity)
                .bind(&o.n.subject)
                .bind(&o.n.payload)
                .bind(ms(o.n.created_at))
                .bind(o.sent_at.map(ms)),
            )
            .await?;
        }
        for a in &s.audit {
            tx.execute(audit(
                ms(a.at),
                &a.actor,
                &a.action,
                &a.target,
                a.before.clone(),
                a.after.clone(),
            ))
            .await?;
        }
        for t in &s.tokens {
            tx.execute(
                Sql::new(format!(
                    "INSERT INTO api_tokens ({TOKEN_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"
                ))
                .bind(&t.id)
                .bind(&t.name)
                .bind(&t.scopes)
                .bind(&t.token_sha256)
                .bind(ms(t.created_at))
                .bind(&t.created_by)
                .bind(t.revoked_at.map(ms)),
            )
            .await?;
        }
        tx.commit().await
    }
}
