//! Test support: a private PostgreSQL cluster for the whole test binary (a fresh
//! database per test), SQLite files in temp dirs, and a Tally server on port 0.

pub mod proc;

use std::sync::OnceLock;

use chrono::{DateTime, Utc};
use tally::app::App;
use tally::config::ServerConfig;
use tally::event::Event;
use tally::store::{self, Backend, Store, StoreOptions};
use tally_cli::dev::devserver::TempPostgres;
use tokio_util::sync::CancellationToken;

/// One cluster per test process; its watchdog stops it when the process exits.
pub fn postgres() -> &'static TempPostgres {
    static PG: OnceLock<Result<TempPostgres, String>> = OnceLock::new();
    PG.get_or_init(|| TempPostgres::start(false).map_err(|e| e.to_string()))
        .as_ref()
        .unwrap_or_else(|e| panic!("cannot start PostgreSQL for the tests: {e}"))
}

/// A store on a fresh database, and what keeps it alive.
pub struct TestStore {
    pub store: Store,
    /// The database URL, for tests that change the database itself.
    pub url: String,
    pub _dir: Option<tempfile::TempDir>,
}

impl TestStore {
    /// Runs `sql` on the database over a connection of its own, as an
    /// operator by hand (or a writer Tally does not know) would.
    pub async fn exec(&self, sql: &str) {
        match self.store.backend() {
            Backend::Postgres => {
                let pool = sqlx::PgPool::connect(&self.url).await.expect("pg");
                sqlx::query(sql).execute(&pool).await.expect(sql);
            }
            Backend::Sqlite => {
                let pool = crate::support::sqlite_pool(&self.url).await;
                sqlx::query(sql).execute(&pool).await.expect(sql);
            }
        }
    }
}

/// A migrated store of the given backend on a fresh database.
pub async fn store(backend: Backend) -> TestStore {
    let (url, dir) = database(backend, "t");
    TestStore {
        store: open(&url).await,
        url,
        _dir: dir,
    }
}

/// A fresh database URL of `backend` (PostgreSQL: named `<name>_<random>`)
/// and what keeps it alive.
pub fn database(backend: Backend, name: &str) -> (String, Option<tempfile::TempDir>) {
    match backend {
        Backend::Postgres => (
            postgres()
                .create_database(name)
                .expect("create test database"),
            None,
        ),
        Backend::Sqlite => {
            let dir = tempfile::tempdir().expect("temp dir");
            let url = format!("sqlite://{}", dir.path().join("tally.db").display());
            (url, Some(dir))
        }
    }
}

/// Connects to `url` and migrates.
pub async fn open(url: &str) -> Store {
    let s = store::connect(url, &StoreOptions::default())
        .await
        .expect("connect store");
    s.migrate().await.expect("migrate");
    s
}

/// A store whose PostgreSQL is not there (a free port, nothing listening):
/// every statement fails after `acquire_timeout`. `userinfo` goes into the URL.
pub async fn dead_store(userinfo: &str, acquire_timeout: std::time::Duration) -> Store {
    let port = tally_cli::dev::devserver::free_port().expect("port");
    store::connect(
        &format!("postgres://{userinfo}@127.0.0.1:{port}/none"),
        &StoreOptions {
            acquire_timeout,
            ..Default::default()
        },
    )
    .await
    .expect("lazy connect")
}

/// A PostgreSQL cluster of the test's own (so it can be stopped) with a
/// migrated database `name`, and a store on it whose pool gives up after
/// `acquire_timeout`.
pub async fn private_postgres(
    name: &str,
    acquire_timeout: std::time::Duration,
) -> (TempPostgres, Store) {
    let pg = TempPostgres::start(false).expect("private postgres");
    let url = pg.create_database(name).expect("db");
    let store = store::connect(
        &url,
        &StoreOptions {
            acquire_timeout,
            ..Default::default()
        },
    )
    .await
    .expect("connect");
    store.migrate().await.expect("migrate");
    (pg, store)
}

/// Server config with defaults and port 0.
pub fn server_config() -> ServerConfig {
    use clap::Parser;
    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        c: ServerConfig,
    }
    let mut c = Wrap::parse_from(["tally"]).c;
    c.http_addr = "127.0.0.1:0".parse().expect("addr");
    c.projections.projections_dir =
        Some(concat!(env!("CARGO_MANIFEST_DIR"), "/../../projections").into());
    c
}

