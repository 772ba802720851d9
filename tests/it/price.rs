//! The price catalog (issue 21): the cost rule at projection time, versioned
//! prices, repricing through restatement, the HTTP contract, the LiteLLM
//! import, and tables from before the catalog.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use tally::event::Event;
use tally::projection::Failpoints;
use tally::store::Backend;

use crate::projection::oracle::{
    append_all, assert_matches_priced_oracle, fold_all, oracle_charge, projector, seeded_events,
    shipped, wait_restated, OraclePrice,
};
use crate::support::proc::TallyProc;
use crate::support::{self, TestServer};

fn t(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s)
        .expect("valid time")
        .with_timezone(&Utc)
}

async fn send(server: &TestServer, method: &str, path: &str, body: &str) -> (u16, Value) {
    server.send_as("pricing-team", method, path, body).await
}

async fn settled(server: &TestServer) {
    server.settled().await
}

/// Nano-units of a decimal string, for the oracle's prices (written apart
/// from Tally's parser: at most 9 fractional digits, no exponent).
fn nanos(s: &str) -> i64 {
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    let frac = format!("{frac:0<9}");
    int.parse::<i64>().expect("int") * 1_000_000_000 + frac[..9].parse::<i64>().expect("frac")
}

/// The oracle's view of a `PUT /v1/prices` body.
fn oracle_prices(body: &Value) -> Vec<OraclePrice> {
    body.as_array()
        .expect("array")
        .iter()
        .map(|p| OraclePrice {
            api: p["api"].as_str().map(str::to_string),
            model: p["model"].as_str().expect("model").to_string(),
            from: t(p["effective_from"].as_str().expect("from")),
            input: nanos(p["input_per_mtok"].as_str().expect("input")),
            output: nanos(p["output_per_mtok"].as_str().expect("output")),
            cached_input: p["cached_input_per_mtok"].as_str().map(nanos),
            per_request: p["per_request"].as_str().map(nanos),
        })
        .collect()
}

async fn assert_priced(store: &tally::store::Store, events: &[Event], prices: &[OraclePrice]) {
    for spec in shipped() {
        assert_matches_priced_oracle(store, &spec, events, prices).await;
    }
}

