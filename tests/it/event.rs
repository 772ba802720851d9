//! Validation semantics that are part of the contract: defaults and derivations.

use std::time::Duration;

use chrono::{TimeZone, Utc};
use serde_json::json;
use tally::event::{validate, ErrorType, ValidationRules};

fn rules() -> ValidationRules {
    ValidationRules {
        now: Utc
            .with_ymd_and_hms(2026, 11, 24, 12, 0, 0)
            .single()
            .expect("time"),
        late_arrival_horizon: Duration::from_secs(35 * 86_400),
        max_future_skew: Duration::from_secs(300),
    }
}

fn check(extra: serde_json::Value) -> Result<tally::event::Event, String> {
    let mut v = json!({"id": "e", "ts": "2026-11-24T11:00:00Z", "api": "openai"});
    for (k, val) in extra.as_object().expect("object") {
        v[k] = val.clone();
    }
    validate(&v, &rules()).map_err(|e| e.to_string())
}

#[test]
fn success_and_error_type_are_derived_from_status() {
    let cases = [
        (json!({}), true, None),
        (json!({"status": 200}), true, None),
        (json!({"status": 399}), true, None),
        (json!({"status": 429}), false, Some(ErrorType::RateLimit)),
        (json!({"status": 408}), false, Some(ErrorType::Timeout)),
        (json!({"status": 504}), false, Some(ErrorType::Timeout)),
        (json!({"status": 500}), false, Some(ErrorType::ServerError)),
        (json!({"status": 503}), false, Some(ErrorType::ServerError)),
        (json!({"status": 404}), false, Some(ErrorType::ClientError)),
        (json!({"success": false}), false, Some(ErrorType::Other)),
        (
            json!({"status": 200, "success": false}),
            false,
            Some(ErrorType::Other),
        ),
        (json!({"status": 500, "success": true}), true, None),
        (
            json!({"status": 500, "error_type": "timeout"}),
            false,
            Some(ErrorType::Timeout),
        ),
        (
            json!({"error_type": "timeout"}),
            false,
            Some(ErrorType::Timeout),
        ),
    ];
    for (extra, success, error_type) in cases {
        let e = check(extra.clone()).unwrap_or_else(|err| panic!("{extra}: {err}"));
        assert_eq!((e.success, e.error_type), (success, error_type), "{extra}");
    }
    let err = check(json!({"success": true, "error_type": "timeout"})).expect_err("contradiction");
    assert!(err.contains("only allowed on a failed call"), "{err}");
}

#[test]
fn timestamps_in_both_forms_and_the_window_edges() {
    let ms = check(json!({"ts": 1_795_003_200_123_i64})).expect("epoch ms");
    assert_eq!(ms.ts.timestamp_millis(), 1_795_003_200_123);
    let off = check(json!({"ts": "2026-11-24T16:30:00.123456789+05:30"})).expect("offset");
    assert_eq!(
        tally::event::format_ts(&off.ts),
        "2026-11-24T11:00:00.123456Z"
    );
    assert!(
        check(json!({"ts": "2026-10-20T12:00:00Z"})).is_ok(),
        "35 days minus a bit is inside"
    );
    assert!(
        check(json!({"ts": "2026-10-20T11:59:59Z"})).is_err(),
        "older than 35 days"
    );
    assert!(
        check(json!({"ts": "2026-11-24T12:05:00Z"})).is_ok(),
        "5 minutes ahead is inside"
    );
    assert!(check(json!({"ts": "2026-11-24T12:05:01Z"})).is_err());
}

#[test]
fn defaults_and_absent_values() {
    let e = check(json!({"key": null, "endpoint": "", "cost": "12.5", "latency_ms": 0.25}))
        .expect("valid");
    assert_eq!(e.key, None, "null is absent");
    assert_eq!(e.endpoint, None, "empty optional string is absent");
    assert!(!e.cached);
    assert_eq!(e.cost_nanos, Some(12_500_000_000));
    assert_eq!(e.latency_ms, Some(0.25));
    assert!(e.metadata.is_empty());
}

#[test]
fn every_problem_is_reported_at_once() {
    let err = check(json!({"status": 700, "cost": "-1", "latencyMs": 3})).expect_err("invalid");
    for part in ["`status`", "`cost`", "`latencyMs`"] {
        assert!(err.contains(part), "{err} lacks {part}");
    }
}

#[test]
fn non_objects_are_rejected_with_their_type() {
    for (v, word) in [
        (json!([1]), "array"),
        (json!("s"), "string"),
        (json!(null), "null"),
    ] {
        let err = validate(&v, &rules())
            .expect_err("not an object")
            .to_string();
        assert!(err.contains(word), "{err}");
    }
}

/// Found by `cargo fuzz run msgpack`: a MessagePack body whose items are long
/// strings holding NUL produced reasons with a raw NUL (the long-string branch
/// of `describe` did not escape). Every reason of every regression input is
/// NUL-free and bounded.
#[test]
fn fuzz_regressions_give_bounded_nul_free_reasons() {
    use tally::event::codec::{decode_body, Encoding};
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fuzz/regressions");
    let mut inputs = 0;
    for entry in std::fs::read_dir(dir).expect("regressions dir") {
        let path = entry.expect("entry").path();
        let data = std::fs::read(&path).expect("read");
        inputs += 1;
        for enc in [
            Encoding::MsgPack,
            Encoding::Json,
            Encoding::Ndjson,
            Encoding::CloudEventsBatch,
        ] {
            let Ok(items) = decode_body(&data, enc, 10_000) else {
                continue;
            };
            for item in items {
                let reason = match item.value {
                    Err(e) => e.to_string(),
                    Ok(v) => match v.validate(&rules()) {
                        Ok(_) => continue,
                        Err(e) => e.to_string(),
                    },
                };
                assert!(
                    !reason.contains('\u{0}'),
                    "{}: NUL in {reason:?}",
                    path.display()
                );
                assert!(
                    reason.chars().count() <= 4_097,
                    "{}: long reason",
                    path.display()
                );
            }
        }
    }
    assert!(inputs > 0, "no regression inputs found");
}
