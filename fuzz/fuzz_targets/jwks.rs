//! libFuzzer entry for `iam_broker_fuzz_targets::jwks::jwks`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    iam_broker_fuzz_targets::jwks::jwks(data);
});
