//! The pre-filtered decision is Cedar's decision on the full set.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use cedar_policy::{EvalResult, Schema};
use mayfly::entry::{Assurance, Entry, EntryId, EntrySpec};
use mayfly::{SpiffeId, TrustDomain};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use time::OffsetDateTime;
use time::macros::datetime;

use super::loader::{self, SourceFile};
use super::request::IssueInput;
use super::*;
use crate::store::NodeRecord;

static REVISION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

const PREFIXES: [&str; 5] = ["payments", "web", "batch", "db", "ml"];
const KINDS: [&str; 3] = ["restricted", "secure", "open"];

/// The 15 policies of `mayfly-bench policy`.
fn bench_policies() -> String {
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

/// Policies written to trip a pre-filter: `unless`, `||`, `!`, `has`,
/// `if`, wildcards in the middle of patterns, entity literals, `in`,
/// sets, arithmetic that overflows (an evaluation error), extension
/// functions, attributes of entities that may not exist, and conditions
/// that are known false only after something unknown.
const ADVERSARIAL: &str = r#"
@id("adv.unless_or")
forbid (principal is Mayfly::Workload, action, resource is Mayfly::Entry)
unless { resource.spiffe_id like "spiffe://example.org/*/open/*" || context.weekday > 5 || context.hour != 3 };

@id("adv.not_like_middle")
@max_ttl("7m")
permit (principal, action == Mayfly::Action::"issue_x509", resource)
when { !(resource.spiffe_id like "spiffe://example.org/*/secure/svc-1*") && principal.node.assurance >= 2 };

@id("adv.has")
forbid (principal, action, resource)
when {
  principal has node.attestor && principal.node.attestor == "join_token" &&
  resource has min_assurance && resource.min_assurance > 1
};

@id("adv.has_missing")
permit (principal, action, resource) when { context has colour };

@id("adv.if")
forbid (principal is Mayfly::Workload, action, resource)
when { if context.hour < 6 then resource.spiffe_id like "*batch*" else resource.admin };

@id("adv.in_node")
forbid (principal in Mayfly::Node::"spiffe://example.org/mayfly/agent/x509pop/n2", action, resource)
when { context.audience.containsAny(["db-api", "ml-api"]) };

@id("adv.is_in")
forbid (principal is Mayfly::Workload in Mayfly::Node::"spiffe://example.org/mayfly/agent/x509pop/n3", action, resource)
when { resource.downstream };

@id("adv.entity_eq")
forbid (principal, action, resource == Mayfly::Entry::"e-db-open-1");

@id("adv.entity_in_cond")
@max_ttl("3m")
permit (principal is Mayfly::Workload, action, resource)
when { resource in [Mayfly::Entry::"e-web-open-2", Mayfly::Entry::"e-web-secure-2"] || principal.node == Mayfly::Node::"spiffe://example.org/mayfly/agent/x509pop/n1" };

@id("adv.overflow_after_narrowing")
forbid (principal is Mayfly::Workload, action, resource is Mayfly::Entry)
when { resource.spiffe_id like "*/db/secure/*" && resource.x509_svid_ttl * 100000000000000000 > 0 };

@id("adv.overflow_first")
forbid (principal is Mayfly::Workload, action, resource is Mayfly::Entry)
when { resource.admin && resource.x509_svid_ttl * 10000000000000000 > 0 && resource.spiffe_id like "nothing*" };

@id("adv.extension")
forbid (principal is Mayfly::Workload, action, resource is Mayfly::Entry)
when { resource.spiffe_id like "*/ml/*" && decimal("1.5").lessThan(decimal("1.2")) };

@id("adv.entity_literal_attr")
forbid (principal is Mayfly::Workload, action, resource is Mayfly::Entry)
when { resource.spiffe_id like "*/payments/open/*" && Mayfly::Node::"spiffe://example.org/mayfly/agent/x509pop/n1".assurance > 1 };

@id("adv.selectors")
@max_ttl("9m")
permit (principal is Mayfly::Workload, action, resource is Mayfly::Entry)
when {
  principal.selectors.contains("unix:uid:1003") && principal.node.selectors.isEmpty() &&
  resource.selectors.containsAll(principal.selectors)
};

@id("adv.task")
forbid (principal is Mayfly::Workload, action, resource is Mayfly::Entry)
when { principal.task like "unix:*:9*" && context.requested_ttl >= 3600 && !principal.node.can_reattest };

@id("adv.set_eq")
forbid (principal, action, resource) when { context.audience == ["b", "a"] };

@id("adv.ages")
forbid (principal is Mayfly::Workload, action, resource is Mayfly::Entry)
when { resource.max_attestation_age != 0 && context.attestation_age - resource.max_attestation_age > 600 };

@id("adv.action_in_cond")
@max_ttl("2m")
permit (principal, action, resource)
when { action == Mayfly::Action::"issue_jwt" && context.audience.contains("short") };

@id("adv.clauses")
forbid (principal is Mayfly::Workload, action in [Mayfly::Action::"issue_x509", Mayfly::Action::"attest_node"], resource)
when { context.weekday <= 3 }
unless { principal.node.banned }
when { -context.hour < -12 };

@id("adv.node_only")
forbid (principal is Mayfly::Node, action, resource);

@id("adv.node_scope_banned")
forbid (principal is Mayfly::Workload, action, resource is Mayfly::Entry) when { principal.node.banned && resource.scope == "shared" };

@id("adv.parent")
forbid (principal is Mayfly::Workload, action, resource is Mayfly::Entry)
when { resource.parent_id like "*/n3" && context.now % 2 == 0 || resource.jwt_svid_ttl > 3000 && resource.downstream };
"#;

/// `adv.parent` uses `%`, which Cedar does not have: replaced by a policy
/// Cedar accepts, with an `||` whose left side can be unknown.
fn adversarial() -> String {
    ADVERSARIAL.replace(
        "context.now % 2 == 0",
        "context.now - context.attestation_age * 2 > 0",
    )
}

fn engine(with_adversarial: bool, builtin: bool) -> Engine {
    let mut files = vec![SourceFile {
        name: "bench.cedar".into(),
        text: bench_policies(),
    }];
    if with_adversarial {
        files.push(SourceFile {
            name: "adversarial.cedar".into(),
            text: adversarial(),
        });
    }
    Engine::new(loader::compile(builtin, &files).unwrap()).unwrap()
}

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

/// A random entry. Its revision is new (an entry's id and revision name
/// its content, which the entity cache relies on), or 0 (never stored).
fn random_entry(rng: &mut StdRng) -> Entry {
    let prefix = PREFIXES[rng.random_range(0..PREFIXES.len())];
    let kind = KINDS[rng.random_range(0..KINDS.len())];
    let n = rng.random_range(0..4);
    let pick = |rng: &mut StdRng, items: &[&str]| -> Option<String> {
        let i = rng.random_range(0..=items.len());
        items.get(i).map(|s| (*s).to_owned())
    };
    let mut selectors = vec![format!("unix:uid:{}", 1000 + rng.random_range(0..5))];
    if rng.random_bool(0.5) {
        selectors.push("unix:gid:100".into());
    }
    let mut entry = EntrySpec {
        spiffe_id: format!("spiffe://example.org/{prefix}/{kind}/svc-{n}"),
        parent_id: format!(
            "spiffe://example.org/mayfly/agent/x509pop/n{}",
            rng.random_range(1..4)
        ),
        selectors,
        min_assurance: pick(rng, &["low", "medium", "high"]),
        max_attestation_age: pick(rng, &["10m", "1h"]),
        x509_svid_ttl: pick(rng, &["1m", "1h", "1000s"]),
        jwt_svid_ttl: pick(rng, &["5m", "1h"]),
        admin: rng.random_bool(0.2),
        downstream: rng.random_bool(0.2),
        ..Default::default()
    }
    .validate(
        &td(),
        format!("e-{prefix}-{kind}-{n}").parse::<EntryId>().unwrap(),
        if rng.random_bool(0.1) {
            0
        } else {
            REVISION.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        },
    )
    .unwrap();
    if rng.random_bool(0.3) {
        entry.scope = mayfly::entry::Scope::Shared;
    }
    entry
}

fn random_node(rng: &mut StdRng, now: OffsetDateTime) -> NodeRecord {
    let n = rng.random_range(1..4);
    NodeRecord {
        spiffe_id: SpiffeId::new(format!("spiffe://example.org/mayfly/agent/x509pop/n{n}"))
            .unwrap(),
        attestor: ["x509pop", "join_token", "k8s_psat"][rng.random_range(0..3)].into(),
        assurance: [Assurance::Low, Assurance::Medium, Assurance::High][rng.random_range(0..3)],
        selectors: if rng.random_bool(0.5) {
            Default::default()
        } else {
            ["x509pop:subject:cn:n".parse().unwrap()]
                .into_iter()
                .collect()
        },
        enrolled_aliases: vec![],
        attested_at: now - time::Duration::seconds(rng.random_range(0..4 * 3600)),
        current_serial: "01".into(),
        next_serial: None,
        svid_expires_at: now + time::Duration::hours(1),
        banned: rng.random_bool(0.1),
        can_reattest: rng.random_bool(0.5),
    }
}

const AUDIENCES: [&str; 8] = [
    "payments-api",
    "db-api",
    "ml-api",
    "other",
    "short",
    "a",
    "b",
    "web-api",
];

/// Counts of what the random requests exercised.
#[derive(Debug, Default)]
struct Seen {
    allowed: usize,
    forbidden: usize,
    no_permit: usize,
    errors: usize,
    capped: usize,
    reasons: BTreeMap<String, usize>,
}

fn check_random_requests(engine: &Engine, seed: u64, requests: usize) -> Seen {
    let mut rng = StdRng::seed_from_u64(seed);
    let base = datetime!(2026-11-23 00:00 UTC);
    // A few nodes, entries and instants reused across requests, so that
    // the cached entities are exercised too (hits, and misses as entries
    // get new revisions and nodes other attestation times).
    let mut entries: Vec<Entry> = (0..40).map(|_| random_entry(&mut rng)).collect();
    let mut nodes: Vec<NodeRecord> = (0..6).map(|_| random_node(&mut rng, base)).collect();
    let instants: Vec<OffsetDateTime> = (0..50)
        .map(|_| base + time::Duration::seconds(rng.random_range(0..7 * 24 * 3600)))
        .collect();
    let mut seen = Seen::default();
    for i in 0..requests {
        if i % 97 == 0 {
            let k = rng.random_range(0..entries.len());
            entries[k] = random_entry(&mut rng);
        }
        if i % 89 == 0 {
            let k = rng.random_range(0..nodes.len());
            nodes[k] = random_node(&mut rng, base);
        }
        let now = instants[rng.random_range(0..instants.len())];
        let mut node = nodes[rng.random_range(0..nodes.len())].clone();
        node.attested_at =
            now - time::Duration::seconds([30, 300, 1800, 7200][rng.random_range(0..4)]);
        let node = &node;
        let entry = &entries[rng.random_range(0..entries.len())];
        let jwt = rng.random_bool(0.5);
        let audience: Vec<String> = if jwt {
            AUDIENCES
                .iter()
                .filter(|_| rng.random_bool(0.25))
                .map(|s| (*s).to_owned())
                .collect()
        } else {
            Vec::new()
        };
        let req = PolicyRequest::Issue(Issue {
            node,
            entry,
            task_id: ["unix:42:1", "unix:77:9001", ""][rng.random_range(0..3)],
            audience: &audience,
            requested_ttl: [60, 3600, 86_400][rng.random_range(0..3)],
            jwt,
        });
        let fast = engine.decide(&req, now);
        let full = engine.decide_full_set(&req, now);
        assert_eq!(
            fast, full,
            "request {i}: entry {entry:?}, node {node:?}, audience {audience:?}, at {now}"
        );
        if !full.errors.is_empty() {
            seen.errors += 1;
        } else if full.allowed {
            seen.allowed += 1;
        } else if full.reasons[0].starts_with("no policy permits") {
            seen.no_permit += 1;
        } else {
            seen.forbidden += 1;
        }
        if full.ttl_cap.is_some() {
            seen.capped += 1;
        }
        for r in &full.reasons {
            *seen.reasons.entry(r.clone()).or_default() += 1;
        }
    }
    seen
}

#[test]
fn prefiltered_decisions_equal_the_full_set_on_the_bench_policies() {
    let e = engine(false, true);
    // Every bench policy's condition is modelled (none left to Cedar
    // unconditionally), and so are the built-in ones.
    let modelled = e.prefiltered("issue_jwt");
    assert_eq!(modelled.len(), 18, "{modelled:?}");
    assert_eq!(e.prefiltered("issue_x509").len(), 13);
    let seen = check_random_requests(&e, 1, 5_000);
    assert!(seen.allowed > 100 && seen.forbidden > 100, "{seen:?}");
    assert!(seen.capped > 100, "{seen:?}");
}

#[test]
fn prefiltered_decisions_equal_the_full_set_on_adversarial_policies() {
    // Without the built-in policies, nothing permits most requests.
    let seen = check_random_requests(&engine(true, false), 4, 5_000);
    assert!(seen.no_permit > 100 && seen.allowed > 10, "{seen:?}");
    let e = engine(true, true);
    let seen = check_random_requests(&e, 2, 20_000);
    // The requests reach every kind of outcome, and the policies meant to
    // fire or fail do.
    assert!(seen.allowed > 1_000, "{seen:?}");
    assert!(seen.forbidden > 1_000, "{seen:?}");
    assert!(seen.errors > 100, "{seen:?}");
    assert!(seen.capped > 100, "{seen:?}");
    for id in [
        "adv.unless_or",
        "adv.not_like_middle",
        "adv.has",
        "adv.if",
        "adv.in_node",
        "adv.is_in",
        "adv.entity_eq",
        "adv.entity_in_cond",
        "adv.selectors",
        "adv.task",
        "adv.set_eq",
        "adv.ages",
        "adv.action_in_cond",
        "adv.clauses",
        "adv.node_scope_banned",
        "adv.overflow_after_narrowing",
        "adv.entity_literal_attr",
        "adv.parent",
        "bench.hours.payments",
        "bench.ttl.db",
        "mayfly.default.min_assurance",
        "mayfly.default.max_attestation_age",
    ] {
        assert!(
            seen.reasons.contains_key(id),
            "{id} never decided: {seen:?}"
        );
    }
}

/// The pre-filter reads the same values as the Cedar entities hold: every
/// attribute of the workload, node and entry entities and of the context,
/// for random requests.
#[test]
fn prefilter_facts_are_the_entity_attributes() {
    let mut rng = StdRng::seed_from_u64(3);
    let now = datetime!(2026-11-25 13:14:15 UTC);
    for _ in 0..200 {
        let entry = random_entry(&mut rng);
        let node = random_node(&mut rng, now);
        let audience = vec!["x".to_owned(), "y".to_owned()];
        let issue = Issue {
            node: &node,
            entry: &entry,
            task_id: "unix:1:2",
            audience: &audience,
            requested_ttl: 123,
            jwt: true,
        };
        let input = IssueInput::new(&issue, now, None).unwrap();
        let cedar = input.to_cedar(prefilter::Reads::ALL, None).unwrap();
        let schema: &Schema = super::schema::schema().unwrap();
        // The entities conform to the schema.
        cedar_policy::Entities::from_entities(cedar.entities.clone(), Some(schema)).unwrap();
        let facts = prefilter::IssueFacts {
            action: "issue_jwt",
            workload_id: &input.workload_id,
            task: input.task,
            node: &input.node.facts,
            entry: &input.entry.facts,
            context: &input.context,
        };
        for entity in &cedar.entities {
            let ty = entity.uid().type_name().to_string();
            let place = match ty.as_str() {
                "Mayfly::Workload" => prefilter::Place::Workload,
                "Mayfly::Node" => prefilter::Place::Node,
                "Mayfly::Entry" => prefilter::Place::Entry,
                other => panic!("unexpected entity type {other}"),
            };
            let names = place.names();
            for name in names {
                let value = entity.attr(name).unwrap().unwrap();
                prefilter::check_attr(place, name, &facts, &value).unwrap();
            }
            // And no attribute is missing from the pre-filter's model.
            assert_eq!(entity.attrs().count(), names.len(), "{ty}");
        }
        let names = prefilter::Place::Context.names();
        assert_eq!(cedar.context.clone().into_iter().count(), names.len());
        for name in names {
            let value = cedar.context.get(name).unwrap();
            prefilter::check_attr(prefilter::Place::Context, name, &facts, &value).unwrap();
        }
        // The principal, resource and node entities are the ones the
        // pre-filter compares with literals.
        let principal = EvalResult::EntityUid(cedar.principal.clone());
        let resource = EvalResult::EntityUid(cedar.resource.clone());
        assert_eq!(
            principal.to_string(),
            format!("Mayfly::Workload::{:?}", input.workload_id)
        );
        assert_eq!(
            resource.to_string(),
            format!("Mayfly::Entry::{:?}", entry.id.as_str())
        );
    }
}