async fn prices_match_the_oracle(backend: Backend) {
    let st = support::store(backend).await;
    let mut events = seeded_events("p", 3000, 31);
    append_all(&st.store, &events, 500).await;
    let server = TestServer::start(st.store.clone(), support::server_config()).await;
    settled(&server).await;
    // Before any price: every event without a cost is unpriced.
    assert_priced(&st.store, &events, &[]).await;

    // Several versions per model, an api-specific price, a cached price, a
    // per-request price, and an input price whose products need rounding.
    let catalog = json!([
        {"model": "m1", "effective_from": "2024-01-01T00:00:00Z",
         "input_per_mtok": "0.15", "output_per_mtok": "0.6", "cached_input_per_mtok": "0.075"},
        {"model": "m1", "api": "anthropic", "effective_from": "2026-06-01T00:00:00Z",
         "input_per_mtok": "3", "output_per_mtok": "15", "per_request": "0.001"},
        {"model": "m2", "effective_from": "2026-03-01T00:00:00Z",
         "input_per_mtok": "1.234567891", "output_per_mtok": "0.5"},
        {"model": "m2", "effective_from": "2026-11-01T00:00:00Z",
         "input_per_mtok": "2", "output_per_mtok": "1"}
    ]);
    let (status, put) = send(&server, "PUT", "/v1/prices", &catalog.to_string()).await;
    assert_eq!(status, 200, "{put}");
    assert_eq!(
        (put["created"].as_u64(), put["unchanged"].as_u64()),
        (Some(4), Some(0))
    );
    assert!(put["restatements"].as_u64() > Some(0), "{put}");
    assert_eq!(put["prices"][2]["effective_to"], "2026-11-01T00:00:00Z");
    assert_eq!(put["prices"][3]["effective_to"], Value::Null);
    let mut prices = oracle_prices(&catalog);
    settled(&server).await;
    assert_priced(&st.store, &events, &prices).await;
    // The same catalog again changes nothing and queues nothing.
    let (status, again) = send(&server, "PUT", "/v1/prices", &catalog.to_string()).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(
        (again["unchanged"].as_u64(), again["restatements"].as_u64()),
        (Some(4), Some(0))
    );

    // Change one price by id, delete another, add a past one, while more
    // events arrive for the same buckets.
    let m1_id = put["prices"][0]["id"].as_str().expect("id").to_string();
    let later_id = put["prices"][3]["id"].as_str().expect("id").to_string();
    let changed = json!({"id": m1_id, "model": "m1", "effective_from": "2024-01-01T00:00:00Z",
                         "input_per_mtok": "0.2", "output_per_mtok": "0.8"});
    let (status, upd) = send(&server, "PUT", "/v1/prices", &changed.to_string()).await;
    assert_eq!(status, 200, "{upd}");
    assert_eq!(upd["updated"], 1);
    let more = seeded_events("p2", 800, 32);
    append_all(&st.store, &more, 100).await;
    events.extend(more);
    let (status, gone) = send(&server, "DELETE", &format!("/v1/prices/{later_id}"), "").await;
    assert_eq!(status, 200, "{gone}");
    assert_eq!(gone["model"], "m2");
    let added = json!([{"model": "m3", "effective_from": "2020-01-01T00:00:00Z",
                        "input_per_mtok": "0.000001", "output_per_mtok": "0.000003"}]);
    let (status, _) = send(&server, "PUT", "/v1/prices", &added.to_string()).await;
    assert_eq!(status, 200);
    prices[0] = oracle_prices(&json!([changed]))[0].clone();
    prices.remove(3);
    prices.extend(oracle_prices(&added));
    settled(&server).await;
    assert_priced(&st.store, &events, &prices).await;

    // /v1/stats reports both measures, equal to the oracle's sums.
    let (from, to) = ("2026-11-24T00:00:00Z", "2026-11-25T00:00:00Z");
    let (status, stats) = server
        .get(&format!("/v1/stats?from={from}&to={to}&series=false"))
        .await;
    assert_eq!(status, 200, "{stats}");
    let in_range: Vec<&Event> = {
        let mut seen = std::collections::HashSet::new();
        events
            .iter()
            .filter(|e| e.ts >= t(from) && e.ts < t(to) && seen.insert(e.id.clone()))
            .collect()
    };
    let (cost, catalog_cost, unpriced) = in_range.iter().fold((0, 0, 0), |acc, e| {
        let (c, k, u) = oracle_charge(e, &prices);
        (acc.0 + c, acc.1 + k, acc.2 + u)
    });
    assert!(catalog_cost > 0 && unpriced > 0, "the range exercises both");
    let total = &stats["totals"][0];
    assert_eq!(total["cost_nanos"].as_i64(), Some(cost), "{total}");
    assert_eq!(
        total["cost_from_catalog_nanos"].as_i64(),
        Some(catalog_cost),
        "{total}"
    );
    assert_eq!(total["unpriced"].as_i64(), Some(unpriced), "{total}");

    // Every change is audited with its actor, before and after.
    let (status, audit) = server.get("/v1/prices/audit").await;
    assert_eq!(status, 200, "{audit}");
    let actions: Vec<&str> = audit["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["action"].as_str().expect("action"))
        .collect();
    assert_eq!(
        actions,
        [
            "price.create",
            "price.delete",
            "price.update",
            "price.create",
            "price.create",
            "price.create",
            "price.create"
        ]
    );
    let update = &audit["entries"][2];
    assert_eq!(update["actor"], "pricing-team");
    assert_eq!(update["before"]["input_per_mtok"], "0.15");
    assert_eq!(update["after"]["input_per_mtok"], "0.2");
    // `at` answers the price in effect then, one per (api, model).
    let (status, at) = server
        .get("/v1/prices?model=m2&at=2026-12-01T00:00:00Z")
        .await;
    assert_eq!(status, 200, "{at}");
    assert_eq!(at["prices"].as_array().map(Vec::len), Some(1), "{at}");
    assert_eq!(at["prices"][0]["input_per_mtok"], "1.234567891");
}

#[tokio::test]
async fn prices_cost_events_and_changes_restate_them_sqlite() {
    prices_match_the_oracle(Backend::Sqlite).await;
}

#[tokio::test]
async fn prices_cost_events_and_changes_restate_them_postgres() {
    prices_match_the_oracle(Backend::Postgres).await;
}

#[tokio::test]
async fn bad_prices_get_a_400_that_says_what_to_fix() {
    let st = support::store(Backend::Sqlite).await;
    let server = TestServer::start(st.store.clone(), support::server_config()).await;
    let ok = json!({"model": "m", "effective_from": "2026-01-01T00:00:00Z",
                    "input_per_mtok": "1", "output_per_mtok": "2"});
    let (status, stored) = send(&server, "PUT", "/v1/prices", &ok.to_string()).await;
    assert_eq!(status, 200, "{stored}");
    let with = |field: &str, v: Value| {
        let mut p = ok.clone();
        p[field] = v;
        p.to_string()
    };
    let cases = [
        (with("input_per_mtok", json!("-1")), "negative"),
        (
            with("output_per_mtok", json!("0.0000000001")),
            "10 fractional digits",
        ),
        (with("per_request", json!("abc")), "`per_request`"),
        (with("colour", json!("red")), "unknown field `colour`"),
        (with("effective_from", json!("yesterday")), "effective_from"),
        (with("model", json!("")), "`model` must not be empty"),
        (
            json!([ok, ok]).to_string(),
            "prices[0] and prices[1] have the same api, model and effective_from",
        ),
        (
            with("id", json!("another-id")),
            "already starts at 2026-01-01T00:00:00Z for model `m`",
        ),
        ("[]".to_string(), "no prices given"),
        ("{".to_string(), "not a price"),
    ];
    for (body, says) in cases {
        let (status, answer) = send(&server, "PUT", "/v1/prices", &body).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(answer["code"], "invalid_price", "{body}: {answer}");
        let msg = answer["error"].as_str().unwrap_or_default();
        assert!(msg.contains(says), "{body}: `{msg}` should say `{says}`");
    }
    let (status, answer) = send(&server, "DELETE", "/v1/prices/no-such-price", "").await;
    assert_eq!(status, 404, "{answer}");
    let (status, answer) = server.get("/v1/prices?at=soon").await;
    assert_eq!(status, 400, "{answer}");
    let (status, answer) = server.get("/v1/prices?modle=m").await;
    assert_eq!(status, 400, "{answer}");
    // Nothing was written by the refused requests.
    let (_, list) = server.get("/v1/prices").await;
    assert_eq!(list["prices"].as_array().map(Vec::len), Some(1), "{list}");
    let (_, audit) = server.get("/v1/prices/audit").await;
    assert_eq!(
        audit["entries"].as_array().map(Vec::len),
        Some(1),
        "{audit}"
    );
}

fn tally(db: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["--database-url", db])
        .args(args)
        .env("TALLY_LOG", "warn")
        .output()
        .expect("run tally");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn litellm_prices_import_exactly_from_the_cli() {
    let dir = tempfile::tempdir().expect("dir");
    let db = format!("sqlite://{}", dir.path().join("t.db").display());
    let file = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/litellm_prices_excerpt.json"
    );
    let (ok, _, err) = tally(&db, &["prices", "import", file, "--format", "litellm"]);
    assert!(!ok && err.contains("--effective-from is required"), "{err}");
    let import = [
        "prices",
        "import",
        file,
        "--format",
        "litellm",
        "--effective-from",
        "2026-01-01T00:00:00Z",
    ];
    let (ok, out, err) = tally(&db, &import);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("5 converted, 2 skipped without token prices, 0 skipped"),
        "{out}"
    );
    assert!(
        out.contains("prices: 5 created, 0 updated, 0 unchanged"),
        "{out}"
    );
    let (ok, out, err) = tally(&db, &import);
    assert!(ok, "{err}");
    assert!(out.contains("0 created, 0 updated, 5 unchanged"), "{out}");
    let (ok, out, err) = tally(&db, &["prices", "list", "--json"]);
    assert!(ok, "{err}");
    let list: Value = serde_json::from_str(&out).expect("json");
    let find = |m: &str| {
        list["prices"]
            .as_array()
            .expect("prices")
            .iter()
            .find(|p| p["model"] == m)
            .unwrap_or_else(|| panic!("{m} imported: {list}"))
            .clone()
    };
    let mini = find("gpt-4o-mini");
    assert_eq!(
        (
            &mini["input_per_mtok"],
            &mini["output_per_mtok"],
            &mini["cached_input_per_mtok"]
        ),
        (&json!("0.15"), &json!("0.6"), &json!("0.075"))
    );
    let claude = find("claude-3-5-sonnet-20241022");
    assert_eq!(
        (
            &claude["input_per_mtok"],
            &claude["output_per_mtok"],
            &claude["cached_input_per_mtok"]
        ),
        (&json!("3"), &json!("15"), &json!("0.3"))
    );
    assert_eq!(find("text-embedding-3-small")["input_per_mtok"], "0.02");
    assert_eq!(find("gemini/gemini-1.5-flash")["input_per_mtok"], "0.075");
    let (ok, table, _) = tally(&db, &["prices", "list", "--model", "gpt-4o"]);
    assert!(
        ok && table.contains("gpt-4o ") && !table.contains("gpt-4o-mini"),
        "{table}"
    );
}

