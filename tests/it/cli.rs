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
