//! The `tally` binary as a user runs it.

use std::process::Command;

fn tally() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tally"))
}

#[test]
fn help_documents_every_option_with_its_env_var() {
    let out = tally()
        .args(["serve", "--help"])
        .output()
        .expect("run tally");
    let help = String::from_utf8_lossy(&out.stdout);
    for var in [
        "TALLY_DATABASE_URL",
        "TALLY_HTTP_ADDR",
        "TALLY_LATE_ARRIVAL_HORIZON",
        "TALLY_LOG",
        "TALLY_LOG_FORMAT",
        "TALLY_MAX_BODY_BYTES",
        "TALLY_MAX_BATCH_EVENTS",
    ] {
        assert!(help.contains(var), "serve --help lacks {var}:\n{help}");
    }
}

/// Through a private nats-server (the main path) and with `--http-only`.
#[test]
fn demo_runs_on_sqlite_and_reports_what_happened() {
    for extra in [None, Some("--http-only")] {
        let dir = tempfile::tempdir().expect("dir");
        let db = format!("sqlite://{}", dir.path().join("demo.db").display());
        let mut args = vec![
            "--database-url",
            &db,
            "demo",
            "--http-addr",
            "127.0.0.1:0",
            "--events",
            "200",
            "--exit",
        ];
        args.extend(extra);
        let out = tally().args(&args).output().expect("run demo");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "demo {extra:?} failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            stdout.contains("Started a private nats-server"),
            extra.is_none(),
            "the demo takes the NATS path unless told otherwise:\n{stdout}"
        );
        // 200 generated + 1 valid among the broken ones; 40 resent duplicates; 1 conflict; 5 invalid.
        for line in [
            "accepted       201",
            "duplicates      40",
            "conflicts        1",
            "rejected         5",
            "bodies refused   1",
        ] {
            assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
        }
        assert!(
            stdout.contains("The event log now holds 201 events; rejected_events holds 7 payloads"),
            "{stdout}"
        );
        // What Tally is for: the last hour by api, top keys, an alert firing,
        // read back through the query API; and no library noise in the log.
        for line in [
            "The last hour by api",
            "Top keys by cost",
            "firing warning {\"api\":",
        ] {
            assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stdout.contains("Uninited") && !stderr.contains("Uninited"),
            "{stderr}"
        );
    }
}

