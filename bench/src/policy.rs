//! `mayfly-bench policy`: the cost of one policy decision on the issuance
//! path.
//!
//! Loads the built-in policies plus 15 more (20 in all: business hours,
//! assurance for path prefixes, TTL caps per audience, weekday rules),
//! builds 10,000 registration entries, then decides one issuance request
//! per iteration for a random entry (X.509 and JWT alternately), timing
//! each decision: building the Cedar request and entities, and evaluating.
//! Prints the median, p99 and decisions per second as a table and, with
//! `--json FILE`, as JSON. No pass/fail on time.
//!
//! `cargo run --release -p mayfly-bench -- policy [--iterations 200000] [--json FILE]`
//! `cargo run --release -p mayfly-bench -- policy --smoke` (2,000 iterations; exit 1 only if decisions are wrong)

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, bail};
use mayfly::SpiffeId;
use mayfly::entry::{Assurance, Entry, EntryId, EntrySpec};
use mayfly_server::policy::loader::{self, SourceFile};
use mayfly_server::policy::{Engine, Issue, PolicyRequest};
use mayfly_server::store::NodeRecord;
use rand::Rng as _;

/// `policy` flags.
#[derive(Debug, clap::Args)]
pub struct PolicyArgs {
    /// Decisions measured.
    #[arg(long, default_value_t = 200_000)]
    iterations: usize,
    /// Registration entries.
    #[arg(long, default_value_t = 10_000)]
    entries: usize,
    /// 2,000 iterations; exit 1 only if the decisions are not as expected.
    #[arg(long)]
    smoke: bool,
    /// Write the figures as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

impl PolicyArgs {
    /// The defaults, as `mayfly-bench all` runs it.
    pub fn for_suite(smoke: bool) -> Self {
        Self {
            iterations: 200_000,
            entries: 10_000,
            smoke,
            json: None,
        }
    }
}

const PREFIXES: [&str; 5] = ["payments", "web", "batch", "db", "ml"];

fn extra_policies() -> String {
    let mut text = String::new();
    for (i, p) in PREFIXES.iter().enumerate() {
        text.push_str(&format!(
            "@id(\"bench.hours.{p}\")\nforbid (principal is Mayfly::Workload, action, resource is Mayfly::Entry)\n\
             when {{ resource.spiffe_id like \"spiffe://example.org/{p}/restricted/*\" && (context.hour < {} || context.hour >= 17) }};\n\n",
            i + 1
        ));
        text.push_str(&format!(
            "@id(\"bench.assurance.{p}\")\nforbid (principal is Mayfly::Workload, action, resource is Mayfly::Entry)\n\
             when {{ resource.spiffe_id like \"spiffe://example.org/{p}/secure/*\" && principal.node.assurance < 3 }};\n\n"
        ));
        text.push_str(&format!(
            "@id(\"bench.ttl.{p}\")\n@max_ttl(\"{}m\")\npermit (principal is Mayfly::Workload, action == Mayfly::Action::\"issue_jwt\", resource)\n\
             when {{ context.audience.contains(\"{p}-api\") }};\n\n",
            i + 1
        ));
    }
    text
}

fn entries(n: usize, rng: &mut impl rand::Rng) -> Result<Vec<Entry>> {
    let td = mayfly::TrustDomain::new("example.org")?;
    (0..n)
        .map(|i| {
            let prefix = PREFIXES[i % PREFIXES.len()];
            let kind = ["restricted", "secure", "open", "open"][rng.random_range(0..4)];
            let spec = EntrySpec {
                spiffe_id: format!("spiffe://example.org/{prefix}/{kind}/svc-{i}"),
                parent_id: "spiffe://example.org/mayfly/agent/x509pop/bench".into(),
                selectors: vec![format!("unix:uid:{}", 1000 + i % 50), "unix:gid:100".into()],
                min_assurance: (i % 7 == 0).then(|| "medium".into()),
                max_attestation_age: (i % 11 == 0).then(|| "1h".into()),
                ..Default::default()
            };
            Ok(spec.validate(&td, EntryId::random(), 1)?)
        })
        .collect()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(idx).copied().unwrap_or(f64::NAN)
}

/// Runs the benchmark and prints its figures.
pub fn run(args: PolicyArgs) -> Result<()> {
    let iterations = if args.smoke { 2_000 } else { args.iterations };
    let loaded = loader::compile(
        true,
        &[SourceFile {
            name: "bench.cedar".into(),
            text: extra_policies(),
        }],
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let engine = Engine::new(loaded).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut rng = rand::rng();
    let entries = entries(args.entries, &mut rng)?;
    let now = time::OffsetDateTime::now_utc();
    let node = NodeRecord {
        spiffe_id: SpiffeId::new("spiffe://example.org/mayfly/agent/x509pop/bench")?,
        attestor: "x509pop".into(),
        assurance: Assurance::Medium,
        selectors: ["x509pop:subject:cn:bench".parse()?].into_iter().collect(),
        enrolled_aliases: vec![],
        attested_at: now - time::Duration::minutes(30),
        current_serial: "01".into(),
        next_serial: None,
        svid_expires_at: now + time::Duration::hours(1),
        banned: false,
        can_reattest: true,
    };
    let audiences = [vec!["payments-api".to_owned()], vec!["other".to_owned()]];
    println!(
        "policy: {} policies, {} entries, {} decisions",
        engine.len(),
        entries.len(),
        iterations
    );
    let mut samples = Vec::with_capacity(iterations);
    let (mut allowed, mut denied, mut capped) = (0usize, 0usize, 0usize);
    let started = Instant::now();
    for i in 0..iterations {
        let entry = &entries[rng.random_range(0..entries.len())];
        let jwt = i % 2 == 1;
        let req = PolicyRequest::Issue(Issue {
            node: &node,
            entry,
            task_id: "unix:4242:1234567",
            audience: if jwt { &audiences[i % 4 / 2] } else { &[] },
            requested_ttl: 3600,
            jwt,
        });
        let t = Instant::now();
        let d = engine.decide(&req, now);
        samples.push(t.elapsed().as_secs_f64() * 1e6);
        if d.allowed {
            allowed += 1;
        } else {
            denied += 1;
        }
        if d.ttl_cap.is_some() {
            capped += 1;
        }
        if !d.errors.is_empty() {
            bail!("evaluation errors: {:?}", d.errors);
        }
    }
    let wall = started.elapsed().as_secs_f64();
    // The share of building the Cedar request (entities, context) alone.
    let mut build = Vec::with_capacity(iterations.min(20_000));
    for i in 0..iterations.min(20_000) {
        let entry = &entries[rng.random_range(0..entries.len())];
        let req = PolicyRequest::Issue(Issue {
            node: &node,
            entry,
            task_id: "unix:4242:1234567",
            audience: &audiences[i % 2],
            requested_ttl: 3600,
            jwt: true,
        });
        let t = Instant::now();
        let input = mayfly_server::policy::request::to_cedar(&req, now)?;
        build.push(t.elapsed().as_secs_f64() * 1e6);
        drop(input);
    }
    build.sort_by(f64::total_cmp);
    let build_median = percentile(&build, 0.5);
    samples.sort_by(f64::total_cmp);
    let median = percentile(&samples, 0.5);
    let p99 = percentile(&samples, 0.99);
    let max = samples.last().copied().unwrap_or(f64::NAN);
    let per_sec = iterations as f64 / samples.iter().sum::<f64>() * 1e6;
    println!();
    println!(
        "| decisions | allowed | denied | capped | median µs | p99 µs | max µs | decisions/s |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {iterations} | {allowed} | {denied} | {capped} | {median:.1} | {p99:.1} | {max:.1} | {per_sec:.0} |"
    );
    println!(
        "(budget: p99 < 50 µs; wall time {wall:.2} s; building the request alone: median {build_median:.1} µs)"
    );
    if let Some(path) = args.json {
        let doc = serde_json::json!({
            "scenario": "policy",
            "policies": engine.len(),
            "entries": entries.len(),
            "decisions": iterations,
            "allowed": allowed,
            "denied": denied,
            "capped": capped,
            "median_us": median,
            "p99_us": p99,
            "max_us": max,
            "build_request_median_us": build_median,
            "decisions_per_sec": per_sec,
            "budget_p99_us": 50,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)? + "\n")?;
    }
    if allowed == 0 || denied == 0 || capped == 0 {
        bail!("unexpected decisions: {allowed} allowed, {denied} denied, {capped} capped");
    }
    Ok(())
}
