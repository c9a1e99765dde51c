//! What the scenarios share: run settings, the pool of CSRs made ahead of
//! time, the correctness checks of answers, and the budgets.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use x509_parser::extensions::{GeneralName, ParsedExtension};

use crate::harness::Row;

/// The concurrencies of the issue.
pub const CONCURRENCIES: [usize; 3] = [1, 8, 32];

/// Flags every suite scenario takes.
#[derive(Debug, Clone, clap::Args)]
pub struct SuiteArgs {
    /// Seconds measured per variant (each concurrency is a variant).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Write every row (and the machine's facts) as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// About 1 s per variant, every answer checked (SVIDs parse, IDs
    /// right); exit 1 only if something is wrong, never on time.
    #[arg(long)]
    pub smoke: bool,
    /// Concurrencies measured, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = CONCURRENCIES)]
    pub concurrency: Vec<usize>,
    /// Worker threads of the benchmark's own client runtime (the client
    /// shares the machine with the server; fewer threads leave it more).
    #[arg(long, default_value_t = 1)]
    pub client_threads: usize,
    /// Workload scenario: concurrent FetchX509SVID streams held on one agent
    /// (smoke: 200).
    #[arg(long, default_value_t = 10_000)]
    pub streams: usize,
    /// Workload scenario: new tasks (processes) whose first credential is
    /// measured (smoke: 10).
    #[arg(long, default_value_t = 200)]
    pub tasks: usize,
}

/// Settings resolved from [`SuiteArgs`].
#[derive(Debug, Clone)]
pub struct Settings {
    /// Measured time per variant.
    pub duration: Duration,
    /// Check every answer; short runs.
    pub smoke: bool,
    /// Concurrencies of the server scenarios.
    pub concurrencies: Vec<usize>,
    /// Streams held at once in the workload scenario.
    pub streams: usize,
    /// New tasks measured in the workload scenario.
    pub tasks: usize,
}

impl Settings {
    /// From the command line.
    pub fn from_args(args: &SuiteArgs) -> Result<Self> {
        ensure!(
            args.duration > 0.0 && args.duration.is_finite(),
            "--duration must be a positive number of seconds"
        );
        ensure!(
            args.concurrency.iter().all(|c| *c > 0),
            "--concurrency values must be at least 1"
        );
        ensure!(
            args.streams > 0 && args.tasks > 0,
            "--streams and --tasks must be at least 1"
        );
        Ok(Self {
            duration: if args.smoke {
                Duration::from_secs(1)
            } else {
                Duration::from_secs_f64(args.duration)
            },
            smoke: args.smoke,
            concurrencies: args.concurrency.clone(),
            streams: if args.smoke { 200 } else { args.streams },
            tasks: if args.smoke { 10 } else { args.tasks },
        })
    }
}

/// CSRs (EC P-256, DER) generated before measuring, so that the client's
/// key generation is not measured. Requests take them in turn; the server
/// keeps nothing keyed on a CSR, so a reused one costs it the same as a
/// new one (parse, signature check, a new certificate and serial).
#[derive(Debug)]
pub struct Csrs(Vec<Vec<u8>>);

impl Csrs {
    /// `n` new key pairs and their CSRs.
    pub fn generate(n: usize) -> Result<Self> {
        let mut v = Vec::with_capacity(n);
        for _ in 0..n.max(1) {
            v.push(mayfly::x509::new_key_and_csr()?.csr_der);
        }
        Ok(Self(v))
    }

    /// The CSR for request `i` of worker `worker`.
    pub fn get(&self, worker: usize, i: u64) -> &[u8] {
        let n = self.0.len() as u64;
        // Workers start at different places in the pool.
        let at = (i + (worker as u64).wrapping_mul(7919)) % n;
        // `at < n = len`, so the index is in range.
        #[allow(clippy::cast_possible_truncation)]
        &self.0[at as usize]
    }
}

/// Checks an X.509-SVID: it parses, and its one URI SAN is `spiffe_id`.
pub fn check_svid(der: &[u8], spiffe_id: &str) -> Result<()> {
    let (rest, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| anyhow::anyhow!("the SVID does not parse: {e}"))?;
    ensure!(rest.is_empty(), "trailing bytes after the SVID");
    let mut uris = Vec::new();
    for ext in cert.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            for name in &san.general_names {
                if let GeneralName::URI(u) = name {
                    uris.push((*u).to_owned());
                }
            }
        }
    }
    if uris != [spiffe_id] {
        bail!("the SVID's URI SANs are {uris:?}, expected [{spiffe_id}]");
    }
    Ok(())
}

/// Checks a JWT-SVID's claims (not its signature): `sub` is `spiffe_id`
/// and `aud` holds `audience`.
pub fn check_jwt(token: &str, spiffe_id: &str, audience: &str) -> Result<()> {
    let mut parts = token.split('.');
    let (Some(_), Some(payload), Some(sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        bail!("the JWT-SVID does not have three parts");
    };
    ensure!(!sig.is_empty(), "the JWT-SVID has no signature");
    let claims: serde_json::Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(payload)
            .context("the JWT-SVID payload is not base64url")?,
    )
    .context("the JWT-SVID payload is not JSON")?;
    ensure!(
        claims["sub"] == spiffe_id,
        "sub is {}, expected {spiffe_id}",
        claims["sub"]
    );
    let aud_ok = claims["aud"] == audience
        || claims["aud"]
            .as_array()
            .is_some_and(|a| a.iter().any(|v| v == audience));
    ensure!(aud_ok, "aud is {}, expected {audience}", claims["aud"]);
    Ok(())
}

