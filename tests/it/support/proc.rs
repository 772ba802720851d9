//! `tally serve` as a child process (so tests can `kill -9` it and read its
//! memory), a private nats-server per test, and helpers to publish and to read
//! the event log's totals back with plain SQL.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use tally_cli::dev::devserver::{free_port, TempNats};
use tally_cli::dev::emit::{EmitConfig, Expectation};

/// A fresh nats-server with JetStream for one test; panics loudly when missing.
pub fn nats() -> TempNats {
    TempNats::start().unwrap_or_else(|e| panic!("cannot start nats-server for the tests: {e}"))
}

/// A `tally serve` child process, killed on drop.
pub struct TallyProc {
    child: Option<Child>,
    pub base: String,
    pub log: PathBuf,
    db_url: String,
    nats_url: Option<String>,
    extra: Vec<(String, String)>,
    port: u16,
    _dir: tempfile::TempDir,
}

impl TallyProc {
    /// Starts `tally serve` on `db_url` and `nats_url` and waits until `/healthz` answers.
    pub async fn start(db_url: &str, nats_url: &str, extra: &[(&str, &str)]) -> Self {
        Self::start_with(db_url, Some(nats_url), extra).await
    }

    /// Starts `tally serve` with HTTP ingest only (no NATS).
    pub async fn start_http(db_url: &str, extra: &[(&str, &str)]) -> Self {
        Self::start_with(db_url, None, extra).await
    }

    async fn start_with(db_url: &str, nats_url: Option<&str>, extra: &[(&str, &str)]) -> Self {
        let mut p = Self::prepared(db_url, nats_url, extra);
        p.spawn().await;
        p
    }

    /// An HTTP-only process, set up but not started ([`TallyProc::launch`]
    /// starts it without waiting: for one that dies at start-up).
    pub fn prepared_http(db_url: &str, extra: &[(&str, &str)]) -> Self {
        Self::prepared(db_url, None, extra)
    }

    fn prepared(db_url: &str, nats_url: Option<&str>, extra: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port().expect("free port");
        Self {
            child: None,
            base: format!("http://127.0.0.1:{port}"),
            log: dir.path().join("tally.log"),
            db_url: db_url.to_string(),
            nats_url: nats_url.map(str::to_string),
            extra: extra
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            port,
            _dir: dir,
        }
    }

