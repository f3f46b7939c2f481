//! What the webhook derives from a token: its hash (the Authorizations key and the
//! `iam-broker.io/token-hash` annotation) and the name of the Secret that holds it. For the
//! fixture generator (`scripts/gen-admission-events.py`), so the fixtures never re-derive either.
//!
//! ```text
//! cargo run -q -p iam-broker-admission --example token-secret -- TOKEN
//! {"token_hash":"…","secret_name":"iam-broker-token-…"}
//! ```
#![forbid(unsafe_code)]

use iam_broker_admission::patch::secret_name;
use iam_broker_kernel::Token;

fn main() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let (Some(token), None) = (args.next(), args.next()) else {
        return Err("usage: token-secret TOKEN".to_owned());
    };
    let hash = Token::parse(&token)
        .map_err(|e| format!("not an iam-broker token: {e}"))?
        .hash();
    println!(
        "{}",
        serde_json::json!({
            "token_hash": hash.as_str(),
            "secret_name": secret_name(hash.as_str()),
        })
    );
    Ok(())
}
