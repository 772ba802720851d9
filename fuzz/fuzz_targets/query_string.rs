#![no_main]
//! Fuzzes the query-string parsers of `/v1/stats` and `/v1/keys`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(pairs) = serde_urlencoded::from_bytes::<Vec<(String, String)>>(data) else {
        return;
    };
    let now = chrono::Utc::now();
    let _ = tally::query::stats::StatsRequest::parse(pairs.clone(), now);
    let _ = tally::query::keys::KeysRequest::parse(pairs, now);
});
