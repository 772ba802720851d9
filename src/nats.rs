//! How Tally reaches NATS: the connection settings and credentials shared by
//! the ingest consumer (`ingest::nats`), the alert relay and `tally emit`
//! (Vector's `nats.rs`: one place for auth and TLS, used by source and sink).

use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, ConnectOptions, ServerAddr};

use crate::health::{Health, NatsState};

/// Why Tally could not connect to NATS.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The server could not be reached or refused us.
    #[error("cannot connect to NATS at {url}: {reason}")]
    Connect {
        /// The configured URL (credentials redacted).
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// A credentials, nkey or TLS file could not be used.
    #[error("NATS credentials: {0}")]
    Credentials(String),
}

/// How to reach and authenticate to NATS (shared by `serve` and `emit`).
#[derive(Clone, Default, clap::Args)]
pub struct NatsConnection {
    /// NATS server URL(s), comma-separated (`nats://host:4222`, `tls://…`). Unset: HTTP ingest only.
    #[arg(long, env = "TALLY_NATS_URL")]
    pub nats_url: Option<String>,

    /// User name (with `--nats-password`).
    #[arg(long, env = "TALLY_NATS_USER")]
    pub nats_user: Option<String>,

    /// Password (with `--nats-user`).
    #[arg(long, env = "TALLY_NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<String>,

    /// Authentication token.
    #[arg(long, env = "TALLY_NATS_TOKEN", hide_env_values = true)]
    pub nats_token: Option<String>,

    /// File holding an nkey seed (`SU…`), so the seed stays out of the environment and `ps`.
    #[arg(long, env = "TALLY_NATS_NKEY_FILE")]
    pub nats_nkey_file: Option<std::path::PathBuf>,

    /// Credentials file (JWT + nkey seed, as written by `nsc`).
    #[arg(long, env = "TALLY_NATS_CREDS")]
    pub nats_creds: Option<std::path::PathBuf>,

    /// CA certificate (PEM) to verify the server with; implies TLS.
    #[arg(long, env = "TALLY_NATS_TLS_CA")]
    pub nats_tls_ca: Option<std::path::PathBuf>,

    /// Client certificate (PEM) for mutual TLS (with `--nats-tls-key`).
    #[arg(long, env = "TALLY_NATS_TLS_CERT")]
    pub nats_tls_cert: Option<std::path::PathBuf>,

    /// Client private key (PEM) for mutual TLS.
    #[arg(long, env = "TALLY_NATS_TLS_KEY")]
    pub nats_tls_key: Option<std::path::PathBuf>,

    /// Refuse to connect without TLS.
    #[arg(long, env = "TALLY_NATS_TLS_REQUIRED")]
    pub nats_tls_required: bool,
}

/// Secrets are shown as `***` so the config can be logged.
impl std::fmt::Debug for NatsConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secret = |s: &Option<String>| s.as_ref().map(|_| "***");
        f.debug_struct("NatsConnection")
            .field(
                "nats_url",
                &self.nats_url.as_deref().map(crate::store::redact_url),
            )
            .field("nats_user", &self.nats_user)
            .field("nats_password", &secret(&self.nats_password))
            .field("nats_token", &secret(&self.nats_token))
            .field("nats_nkey_file", &self.nats_nkey_file)
            .field("nats_creds", &self.nats_creds)
            .field("nats_tls_ca", &self.nats_tls_ca)
            .field("nats_tls_cert", &self.nats_tls_cert)
            .field("nats_tls_key", &self.nats_tls_key)
            .field("nats_tls_required", &self.nats_tls_required)
            .finish()
    }
}

/// Connects to NATS with the configured credentials; reconnects forever afterwards.
///
/// `health`, when given, follows the connection state (for `/readyz` and the log).
pub async fn connect(
    conn: &NatsConnection,
    client_name: &str,
    health: Option<Arc<Health>>,
) -> Result<Client, ConnectError> {
    let url = conn
        .nats_url
        .clone()
        .unwrap_or_else(|| "nats://127.0.0.1:4222".to_string());
    let shown = crate::store::redact_url(&url);
    let mut opts = match &conn.nats_creds {
        Some(path) => ConnectOptions::with_credentials_file(path)
            .await
            .map_err(|e| {
                ConnectError::Credentials(format!("credentials file {}: {e}", path.display()))
            })?,
        None => ConnectOptions::new(),
    };
    match (&conn.nats_user, &conn.nats_password) {
        (Some(user), Some(pass)) => opts = opts.user_and_password(user.clone(), pass.clone()),
        (None, None) => {}
        _ => {
            return Err(ConnectError::Credentials(
                "--nats-user and --nats-password go together; set both or neither".into(),
            ))
        }
    }
    if let Some(token) = &conn.nats_token {
        opts = opts.token(token.clone());
    }
    if let Some(path) = &conn.nats_nkey_file {
        let seed = std::fs::read_to_string(path)
            .map_err(|e| ConnectError::Credentials(format!("nkey file {}: {e}", path.display())))?;
        opts = opts.nkey(seed.trim().to_string());
    }
    if let Some(ca) = &conn.nats_tls_ca {
        opts = opts.add_root_certificates(ca.clone()).require_tls(true);
    }
    match (&conn.nats_tls_cert, &conn.nats_tls_key) {
        (Some(cert), Some(key)) => {
            opts = opts.add_client_certificate(cert.clone(), key.clone());
        }
        (None, None) => {}
        _ => {
            return Err(ConnectError::Credentials(
                "--nats-tls-cert and --nats-tls-key go together; set both or neither".into(),
            ))
        }
    }
    if conn.nats_tls_required {
        opts = opts.require_tls(true);
    }
    if let Some(health) = health.clone() {
        opts = opts.event_callback(move |event| {
            let health = health.clone();
            async move {
                match event {
                    async_nats::Event::Connected => health.note_nats(NatsState::Up, "connected"),
                    async_nats::Event::Disconnected => {
                        health.note_nats(NatsState::Down, "disconnected")
                    }
                    other => tracing::debug!(event = %other, "NATS client event"),
                }
            }
        });
    }
    let servers = url
        .split(',')
        .map(|s| s.trim().parse::<ServerAddr>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ConnectError::Connect {
            url: shown.clone(),
            reason: format!("bad URL: {e}"),
        })?;
    let client = opts
        .name(client_name)
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        .connect(servers)
        .await
        .map_err(|e| ConnectError::Connect {
            url: shown,
            reason: e.to_string(),
        })?;
    if let Some(health) = health {
        health.note_nats(NatsState::Up, "connected");
    }
    Ok(client)
}