/// Scenario 1's budget, applied at concurrency 32: at least 70% of the
/// X.509 crypto ceiling, and p99 under 5 ms.
pub fn x509_budget(row: &mut Row) {
    if row.concurrency == 32
        && let Some(ratio) = row.ratio_to_ceiling
    {
        row.budget = "≥ 0.70 × ceiling, p99 < 5 ms".into();
        row.budget_met = Some(ratio >= 0.70 && row.p99_us < 5_000.0);
    }
}

/// Scenario 2's budget, applied at concurrency 32: at least 20,000 per second.
pub fn jwt_budget(row: &mut Row) {
    if row.concurrency == 32 {
        row.budget = "≥ 20,000/s".into();
        row.budget_met = Some(row.per_second >= 20_000.0);
    }
}

/// A bench agent attested with a join token over the node API, and one
/// entry registered under it for `path` (`spiffe://example.org/<path>`).
#[derive(Debug)]
pub struct Registered {
    /// The agent's identity (its SVID and key).
    pub agent: crate::node_client::AgentIdentity,
    /// The entry's id.
    pub entry_id: String,
    /// The entry's SPIFFE ID, which every SVID must carry.
    pub spiffe_id: String,
}

/// Attests a bench agent on `server` and registers an entry under it.
pub async fn register(server: &crate::harness::Server, path: &str) -> Result<Registered> {
    let (token, agent_id) = server.join_token()?;
    let agent = crate::node_client::attest_join_token(server.node_addr, &token).await?;
    ensure!(
        agent.spiffe_id == agent_id,
        "attested as {}, expected {agent_id}",
        agent.spiffe_id
    );
    let spiffe_id = format!("spiffe://{}/{path}", crate::harness::TRUST_DOMAIN);
    let entry_id = server.create_entry(&spiffe_id, &agent_id, "unix:uid:1000")?;
    Ok(Registered {
        agent,
        entry_id,
        spiffe_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svid_check_accepts_the_right_id_only() {
        use mayfly::x509::{CaParams, SvidParams, VerifiedCsr, X509Authority};
        let now = time::OffsetDateTime::now_utc();
        let ca = X509Authority::generate(
            &CaParams {
                trust_domain: spiffe::TrustDomain::new("example.org").unwrap(),
                ttl: time::Duration::hours(1),
                subject: "t".into(),
            },
            now,
        )
        .unwrap();
        let csrs = Csrs::generate(1).unwrap();
        let csr = VerifiedCsr::from_der(csrs.get(3, 5)).unwrap();
        let id = mayfly::SpiffeId::new("spiffe://example.org/a").unwrap();
        let signed = ca
            .sign_svid(
                &csr,
                &SvidParams {
                    spiffe_id: &id,
                    dns_names: &[],
                    ttl: time::Duration::minutes(5),
                },
                now,
            )
            .unwrap();
        check_svid(&signed.der, "spiffe://example.org/a").unwrap();
        let err = check_svid(&signed.der, "spiffe://example.org/b").unwrap_err();
        assert!(err.to_string().contains("expected"), "{err}");
        assert!(check_svid(b"junk", "spiffe://example.org/a").is_err());
    }

    #[test]
    fn jwt_check_reads_sub_and_aud() {
        let key = mayfly::jwt::JwtSigningKey::generate().unwrap();
        let token = key
            .mint(&mayfly::jwt::JwtClaims {
                sub: "spiffe://example.org/a".into(),
                aud: vec!["x".into(), "y".into()],
                exp: 2,
                iat: 1,
                jti: "j".into(),
                iss: None,
            })
            .unwrap();
        check_jwt(&token, "spiffe://example.org/a", "y").unwrap();
        assert!(check_jwt(&token, "spiffe://example.org/b", "y").is_err());
        assert!(check_jwt(&token, "spiffe://example.org/a", "z").is_err());
        assert!(check_jwt("a.b", "spiffe://example.org/a", "y").is_err());
    }

    #[test]
    fn budgets_apply_at_32_only() {
        let lat = crate::harness::Latency {
            p50_us: 1.0,
            p99_us: 4_000.0,
            max_us: 1.0,
            mean_us: 1.0,
        };
        let mut r = Row::new("x509", "v", 8, 10, Duration::from_secs(1), lat);
        r.ratio_to_ceiling = Some(0.9);
        x509_budget(&mut r);
        assert_eq!(r.budget_met, None);
        r.concurrency = 32;
        x509_budget(&mut r);
        assert_eq!(r.budget_met, Some(true));
        r.p99_us = 6_000.0;
        x509_budget(&mut r);
        assert_eq!(r.budget_met, Some(false));
        let mut j = Row::new("jwt", "v", 32, 30_000, Duration::from_secs(2), lat);
        jwt_budget(&mut j);
        assert_eq!(j.budget_met, Some(false));
    }
}
