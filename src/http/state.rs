//! What every handler can reach.

use std::sync::Arc;
use std::time::Duration;

use crate::auth::Auth;
use crate::config::{ServerConfig, Switch};
use crate::correction::Corrector;
use crate::health::Health;
use crate::ingest::Intake;
use crate::price::Pricer;
use crate::projection::projector::FoldSignal;
use crate::query::Catalog;
use crate::store::Store;

/// What every handler can reach. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    /// The ingest path shared with NATS.
    pub intake: Intake,
    /// The event log.
    pub store: Store,
    /// Largest accepted body, in bytes.
    pub max_body_bytes: usize,
    /// Longest time to receive a whole body.
    pub body_timeout: Duration,
    /// Dependency states shared with the background tasks.
    pub health: Arc<Health>,
    /// The projections the query module can read.
    pub catalog: Arc<Catalog>,
    /// Shared by the projectors and the alert evaluator of this process; a
    /// rule or quota change wakes the evaluator through it.
    pub signal: Arc<FoldSignal>,
    /// The API token check.
    pub auth: Arc<Auth>,
    /// The dashboard's default refresh; `None`: the dashboard is off.
    pub dashboard: Option<Duration>,
    /// Records corrections and wakes the restater.
    pub corrector: Arc<Corrector>,
    /// Records price changes and wakes the restater.
    pub pricer: Arc<Pricer>,
    /// Wakes the restater (queued restatements).
    pub restate_wake: Arc<tokio::sync::Notify>,
    /// Host names an open API answers to beside IP addresses and localhost
    /// (`TALLY_ALLOWED_HOSTS`, see [`super::guard`]).
    pub allowed_hosts: Vec<String>,
    /// Caps on new rules and quotas.
    pub rule_limits: crate::config::RuleLimits,
}

impl AppState {
    /// State for a server with this config over this store.
    pub fn new(store: Store, config: &ServerConfig, health: Arc<Health>, catalog: Catalog) -> Self {
        let restate_wake = Arc::new(tokio::sync::Notify::new());
        let corrector = Arc::new(Corrector::new(
            store.clone(),
            catalog.specs.iter().map(|s| s.name.clone()).collect(),
            config.late_arrival_horizon,
            restate_wake.clone(),
        ));
        Self {
            intake: Intake::new(store.clone(), config.intake_limits()),
            store: store.clone(),
            max_body_bytes: config.max_body_bytes,
            body_timeout: config.http_body_timeout,
            health,
            catalog: Arc::new(catalog),
            signal: Arc::default(),
            auth: Arc::new(Auth::new(
                store.clone(),
                config.http_addr,
                config.insecure_no_auth,
            )),
            dashboard: (config.dashboard == Switch::On).then_some(config.dashboard_refresh),
            corrector,
            pricer: Arc::new(Pricer::new(store.clone(), Some(restate_wake.clone()))),
            restate_wake,
            allowed_hosts: config.allowed_hosts.clone(),
            rule_limits: config.alerts.limits,
        }
    }
}