    /// Sets (or replaces) an environment variable for the next launch.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.extra.retain(|(k, _)| k != key);
        self.extra.push((key.to_string(), value.to_string()));
    }

    /// (Re)starts the process with the same settings, without waiting for it.
    pub fn launch(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let err = log.try_clone().expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tally"));
        cmd.arg("serve")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("TALLY_DATABASE_URL", &self.db_url)
            .env(
                "TALLY_PROJECTIONS_DIR",
                concat!(env!("CARGO_MANIFEST_DIR"), "/../../projections"),
            )
            .env("TALLY_HTTP_ADDR", format!("127.0.0.1:{}", self.port));
        if let Some(url) = &self.nats_url {
            cmd.env("TALLY_NATS_URL", url);
        }
        let child = cmd
            .env("TALLY_LOG", "info,tally=debug,sqlx=warn")
            .envs(self.extra.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .expect("spawn tally");
        self.child = Some(child);
    }

    /// (Re)starts the process and waits until `/healthz` answers.
    pub async fn spawn(&mut self) {
        self.launch();
        let deadline = Instant::now() + Duration::from_secs(30);
        let client = reqwest::Client::new();
        loop {
            if let Ok(r) = client.get(format!("{}/healthz", self.base)).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!(
                    "tally exited at start with {status}; log:\n{}",
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "tally not up after 30s; log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL: a crash at whatever point the process is.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits; returns how long the exit took and the exit status.
    pub fn terminate(&mut self) -> (Duration, std::process::ExitStatus) {
        let mut c = self.child.take().expect("running");
        let started = Instant::now();
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return (started.elapsed(), status);
            }
            if started.elapsed() > Duration::from_secs(30) {
                let _ = c.kill();
                panic!("tally ignored SIGTERM for 30s; log:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id (0 when not running).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// True while the process runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    /// `(VmRSS, VmHWM)` in KiB: current and peak resident memory.
    pub fn memory_kib(&self) -> (u64, u64) {
        let pid = self.child.as_ref().expect("running").id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// `GET /readyz` status code (0 when unreachable).
    pub async fn readyz(&self) -> u16 {
        match reqwest::Client::new()
            .get(format!("{}/readyz", self.base))
            .timeout(Duration::from_secs(5))
            .send()
            .await
        {
            Ok(r) => r.status().as_u16(),
            Err(_) => 0,
        }
    }

    /// The process's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for TallyProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A JetStream context on `url`.
pub async fn jetstream(url: &str) -> (async_nats::Client, jetstream::Context) {
    let client = async_nats::connect(url).await.expect("connect to nats");
    (client.clone(), jetstream::new(client))
}

/// Publishes with `tally emit`'s generator; returns what Tally must count.
pub async fn emit(js: &jetstream::Context, cfg: EmitConfig) -> Expectation {
    let (summary, expect) = tally_cli::dev::emit::emit(js, &cfg).await.expect("emit");
    assert_eq!(summary.failed, 0, "every publish is acked: {summary:?}");
    assert_eq!(summary.acked, summary.published);
    expect
}

/// Per (api, key): requests, successes, errors, tokens_in, tokens_out, cost_nanos.
pub type Sums = BTreeMap<(String, String), [i64; 6]>;

type SumRow = (String, String, i64, i64, i64, i64, i64, i64);

/// Reads the event log's totals with plain SQL (either backend).
pub async fn log_sums(db_url: &str) -> (i64, Sums) {
    let sql = "SELECT api, COALESCE(key, ''), COUNT(*), \
               SUM(CASE WHEN success THEN 1 ELSE 0 END), SUM(CASE WHEN success THEN 0 ELSE 1 END), \
               COALESCE(SUM(tokens_in), 0), COALESCE(SUM(tokens_out), 0), COALESCE(SUM(cost_nanos), 0) \
               FROM usage_events GROUP BY 1, 2";
    let rows: Vec<SumRow> = if db_url.starts_with("sqlite:") {
        let pool = crate::support::sqlite_pool(db_url).await;
        let r = sqlx::query_as(sql).fetch_all(&pool).await.expect("sums");
        pool.close().await;
        r
    } else {
        let pool = sqlx::PgPool::connect(db_url).await.expect("pg");
        let pg_sql = sql
            .replace("COUNT(*)", "COUNT(*)::int8")
            .replace(
                "SUM(CASE WHEN success THEN 1 ELSE 0 END)",
                "SUM(CASE WHEN success THEN 1 ELSE 0 END)::int8",
            )
            .replace(
                "SUM(CASE WHEN success THEN 0 ELSE 1 END)",
                "SUM(CASE WHEN success THEN 0 ELSE 1 END)::int8",
            )
            .replace(
                "COALESCE(SUM(tokens_in), 0)",
                "COALESCE(SUM(tokens_in), 0)::int8",
            )
            .replace(
                "COALESCE(SUM(tokens_out), 0)",
                "COALESCE(SUM(tokens_out), 0)::int8",
            )
            .replace(
                "COALESCE(SUM(cost_nanos), 0)",
                "COALESCE(SUM(cost_nanos), 0)::int8",
            );
        let r = sqlx::query_as(&pg_sql)
            .fetch_all(&pool)
            .await
            .expect("sums");
        pool.close().await;
        r
    };
    let mut total = 0;
    let mut sums = Sums::new();
    for (api, key, n, ok, err, ti, to, cost) in rows {
        total += n;
        sums.insert((api, key), [n, ok, err, ti, to, cost]);
    }
    (total, sums)
}

/// The same shape from an [`Expectation`].
pub fn expected_sums(e: &Expectation) -> Sums {
    let mut sums = Sums::new();
    for (api, keys) in &e.by_api_key {
        for (key, t) in keys {
            sums.insert(
                (api.clone(), key.clone()),
                [
                    t.requests as i64,
                    t.successes as i64,
                    t.errors as i64,
                    t.tokens_in,
                    t.tokens_out,
                    t.cost_nanos,
                ],
            );
        }
    }
    sums
}

/// Rows in `usage_events` (0 while the database is unreachable).
pub async fn event_count(db_url: &str) -> i64 {
    let sql = "SELECT COUNT(*) FROM usage_events";
    if db_url.starts_with("sqlite:") {
        let Ok(pool) = sqlx::SqlitePool::connect(db_url).await else {
            return 0;
        };
        let n = sqlx::query_scalar::<_, i64>(sql)
            .fetch_one(&pool)
            .await
            .unwrap_or(0);
        pool.close().await;
        n
    } else {
        let Ok(pool) = sqlx::PgPool::connect(db_url).await else {
            return 0;
        };
        let n = sqlx::query_scalar::<_, i64>(sql)
            .fetch_one(&pool)
            .await
            .unwrap_or(0);
        pool.close().await;
        n
    }
}

/// Waits until the log holds `n` events and the consumer has nothing pending or unacked.
pub async fn wait_drained(
    db_url: &str,
    js: &jetstream::Context,
    n: i64,
    timeout: Duration,
    what: &str,
) {
    let deadline = Instant::now() + timeout;
    loop {
        let have = event_count(db_url).await;
        let (pending, unacked) = consumer_backlog(js).await;
        if have == n && pending == 0 && unacked == 0 {
            return;
        }
        assert!(
            have <= n,
            "{what}: the log holds {have} events, more than the {n} distinct ones published"
        );
        assert!(
            Instant::now() < deadline,
            "{what}: after {timeout:?} the log holds {have} of {n} events; consumer pending {pending}, unacked {unacked}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `(num_pending, num_ack_pending)` of the `tally` consumer on `USAGE`.
pub async fn consumer_backlog(js: &jetstream::Context) -> (u64, usize) {
    let Ok(stream) = js.get_stream("USAGE").await else {
        return (u64::MAX, usize::MAX);
    };
    match stream.consumer_info("tally").await {
        Ok(info) => (info.num_pending, info.num_ack_pending),
        Err(_) => (u64::MAX, usize::MAX),
    }
}

/// An emit config with a unique id prefix and no sleeping.
pub fn emit_config(count: usize, seed: u64) -> EmitConfig {
    EmitConfig {
        count,
        seed,
        id_prefix: format!("t{:08x}", rand::random::<u32>()),
        ..EmitConfig::default()
    }
}