/// Tables created before the catalog lack its two columns: opening them adds
/// the columns and restates every bucket, so `unpriced` counts the past too.
async fn old_tables_are_upgraded(backend: Backend) {
    let st = support::store(backend).await;
    let events = seeded_events("u", 1500, 41);
    append_all(&st.store, &events, 500).await;
    let specs = shipped();
    for spec in &specs {
        let mut p = projector(&st.store, spec).await;
        fold_all(&mut p, &st.store, 1000).await;
    }
    // Make the tables look like an older Tally's.
    let mut drops = Vec::new();
    for spec in &specs {
        for &g in &spec.granularities {
            for c in ["cost_from_catalog_nanos", "unpriced"] {
                drops.push(format!("ALTER TABLE {} DROP COLUMN {c}", spec.table(g)));
            }
        }
    }
    match backend {
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(&st.url).await.expect("pg");
            for d in &drops {
                sqlx::query(d).execute(&pool).await.expect("drop column");
            }
        }
        Backend::Sqlite => {
            let pool = crate::support::sqlite_pool(&st.url).await;
            for d in &drops {
                sqlx::query(d).execute(&pool).await.expect("drop column");
            }
        }
    }
    let arcs: Vec<Arc<tally::aggregate::Spec>> = specs.iter().cloned().map(Arc::new).collect();
    for spec in &specs {
        let mut p = projector(&st.store, spec).await;
        fold_all(&mut p, &st.store, 1000).await;
    }
    let mut restated = 0;
    while tally::projection::restate::step(&st.store, &arcs, None, Failpoints::default())
        .await
        .expect("restate")
    {
        restated += 1;
    }
    assert!(
        restated >= specs.len(),
        "every projection restated ({restated})"
    );
    assert_priced(&st.store, &events, &[]).await;
}

