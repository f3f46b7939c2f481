//! A cluster's JSON Web Key Set as the broker reads it (`KeySet::from_jwks`, called by
//! `cluster add`, the registry and the projected-token path for every key set it loads).
//!
//! The bytes pick one of two shapes:
//! - any text at all as the document;
//! - a document built from the bytes: one to four keys, each an RSA key (a modulus of 0 to 1 100
//!   bytes, mostly at the 2048- and 8192-bit bounds, with leading zero bytes, either parity; an
//!   exponent of 0 to 6 bytes, leading zeros included), a P-256 key (a point computed on the
//!   curve from the bytes, the same point with `y` changed, a coordinate at or above the field
//!   prime, coordinates of 31 or 33 bytes, or two arbitrary coordinates), or a key of a type the
//!   broker skips (`oct`, P-384, `use: enc`, another `alg`); members sometimes `null` or of the
//!   wrong type, base64url sometimes padded, non-canonical or with a foreign character.
//!
//! Properties, besides "no panic", re-checked by code independent of the kernel's (its own
//! base64url decoder, and num-bigint for the curve): every accepted RSA key has a modulus of
//! 2048 ..= 8192 bits that is odd, and an exponent of 1 to 4 bytes that is odd and at least 3
//! (leading zero bytes stripped); every accepted EC key is a point of P-256 (`x, y < p` and
//! `y² = x³ − 3x + b mod p`); the accepted keys are exactly the document's usable ones, in order,
//! with their `kid` and algorithm, and the skipped count is the rest. For a built document the
//! answer is exactly the oracle's: accepted iff every key is well formed and valid (so every
//! on-curve point with 32-byte coordinates and proper members **is** accepted) and one is
//! usable; `NoUsableKey` when none is; `BadKey` otherwise.

use arbitrary::{Result, Unstructured};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use iam_broker_kernel::jwt::{Algorithm, JwksError, KeySet};
use num_bigint::BigUint;
use serde_json::{Map, Value, json};
use std::sync::LazyLock;

/// Target.
pub fn jwks(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 4 == 0 {
        check(&String::from_utf8_lossy(rest), false);
    } else if let Ok(document) = document(&mut Unstructured::new(rest)) {
        check(&document.to_string(), true);
    }
}

/// For the smoke: the document built from `data` (as the target builds it with a mode byte
/// that is not 0 mod 4), checked, and the RSA and EC keys of it the broker accepted (both 0 when
/// it refused the document); `None` when the bytes build no document.
pub fn built_and_accepted(data: &[u8]) -> Option<(usize, usize)> {
    let document = document(&mut Unstructured::new(data)).ok()?.to_string();
    check(&document, true);
    let keys = KeySet::from_jwks(&document).map(|set| set.keys().to_vec());
    let count = |algorithm| {
        keys.as_ref().map_or(0, |keys| {
            keys.iter().filter(|k| k.algorithm == algorithm).count()
        })
    };
    Some((count(Algorithm::Rs256), count(Algorithm::Es256)))
}

/// What the oracle makes of one member of `keys`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    /// Not an object of optional strings, or an RSA / P-256 key that cannot verify safely.
    Bad(&'static str),
    /// Not for signatures, or of a type the broker does not verify.
    Skipped,
    /// A usable key.
    Usable {
        kid: Option<String>,
        algorithm: Algorithm,
    },
}

const MEMBERS: [&str; 9] = ["kty", "kid", "alg", "use", "crv", "n", "e", "x", "y"];

/// The members of a JWK, each absent or a string; `None` when one has another type. Like any
/// struct read with serde, a JWK may also be an array of its nine members in order.
fn members(jwk: &Value) -> Option<Map<String, Value>> {
    let map = match jwk {
        Value::Object(map) => map.clone(),
        Value::Array(items) if items.len() == MEMBERS.len() => MEMBERS
            .iter()
            .zip(items)
            .map(|(name, value)| ((*name).to_owned(), value.clone()))
            .collect(),
        _ => return None,
    };
    MEMBERS
        .iter()
        .all(|name| matches!(map.get(*name), None | Some(Value::Null | Value::String(_))))
        .then_some(map)
}

