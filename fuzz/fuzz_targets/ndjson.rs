#![no_main]
//! Fuzzes the ndjson body decoder and the validator behind it.

mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    common::body(data, tally::event::codec::Encoding::Ndjson);
});
