//! The closed-loop load driver: N workers, each with its own connection,
//! each sending its next request as soon as the previous one is answered,
//! for a fixed duration.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use tokio::sync::Barrier;

/// One client of a closed-loop run (one connection; one request in flight).
pub trait Worker: Send + 'static {
    /// Makes one request and checks its answer.
    fn call(&mut self) -> impl Future<Output = Result<()>> + Send;
}

/// What a run measured.
#[derive(Debug)]
pub struct Outcome {
    /// Requests answered within the measured window.
    pub ops: u64,
    /// From the start barrier until the last worker stopped.
    pub elapsed: Duration,
    /// The latency of every request.
    pub samples: Vec<Duration>,
}

/// Runs every worker for `duration` after one unmeasured warm-up call each
/// (connection set-up, HTTP/2 windows); fails on the first failed call.
pub async fn closed_loop<W: Worker>(workers: Vec<W>, duration: Duration) -> Result<Outcome> {
    let n = workers.len();
    // Everyone (the workers and this task) starts measuring together.
    let barrier = Arc::new(Barrier::new(n + 1));
    let mut set = tokio::task::JoinSet::new();
    for mut w in workers {
        let barrier = Arc::clone(&barrier);
        set.spawn(async move {
            let warm = w.call().await.context("warm-up call");
            barrier.wait().await;
            warm?;
            let deadline = Instant::now() + duration;
            let mut samples = Vec::with_capacity(4096);
            loop {
                let t = Instant::now();
                if t >= deadline {
                    break;
                }
                w.call().await?;
                samples.push(t.elapsed());
            }
            Ok::<_, anyhow::Error>(samples)
        });
    }
    barrier.wait().await;
    let start = Instant::now();
    let mut samples = Vec::new();
    while let Some(joined) = set.join_next().await {
        samples.extend(joined.context("a load worker panicked")??);
    }
    let elapsed = start.elapsed();
    Ok(Outcome {
        ops: samples.len() as u64,
        elapsed,
        samples,
    })
}

/// One variant against a running server: runs `workers` for `duration`,
/// checks the server is still up, and makes the row (latency, throughput,
/// the server's peak RSS). The error names the variant and the server log.
pub async fn measure_variant<W: Worker>(
    server: &mut super::Server,
    scenario: &str,
    variant: &str,
    workers: Vec<W>,
    duration: Duration,
) -> Result<super::Row> {
    let c = workers.len();
    let mut out = closed_loop(workers, duration).await.with_context(|| {
        format!(
            "{scenario} at concurrency {c} (server log: {})",
            server.log_path().display()
        )
    })?;
    server.check_running()?;
    let lat = super::Latency::from_samples(&mut out.samples);
    let mut row = super::Row::new(scenario, variant, c, out.ops, out.elapsed, lat);
    row.server_peak_rss_kb = server.peak_rss_kb();
    Ok(row)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Sleeper(u64);

    impl Worker for Sleeper {
        async fn call(&mut self) -> Result<()> {
            self.0 += 1;
            tokio::time::sleep(Duration::from_millis(1)).await;
            Ok(())
        }
    }

    struct FailsSecond(u32);

    impl Worker for FailsSecond {
        async fn call(&mut self) -> Result<()> {
            self.0 += 1;
            anyhow::ensure!(self.0 < 2, "second call fails");
            Ok(())
        }
    }

    #[tokio::test]
    async fn every_answered_call_is_a_sample() {
        let out = closed_loop(vec![Sleeper(0), Sleeper(0)], Duration::from_millis(50))
            .await
            .unwrap();
        assert_eq!(out.samples.len() as u64, out.ops);
        assert!(out.ops >= 2, "{out:?}");
        assert!(out.samples.iter().all(|d| *d >= Duration::from_millis(1)));
        assert!(out.elapsed >= Duration::from_millis(50));
    }

    #[tokio::test]
    async fn a_failed_call_fails_the_run() {
        let err = closed_loop(vec![FailsSecond(0)], Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("second call fails"), "{err:#}");
    }
}