fn verdict(jwk: &Value) -> Verdict {
    let Some(map) = members(jwk) else {
        return Verdict::Bad("a member is not a string");
    };
    let text = |name: &str| map.get(name).and_then(Value::as_str);
    if text("use").is_some_and(|u| u != "sig") {
        return Verdict::Skipped;
    }
    let bytes = |name: &str| text(name).and_then(base64url);
    let kid = text("kid").map(str::to_owned);
    match (text("kty"), text("alg")) {
        (Some("RSA"), None | Some("RS256")) => match (bytes("n"), bytes("e")) {
            (Some(n), Some(e)) if rsa_ok(&n, &e) => Verdict::Usable {
                kid,
                algorithm: Algorithm::Rs256,
            },
            (Some(_), Some(_)) => Verdict::Bad("an RSA key out of bounds"),
            _ => Verdict::Bad("n or e missing or not base64url"),
        },
        (Some("EC"), None | Some("ES256")) if text("crv") == Some("P-256") => {
            match (bytes("x"), bytes("y")) {
                (Some(x), Some(y)) if x.len() == 32 && y.len() == 32 && on_p256(&x, &y) => {
                    Verdict::Usable {
                        kid,
                        algorithm: Algorithm::Es256,
                    }
                }
                (Some(_), Some(_)) => Verdict::Bad("not a P-256 point"),
                _ => Verdict::Bad("x or y missing or not base64url"),
            }
        }
        _ => Verdict::Skipped,
    }
}

/// The keys of a document: the `keys` array of an object, or serde's array form of the
/// document struct (`[keys]`).
fn keys_of(document: &Value) -> Option<&Vec<Value>> {
    match document {
        Value::Object(map) => map.get("keys")?.as_array(),
        Value::Array(items) => match items.as_slice() {
            [keys] => keys.as_array(),
            _ => None,
        },
        _ => None,
    }
}

fn check(text: &str, built: bool) {
    let result = KeySet::from_jwks(text);
    let document: Option<Value> = serde_json::from_str(text).ok();
    let verdicts: Option<Vec<Verdict>> = keys_of(document.as_ref().unwrap_or(&Value::Null))
        .map(|keys| keys.iter().map(verdict).collect());
    if let Ok(set) = &result {
        let verdicts = verdicts
            .as_ref()
            .unwrap_or_else(|| panic!("accepted a document without a keys array: {text}"));
        let mut usable = Vec::new();
        for (index, verdict) in verdicts.iter().enumerate() {
            match verdict {
                Verdict::Bad(why) => {
                    panic!("accepted a document whose key #{index} is bad ({why}): {text}")
                }
                Verdict::Skipped => {}
                Verdict::Usable { kid, algorithm } => usable.push((kid.as_deref(), *algorithm)),
            }
        }
        let accepted: Vec<_> = set
            .keys()
            .iter()
            .map(|key| (key.kid.as_deref(), key.algorithm))
            .collect();
        assert_eq!(
            accepted, usable,
            "the accepted keys are not the usable ones: {text}"
        );
        assert_eq!(
            set.skipped(),
            verdicts.len() - usable.len(),
            "skipped count: {text}"
        );
    }
    if built {
        let verdicts =
            verdicts.unwrap_or_else(|| panic!("a built document without a keys array: {text}"));
        let expected = if verdicts.iter().any(|v| matches!(v, Verdict::Bad(_))) {
            "BadKey"
        } else if verdicts.iter().all(|v| *v == Verdict::Skipped) {
            "NoUsableKey"
        } else {
            "accepted"
        };
        let answer = match &result {
            Ok(_) => "accepted",
            Err(JwksError::BadKey { .. }) => "BadKey",
            Err(JwksError::NoUsableKey) => "NoUsableKey",
            Err(JwksError::NotAJwks(_)) => "NotAJwks",
        };
        assert_eq!(answer, expected, "{result:?} for {verdicts:?}: {text}");
    }
}

