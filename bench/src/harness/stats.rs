//! Latency statistics from samples.

use std::time::Duration;

/// Percentiles and mean of a set of latencies, microseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Latency {
    /// Median (nearest rank).
    pub p50_us: f64,
    /// 99th percentile (nearest rank).
    pub p99_us: f64,
    /// The slowest sample.
    pub max_us: f64,
    /// Arithmetic mean.
    pub mean_us: f64,
}

/// The value at quantile `q` (nearest rank) of sorted `v`.
pub fn quantile(v: &[Duration], q: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

impl Latency {
    /// Sorts `samples` and summarises them; all zero when there are none.
    pub fn from_samples(samples: &mut [Duration]) -> Self {
        samples.sort_unstable();
        #[allow(clippy::cast_precision_loss)]
        let mean_us = if samples.is_empty() {
            0.0
        } else {
            samples.iter().map(|d| us(*d)).sum::<f64>() / samples.len() as f64
        };
        Self {
            p50_us: us(quantile(samples, 0.50)),
            p99_us: us(quantile(samples, 0.99)),
            max_us: us(samples.last().copied().unwrap_or_default()),
            mean_us,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut v: Vec<Duration> = (1..=100).rev().map(Duration::from_micros).collect();
        let l = Latency::from_samples(&mut v);
        assert!((l.p50_us - 50.0).abs() < 1e-6, "{l:?}");
        assert!((l.p99_us - 99.0).abs() < 1e-6, "{l:?}");
        assert!((l.max_us - 100.0).abs() < 1e-6, "{l:?}");
        assert!((l.mean_us - 50.5).abs() < 1e-6, "{l:?}");
    }

    #[test]
    fn one_sample_and_none() {
        let mut one = vec![Duration::from_micros(7)];
        let l = Latency::from_samples(&mut one);
        assert!((l.p50_us - 7.0).abs() < 1e-6 && (l.p99_us - 7.0).abs() < 1e-6);
        let l = Latency::from_samples(&mut []);
        assert!(l.p50_us == 0.0 && l.max_us == 0.0 && l.mean_us == 0.0);
    }
}
