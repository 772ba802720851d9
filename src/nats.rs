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
    /// Credentials in a URL (`nats://user:pass@host`, `nats://token@host`)
    /// are taken out of it and sent as the user/password or token options.
    #[arg(long, env = "TALLY_NATS_URL", hide_env_values = true)]
    pub nats_url: Option<String>,

    /// User name (with `--nats-password`).
    #[arg(long, env = "TALLY_NATS_USER", hide_env_values = true)]
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
            .field("nats_url", &self.nats_url.as_deref().map(redact_urls))
            .field("nats_user", &secret(&self.nats_user))
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

/// A comma-separated URL list, each one redacted ([`crate::store::redact_url`]).
pub fn redact_urls(urls: &str) -> String {
    urls.split(',')
        .map(|u| crate::store::redact_url(u.trim()))
        .collect::<Vec<_>>()
        .join(",")
}

/// Credentials written in a NATS URL's userinfo.
#[derive(PartialEq, Eq)]
enum UrlCredentials {
    /// `nats://user:password@host`.
    UserPassword(String, String),
    /// `nats://token@host`.
    Token(String),
}

/// The server addresses of a comma-separated URL list with their
/// credentials taken out, and those credentials (percent-decoded). Every URL
/// that carries credentials must carry the same ones (they are one client's);
/// URLs without any use them too.
fn servers(urls: &str) -> Result<(Vec<ServerAddr>, Option<UrlCredentials>), String> {
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    let mut found: Option<UrlCredentials> = None;
    let mut out = Vec::new();
    for (i, part) in urls.split(',').map(str::trim).enumerate() {
        let with_scheme = match part.contains("://") {
            true => part.to_string(),
            false => format!("nats://{part}"),
        };
        let mut url = url::Url::parse(&with_scheme)
            .map_err(|e| format!("bad URL (number {} in the list): {e}", i + 1))?;
        let creds = match (url.username(), url.password()) {
            ("", None) => None,
            (user, Some(pass)) => Some(UrlCredentials::UserPassword(decode(user), decode(pass))),
            (token, None) => Some(UrlCredentials::Token(decode(token))),
        };
        if let Some(creds) = creds {
            if found.as_ref().is_some_and(|f| *f != creds) {
                return Err("the URLs carry different credentials: give one set (in every URL, or once in TALLY_NATS_USER/TALLY_NATS_PASSWORD or TALLY_NATS_TOKEN)".into());
            }
            found = Some(creds);
            let _ = url.set_password(None);
            let _ = url.set_username("");
        }
        out.push(
            ServerAddr::from_url(url)
                .map_err(|e| format!("bad URL (number {} in the list): {e}", i + 1))?,
        );
    }
    Ok((out, found))
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
    let shown = redact_urls(&url);
    let mut opts = match &conn.nats_creds {
        Some(path) => ConnectOptions::with_credentials_file(path)
            .await
            .map_err(|e| {
                ConnectError::Credentials(format!("credentials file {}: {e}", path.display()))
            })?,
        None => ConnectOptions::new(),
    };
    // Credentials written in the URL are taken out of it and given to the
    // client as options: the client logs server addresses (at debug, and in
    // its errors), and a URL must never carry a secret into a log line.
    let (servers, in_url) = servers(&url).map_err(|reason| ConnectError::Connect {
        url: shown.clone(),
        reason,
    })?;
    if let Some(found) = in_url {
        if conn.nats_user.is_some() || conn.nats_password.is_some() || conn.nats_token.is_some() {
            return Err(ConnectError::Credentials(
                "credentials are given twice: in TALLY_NATS_URL and in TALLY_NATS_USER/TALLY_NATS_PASSWORD or TALLY_NATS_TOKEN; give them once".into(),
            ));
        }
        opts = match found {
            UrlCredentials::UserPassword(user, pass) => opts.user_and_password(user, pass),
            UrlCredentials::Token(token) => opts.token(token),
        };
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_leave_the_urls() {
        let (addrs, creds) = servers("nats://al%40ice:p%3Ass@h1:4222, nats://h2:4223").expect("ok");
        assert!(creds == Some(UrlCredentials::UserPassword("al@ice".into(), "p:ss".into())));
        for a in &addrs {
            assert!(!a.as_url_str().contains('@'), "{}", a.as_url_str());
            assert!(a.username().is_none() && a.password().is_none());
        }
        let (addrs, creds) = servers("TOKEN@127.0.0.1:4222").expect("ok");
        assert!(creds == Some(UrlCredentials::Token("TOKEN".into())));
        assert_eq!(addrs[0].as_url_str(), "nats://127.0.0.1:4222");
        let (_, creds) = servers("nats://h:4222").expect("ok");
        assert!(creds.is_none());
        let err = servers("nats://a:b@h1,nats://c:d@h2")
            .err()
            .expect("refused");
        assert!(err.contains("different credentials"), "{err}");
        assert!(!err.contains('b') || !err.contains(":d"), "{err}");
        assert!(servers("nats://a:b@h1,nats://a:b@h2").is_ok());
    }
}