#[tokio::test]
async fn tables_from_before_the_catalog_are_upgraded_sqlite() {
    old_tables_are_upgraded(Backend::Sqlite).await;
}

#[tokio::test]
async fn tables_from_before_the_catalog_are_upgraded_postgres() {
    old_tables_are_upgraded(Backend::Postgres).await;
}

/// Columns of `table` in the aggregates file.
async fn columns(pool: &sqlx::SqlitePool, table: &str) -> Vec<String> {
    sqlx::query_scalar("SELECT name FROM pragma_table_info($1, 'agg')")
        .bind(table)
        .fetch_all(pool)
        .await
        .expect("columns")
}

/// `kill -9` on SQLite while opening tables from before the catalog, after
/// their restatement is queued (main file) and before the columns are added
/// (aggregates file): the restart finds the columns still missing, adds
/// them, restates, and every table equals the oracle. Queueing after adding
/// the columns would lose the restatement here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_while_upgrading_old_tables_still_restates_them_sqlite() {
    let (url, _dir) = support::database(Backend::Sqlite, "upgrade_crash");
    let store = support::open(&url).await;
    let events = seeded_events("uc", 1500, 43);
    append_all(&store, &events, 500).await;
    let specs = shipped();
    for spec in &specs {
        let mut p = projector(&store, spec).await;
        fold_all(&mut p, &store, 1000).await;
    }
    let pool = crate::support::sqlite_pool(&url).await;
    let tables: Vec<String> = specs
        .iter()
        .flat_map(|s| s.granularities.iter().map(|&g| s.table(g)))
        .collect();
    for t in &tables {
        for c in ["cost_from_catalog_nanos", "unpriced"] {
            sqlx::query(&format!("ALTER TABLE {t} DROP COLUMN {c}"))
                .execute(&pool)
                .await
                .expect("drop column");
        }
    }
    let mut tally = TallyProc::prepared_http(
        &url,
        &[
            ("TALLY_FAILPOINTS", "store.upgrade_queued=1"),
            ("TALLY_LATE_ARRIVAL_HORIZON", "3650d"),
            ("TALLY_RETENTION_REJECTED", "forever"),
            ("TALLY_PROJECTOR_POLL", "20ms"),
        ],
    );
    tally.launch();
    let deadline = Instant::now() + Duration::from_secs(30);
    while tally.running() {
        assert!(Instant::now() < deadline, "the failpoint did not fire");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        tally.log_text().contains("failpoint store.upgrade_queued"),
        "{}",
        tally.log_text()
    );
    assert!(
        !store
            .corrections()
            .pending(10)
            .await
            .expect("queue")
            .is_empty(),
        "the restatement is queued"
    );
    let mut missing = 0;
    for t in &tables {
        missing += usize::from(!columns(&pool, t).await.iter().any(|c| c == "unpriced"));
    }
    assert!(missing > 0, "the crash came before the columns were added");
    tally.set_env("TALLY_FAILPOINTS", "");
    tally.spawn().await;
    wait_restated(&store).await;
    tally.kill9();
    for t in &tables {
        assert!(
            columns(&pool, t).await.iter().any(|c| c == "unpriced"),
            "{t}"
        );
    }
    assert_priced(&store, &events, &[]).await;
}

