//! What the benchmarks that drive a running `tally serve` share: spawning it
//! and calling its JSON API.

use std::path::Path;

use serde_json::Value;

use super::BenchError;

/// Starts `tally serve` (this binary) on `url` with HTTP on a free port and
/// no NATS, its output in `log`, plus `env`; returns it and its base URL.
pub(super) fn spawn(
    url: &str,
    projections: &Path,
    log: &Path,
    env: &[(&str, String)],
) -> Result<(std::process::Child, String), BenchError> {
    let log = std::fs::File::create(log)?;
    let port = crate::dev::devserver::free_port()?;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.arg("serve")
        .env("TALLY_DATABASE_URL", url)
        .env("TALLY_HTTP_ADDR", format!("127.0.0.1:{port}"))
        .env("TALLY_PROJECTIONS_DIR", projections)
        .env("TALLY_LOG", "warn")
        .env_remove("TALLY_NATS_URL");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.stdout(log.try_clone()?).stderr(log).spawn()?;
    Ok((child, format!("http://127.0.0.1:{port}")))
}

/// Sends `body` (if any) with `method` to `url` and parses the JSON answer;
/// a failure or a non-2xx status is an error naming `url`.
pub(super) async fn call(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    body: Option<&Value>,
) -> Result<Value, BenchError> {
    let fail = |e: &dyn std::fmt::Display| BenchError::Check(format!("{url}: {e}"));
    let mut req = http.request(method, url);
    if let Some(b) = body {
        req = req.json(b);
    }
    let resp = req.send().await.map_err(|e| fail(&e))?;
    let status = resp.status();
    let text = resp.text().await.map_err(|e| fail(&e))?;
    if !status.is_success() {
        return Err(fail(&format!("{status} {text}")));
    }
    serde_json::from_str(&text).map_err(|e| fail(&e))
}

/// `GET url` as JSON.
pub(super) async fn get_json(http: &reqwest::Client, url: &str) -> Result<Value, BenchError> {
    call(http, reqwest::Method::GET, url, None).await
}
