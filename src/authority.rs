//! Authority rotation maths: when the next signing authority is prepared,
//! when it becomes active, and when an old one can leave the bundle. Pure
//! functions of the authorities' lifetimes and `now`.
//!
//! Each authority (an X.509 CA or a JWT signing key) moves through slots
//! `prepared → active → old`. The default schedule follows SPIRE's rule: a
//! successor is prepared (and published in the bundle, before it signs
//! anything) at half the active authority's life, and activated at five
//! sixths. The old one stays in the bundle until everything it signed has
//! expired, which is its own NotAfter, because no SVID outlives its issuer.

use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

/// Where an authority is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Published in the bundle, not signing yet.
    Prepared,
    /// Signing.
    Active,
    /// No longer signing; published until what it signed has expired.
    Old,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Prepared => "prepared",
            Self::Active => "active",
            Self::Old => "old",
        })
    }
}

/// An authority's validity window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetime {
    /// NotBefore.
    pub not_before: OffsetDateTime,
    /// NotAfter.
    pub not_after: OffsetDateTime,
}

impl Lifetime {
    /// The point `num/den` of the way through the lifetime.
    pub fn at_fraction(&self, num: i64, den: i64) -> OffsetDateTime {
        let life = self.not_after - self.not_before;
        self.not_before + life * (num as f64 / den as f64)
    }
}

/// When successors are prepared and activated, as fractions of the active
/// authority's lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// Prepare at `prepare.0 / prepare.1` of the life (default 1/2).
    pub prepare: (i64, i64),
    /// Activate at `activate.0 / activate.1` of the life (default 5/6).
    pub activate: (i64, i64),
}

impl Default for Schedule {
    fn default() -> Self {
        Self {
            prepare: (1, 2),
            activate: (5, 6),
        }
    }
}

/// What the rotation task should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Create a prepared authority (there is none, and it is time).
    Prepare,
    /// Make the prepared authority active (and the active one old).
    Activate,
    /// Nothing until this time.
    Wait(OffsetDateTime),
}

impl Schedule {
    /// Decides the next step from the active authority's lifetime, whether
    /// a prepared one exists, and `now`. A server that was down past the
    /// activation point catches up: it prepares, then activates at once.
    pub fn next_step(
        &self,
        active: Option<Lifetime>,
        has_prepared: bool,
        now: OffsetDateTime,
    ) -> Step {
        let Some(active) = active else {
            return if has_prepared {
                Step::Activate
            } else {
                Step::Prepare
            };
        };
        let prepare_at = active.at_fraction(self.prepare.0, self.prepare.1);
        let activate_at = active.at_fraction(self.activate.0, self.activate.1);
        match (has_prepared, now >= prepare_at, now >= activate_at) {
            (false, true, _) => Step::Prepare,
            (false, false, _) => Step::Wait(prepare_at),
            (true, _, true) => Step::Activate,
            (true, _, false) => Step::Wait(activate_at),
        }
    }
}

/// Whether an old authority can leave the bundle: everything it signed has
/// expired (SVIDs never outlive their issuer), with `grace` for clock skew.
pub fn can_drop_old(old: Lifetime, now: OffsetDateTime, grace: Duration) -> bool {
    now >= old.not_after + grace
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn life(start: i64, len: i64) -> Lifetime {
        let nb = OffsetDateTime::from_unix_timestamp(start).unwrap();
        Lifetime {
            not_before: nb,
            not_after: nb + Duration::seconds(len),
        }
    }

    #[test]
    fn spire_rule_by_default() {
        let s = Schedule::default();
        let l = life(0, 600);
        let t = |secs| OffsetDateTime::from_unix_timestamp(secs).unwrap();
        assert_eq!(s.next_step(Some(l), false, t(10)), Step::Wait(t(300)));
        assert_eq!(s.next_step(Some(l), false, t(300)), Step::Prepare);
        assert_eq!(s.next_step(Some(l), true, t(301)), Step::Wait(t(500)));
        assert_eq!(s.next_step(Some(l), true, t(500)), Step::Activate);
        // Down past activation with nothing prepared: prepare, then activate.
        assert_eq!(s.next_step(Some(l), false, t(900)), Step::Prepare);
        assert_eq!(s.next_step(Some(l), true, t(900)), Step::Activate);
        assert_eq!(s.next_step(None, false, t(0)), Step::Prepare);
        assert!(!can_drop_old(l, t(600), Duration::seconds(10)));
        assert!(can_drop_old(l, t(610), Duration::seconds(10)));
    }

    proptest! {
        /// Whatever the lifetime and the time, the schedule never activates
        /// without a prepared authority, never prepares before the prepare
        /// point, and always waits for a point in the future.
        #[test]
        fn never_activates_unprepared_and_waits_forward(len in 6i64..10_000_000, at in 0i64..20_000_000, prepared: bool) {
            let s = Schedule::default();
            let l = life(0, len);
            let now = OffsetDateTime::from_unix_timestamp(at).unwrap();
            match s.next_step(Some(l), prepared, now) {
                Step::Activate => prop_assert!(prepared),
                Step::Prepare => prop_assert!(!prepared && now >= l.at_fraction(1, 2)),
                Step::Wait(until) => prop_assert!(until > now),
            }
        }
    }
}
