//! Authorization tokens: minting from the OS CSPRNG, parsing what callers send, hashing for storage.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

/// Prefix of every token, so a leaked token is recognisable by secret scanners.
pub const TOKEN_PREFIX: &str = "iamb_";
/// Bytes of randomness in a token.
const TOKEN_BYTES: usize = 32;
/// Length of the unpadded base64url encoding of [`TOKEN_BYTES`].
const TOKEN_BODY_LEN: usize = 43;

/// A bearer token that lets a pod fetch credentials for one role.
///
/// The value is only ever shown once (when minted) and never logged: `Debug` and `Display` are
/// redacted. Only its [`TokenHash`] is stored.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

/// Why a caller-supplied value is not a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// No `Authorization` header, or an empty one.
    #[error("no Authorization header was sent")]
    Missing,
    /// Something was sent, but it is not an iam-broker token.
    #[error("the Authorization header does not hold an iam-broker token")]
    Malformed,
    /// The operating system's random number generator failed.
    #[error("the operating system's random number generator failed: {0}")]
    Entropy(String),
}

impl Token {
    /// Mints a new token: `iamb_` plus 43 characters of unpadded base64url over 32 bytes from the
    /// OS CSPRNG.
    pub fn mint() -> Result<Self, TokenError> {
        let mut bytes = [0u8; TOKEN_BYTES];
        getrandom::fill(&mut bytes).map_err(|e| TokenError::Entropy(e.to_string()))?;
        Ok(Self(format!(
            "{TOKEN_PREFIX}{}",
            URL_SAFE_NO_PAD.encode(bytes)
        )))
    }

    /// Parses a token in its canonical form (as minted).
    pub fn parse(value: &str) -> Result<Self, TokenError> {
        let body = value
            .strip_prefix(TOKEN_PREFIX)
            .ok_or(TokenError::Malformed)?;
        let well_formed = body.len() == TOKEN_BODY_LEN
            && body
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && URL_SAFE_NO_PAD
                .decode(body)
                .is_ok_and(|bytes| bytes.len() == TOKEN_BYTES);
        if well_formed {
            Ok(Self(value.to_owned()))
        } else {
            Err(TokenError::Malformed)
        }
    }

    /// Reads the token from an `Authorization` header value: raw (as the AWS SDKs send
    /// `AWS_CONTAINER_AUTHORIZATION_TOKEN`) or as `Bearer <token>`.
    pub fn from_authorization(header: Option<&str>) -> Result<Self, TokenError> {
        match bearer(header) {
            Some(value) => Self::parse(value),
            None => Err(TokenError::Missing),
        }
    }

    /// The secret value, for the one place that must hand it out (a Secret, a CLI's output).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The SHA-256 of the token, the only form that is stored.
    pub fn hash(&self) -> TokenHash {
        TokenHash(hex::encode(Sha256::digest(self.0.as_bytes())))
    }
}

/// The credential of an `Authorization` header value: the value itself (as the AWS SDKs send
/// `AWS_CONTAINER_AUTHORIZATION_TOKEN`) or what follows `Bearer ` (any case), trimmed; `None`
/// when nothing is left.
pub fn bearer(header: Option<&str>) -> Option<&str> {
    let value = header?.trim();
    let value = match value.split_once(' ') {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim(),
        _ if value.eq_ignore_ascii_case("bearer") => "",
        _ => value,
    };
    (!value.is_empty()).then_some(value)
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// Lowercase hex SHA-256 of a token: the `token_hash` key of the Authorizations table.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TokenHash(String);

impl TokenHash {
    /// Accepts a stored hash: 64 lowercase hex characters.
    pub fn parse(value: &str) -> Option<Self> {
        (value.len() == 64
            && value
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .then(|| Self(value.to_owned()))
    }

    /// The hex string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A short, non-secret prefix for logs, so an operator can correlate a request with a record.
    pub fn short(&self) -> &str {
        &self.0[..12]
    }
}

impl fmt::Display for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_tokens_have_the_documented_shape_and_differ() {
        let a = Token::mint().unwrap();
        let b = Token::mint().unwrap();
        assert!(a.expose().starts_with("iamb_"));
        assert_eq!(a.expose().len(), 5 + 43);
        assert_ne!(a, b);
        assert_eq!(Token::parse(a.expose()).unwrap(), a);
    }

    #[test]
    fn hash_is_lowercase_hex_sha256() {
        // The FIPS 180-2 test vector for "abc".
        let token = Token(String::from("abc"));
        assert_eq!(
            token.hash().as_str(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(TokenHash::parse(token.hash().as_str()).is_some());
        assert!(TokenHash::parse("BA7816BF").is_none());
    }

    #[test]
    fn authorization_header_forms() {
        let token = Token::mint().unwrap();
        let raw = token.expose().to_owned();
        assert_eq!(Token::from_authorization(Some(&raw)).unwrap(), token);
        assert_eq!(
            Token::from_authorization(Some(&format!("Bearer {raw}"))).unwrap(),
            token
        );
        assert_eq!(
            Token::from_authorization(Some(&format!("bearer  {raw} "))).unwrap(),
            token
        );
        assert_eq!(Token::from_authorization(None), Err(TokenError::Missing));
        assert_eq!(
            Token::from_authorization(Some("  ")),
            Err(TokenError::Missing)
        );
        assert_eq!(
            Token::from_authorization(Some("Bearer ")),
            Err(TokenError::Missing)
        );
        assert_eq!(
            Token::from_authorization(Some("hello")),
            Err(TokenError::Malformed)
        );
        assert_eq!(
            Token::from_authorization(Some(&format!("{raw}x"))),
            Err(TokenError::Malformed)
        );
        let bad_char = format!("iamb_{}", "!".repeat(43));
        assert_eq!(
            Token::from_authorization(Some(&bad_char)),
            Err(TokenError::Malformed)
        );
    }

    #[test]
    fn debug_never_shows_the_value() {
        let token = Token::mint().unwrap();
        assert!(!format!("{token:?}").contains(&token.expose()[5..]));
    }
}