/// RFC 4648 §5 base64url without padding (trailing `=` tolerated, as the broker documents),
/// canonical: the unused bits of the last character must be zero.
fn base64url(text: &str) -> Option<Vec<u8>> {
    let text = text.trim_end_matches('=');
    let mut sextets = Vec::with_capacity(text.len());
    for c in text.bytes() {
        sextets.push(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        });
    }
    let mut out = Vec::with_capacity(sextets.len() * 3 / 4);
    for chunk in sextets.chunks(4) {
        let word = chunk
            .iter()
            .enumerate()
            .fold(0u32, |w, (i, s)| w | u32::from(*s) << (18 - 6 * i));
        let [_, a, b, c] = word.to_be_bytes();
        match chunk.len() {
            4 => out.extend_from_slice(&[a, b, c]),
            3 if c == 0 => out.extend_from_slice(&[a, b]),
            2 if b == 0 && c == 0 => out.push(a),
            _ => return None,
        }
    }
    Some(out)
}

fn strip(bytes: &[u8]) -> &[u8] {
    let zeros = bytes.iter().take_while(|b| **b == 0).count();
    &bytes[zeros..]
}

/// The documented RSA bounds: modulus 2048 ..= 8192 bits and odd; exponent 1 to 4 bytes, odd,
/// at least 3; both without their leading zero bytes.
fn rsa_ok(n: &[u8], e: &[u8]) -> bool {
    let n = BigUint::from_bytes_be(n);
    let (n_bytes, e_bytes) = (n.to_bytes_be(), strip(e).len());
    let exponent = BigUint::from_bytes_be(e);
    (2048..=8192).contains(&n.bits())
        && n_bytes.last().is_some_and(|b| b % 2 == 1)
        && (1..=4).contains(&e_bytes)
        && exponent >= BigUint::from(3u8)
        && exponent.bit(0)
}

/// P-256's field prime `p = 2^256 - 2^224 + 2^192 + 2^96 - 1` and the curve's `b`.
static CURVE: LazyLock<(BigUint, BigUint)> = LazyLock::new(|| {
    let one = BigUint::from(1u8);
    let p = (&one << 256u32) - (&one << 224u32) + (&one << 192u32) + (&one << 96u32) - &one;
    let b = BigUint::parse_bytes(
        b"5ac635d8aa3a93e7b3ebbd55769886bc651d06b0cc53b0f63bce3c3e27d2604b",
        16,
    )
    .unwrap_or_default();
    (p, b)
});

/// `x³ − 3x + b mod p`.
fn curve_rhs(x: &BigUint) -> BigUint {
    let (p, b) = &*CURVE;
    (x * x * x + (p - 3u8) * x + b) % p
}

/// Whether `(x, y)` is a point of P-256: both below `p`, and `y² = x³ − 3x + b mod p`.
fn on_p256(x: &[u8], y: &[u8]) -> bool {
    let p = &CURVE.0;
    let (x, y) = (BigUint::from_bytes_be(x), BigUint::from_bytes_be(y));
    x < *p && y < *p && (&y * &y) % p == curve_rhs(&x)
}

/// A `y` with `(x, y)` on the curve, when `x³ − 3x + b` is a square mod `p` (p ≡ 3 mod 4, so
/// the root is a power).
fn y_for(x: &BigUint) -> Option<BigUint> {
    let p = &CURVE.0;
    let rhs = curve_rhs(x);
    let root = rhs.modpow(&((p + 1u8) >> 2u32), p);
    ((&root * &root) % p == rhs).then_some(root)
}

/// `value` as exactly 32 big-endian bytes (it is below 2^256).
fn be32(value: &BigUint) -> Vec<u8> {
    let bytes = value.to_bytes_be();
    let mut out = vec![0; 32usize.saturating_sub(bytes.len())];
    out.extend_from_slice(&bytes);
    out
}