#[test]
fn migrate_command_creates_the_tables() {
    let dir = tempfile::tempdir().expect("dir");
    let db = format!("sqlite://{}", dir.path().join("m.db").display());
    let out = tally()
        .args(["--database-url", &db, "migrate"])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = tally()
        .args(["--database-url", "mysql://x", "migrate"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unsupported database URL"));
}

/// `tally projections list` and `rebuild` on a SQLite file with events in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projections_list_and_rebuild_from_the_command_line() {
    let dir = tempfile::tempdir().expect("dir");
    let db = format!("sqlite://{}", dir.path().join("p.db").display());
    let store = tally::store::connect(&db, &Default::default())
        .await
        .expect("store");
    store.migrate().await.expect("migrate");
    let events = crate::projection::oracle::seeded_events("cli", 300, 21);
    crate::projection::oracle::append_all(&store, &events, 100).await;
    let projections = concat!(env!("CARGO_MANIFEST_DIR"), "/../../projections");
    let run = |args: &[&str]| {
        let out = tally()
            .args(["--database-url", &db, "projections"])
            .args(args)
            .args(["--projections-dir", projections])
            .output()
            .expect("run tally");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    // Before any projector ran: every shipped projection is `new`.
    let (ok, out, err) = run(&["list"]);
    assert!(ok, "{err}");
    assert!(out.contains("by_key [new]"), "{out}");

    let (ok, out, err) = run(&["rebuild", "by_key"]);
    assert!(ok, "{err}");
    assert!(out.contains("rebuilt `by_key` from 300 events"), "{out}");
    assert!(err.contains("100%"), "progress bar: {err}");

    let (ok, out, err) = run(&["list", "--json"]);
    assert!(ok, "{err}");
    let list: serde_json::Value = serde_json::from_str(&out).expect("json");
    let by_key = list
        .as_array()
        .and_then(|a| a.iter().find(|p| p["name"] == "by_key"))
        .expect("by_key listed");
    assert_eq!(by_key["status"], "ok");
    assert_eq!(by_key["lag_events"], 0);
    assert_eq!(by_key["events_folded"], 300);
    assert!(by_key["as_of"].is_string(), "{by_key}");
    let spec = crate::projection::oracle::shipped()
        .into_iter()
        .find(|s| s.name == "by_key")
        .expect("spec");
    crate::projection::oracle::assert_matches_oracle(&store, &spec, &events).await;

    let (ok, _, err) = run(&["rebuild", "no_such"]);
    assert!(!ok);
    assert!(err.contains("no projection named `no_such`"), "{err}");
}

/// `tally stats` and `tally keys` read the database directly and ask a server,
/// and both give the same answer; table, JSON and CSV output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_and_keys_from_the_command_line() {
    let dir = tempfile::tempdir().expect("dir");
    let db = format!("sqlite://{}", dir.path().join("q.db").display());
    let store = tally::store::connect(&db, &Default::default())
        .await
        .expect("store");
    store.migrate().await.expect("migrate");
    let events = crate::projection::oracle::seeded_events("cliq", 400, 5);
    crate::projection::oracle::append_all(&store, &events, 100).await;
    let projections = concat!(env!("CARGO_MANIFEST_DIR"), "/../../projections");
    let run = |args: &[&str]| {
        let out = tally()
            .args(["--database-url", &db])
            .args(args)
            .env("TALLY_PROJECTIONS_DIR", projections)
            .output()
            .expect("run tally");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    for name in ["by_api", "by_key", "alerts_minute"] {
        run(&["projections", "rebuild", name]);
    }
    let range = [
        "--from",
        "2024-01-01T00:00:00Z",
        "--to",
        "2027-02-01T00:00:00Z",
    ];
    let stats = |extra: &[&str]| {
        let mut args = vec!["stats", "--granularity", "month", "--group-by", "api"];
        args.extend_from_slice(&range);
        args.extend_from_slice(extra);
        run(&args)
    };
    let direct: serde_json::Value =
        serde_json::from_str(&stats(&["--format", "json"])).expect("json");
    let total: i64 = direct["totals"]
        .as_array()
        .expect("totals")
        .iter()
        .map(|t| t["requests"].as_i64().expect("requests"))
        .sum();
    assert_eq!(total, 400, "{direct}");
    let openai = events.iter().filter(|e| e.api == "openai").count() as i64;
    let filtered: serde_json::Value =
        serde_json::from_str(&stats(&["--format", "json", "--filter", "api=openai"]))
            .expect("json");
    assert_eq!(filtered["totals"][0]["requests"], openai);

    let csv = stats(&["--format", "csv"]);
    let mut lines = csv.lines();
    assert!(
        lines
            .next()
            .expect("header")
            .starts_with("bucket,api,requests,successes,errors"),
        "{csv}"
    );
    assert_eq!(
        lines.count(),
        direct["series"].as_array().expect("series").len()
    );
    let table = stats(&[]);
    assert!(
        table.contains("openai") && table.contains("projection by_api"),
        "{table}"
    );

    // The same question to a running server answers the same numbers.
    let mut config = crate::support::server_config();
    config.projections.projections_dir = Some(projections.into());
    let server = crate::support::TestServer::start(store.clone(), config).await;
    let remote: serde_json::Value =
        serde_json::from_str(&stats(&["--format", "json", "--server", &server.base]))
            .expect("json");
    assert_eq!(remote["series"], direct["series"]);
    assert_eq!(remote["totals"], direct["totals"]);

    // Keys: the ranking and a key page, and a bad flag is a clear error.
    let keys: serde_json::Value = serde_json::from_str(&run(&[
        "keys",
        "--from",
        "2024-01-01T00:00:00Z",
        "--to",
        "2027-02-01T00:00:00Z",
        "--order-by",
        "requests",
        "--format",
        "json",
    ]))
    .expect("json");
    let ranked: Vec<i64> = keys["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| k["requests"].as_i64().expect("requests"))
        .collect();
    assert_eq!(ranked.iter().sum::<i64>(), 400);
    assert!(ranked.windows(2).all(|w| w[0] >= w[1]), "{ranked:?}");
    let page = run(&[
        "keys",
        "k1",
        "--at",
        "2026-11-24T12:00:00Z",
        "--format",
        "csv",
    ]);
    assert!(page.lines().any(|l| l.starts_with("today,")), "{page}");
    let out = tally()
        .args(["--database-url", &db, "stats", "--group-by", "colour"])
        .env("TALLY_PROJECTIONS_DIR", projections)
        .output()
        .expect("run tally");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("`colour` is not a dimension"));
}
