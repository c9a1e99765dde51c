//! Selectors: `type:value` facts about a node or a workload, spelled as
//! SPIRE spells them (`unix:uid:1000`, `k8s:ns:payments`).

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Why a selector string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SelectorError {
    /// The string has no `:` separating type and value.
    #[error("selector {0:?} must be written type:value (for example unix:uid:1000)")]
    MissingSeparator(String),
    /// The type part is empty or has characters other than `[a-z0-9_-]`.
    #[error("selector type {0:?} must be non-empty lowercase letters, digits, '_' or '-'")]
    BadType(String),
    /// The value part is empty.
    #[error("selector {0:?} has an empty value")]
    EmptyValue(String),
}

/// One selector. The value may itself contain `:` (`unix:uid:1000` has
/// type `unix` and value `uid:1000`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Selector {
    kind: String,
    value: String,
}

impl Selector {
    /// A selector from its parts, validated.
    pub fn new(kind: impl Into<String>, value: impl Into<String>) -> Result<Self, SelectorError> {
        let kind = kind.into();
        let value = value.into();
        if kind.is_empty()
            || !kind
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        {
            return Err(SelectorError::BadType(kind));
        }
        if value.is_empty() {
            return Err(SelectorError::EmptyValue(format!("{kind}:")));
        }
        Ok(Self { kind, value })
    }

    /// The selector type (`unix`, `k8s`, ...).
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The value after the first `:`.
    pub fn value(&self) -> &str {
        &self.value
    }
}

impl FromStr for Selector {
    type Err = SelectorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, value) = s
            .split_once(':')
            .ok_or_else(|| SelectorError::MissingSeparator(s.to_owned()))?;
        Self::new(kind, value)
    }
}

impl TryFrom<String> for Selector {
    type Error = SelectorError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Selector> for String {
    fn from(s: Selector) -> Self {
        s.to_string()
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

/// A set of selectors, ordered so that it prints and compares stably.
pub type SelectorSet = BTreeSet<Selector>;

/// Whether every selector in `required` is in `have`: the matching rule for
/// entries (an entry's selectors must be a subset of the caller's).
pub fn is_subset(required: &SelectorSet, have: &SelectorSet) -> bool {
    required.is_subset(have)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_type_and_value_with_colons() {
        let s: Selector = "unix:uid:1000".parse().unwrap();
        assert_eq!(s.kind(), "unix");
        assert_eq!(s.value(), "uid:1000");
        assert_eq!(s.to_string(), "unix:uid:1000");
        let k: Selector = "k8s:pod-label:app:web".parse().unwrap();
        assert_eq!(k.value(), "pod-label:app:web");
    }

    #[test]
    fn rejects_bad_selectors() {
        assert!(matches!(
            "unix".parse::<Selector>(),
            Err(SelectorError::MissingSeparator(_))
        ));
        assert!(matches!(
            ":x".parse::<Selector>(),
            Err(SelectorError::BadType(_))
        ));
        assert!(matches!(
            "Unix:x".parse::<Selector>(),
            Err(SelectorError::BadType(_))
        ));
        assert!(matches!(
            "unix:".parse::<Selector>(),
            Err(SelectorError::EmptyValue(_))
        ));
    }

    #[test]
    fn serde_round_trip() {
        let s: Selector = "unix:uid:0".parse().unwrap();
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(json, "\"unix:uid:0\"");
        assert_eq!(serde_json::from_str::<Selector>(&json).unwrap(), s);
        assert!(serde_json::from_str::<Selector>("\"nope\"").is_err());
    }

    #[test]
    fn subset_rule() {
        let have: SelectorSet = ["unix:uid:1", "unix:gid:2"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let need: SelectorSet = ["unix:uid:1"].iter().map(|s| s.parse().unwrap()).collect();
        assert!(is_subset(&need, &have));
        assert!(!is_subset(&have, &need));
    }
}
