//! libFuzzer entry for `iam_broker_fuzz_targets::jwt::projected_token`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    iam_broker_fuzz_targets::jwt::projected_token(data);
});
