#![no_main]
//! Fuzzes alert rule and quota parsing and validation (JSON and TOML files)
//! against the shipped projection specs.

use std::sync::{Arc, OnceLock};

use tally::alert::quota::QuotaSpec;
use tally::alert::rule::{RuleFile, RuleSpec};
use tally::aggregate::spec::{SpecSource, Spec};

fn specs() -> &'static [Arc<Spec>] {
    static SPECS: OnceLock<Vec<Arc<Spec>>> = OnceLock::new();
    SPECS.get_or_init(|| {
        SpecSource::Builtin
            .load()
            .expect("built-in specs")
            .into_iter()
            .map(Arc::new)
            .collect()
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(spec) = RuleSpec::from_json(data) {
        let _ = spec.validate("uid", specs());
    }
    if let Ok(q) = QuotaSpec::from_json(data) {
        if let Ok(q) = q.validate("key", specs()) {
            let _ = q.rule("uid", specs());
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(file) = toml::from_str::<RuleFile>(text) {
            for r in &file.rule {
                let _ = r.validate("", specs());
            }
        }
    }
});
