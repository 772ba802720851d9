//! Shared by the body decoder targets: decode, validate every item, and check
//! the invariants a hostile body must never break.

use tally::event::codec::{decode_body, Decoded, Encoding};
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
        let result = v.validate(&rules);
        if let Decoded::Fields(_) = v {
            // Read in place, the item means what it means as a JSON value.
            let value: serde_json::Value =
                serde_json::from_slice(&item.raw).expect("the fast path took invalid JSON");
            assert_eq!(result, validate(&value, &rules), "the two paths disagree");
        }
        match result {
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
