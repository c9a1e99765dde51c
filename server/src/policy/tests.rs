//! Unit tests of the policy engine, loader and store.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use mayfly::entry::{Assurance, Entry, EntryId, EntrySpec};
use mayfly::{SpiffeId, TrustDomain};
use time::OffsetDateTime;
use time::macros::datetime;

use super::loader::{self, SourceFile};
use super::*;
use crate::admin::caller::AdminCaller;
use crate::store::NodeRecord;

const NOON: OffsetDateTime = datetime!(2026-11-23 12:00 UTC);

fn node(assurance: Assurance, attested_at: OffsetDateTime) -> NodeRecord {
    NodeRecord {
        spiffe_id: SpiffeId::new("spiffe://example.org/mayfly/agent/x509pop/n1").unwrap(),
        attestor: "x509pop".into(),
        assurance,
        selectors: Default::default(),
        enrolled_aliases: vec![],
        attested_at,
        current_serial: "01".into(),
        next_serial: None,
        svid_expires_at: attested_at + time::Duration::hours(1),
        banned: false,
        can_reattest: true,
    }
}

fn entry(path: &str, min: Option<&str>, max_age: Option<&str>) -> Entry {
    EntrySpec {
        spiffe_id: format!("spiffe://example.org{path}"),
        parent_id: "spiffe://example.org/mayfly/agent/x509pop/n1".into(),
        selectors: vec!["unix:uid:1000".into()],
        min_assurance: min.map(Into::into),
        max_attestation_age: max_age.map(Into::into),
        ..Default::default()
    }
    .validate(
        &TrustDomain::new("example.org").unwrap(),
        EntryId::random(),
        1,
    )
    .unwrap()
}

fn issue<'a>(n: &'a NodeRecord, e: &'a Entry, jwt: bool, aud: &'a [String]) -> PolicyRequest<'a> {
    PolicyRequest::Issue(Issue {
        node: n,
        entry: e,
        task_id: "unix:42:1",
        audience: aud,
        requested_ttl: 3600,
        jwt,
    })
}

fn engine_with(files: &[(&str, &str)]) -> Engine {
    let files: Vec<SourceFile> = files
        .iter()
        .map(|(n, t)| SourceFile {
            name: (*n).into(),
            text: (*t).into(),
        })
        .collect();
    Engine::new(loader::compile(true, &files).unwrap()).unwrap()
}

#[test]
fn the_default_policy_reproduces_the_registration_rules() {
    let e = Engine::builtin().unwrap();
    // Plain entry: allowed by the issue permit.
    let plain = entry("/web", None, None);
    let n = node(Assurance::Low, NOON - time::Duration::hours(5));
    let d = e.decide(&issue(&n, &plain, false, &[]), NOON);
    assert!(d.allowed, "{d:?}");
    assert_eq!(d.reasons, ["mayfly.default.issue"]);

    // Assurance below the entry's minimum.
    let high = entry("/db", Some("high"), None);
    let d = e.decide(&issue(&n, &high, false, &[]), NOON);
    assert!(!d.allowed);
    assert_eq!(d.reasons, ["mayfly.default.min_assurance"]);
    let strong = node(Assurance::High, NOON);
    assert!(e.decide(&issue(&strong, &high, true, &[]), NOON).allowed);

    // Attestation older than max_attestation_age.
    let fresh_only = entry("/vault", None, Some("10m"));
    let d = e.decide(&issue(&n, &fresh_only, false, &[]), NOON);
    assert!(!d.allowed);
    assert_eq!(d.reasons, ["mayfly.default.max_attestation_age"]);
    let recent = node(Assurance::Low, NOON - time::Duration::minutes(9));
    assert!(
        e.decide(&issue(&recent, &fresh_only, false, &[]), NOON)
            .allowed
    );

    // Attestation and renewal: allowed unless banned.
    assert!(e.decide(&PolicyRequest::Attest(&n), NOON).allowed);
    assert!(e.decide(&PolicyRequest::Renew(&n), NOON).allowed);
    let mut banned = n.clone();
    banned.banned = true;
    let d = e.decide(&PolicyRequest::Attest(&banned), NOON);
    assert!(!d.allowed);
    assert!(
        d.reasons[0].starts_with("no policy permits attest_node"),
        "{d:?}"
    );

    // Admin: any authenticated caller.
    let caller = AdminCaller::unix(1000, Some(7));
    let call = PolicyRequest::Admin(AdminCall {
        caller: &caller,
        operation: "entry.delete",
        method: "DELETE",
        route: "/v1/entries/{id}",
        path: "/v1/entries/x",
    });
    let d = e.decide(&call, NOON);
    assert!(d.allowed, "{d:?}");
    assert_eq!(d.reasons, ["mayfly.default.admin"]);
}

