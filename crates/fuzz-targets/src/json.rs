//! Structured JSON from fuzzer bytes: values of every type, keys and strings mostly drawn from a
//! vocabulary, so a fuzzer reaches the shapes a decoder cares about instead of spending its time
//! on JSON syntax.

use arbitrary::{Result, Unstructured};
use serde_json::{Map, Value};

/// Any JSON value, at most `depth` levels deep, with keys and strings from `words` (or arbitrary).
pub fn any(u: &mut Unstructured<'_>, words: &[&str], depth: u8) -> Result<Value> {
    let kinds = if depth == 0 { 4 } else { 6 };
    Ok(match u.choose_index(kinds)? {
        0 => Value::Null,
        1 => Value::Bool(u.arbitrary()?),
        2 => number(u)?,
        3 => Value::String(string(u, words)?),
        4 => Value::Array(list(u, |u| any(u, words, depth - 1))?),
        _ => {
            let mut map = Map::new();
            for _ in 0..u.int_in_range(0..=3u8)? {
                map.insert(string(u, words)?, any(u, words, depth - 1)?);
            }
            Value::Object(map)
        }
    })
}

/// A number: small, large, negative or fractional.
pub fn number(u: &mut Unstructured<'_>) -> Result<Value> {
    Ok(match u.choose_index(3)? {
        0 => Value::from(u.int_in_range(0..=5u8)?),
        1 => Value::from(u.arbitrary::<i64>()?),
        _ => serde_json::Number::from_f64(u.arbitrary::<f64>()?).map_or(Value::Null, Value::Number),
    })
}

/// A string: mostly one of `words`, else arbitrary.
pub fn string(u: &mut Unstructured<'_>, words: &[&str]) -> Result<String> {
    if !words.is_empty() && u.ratio(7u8, 8u8)? {
        Ok((*u.choose(words)?).to_owned())
    } else {
        u.arbitrary()
    }
}

/// Up to four items.
pub fn list(
    u: &mut Unstructured<'_>,
    mut item: impl FnMut(&mut Unstructured<'_>) -> Result<Value>,
) -> Result<Vec<Value>> {
    let mut items = Vec::new();
    for _ in 0..u.int_in_range(0..=4u8)? {
        items.push(item(u)?);
    }
    Ok(items)
}

/// Usually the `expected` shape; when `noisy`, sometimes absent (`None`), `null` or any other
/// value: the wrong types a forged object may carry at that place.
pub fn shaped(
    u: &mut Unstructured<'_>,
    words: &[&str],
    noisy: bool,
    expected: impl FnOnce(&mut Unstructured<'_>) -> Result<Value>,
) -> Result<Option<Value>> {
    if !noisy {
        return Ok(Some(expected(u)?));
    }
    // Exhausted input reads as 0: the expected shape, so short inputs still make sense.
    Ok(match u.int_in_range(0..=31u8)? {
        28 | 29 => None,
        30 => Some(Value::Null),
        31 => Some(any(u, words, 1)?),
        _ => Some(expected(u)?),
    })
}

/// Inserts `value` under `key` unless it is absent.
pub fn put(map: &mut Map<String, Value>, key: &str, value: Option<Value>) {
    if let Some(value) = value {
        map.insert(key.to_owned(), value);
    }
}