/// Base64url of `bytes`, sometimes not as the broker wants it.
fn encode(u: &mut Unstructured<'_>, bytes: &[u8]) -> Result<Value> {
    let text = URL_SAFE_NO_PAD.encode(bytes);
    Ok(match u.int_in_range(0..=31u8)? {
        0 => Value::String(format!("{text}==")),
        1 => Value::String(format!("{text}+")),
        2 if !text.is_empty() => {
            // A last character with (possibly) non-zero unused bits.
            let mut t = text.into_bytes();
            let last = t.len() - 1;
            t[last] = *u.choose(b"ABCDQRSTghijwxyz0123_-")?;
            Value::String(String::from_utf8_lossy(&t).into_owned())
        }
        3 => Value::String(format!("={text}")),
        4 => Value::Null,
        5 => json!(bytes.len()),
        _ => Value::String(text),
    })
}

/// A member that is usually right, sometimes another string, `null`, a number or missing.
fn member(
    u: &mut Unstructured<'_>,
    map: &mut Map<String, Value>,
    name: &str,
    usual: Option<&str>,
    others: &[&str],
) -> Result<()> {
    let value = match u.int_in_range(0..=23u8)? {
        0 => Some(Value::Null),
        1 => Some(json!(7)),
        2 => None,
        3 | 4 => Some(Value::String((*u.choose(others)?).to_owned())),
        _ => usual.map(|v| Value::String(v.to_owned())),
    };
    if let Some(value) = value {
        map.insert(name.to_owned(), value);
    }
    Ok(())
}

/// Bytes of `len`, made from a few of the input's: `top` first, `last` last, `fill` between.
fn filled(len: usize, top: u8, fill: u8, last: u8) -> Vec<u8> {
    let mut bytes = vec![fill; len];
    if let Some(first) = bytes.first_mut() {
        *first = top;
    }
    if len > 1 {
        bytes[len - 1] = last;
    }
    bytes
}

fn rsa_key(u: &mut Unstructured<'_>, map: &mut Map<String, Value>) -> Result<()> {
    member(u, map, "kty", Some("RSA"), &["EC", "oct", "rsa"])?;
    member(
        u,
        map,
        "alg",
        Some("RS256"),
        &["RS512", "ES256", "PS256", "none"],
    )?;
    let len = match u.int_in_range(0..=9u8)? {
        0 => 255,
        1 | 2 => 256,
        3 => 257,
        4 => 1023,
        5 => 1024,
        6 => 1025,
        7 => u.int_in_range(0..=8usize)?,
        _ => u.int_in_range(0..=1100usize)?,
    };
    let (mut top, fill, mut last): (u8, u8, u8) = (u.arbitrary()?, u.arbitrary()?, u.arbitrary()?);
    // Mostly a full top byte and an odd modulus, so keys within the bounds are common.
    if u.ratio(3, 4)? {
        top |= 0x80;
        last |= 1;
    }
    let mut n = vec![0; u.int_in_range(0..=3usize)?];
    n.extend(filled(len, top, fill, last));
    let mut e = vec![0; u.int_in_range(0..=2usize)?];
    match u.int_in_range(0..=3u8)? {
        0 => e.extend_from_slice(&[1, 0, 1]),
        1 => e.push(3),
        _ => {
            for _ in 0..u.int_in_range(0..=6usize)? {
                e.push(u.arbitrary()?);
            }
        }
    }
    map.insert("n".to_owned(), encode(u, &n)?);
    map.insert("e".to_owned(), encode(u, &e)?);
    Ok(())
}