const BUSINESS_HOURS: &str = r#"
@id("payments.business_hours")
forbid (
  principal is Mayfly::Workload,
  action in [Mayfly::Action::"issue_x509", Mayfly::Action::"issue_jwt"],
  resource is Mayfly::Entry
)
when {
  resource.spiffe_id like "spiffe://example.org/payments/*" &&
  (context.hour < 9 || context.hour >= 17)
};
"#;

#[test]
fn business_hours_deny_then_allow_as_time_moves() {
    let e = engine_with(&[("hours.cedar", BUSINESS_HOURS)]);
    let n = node(Assurance::Low, datetime!(2026-11-23 00:00 UTC));
    let pay = entry("/payments/api", None, None);
    let night = datetime!(2026-11-23 03:00 UTC);
    let d = e.decide(&issue(&n, &pay, false, &[]), night);
    assert!(!d.allowed);
    assert_eq!(d.reasons, ["payments.business_hours"]);
    let d = e.decide(&issue(&n, &pay, true, &["aud".into()]), night);
    assert!(!d.allowed, "JWT too");
    let day = datetime!(2026-11-23 10:30 UTC);
    assert!(e.decide(&issue(&n, &pay, false, &[]), day).allowed);
    assert!(
        !e.decide(
            &issue(&n, &pay, false, &[]),
            datetime!(2026-11-23 17:00 UTC)
        )
        .allowed
    );
    // Other paths are not affected.
    let web = entry("/web", None, None);
    assert!(e.decide(&issue(&n, &web, false, &[]), night).allowed);
}

#[test]
fn ttl_caps_apply_from_the_permits_that_fired() {
    let e = engine_with(&[(
        "ttl.cedar",
        r#"
@id("jwt.vault.short")
@max_ttl("10m")
permit (principal, action == Mayfly::Action::"issue_jwt", resource)
when { context.audience.contains("vault") };

@max_ttl("30m")
permit (principal, action == Mayfly::Action::"issue_jwt", resource)
when { context.audience.contains("vault") };
"#,
    )]);
    let n = node(Assurance::Low, NOON);
    let en = entry("/web", None, None);
    let aud = vec!["vault".to_owned()];
    let d = e.decide(&issue(&n, &en, true, &aud), NOON);
    assert!(d.allowed);
    assert_eq!(d.ttl_cap.map(|t| t.as_secs()), Some(600));
    assert!(d.reasons.contains(&"jwt.vault.short".to_owned()));
    assert!(d.reasons.contains(&"ttl.cedar:1".to_owned()), "{d:?}");
    assert_eq!(d.cap("1h".parse().unwrap()).as_secs(), 600);
    assert_eq!(d.cap("5m".parse().unwrap()).as_secs(), 300);
    let other = vec!["db".to_owned()];
    assert_eq!(e.decide(&issue(&n, &en, true, &other), NOON).ttl_cap, None);
}

#[test]
fn an_unknown_attribute_fails_validation_with_its_position() {
    let text = "permit (principal, action, resource)\nwhen {\n  principal.colour == \"red\" };\n";
    let err = loader::compile(
        true,
        &[SourceFile {
            name: "bad.cedar".into(),
            text: text.into(),
        }],
    )
    .unwrap_err();
    let shown = err.0[0].to_string();
    assert!(shown.starts_with("bad.cedar:3:3: "), "{shown}");
    assert!(shown.contains("colour"), "{shown}");
}

#[test]
fn syntax_errors_name_file_line_and_column() {
    let err = loader::compile(
        false,
        &[SourceFile {
            name: "p.cedar".into(),
            text: "permit (principal, action, resource);\nforbid (principal action, resource);\n"
                .into(),
        }],
    )
    .unwrap_err();
    assert_eq!(err.0[0].file, "p.cedar");
    assert_eq!(err.0[0].line, Some(2), "{err}");
    assert!(err.0[0].column.is_some());
}

#[test]
fn duplicate_ids_and_bad_caps_are_rejected() {
    let err = loader::compile(
        true,
        &[SourceFile {
            name: "d.cedar".into(),
            text: "\n@id(\"mayfly.default.issue\")\npermit (principal, action, resource);\n".into(),
        }],
    )
    .unwrap_err();
    assert_eq!(
        err.0[0].to_string(),
        "d.cedar:2:1: policy id \"mayfly.default.issue\" is already used in <built-in default.cedar>"
    );
    let err = loader::compile(
        true,
        &[SourceFile {
            name: "c.cedar".into(),
            text: "@max_ttl(\"soon\")\npermit (principal, action, resource);\n".into(),
        }],
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("c.cedar:1:1: @max_ttl(\"soon\")"),
        "{err}"
    );
}

