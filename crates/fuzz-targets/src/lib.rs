//! Fuzz targets of iam-broker, as plain functions over bytes.
//!
//! Each target takes whatever bytes a fuzzer hands it, drives one input-facing part of the system
//! with them, and panics when a property fails (so libFuzzer records a crash and the smoke tests
//! fail). The same functions are called from two places:
//! - the cargo-fuzz project in `fuzz/` (libFuzzer, nightly only; `scripts/fuzz.sh`), one binary
//!   per target;
//! - this crate's tests (`cargo test -p iam-broker-fuzz-targets`, stable), a short smoke of every
//!   target on random and generated inputs that CI runs.
//!
//! | target | drives | checks, besides "no panic" |
//! |---|---|---|
//! | [`admission::review`] | AdmissionReview bytes → `review::parse` → `admission::view` / `skip` → `patch` | the answer echoes the uid and apiVersion; every patch returned applies and delivers the sidecar, env, volume, annotations and label; the base64 patch decodes back |
//! | [`admission::pod`] | a structured pod (wrong types at every place the patch touches) → the same | as above |
//! | [`token::authorization`] | an `Authorization` header value → `Token::from_authorization` | parses iff it has the documented shape (an independent oracle); the hash is 64 lowercase hex; `Bearer` and raw forms agree |
//! | [`record::token_record`] | a DynamoDB `GetItem` answer → `DynamoTokenStore::record` | a well-formed item is a record or `Corrupt`, never `Unavailable`; a record re-encodes (`insert`) to an item that decodes to the same record, with equal attributes |
//! | [`record::stream_event`] | an Authorizations stream batch → `stream::removed_records` | only whole `REMOVE`s become removals, every record is counted once |
//! | [`sidecar::proxy_request`] | up to four requests (method, path, `Authorization`) to a real sidecar (`iam_broker_proxy::serve`) on loopback, in front of a stand-in broker whose answer (status, `Cache-Control`, `Retry-After`, body, `Expiration`) comes from the bytes | every answer is JSON with a `Cache-Control`; errors are `no-store`; non-`GET` is `405` with `Allow: GET`; no token is `401` without a broker call; credentials served are only ever ones the broker gave that very token, never expired, with a `max-age` that never promises past the expiry |
//! | [`jwt::projected_token`] | a token → `identity::identify` against two registered clusters of one issuer (any string; a signed token with one byte changed; claims from the bytes signed by a registered key under a header with `kid`, without `kid`, with `crit`, or with the other cluster's `kid`) | nothing unsigned is accepted; a changed token is never anyone but the original; signed claims are accepted iff an independent oracle says so (types, issuer, audience, times, `iat` and the lifetime bound, `sub`, names, pod binding), with or without `kid`, and name the cluster that signed; `crit` is always refused |
//! | [`jwks::jwks`] | a JWKS → `KeySet::from_jwks` (any text; a document of RSA, P-256 and skipped keys built from the bytes, moduli at the bit bounds, points on and off the curve) | every accepted RSA key is 2048..=8192 bits, odd, with an odd exponent ≥ 3 of ≤ 4 bytes, and every accepted EC key on P-256, re-checked independently (own base64url, num-bigint); the accepted keys are the usable ones in order; a built document is accepted iff the oracle says so |
//! | [`proxy::cache_policy`] | a sequence of broker answers, requests and failures → `policy::Policy` | nothing is served below the entry's min validity, which is the configured one or a third of a shorter lifetime, never under 60 s (so never past expiry); freshness never outlives the expiry or `max-age`; backoff stays within 1 s ..= 60 s |
#![forbid(unsafe_code)]

pub mod admission;
pub mod json;
pub mod jwks;
pub mod jwt;
pub mod proxy;
pub mod record;
pub mod sidecar;
pub mod token;
