//! Text for logs and messages: bounds on what user-controlled text may cost (a value echoed into
//! a log line, an admission warning or an Event is clipped, so a 100 kB annotation costs a few
//! hundred bytes, not 100 kB per admission), and an error with its causes on one line.

use std::error::Error;

/// The most bytes of one user-controlled value that are echoed (role annotations, names).
pub const MAX_ECHO: usize = 160;
/// The most bytes of one sentence built around such values (reasons, warnings, Event messages).
pub const MAX_MESSAGE: usize = 512;

/// `value` cut to at most `max` bytes on a character boundary; a cut value ends in `…` and
/// says how long it was.
pub fn clip(value: &str, max: usize) -> String {
    if value.len() <= max {
        return value.to_owned();
    }
    let mut end = max;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…({} bytes)", &value[..end], value.len())
}

/// [`clip`] in place, for a value that may be long.
pub fn clip_in_place(value: &mut String, max: usize) {
    if value.len() > max {
        *value = clip(value, max);
    }
}

/// `value` quoted as `{:?}` would, after [`clip`] to [`MAX_ECHO`].
pub fn quoted(value: &str) -> String {
    format!("{:?}", clip(value, MAX_ECHO))
}

/// `error` and its sources, outermost first.
pub fn sources<'a>(
    error: &'a (dyn Error + 'static),
) -> impl Iterator<Item = &'a (dyn Error + 'static)> {
    std::iter::successors(Some(error), |&e| e.source())
}

/// `error` and its sources joined by `: `, as anyhow's `{:#}` prints them: for a log field or a
/// JSON message that must say why, not only what.
pub fn error_chain(error: &(dyn Error + 'static)) -> String {
    sources(error)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
}

/// Decodes `%XX` escapes (RFC 3986); anything else, a malformed escape included, is kept as is.
/// Bytes that do not form UTF-8 become U+FFFD.
pub fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(byte) = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(byte);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_values_pass_unchanged() {
        assert_eq!(
            clip("arn:aws:iam::123456789012:role/x", MAX_ECHO),
            "arn:aws:iam::123456789012:role/x"
        );
    }

    #[test]
    fn long_values_are_cut_on_a_character_boundary_and_say_their_length() {
        let long = "é".repeat(100_000);
        let cut = clip(&long, 9);
        assert_eq!(cut, "éééé…(200000 bytes)");
        assert!(quoted(&long).len() < MAX_ECHO + 40);
        let mut s = "x".repeat(600);
        clip_in_place(&mut s, MAX_MESSAGE);
        assert!(s.starts_with(&"x".repeat(MAX_MESSAGE)) && s.ends_with("…(600 bytes)"));
    }

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn an_error_chain_names_every_cause_in_order() {
        let error = Outer(std::io::Error::other("inner"));
        assert_eq!(error_chain(&error), "outer: inner");
        assert_eq!(sources(&error).count(), 2);
    }
}