#[test]
fn without_the_default_set_everything_is_denied() {
    let e = Engine::new(loader::compile(false, &[]).unwrap()).unwrap();
    let n = node(Assurance::High, NOON);
    let d = e.decide(&PolicyRequest::Attest(&n), NOON);
    assert!(!d.allowed);
    assert!(d.reasons[0].contains("no policy permits"), "{d:?}");
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

#[test]
fn a_broken_file_on_reload_is_rejected_and_the_old_set_stays() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "hours.cedar", BUSINESS_HOURS);
    let store = PolicyStore::builtin().unwrap();
    let n = store
        .configure(PolicySources {
            paths: vec![dir.path().to_owned()],
            default_policy: true,
        })
        .unwrap();
    assert_eq!(n, 6);
    let nd = node(Assurance::Low, NOON);
    let pay = entry("/payments/api", None, None);
    let night = datetime!(2026-11-23 03:00 UTC);
    assert!(!store.decide(&issue(&nd, &pay, false, &[]), night).allowed);
    assert!(store.reload_if_changed().is_none(), "nothing changed");

    // Broken: rejected, the business-hours rule stays in force.
    write(
        dir.path(),
        "hours.cedar",
        "forbid (principal, action resource);",
    );
    let err = store.reload_if_changed().unwrap().unwrap_err();
    assert!(err.to_string().contains("hours.cedar:1:"), "{err}");
    assert!(!store.decide(&issue(&nd, &pay, false, &[]), night).allowed);
    assert!(store.reload_if_changed().is_none(), "reported once");

    // A missing file is reported once too.
    std::fs::remove_file(dir.path().join("hours.cedar")).unwrap();
    std::fs::write(dir.path().join("hours.cedar"), BUSINESS_HOURS).unwrap();
    assert_eq!(store.reload_if_changed().unwrap().unwrap(), 6);

    // Fixed (the rule removed): the new set is in force.
    write(dir.path(), "hours.cedar", "");
    assert_eq!(store.reload_if_changed().unwrap().unwrap(), 5);
    assert!(store.decide(&issue(&nd, &pay, false, &[]), night).allowed);
}

#[test]
fn the_weekday_is_iso() {
    let e = engine_with(&[(
        "w.cedar",
        "forbid (principal, action, resource) when { context.weekday == 7 };",
    )]);
    let n = node(Assurance::Low, NOON);
    // 2026-11-22 is a Sunday.
    assert!(
        !e.decide(&PolicyRequest::Attest(&n), datetime!(2026-11-22 12:00 UTC))
            .allowed
    );
    assert!(e.decide(&PolicyRequest::Attest(&n), NOON).allowed);
}

#[test]
fn cached_entities_follow_node_and_entry_changes() {
    let e = Engine::builtin().unwrap();
    let mut n = node(Assurance::Low, NOON);
    let mut en = entry("/db", Some("high"), None);
    assert!(!e.decide(&issue(&n, &en, false, &[]), NOON).allowed);
    // Same node id and second, higher assurance: not the cached entity.
    n.assurance = Assurance::High;
    assert!(e.decide(&issue(&n, &en, false, &[]), NOON).allowed);
    n.assurance = Assurance::Low;
    assert!(!e.decide(&issue(&n, &en, false, &[]), NOON).allowed);
    // The entry changed (new revision): not the cached entity.
    en.min_assurance = None;
    en.revision += 1;
    assert!(e.decide(&issue(&n, &en, false, &[]), NOON).allowed);
    // Attestation age moves with time for the same node.
    let mut aged = entry("/vault", None, Some("10m"));
    aged.revision = 7;
    assert!(e.decide(&issue(&n, &aged, false, &[]), NOON).allowed);
    let later = NOON + time::Duration::minutes(11);
    assert!(!e.decide(&issue(&n, &aged, false, &[]), later).allowed);
}

/// `Engine::decide` leaves the action entity out for non-admin actions,
/// which is only right while they belong to no action group.
#[test]
fn only_admin_operations_belong_to_an_action_group() {
    let actions = super::schema::schema().unwrap().action_entities().unwrap();
    for a in actions.iter() {
        let uid = a.uid();
        let name = uid.id().unescaped().to_owned();
        let groups = actions.ancestors(&uid).map(|i| i.count()).unwrap_or(0);
        match Action::from_name(&name) {
            Action::Admin(op) if op != "admin" => assert_eq!(groups, 1, "{op}"),
            _ => assert_eq!(groups, 0, "{name} must not be in a group"),
        }
    }
}

#[test]
fn a_missing_policy_file_is_reported_once_and_the_old_set_stays() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hours.cedar");
    write(dir.path(), "hours.cedar", BUSINESS_HOURS);
    let store = PolicyStore::builtin().unwrap();
    store
        .configure(PolicySources {
            paths: vec![file.clone()],
            default_policy: true,
        })
        .unwrap();
    std::fs::remove_file(&file).unwrap();
    let err = store.reload_if_changed().unwrap().unwrap_err();
    assert!(err.to_string().contains("cannot read"), "{err}");
    assert!(store.reload_if_changed().is_none(), "reported once");
    let nd = node(Assurance::Low, NOON);
    let pay = entry("/payments/api", None, None);
    let night = datetime!(2026-11-23 03:00 UTC);
    assert!(!store.decide(&issue(&nd, &pay, false, &[]), night).allowed);
}