fn ec_key(u: &mut Unstructured<'_>, map: &mut Map<String, Value>) -> Result<()> {
    member(u, map, "kty", Some("EC"), &["RSA", "OKP", "ec"])?;
    member(u, map, "alg", Some("ES256"), &["ES384", "RS256", "ES256K"])?;
    member(
        u,
        map,
        "crv",
        Some("P-256"),
        &["P-384", "secp256k1", "p-256"],
    )?;
    let p = &CURVE.0;
    let mut seed = [0u8; 32];
    u.fill_buffer(&mut seed)?;
    let x = BigUint::from_bytes_be(&seed) % p;
    // When x has no point, a y below p that is not on the curve.
    let y = y_for(&x).unwrap_or_else(|| BigUint::from_bytes_be(&seed) % p);
    let (x, y): (Vec<u8>, Vec<u8>) = match u.int_in_range(0..=9u8)? {
        // On the curve, either root.
        0..=3 => (be32(&x), be32(&y)),
        4 => (be32(&x), be32(&((p - &y) % p))),
        // One bit of y changed.
        5 => {
            let mut y = be32(&y);
            let bit = u.int_in_range(0..=255usize)?;
            y[bit / 8] ^= 1 << (bit % 8);
            (be32(&x), y)
        }
        // A coordinate at or above p (same point mod p, when it fits in 32 bytes).
        6 => {
            let big = &x + p;
            if big.bits() <= 256 {
                (be32(&big), be32(&y))
            } else {
                (be32(&x), be32(p))
            }
        }
        // 31 or 33 bytes.
        7 => {
            let mut long = vec![0];
            long.extend(be32(&x));
            (long, be32(&y))
        }
        8 => (be32(&x), be32(&y)[1..].to_vec()),
        _ => {
            let mut other = [0u8; 32];
            u.fill_buffer(&mut other)?;
            (seed.to_vec(), other.to_vec())
        }
    };
    map.insert("x".to_owned(), encode(u, &x)?);
    map.insert("y".to_owned(), encode(u, &y)?);
    Ok(())
}

/// A JWKS built from the bytes.
fn document(u: &mut Unstructured<'_>) -> Result<Value> {
    let mut keys = Vec::new();
    for _ in 0..*u.choose(&[1u8, 1, 1, 2, 2, 3, 4])? {
        let mut map = Map::new();
        member(u, &mut map, "use", Some("sig"), &["enc", "SIG", ""])?;
        if u.ratio(3, 4)? {
            map.insert("kid".to_owned(), json!(format!("k{}", keys.len())));
        }
        match u.int_in_range(0..=7u8)? {
            0..=2 => rsa_key(u, &mut map)?,
            3..=6 => ec_key(u, &mut map)?,
            _ => {
                map.insert("kty".to_owned(), json!("oct"));
                map.insert("k".to_owned(), json!("AAAA"));
            }
        }
        keys.push(Value::Object(map));
    }
    Ok(json!({ "keys": keys }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oracle_agrees_with_known_points_and_encodings() {
        let g_x = BigUint::parse_bytes(
            b"6b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c296",
            16,
        )
        .unwrap_or_default();
        let g_y = BigUint::parse_bytes(
            b"4fe342e2fe1a7f9b8ee7eb4a7c0f9e162bce33576b315ececbb6406837bf51f5",
            16,
        )
        .unwrap_or_default();
        assert!(on_p256(&be32(&g_x), &be32(&g_y)));
        assert!(!on_p256(&be32(&g_x), &be32(&(&g_y + 1u8))));
        let y = y_for(&g_x).unwrap_or_default();
        assert!(y == g_y || y == &CURVE.0 - &g_y);
        for bytes in [&[][..], &[0xff], &[1, 2], &[1, 2, 3], &[0, 0, 0, 0xfe]] {
            assert_eq!(
                base64url(&URL_SAFE_NO_PAD.encode(bytes)).as_deref(),
                Some(bytes)
            );
        }
        assert_eq!(base64url("AQAB=="), Some(vec![1, 0, 1]));
        assert_eq!(base64url("AQAC"), Some(vec![1, 0, 2]));
        assert_eq!(base64url("_w"), Some(vec![0xff]));
        assert_eq!(base64url("_x"), None, "non-zero unused bits");
        assert_eq!(base64url("A"), None);
        assert_eq!(base64url("AQ+B"), None);
    }
}
