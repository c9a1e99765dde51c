//! Per-identity rate limits on attestation and signing (`[server.rate_limits]`).
//!
//! Buckets are keyed by agent SPIFFE ID (for attestation: the identity the
//! evidence claims, before it is proven), never by network address, so that
//! agents behind a load balancer or NAT do not share a budget. The limiter
//! is `governor`'s keyed GCRA; keys whose bucket is full again are dropped
//! every [`RETAIN_EVERY`] checks, so memory follows the recently active
//! agents, not every identity ever seen.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::{Clock, MonotonicClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};

use crate::config::RateLimitConfig;
use crate::error::ServiceError;

/// How many checks pass between two sweeps of idle keys.
pub const RETAIN_EVERY: u64 = 1024;

/// The key shared by every attestation that presents an unknown join token.
pub const UNKNOWN_JOIN_TOKENS: &str = "join_token:<unknown>";

type Keyed<C> =
    RateLimiter<String, DashMapStateStore<String>, C, NoOpMiddleware<<C as Clock>::Instant>>;

struct Limit<C: Clock> {
    limiter: Keyed<C>,
    clock: C,
    checks: AtomicU64,
}

impl<C: Clock + Clone> Limit<C> {
    fn new(quota: Quota, clock: C) -> Self {
        Self {
            limiter: RateLimiter::dashmap_with_clock(quota, clock.clone()),
            clock,
            checks: AtomicU64::new(0),
        }
    }

    /// `Ok` when `key` may spend `n` cells now, else how long to wait
    /// (`None`: never, `n` exceeds the burst).
    fn check(&self, key: &str, n: NonZeroU32) -> Result<(), Option<Duration>> {
        if self.checks.fetch_add(1, Ordering::Relaxed) % RETAIN_EVERY == RETAIN_EVERY - 1 {
            self.limiter.retain_recent();
            self.limiter.shrink_to_fit();
        }
        match self.limiter.check_key_n(&key.to_owned(), n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(Some(not_until.wait_time_from(self.clock.now()))),
            Err(_) => Err(None),
        }
    }

    fn keys(&self) -> usize {
        self.limiter.len()
    }
}

/// The server's per-identity limits. Disabled limits (`0`) cost nothing.
pub struct RateLimits<C: Clock = MonotonicClock> {
    attestations: Option<(Limit<C>, u32)>,
    signings: Option<(Limit<C>, u32)>,
}

impl<C: Clock> std::fmt::Debug for RateLimits<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimits")
            .field(
                "attestations_per_minute",
                &self.attestations.as_ref().map(|l| l.1),
            )
            .field("signings_per_second", &self.signings.as_ref().map(|l| l.1))
            .finish()
    }
}

impl RateLimits<MonotonicClock> {
    /// Limits from the configuration, on the monotonic clock.
    pub fn new(config: &RateLimitConfig) -> Self {
        Self::with_clock(config, MonotonicClock)
    }
}

impl<C: Clock + Clone> RateLimits<C> {
    /// Limits from the configuration on `clock` (tests pass a fake one).
    pub fn with_clock(config: &RateLimitConfig, clock: C) -> Self {
        let attestations = NonZeroU32::new(config.attestations_per_minute)
            .map(|n| (Limit::new(Quota::per_minute(n), clock.clone()), n.get()));
        let signings = NonZeroU32::new(config.signings_per_second).map(|rate| {
            let burst = NonZeroU32::new(config.signing_burst).unwrap_or(rate);
            (
                Limit::new(Quota::per_second(rate).allow_burst(burst), clock.clone()),
                rate.get(),
            )
        });
        Self {
            attestations,
            signings,
        }
    }

    /// One attestation claimed by `agent` (a SPIFFE ID, or
    /// [`UNKNOWN_JOIN_TOKENS`]); `RateLimited` when over the limit.
    pub fn check_attestation(&self, agent: &str) -> Result<(), ServiceError> {
        let Some((limit, per_minute)) = &self.attestations else {
            return Ok(());
        };
        limit.check(agent, NonZeroU32::MIN).map_err(|wait| {
            tracing::warn!(agent, per_minute, "attestation rate limit exceeded");
            ServiceError::RateLimited(format!(
                "agent {agent} exceeded {per_minute} attestations per minute; retry after {}",
                retry_after(wait)
            ))
        })
    }