#[tokio::test]
async fn corrections_from_the_cli() {
    let st = support::store(Backend::Sqlite).await;
    let events = seeded_events("cli", 200, 51);
    append_all(&st.store, &events, 100).await;
    let db = st.url.clone();
    let body = json!({"id": "cli-1", "reason": "double-sent",
                      "void": {"ids": [events[0].id, events[1].id, "nope"]}})
    .to_string();
    let (ok, out, err) = tally(&db, &["corrections", "submit", "--json", &body]);
    assert!(ok, "{err}");
    let answer: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(
        (&answer["voided"], &answer["not_found"]),
        (&json!(2), &json!(["nope"])),
        "{out}"
    );
    assert!(answer["actor"]
        .as_str()
        .unwrap_or_default()
        .starts_with("cli:"));
    let (ok, out, _) = tally(&db, &["corrections", "list"]);
    assert!(ok && out.contains("\"cli-1\""), "{out}");
    let (ok, out, err) = tally(
        &db,
        &["corrections", "revert", "cli-1", "--reason", "wrong ids"],
    );
    assert!(ok, "{err}");
    assert!(out.contains("\"revert_reason\": \"wrong ids\""), "{out}");
    let (ok, _, err) = tally(&db, &["corrections", "submit", "--json", "{\"id\": \"x\"}"]);
    assert!(!ok && err.contains("reason"), "{err}");
}
