//! Reading configuration from a key/value source (the process environment, or a map in tests):
//! one variable per line, each with its parser and its default, and one error type that names
//! the variable. The broker / webhook configuration ([`crate::config`]) and the sidecar's both
//! read through this.

use std::collections::HashMap;
use std::ops::RangeInclusive;

/// A variable that could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {variable}: {message}")]
pub struct ConfigError {
    /// The environment variable at fault.
    pub variable: &'static str,
    /// What is wrong with it.
    pub message: String,
}

/// Variables from a lookup. Values are trimmed; unset and empty values are the same: absent.
pub struct Vars<F> {
    lookup: F,
}

impl<F: Fn(&str) -> Option<String>> Vars<F> {
    /// Variables read through `lookup`.
    pub fn new(lookup: F) -> Self {
        Self { lookup }
    }

    /// The trimmed value, `None` when unset or empty.
    pub fn text(&self, name: &str) -> Option<String> {
        (self.lookup)(name)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    }

    /// The value parsed by `parse`, `None` when absent; a parse failure names the variable.
    pub fn parse<T>(
        &self,
        name: &'static str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        self.text(name)
            .map(|value| {
                parse(&value).map_err(|message| ConfigError {
                    variable: name,
                    message,
                })
            })
            .transpose()
    }

    /// [`Self::parse`], with `default` when absent.
    pub fn parse_or<T>(
        &self,
        name: &'static str,
        default: T,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        Ok(self.parse(name, parse)?.unwrap_or(default))
    }

    /// The value, or an error saying it is required (with an example).
    pub fn required(&self, name: &'static str, example: &str) -> Result<String, ConfigError> {
        self.text(name).ok_or_else(|| ConfigError {
            variable: name,
            message: format!("required, e.g. {example}"),
        })
    }
}

/// Variables of the process environment.
pub fn process() -> Vars<impl Fn(&str) -> Option<String>> {
    Vars::new(|name: &str| std::env::var(name).ok())
}

/// Variables of a map (tests).
pub fn map(map: &HashMap<String, String>) -> Vars<impl Fn(&str) -> Option<String> + '_> {
    Vars::new(move |name: &str| map.get(name).cloned())
}

/// A whole number in `range`; `unit` says what it counts.
pub fn integer_in(
    range: RangeInclusive<u64>,
    unit: &'static str,
) -> impl FnOnce(&str) -> Result<u64, String> {
    move |value| match value.parse::<u64>() {
        Ok(n) if range.contains(&n) => Ok(n),
        _ => Err(format!(
            "{value:?} must be a whole number from {} to {} ({unit})",
            range.start(),
            range.end()
        )),
    }
}

/// `true` or `false`.
pub fn boolean(value: &str) -> Result<bool, String> {
    one_of(&[("true", true), ("false", false)])(value)
}

/// One of the named choices.
pub fn one_of<'a, T: Copy>(
    choices: &'a [(&'static str, T)],
) -> impl Fn(&str) -> Result<T, String> + 'a {
    move |value| {
        choices
            .iter()
            .find(|(name, _)| *name == value)
            .map(|(_, choice)| *choice)
            .ok_or_else(|| {
                let names: Vec<&str> = choices.iter().map(|(name, _)| *name).collect();
                format!("{value:?} is not one of {}", names.join(", "))
            })
    }
}

/// An absolute `http://` or `https://` URL.
pub fn http_url(value: &str) -> Result<String, String> {
    if value.starts_with("https://") || value.starts_with("http://") {
        Ok(value.to_owned())
    } else {
        Err(format!("{value:?} is not an http:// or https:// URL"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn values_are_trimmed_and_empty_means_absent() {
        let m = vars(&[("A", "  x "), ("B", "   ")]);
        let v = map(&m);
        assert_eq!(v.text("A").as_deref(), Some("x"));
        assert_eq!(v.text("B"), None);
        assert_eq!(v.text("C"), None);
        assert_eq!(v.parse_or("B", 7, integer_in(1..=9, "things")), Ok(7));
    }

    #[test]
    fn parse_errors_name_the_variable_and_what_is_allowed() {
        let m = vars(&[("N", "99"), ("B", "yes"), ("P", "maybe"), ("U", "ftp://x")]);
        let v = map(&m);
        let error = v.parse("N", integer_in(1..=9, "things")).unwrap_err();
        assert_eq!(error.variable, "N");
        assert_eq!(
            error.to_string(),
            "invalid configuration: N: \"99\" must be a whole number from 1 to 9 (things)"
        );
        assert!(
            v.parse("B", boolean)
                .unwrap_err()
                .message
                .contains("true, false")
        );
        let policy = one_of(&[("open", 1), ("closed", 2)]);
        assert!(
            v.parse("P", policy)
                .unwrap_err()
                .message
                .contains("open, closed")
        );
        assert!(v.parse("U", http_url).is_err());
        assert_eq!(
            v.required("MISSING", "https://x/").unwrap_err().message,
            "required, e.g. https://x/"
        );
    }
}
