//! libFuzzer entry for `iam_broker_fuzz_targets::record::stream_event`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    iam_broker_fuzz_targets::record::stream_event(data);
});