    /// `n` signings (X.509-SVID items or JWT-SVIDs) for `agent`;
    /// `RateLimited` when over the limit.
    pub fn check_signing(&self, agent: &str, n: usize) -> Result<(), ServiceError> {
        let Some((limit, per_second)) = &self.signings else {
            return Ok(());
        };
        let cells =
            NonZeroU32::new(u32::try_from(n).unwrap_or(u32::MAX)).unwrap_or(NonZeroU32::MIN);
        limit.check(agent, cells).map_err(|wait| {
            tracing::warn!(agent, per_second, n, "signing rate limit exceeded");
            ServiceError::RateLimited(format!(
                "agent {agent} exceeded {per_second} signings per second; retry after {}",
                retry_after(wait)
            ))
        })
    }

    /// How many identities the limiters currently remember.
    pub fn tracked_keys(&self) -> usize {
        self.attestations.as_ref().map_or(0, |l| l.0.keys())
            + self.signings.as_ref().map_or(0, |l| l.0.keys())
    }
}

fn retry_after(wait: Option<Duration>) -> String {
    match wait {
        // Rounded up to whole milliseconds, and never "0ms".
        Some(d) => format!("{}ms", d.as_nanos().div_ceil(1_000_000).max(1)),
        None => "splitting the request: it asks for more than the burst allows".into(),
    }
}

#[cfg(test)]
mod tests {
    use governor::clock::FakeRelativeClock;

    use super::*;

    fn limits(
        att: u32,
        rate: u32,
        burst: u32,
    ) -> (RateLimits<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        let config = RateLimitConfig {
            attestations_per_minute: att,
            signings_per_second: rate,
            signing_burst: burst,
        };
        (RateLimits::with_clock(&config, clock.clone()), clock)
    }

    #[test]
    fn signing_burst_then_refusal_then_refill() {
        let (l, clock) = limits(0, 2, 4);
        for _ in 0..4 {
            l.check_signing("spiffe://td/mayfly/agent/a", 1).unwrap();
        }
        let err = l
            .check_signing("spiffe://td/mayfly/agent/a", 1)
            .unwrap_err();
        assert!(matches!(err, ServiceError::RateLimited(_)));
        let msg = err.to_string();
        assert!(
            msg.contains("spiffe://td/mayfly/agent/a")
                && msg.contains("2 signings per second")
                && msg.contains("retry after"),
            "{msg}"
        );
        clock.advance(Duration::from_millis(500));
        l.check_signing("spiffe://td/mayfly/agent/a", 1).unwrap();
        assert!(l.check_signing("spiffe://td/mayfly/agent/a", 1).is_err());
    }

    #[test]
    fn identities_have_independent_buckets() {
        let (l, _clock) = limits(1, 1, 1);
        l.check_attestation("a").unwrap();
        assert!(l.check_attestation("a").is_err());
        l.check_attestation("b").unwrap();
        l.check_signing("a", 1).unwrap();
        assert!(l.check_signing("a", 1).is_err());
        l.check_signing("b", 1).unwrap();
    }

    #[test]
    fn batches_count_every_item_and_oversized_batches_are_refused() {
        let (l, _clock) = limits(0, 10, 10);
        l.check_signing("a", 8).unwrap();
        assert!(l.check_signing("a", 3).is_err());
        l.check_signing("a", 2).unwrap();
        assert!(l.check_signing("b", 11).is_err());
    }

    #[test]
    fn attestations_refill_per_minute() {
        let (l, clock) = limits(2, 0, 0);
        l.check_attestation("a").unwrap();
        l.check_attestation("a").unwrap();
        assert!(l.check_attestation("a").is_err());
        clock.advance(Duration::from_secs(30));
        l.check_attestation("a").unwrap();
    }

    #[test]
    fn zero_disables() {
        let (l, _clock) = limits(0, 0, 0);
        for _ in 0..10_000 {
            l.check_attestation("a").unwrap();
            l.check_signing("a", 256).unwrap();
        }
        assert_eq!(l.tracked_keys(), 0);
    }

    #[test]
    fn idle_keys_are_forgotten() {
        let (l, clock) = limits(0, 100, 100);
        for i in 0..RETAIN_EVERY - 1 {
            l.check_signing(&format!("agent-{i}"), 1).unwrap();
        }
        assert_eq!(l.tracked_keys(), usize::try_from(RETAIN_EVERY - 1).unwrap());
        clock.advance(Duration::from_secs(10));
        l.check_signing("last", 1).unwrap();
        assert!(l.tracked_keys() <= 1, "{}", l.tracked_keys());
    }
}