/// A running Tally server over `store`, stopped on drop.
pub struct TestServer {
    pub base: String,
    pub client: reqwest::Client,
    shutdown: CancellationToken,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl TestServer {
    pub async fn start(store: Store, config: ServerConfig) -> Self {
        let app = App::with_store(store, &config).await.expect("build app");
        let base = format!("http://{}", app.local_addr());
        let shutdown = CancellationToken::new();
        tokio::spawn(app.run(shutdown.clone()));
        Self {
            base,
            client: reqwest::Client::new(),
            shutdown,
        }
    }

    /// POSTs a body to /v1/events; returns status and JSON answer.
    pub async fn post(
        &self,
        content_type: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> (u16, serde_json::Value) {
        let mut req = self
            .client
            .post(format!("{}/v1/events", self.base))
            .body(body);
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        let json = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("answer is not JSON ({e}): {text}"));
        (status, json)
    }

    pub async fn post_json(&self, body: &serde_json::Value) -> (u16, serde_json::Value) {
        self.post(Some("application/json"), body.to_string()).await
    }

    /// `method path` with a JSON `body`, as `actor`; a body that is not JSON
    /// comes back as a string.
    pub async fn send_as(
        &self,
        actor: &str,
        method: &str,
        path: &str,
        body: impl std::fmt::Display,
    ) -> (u16, serde_json::Value) {
        let url = format!("{}{path}", self.base);
        let req = match method {
            "PUT" => self.client.put(url),
            "POST" => self.client.post(url),
            "DELETE" => self.client.delete(url),
            _ => self.client.get(url),
        };
        let resp = req
            .header("content-type", "application/json")
            .header("x-tally-actor", actor)
            .body(body.to_string())
            .send()
            .await
            .expect("request");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
        )
    }

    /// Waits until every projection has folded the log and no restatement
    /// is queued.
    pub async fn settled(&self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
        loop {
            let (status, body) = self.get("/v1/projections").await;
            assert_eq!(status, 200, "{body}");
            let list = body["projections"].as_array().expect("projections");
            if !list.is_empty()
                && list
                    .iter()
                    .all(|p| p["lag_events"] == 0 && p["restating"] == 0 && !p["as_of"].is_null())
            {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "not settled: {body}");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let resp = self
            .client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .expect("request");
        let status = resp.status().as_u16();
        (status, resp.json().await.expect("json"))
    }
}

/// A minimal valid wire event.
pub fn wire(id: &str) -> serde_json::Value {
    serde_json::json!({"id": id, "ts": now_rfc3339(), "api": "openai"})
}

pub fn now_rfc3339() -> String {
    Utc::now().to_rfc3339()
}

/// A full event (every field set) for round-trip tests.
pub fn full_event(id: &str, ts: DateTime<Utc>) -> Event {
    use chrono::SubsecRound;
    Event {
        id: id.to_string(),
        ts: ts.trunc_subsecs(6),
        api: "openai".into(),
        endpoint: Some("/v1/chat/completions".into()),
        method: Some("POST".into()),
        key: Some("key_01".into()),
        user: Some("ユーザー-😀".into()),
        model: Some("gpt-4o".into()),
        status: Some(429),
        success: false,
        error_type: Some(tally::event::ErrorType::RateLimit),
        error_message: Some("slow down\nplease".into()),
        latency_ms: Some(123.456),
        request_bytes: Some(1024),
        response_bytes: Some(0),
        tokens_in: Some(1500),
        tokens_out: Some(0),
        cost_nanos: Some(2_300_000),
        cached: true,
        metadata: [
            ("region".to_string(), "eu-west-1".to_string()),
            ("تجربة".to_string(), "✓".to_string()),
        ]
        .into_iter()
        .collect(),
    }
}

/// Generates `#[tokio::test]`s running one async test function on both backends.
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    let s = crate::support::store(tally::store::Backend::Postgres).await;
                    super::$name(&s).await;
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    let s = crate::support::store(tally::store::Backend::Sqlite).await;
                    super::$name(&s).await;
                }
            }
        )*
    };
}
pub(crate) use both_backends;

/// A pool on a SQLite database as an operator's `sqlite3` would open it:
/// the main file, with the aggregates file beside it attached (read-write)
/// as `agg`, so a name resolves to whichever file holds the table.
pub async fn sqlite_pool(url: &str) -> sqlx::SqlitePool {
    use std::str::FromStr;
    let opts = sqlx::sqlite::SqliteConnectOptions::from_str(url).expect("sqlite url");
    let aggregates = tally::store::sqlite::aggregates_path(opts.get_filename());
    let attach = format!(
        "ATTACH DATABASE '{}' AS agg",
        aggregates.display().to_string().replace('\'', "''")
    );
    sqlx::sqlite::SqlitePoolOptions::new()
        .after_connect(move |conn, _| {
            let attach = attach.clone();
            Box::pin(async move {
                sqlx::query(&attach).execute(conn).await?;
                Ok(())
            })
        })
        .connect_with(opts)
        .await
        .expect("sqlite")
}
