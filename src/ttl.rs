//! Durations as people write them: `30s`, `10m`, `1h`, `1h30m`, `2d`.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Why a duration string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {input:?}: {reason} (write it like 30s, 10m, 1h or 1h30m)")]
pub struct TtlError {
    input: String,
    reason: &'static str,
}

/// A positive duration with second precision, written `1h30m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Ttl(u64);

impl Ttl {
    /// A TTL of `secs` seconds; `None` when zero.
    pub const fn from_secs(secs: u64) -> Option<Self> {
        if secs == 0 { None } else { Some(Self(secs)) }
    }

    /// The length in seconds.
    pub const fn as_secs(self) -> u64 {
        self.0
    }

    /// As a `std::time::Duration`.
    pub const fn as_duration(self) -> Duration {
        Duration::from_secs(self.0)
    }

    /// As a `time::Duration`.
    pub fn as_time(self) -> time::Duration {
        time::Duration::seconds(i64::try_from(self.0).unwrap_or(i64::MAX))
    }
}

impl FromStr for Ttl {
    type Err = TtlError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| TtlError {
            input: s.to_owned(),
            reason,
        };
        let t = s.trim();
        if t.is_empty() {
            return Err(err("empty"));
        }
        let mut total: u64 = 0;
        let mut number = String::new();
        for c in t.chars() {
            if c.is_ascii_digit() {
                number.push(c);
                continue;
            }
            let unit: u64 = match c {
                's' => 1,
                'm' => 60,
                'h' => 3600,
                'd' => 86_400,
                _ => return Err(err("unknown unit (use s, m, h or d)")),
            };
            if number.is_empty() {
                return Err(err("a unit must follow a number"));
            }
            let n: u64 = number.parse().map_err(|_| err("number too large"))?;
            total = n
                .checked_mul(unit)
                .and_then(|v| total.checked_add(v))
                .ok_or_else(|| err("too large"))?;
            number.clear();
        }
        if !number.is_empty() {
            return Err(err("missing unit after the last number"));
        }
        Self::from_secs(total).ok_or_else(|| err("must be greater than zero"))
    }
}

impl TryFrom<String> for Ttl {
    type Error = TtlError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Ttl> for String {
    fn from(t: Ttl) -> Self {
        t.to_string()
    }
}

impl fmt::Display for Ttl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        for (unit, len) in [("d", 86_400), ("h", 3600), ("m", 60)] {
            if rest >= len {
                write!(f, "{}{unit}", rest / len)?;
                rest %= len;
            }
        }
        if rest > 0 || self.0 == 0 {
            write!(f, "{rest}s")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_common_forms() {
        assert_eq!("30s".parse::<Ttl>().unwrap().as_secs(), 30);
        assert_eq!("10m".parse::<Ttl>().unwrap().as_secs(), 600);
        assert_eq!("1h30m".parse::<Ttl>().unwrap().as_secs(), 5400);
        assert_eq!("2d".parse::<Ttl>().unwrap().as_secs(), 172_800);
    }

    #[test]
    fn rejects_bad_forms() {
        for bad in ["", "10", "m", "0s", "1x", "-1s", "99999999999999999999s"] {
            assert!(bad.parse::<Ttl>().is_err(), "{bad:?} accepted");
        }
    }

    proptest! {
        #[test]
        fn display_round_trips(secs in 1u64..10_000_000) {
            let t = Ttl::from_secs(secs).unwrap();
            prop_assert_eq!(t.to_string().parse::<Ttl>().unwrap(), t);
        }
    }
}
