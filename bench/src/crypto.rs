//! Scenario 6, `crypto`: the ceiling. On this process, no server: the CSR
//! parse and signature check (`VerifiedCsr::from_der`) and the X.509-SVID
//! signing (`X509Authority::sign_svid`) the server runs per `SignX509`
//! item, and the JWT-SVID signing (`JwtSigningKey::mint`, ES256) it runs
//! per `MintJwt`; on one thread and on one thread per core. Every server
//! figure is given as a ratio to the all-cores figure of its kind.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use mayfly::SpiffeId;
use mayfly::jwt::{JwtClaims, JwtSigningKey};
use mayfly::x509::{CaParams, SvidParams, VerifiedCsr, X509Authority};
use spiffe::TrustDomain;
use time::OffsetDateTime;

use crate::harness::{Latency, Row, TRUST_DOMAIN};
use crate::scenario::{Csrs, Settings};

/// The ceilings measured, per second, with one thread per core.
#[derive(Debug, Clone, Copy)]
pub struct Ceiling {
    /// CSR parse + verify + X.509-SVID sign.
    pub x509_per_second: f64,
    /// JWT-SVID sign.
    pub jwt_per_second: f64,
}

/// Runs `op` on `threads` threads for `duration`; the row.
fn measure<F>(variant: &str, threads: usize, duration: Duration, op: F) -> Result<Row>
where
    F: Fn(usize, u64) -> Result<()> + Sync,
{
    let start = Instant::now();
    let deadline = start + duration;
    let per_thread: Vec<Result<Vec<Duration>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let op = &op;
                s.spawn(move || {
                    let mut samples = Vec::with_capacity(65_536);
                    let mut i = 0u64;
                    loop {
                        let at = Instant::now();
                        if at >= deadline {
                            break;
                        }
                        op(t, i)?;
                        samples.push(at.elapsed());
                        i += 1;
                    }
                    Ok(samples)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a thread panicked")))
            })
            .collect()
    });
    let elapsed = start.elapsed();
    let mut samples = Vec::new();
    for s in per_thread {
        samples.extend(s?);
    }
    let lat = Latency::from_samples(&mut samples);
    Ok(Row::new(
        "crypto",
        variant,
        threads,
        samples.len() as u64,
        elapsed,
        lat,
    ))
}

/// Runs the scenario; its rows and the ceiling.
pub fn run(settings: &Settings, csrs: &Arc<Csrs>) -> Result<(Vec<Row>, Ceiling)> {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let td = TrustDomain::new(TRUST_DOMAIN)?;
    let ca = X509Authority::generate(
        &CaParams {
            trust_domain: td,
            ttl: time::Duration::hours(24),
            subject: "Mayfly".into(),
        },
        OffsetDateTime::now_utc(),
    )?;
    let jwt_key = JwtSigningKey::generate()?;
    let spiffe_id = SpiffeId::new(format!("spiffe://{TRUST_DOMAIN}/bench/crypto"))?;
    let params = SvidParams {
        spiffe_id: &spiffe_id,
        dns_names: &[],
        ttl: time::Duration::hours(1),
    };
    let x509_op = |t: usize, i: u64| -> Result<()> {
        let der = csrs.get(t, i);
        let csr = VerifiedCsr::from_der(der)?;
        let signed = ca.sign_svid(&csr, &params, OffsetDateTime::now_utc())?;
        if settings.smoke {
            crate::scenario::check_svid(&signed.der, &spiffe_id.to_string())?;
        }
        Ok(())
    };
    let audience = vec!["bench".to_owned()];
    let jwt_op = |t: usize, i: u64| -> Result<()> {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let claims = JwtClaims {
            sub: spiffe_id.to_string(),
            aud: audience.clone(),
            exp: now + 300,
            iat: now,
            jti: format!("{t}-{i}"),
            iss: None,
        };
        let token = jwt_key.mint(&claims)?;
        if settings.smoke {
            crate::scenario::check_jwt(&token, &spiffe_id.to_string(), "bench")?;
        }
        Ok(())
    };

    let mut rows = Vec::new();
    let thread_counts = if cores > 1 { vec![1, cores] } else { vec![1] };
    for &threads in &thread_counts {
        let row = measure(
            "csr parse+verify, x509 sign",
            threads,
            settings.duration,
            x509_op,
        )?;
        eprintln!("{}", row.progress());
        rows.push(row);
    }
    for &threads in &thread_counts {
        let row = measure("jwt sign", threads, settings.duration, jwt_op)?;
        eprintln!("{}", row.progress());
        rows.push(row);
    }
    let best = |prefix: &str| {
        rows.iter()
            .filter(|r| r.variant.starts_with(prefix))
            .map(|r| r.per_second)
            .fold(0.0, f64::max)
    };
    let ceiling = Ceiling {
        x509_per_second: best("csr"),
        jwt_per_second: best("jwt"),
    };
    for r in &mut rows {
        let c = if r.variant.starts_with("csr") {
            ceiling.x509_per_second
        } else {
            ceiling.jwt_per_second
        };
        r.ratio_to_ceiling = (c > 0.0).then(|| r.per_second / c);
    }
    anyhow::ensure!(
        ceiling.x509_per_second > 0.0 && ceiling.jwt_per_second > 0.0,
        "the crypto scenario measured nothing"
    );
    Ok((rows, ceiling))
}
