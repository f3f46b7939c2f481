//! The `Authorization` header as the broker reads it (`Token::from_authorization`, called by
//! `Broker::credentials`), against an independent statement of the documented shape.

use iam_broker_kernel::token::{TOKEN_PREFIX, Token, TokenError, TokenHash};

/// The base64url alphabet.
const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Whether `value` is a token as documented: `iamb_` and 43 base64url characters (no padding)
/// that encode exactly 32 bytes, so the last character carries 4 zero bits.
pub fn documented_shape(value: &str) -> bool {
    let Some(body) = value.strip_prefix(TOKEN_PREFIX) else {
        return false;
    };
    let digits: Option<Vec<usize>> = body
        .bytes()
        .map(|b| ALPHABET.iter().position(|a| *a == b))
        .collect();
    match digits {
        Some(digits) if digits.len() == 43 => digits.last().is_some_and(|d| d % 4 == 0),
        _ => false,
    }
}

/// What the header should give: the token, raw or after `Bearer ` (any case), with surrounding
/// whitespace ignored; `Missing` when nothing (or a bare `Bearer`) was sent.
fn expected(header: &str) -> Result<&str, TokenError> {
    let value = header.trim();
    let scheme = value.get(..7).filter(|s| s.eq_ignore_ascii_case("bearer "));
    let candidate = match scheme {
        Some(_) => value.get(7..).unwrap_or_default().trim(),
        None => value,
    };
    if value.is_empty() || value.eq_ignore_ascii_case("bearer") || candidate.is_empty() {
        Err(TokenError::Missing)
    } else if documented_shape(candidate) {
        Ok(candidate)
    } else {
        Err(TokenError::Malformed)
    }
}

/// Target: header bytes (as UTF-8, the only form the router passes on).
pub fn authorization(data: &[u8]) {
    let Ok(header) = std::str::from_utf8(data) else {
        return;
    };
    let got = Token::from_authorization(Some(header));
    match (expected(header), &got) {
        (Ok(value), Ok(token)) => {
            assert_eq!(token.expose(), value);
            // The stored form: 64 lowercase hex, accepted by the table's own parser.
            let hash = token.hash();
            assert!(TokenHash::parse(hash.as_str()).is_some(), "hash {hash}");
            assert_eq!(hash.short().len(), 12);
            // Raw and Bearer forms agree; Debug never shows the secret.
            let bearer = Token::from_authorization(Some(&format!("Bearer {value}")));
            assert_eq!(bearer.as_ref(), Ok(token));
            assert!(!format!("{token:?}").contains(&value[TOKEN_PREFIX.len()..]));
        }
        (Err(want), Err(have)) => assert_eq!(want, *have, "header {header:?}"),
        (want, have) => panic!("header {header:?}: expected {want:?}, got {have:?}"),
    }
    // A stored hash is accepted iff it is 64 lowercase hex.
    let hex = header.len() == 64
        && header
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    assert_eq!(TokenHash::parse(header).is_some(), hex);
}
