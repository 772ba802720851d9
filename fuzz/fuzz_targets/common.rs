//! Shared by the body decoder targets: decode, validate every item, and check
//! the invariants a hostile body must never break.

use tally::event::codec::{decode_body, Encoding};
use tally::event::{validate, ValidationRules};

/// Decodes `data` as `encoding` (and sniffs it under generic content types),
/// validates each item and checks that reasons stay bounded and NUL-free.
pub fn body(data: &[u8], encoding: Encoding) {
    let rules = ValidationRules::now(std::time::Duration::from_secs(35 * 86_400));
    for ct in [None, Some("text/plain")] {
        let _ = Encoding::detect(ct, data);
    }
    let Ok(items) = decode_body(data, encoding, 10_000) else {
        return;
    };
    assert!(items.len() <= 10_000);
    for item in items {
        let Ok(v) = item.value else { continue };
        match validate(&v, &rules) {
            Ok(e) => {
                // A valid event round-trips through the wire JSON unchanged.
                let wire = tally::event::codec::to_wire_json(&e);
                let again = validate(&wire, &rules).expect("wire JSON of a valid event validates");
                assert_eq!(again, e);
            }
            Err(err) => {
                let reason = err.to_string();
                assert!(reason.chars().count() <= 4_097, "reason too long");
                assert!(!reason.contains('\u{0}'), "NUL in a reason");
            }
        }
    }
}
