use std::sync::Arc;

use mayfly::clock::Clock as _;
use mayfly::entry::{Assurance, EntrySpec};
use mayfly::proto::node::TaskEnd;
use mayfly::revocation::{CredentialId, Reason};
use mayfly::x509::{VerifiedCsr, new_key_and_csr, verify_crl};
use time::Duration;

use super::OperatorTarget;
use crate::authority::AuthorityManager;
use crate::config::ServerConfig;
use crate::error::ServiceError;
use crate::service::sign::tests::test_state;
use crate::state::{ChangeEvent, ServerState};
use crate::store::sled_store::SledStore;
use crate::store::{IssuedRecord, NodeRecord};

const A: &str = "spiffe://example.org/mayfly/agent/join_token/a";
const B: &str = "spiffe://example.org/mayfly/agent/join_token/b";

fn sid(s: &str) -> mayfly::SpiffeId {
    mayfly::SpiffeId::new(s).unwrap()
}

/// Signs a real X.509-SVID and records it as issued to `agent` for
/// `task` under `entry`; returns the serial.
fn issue_x509(state: &ServerState, agent: &str, entry: &str, task: &str, ttl: Duration) -> String {
    let csr = VerifiedCsr::from_der(&new_key_and_csr().unwrap().csr_der).unwrap();
    let ttl = mayfly::ttl::Ttl::from_secs(u64::try_from(ttl.whole_seconds()).unwrap());
    let (signed, authority_id) = state
        .sign_x509_svid_by(&sid("spiffe://example.org/web"), &csr, ttl, &[])
        .unwrap();
    state
        .record_issued(&[IssuedRecord {
            id: CredentialId::Serial(signed.serial_hex()),
            spiffe_id: "spiffe://example.org/web".into(),
            agent_id: Some(agent.into()),
            entry_id: Some(entry.into()),
            task_id: (!task.is_empty()).then(|| task.to_owned()),
            authority_id,
            expires_at: signed.not_after,
        }])
        .unwrap();
    signed.serial_hex()
}

fn issue_jwt(state: &ServerState, agent: &str, entry: &str, task: &str) -> String {
    let (_, exp, jti, kid) = state
        .mint_jwt_svid_by(&sid("spiffe://example.org/web"), &["db".into()], None)
        .unwrap();
    state
        .record_issued(&[IssuedRecord {
            id: CredentialId::Jti(jti.clone()),
            spiffe_id: "spiffe://example.org/web".into(),
            agent_id: Some(agent.into()),
            entry_id: Some(entry.into()),
            task_id: Some(task.into()),
            authority_id: kid,
            expires_at: time::OffsetDateTime::from_unix_timestamp(exp).unwrap(),
        }])
        .unwrap();
    jti
}

fn task_end(task: &str, serials: &[&String], jtis: &[&String]) -> TaskEnd {
    TaskEnd {
        task_id: task.into(),
        x509_serials: serials.iter().map(|s| (*s).clone()).collect(),
        jwt_ids: jtis.iter().map(|s| (*s).clone()).collect(),
        reason: "task_ended".into(),
        ended_at: 0,
    }
}

/// The serials listed in the active CA's current CRL (verified).
fn crl_serials(state: &ServerState) -> Vec<String> {
    let auth = state.authorities.snapshot();
    let (id, ca) = auth.active_x509().unwrap();
    let der = state.crl(id).unwrap();
    let info = verify_crl(&der, ca.cert_der()).unwrap();
    info.revoked.into_iter().map(|(s, _)| s).collect()
}

fn crl_number(state: &ServerState) -> u64 {
    let auth = state.authorities.snapshot();
    let (id, ca) = auth.active_x509().unwrap();
    verify_crl(&state.crl(id).unwrap(), ca.cert_der())
        .unwrap()
        .crl_number
        .unwrap()
}

#[test]
fn every_authority_has_a_crl_from_the_start() {
    let (state, _clock, _dir) = test_state();
    assert!(crl_serials(&state).is_empty());
    assert_eq!(state.crls().0.len(), 1);
    assert!(state.crl("nope").is_none());
}

#[test]
fn task_end_revokes_only_the_callers_credentials_of_that_task_and_is_idempotent() {
    let (state, _clock, _dir) = test_state();
    let mut events = state.subscribe();
    let a1 = issue_x509(&state, A, "e1", "t1", Duration::hours(1));
    let a2 = issue_x509(&state, A, "e1", "t2", Duration::hours(1));
    let aj = issue_jwt(&state, A, "e1", "t1");
    let b1 = issue_x509(&state, B, "e1", "t1", Duration::hours(1));
    let before = crl_number(&state);

    // A reports t1 with its own credentials, B's serial, another task's
    // serial and an unknown one: only its own t1 credentials are revoked.
    let unknown = "01".to_owned();
    let n = state
        .report_task_ends(
            &sid(A),
            &[task_end("t1", &[&a1, &b1, &a2, &unknown], &[&aj])],
        )
        .unwrap();
    assert_eq!(n, 2);
    assert!(state.is_revoked(&CredentialId::Serial(a1.clone())));
    assert!(state.is_revoked(&CredentialId::Jti(aj.clone())));
    assert!(!state.is_revoked(&CredentialId::Serial(a2.clone())));
    assert!(!state.is_revoked(&CredentialId::Serial(b1.clone())));
    assert_eq!(crl_serials(&state), vec![a1.clone()]);
    assert!(crl_number(&state) > before);
    match events.try_recv().unwrap() {
        ChangeEvent::Revocations { added } => {
            assert_eq!(added.len(), 2);
            assert!(added.iter().all(|r| r.reason == Reason::TaskEnded));
        }
        other => panic!("unexpected event {other:?}"),
    }

    // Idempotent.
    let n = state
        .report_task_ends(&sid(A), &[task_end("t1", &[&a1], &[&aj])])
        .unwrap();
    assert_eq!(n, 0);
    // B cannot revoke A's credentials.
    let n = state
        .report_task_ends(&sid(B), &[task_end("t2", &[&a2], &[])])
        .unwrap();
    assert_eq!(n, 0);
    assert!(!state.is_revoked(&CredentialId::Serial(a2)));
    // Completed tasks carry their reason; bad reasons are refused.
    let mut te = task_end("t1", &[&b1], &[]);
    te.reason = "task_completed".into();
    assert_eq!(state.report_task_ends(&sid(B), &[te.clone()]).unwrap(), 1);
    assert_eq!(
        state
            .current_revocations()
            .iter()
            .find(|r| r.id == CredentialId::Serial(b1.clone()))
            .unwrap()
            .reason,
        Reason::TaskCompleted
    );
    te.reason = "bored".into();
    assert!(matches!(
        state.report_task_ends(&sid(B), &[te]),
        Err(ServiceError::InvalidArgument(_))
    ));
}

#[test]
fn shared_svids_are_revoked_by_any_task_end_of_their_agent() {
    let (state, _clock, _dir) = test_state();
    let shared = issue_x509(&state, A, "e1", "", Duration::hours(1));
    let n = state
        .report_task_ends(&sid(A), &[task_end("whatever", &[&shared], &[])])
        .unwrap();
    assert_eq!(n, 1);
}

fn node(state: &ServerState, id: &str) -> NodeRecord {
    let now = state.now();
    NodeRecord {
        spiffe_id: sid(id),
        attestor: "join_token".into(),
        assurance: Assurance::Low,
        selectors: Default::default(),
        enrolled_aliases: vec![],
        attested_at: now,
        current_serial: "01".into(),
        next_serial: None,
        svid_expires_at: now,
        banned: false,
        can_reattest: false,
    }
}

#[test]
fn entry_deletion_ban_and_eviction_revoke_what_was_issued_under_them() {
    let (state, _clock, _dir) = test_state();
    let entry = state
        .create_entries(vec![EntrySpec {
            spiffe_id: "spiffe://example.org/web".into(),
            parent_id: A.into(),
            selectors: vec!["unix:uid:1000".into()],
            ..Default::default()
        }])
        .unwrap()
        .remove(0)
        .unwrap();
    let in_entry = issue_x509(&state, A, entry.id.as_str(), "t1", Duration::hours(1));
    let other_entry = issue_x509(&state, A, "e-other", "t1", Duration::hours(1));
    let of_b = issue_x509(&state, B, "e-other", "t1", Duration::hours(1));
    let jwt_b = issue_jwt(&state, B, "e-other", "t9");

    state.delete_entry(&entry.id).unwrap();
    let revs = state.current_revocations();
    assert_eq!(revs.len(), 1);
    assert_eq!(revs[0].id, CredentialId::Serial(in_entry.clone()));
    assert_eq!(revs[0].reason, Reason::EntryDeleted);

    state.store.put_node(&node(&state, B)).unwrap();
    state.ban_agent(&sid(B)).unwrap();
    let revs = state.current_revocations();
    assert_eq!(revs.len(), 3);
    for id in [CredentialId::Serial(of_b.clone()), CredentialId::Jti(jwt_b)] {
        assert_eq!(
            revs.iter().find(|r| r.id == id).unwrap().reason,
            Reason::AgentBanned
        );
    }
    let mut crl = crl_serials(&state);
    crl.sort();
    let mut want = vec![in_entry, of_b];
    want.sort();
    assert_eq!(crl, want);

    state.store.put_node(&node(&state, A)).unwrap();
    state.evict_agent(&sid(A)).unwrap();
    let r = state.current_revocations();
    let r = r
        .iter()
        .find(|r| r.id == CredentialId::Serial(other_entry.clone()))
        .unwrap();
    assert_eq!(r.reason, Reason::AgentEvicted);
}

#[test]
fn operator_revokes_by_serial_jti_or_spiffe_id() {
    let (state, _clock, _dir) = test_state();
    let s = issue_x509(&state, A, "e1", "t1", Duration::hours(1));
    let j = issue_jwt(&state, A, "e1", "t1");
    let upper = s.to_uppercase();
    let r = state
        .revoke_by_operator(
            &OperatorTarget::Credential(CredentialId::serial(&upper).unwrap()),
            Some("leaked"),
        )
        .unwrap();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].reason, Reason::Operator);
    let audited = state.store.list_audit(0, 100).unwrap();
    let rec = audited
        .iter()
        .find(|r| r.event.action == "revocation.operator")
        .expect("the operator revocation is audited");
    assert_eq!(rec.event.details["note"], "leaked");
    assert_eq!(
        rec.event.details["revoked"],
        serde_json::json!([format!("serial {s}")])
    );
    assert!(matches!(
        state.revoke_by_operator(
            &OperatorTarget::Credential(CredentialId::Serial("0123".into())),
            None
        ),
        Err(ServiceError::NotFound(_))
    ));
    let r = state
        .revoke_by_operator(
            &OperatorTarget::SpiffeId(sid("spiffe://example.org/web")),
            None,
        )
        .unwrap();
    assert_eq!(r.len(), 1, "only the jti was still live");
    assert_eq!(r[0].id, CredentialId::Jti(j));
    let (page, next) = state.list_revocations(Some(1), None).unwrap();
    assert_eq!(page.len(), 1);
    let (rest, none) = state.list_revocations(Some(1), next.as_deref()).unwrap();
    assert_eq!(rest.len(), 1);
    assert!(none.is_none());
    assert_ne!(page[0].id, rest[0].id);
}

#[test]
fn expired_credentials_are_pruned_with_their_records_and_leave_the_crl() {
    let (state, clock, _dir) = test_state();
    let short = issue_x509(&state, A, "e1", "t1", Duration::minutes(2));
    let long = issue_x509(&state, A, "e1", "t2", Duration::minutes(30));
    state
        .report_task_ends(
            &sid(A),
            &[
                task_end("t1", &[&short], &[]),
                task_end("t2", &[&long], &[]),
            ],
        )
        .unwrap();
    assert_eq!(crl_serials(&state).len(), 2);
    assert_eq!(state.store.list_issued().unwrap().len(), 2);

    clock.advance(Duration::minutes(3));
    state.prune_revocations().unwrap();
    assert_eq!(crl_serials(&state), vec![long.clone()]);
    assert_eq!(state.current_revocations().len(), 1);
    assert_eq!(state.store.list_revocations().unwrap().len(), 1);
    assert_eq!(state.store.list_issued().unwrap().len(), 1);

    // A CRL is re-signed at half its lifetime, with a later nextUpdate.
    let n = crl_number(&state);
    clock.advance(Duration::minutes(31));
    state.prune_revocations().unwrap();
    assert!(crl_number(&state) > n);
    assert!(crl_serials(&state).is_empty());
    assert!(state.store.list_issued().unwrap().is_empty());
    let auth = state.authorities.snapshot();
    let (id, ca) = auth.active_x509().unwrap();
    let info = verify_crl(&state.crl(id).unwrap(), ca.cert_der()).unwrap();
    assert_eq!(info.next_update, Some(clock.now() + Duration::hours(1)));
}

#[test]
fn revocations_and_crl_numbers_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ServerConfig::development();
    cfg.data_dir = dir.path().to_owned();
    let now = time::OffsetDateTime::now_utc();
    let open = |cfg: &ServerConfig| {
        let store = Arc::new(SledStore::open(&cfg.data_dir.join("store")).unwrap());
        let auth = AuthorityManager::load_or_create(cfg, now).unwrap();
        ServerState::new(
            cfg.clone(),
            store,
            Arc::new(mayfly::clock::SystemClock),
            auth,
        )
        .unwrap()
    };
    let (serial, number) = {
        let state = open(&cfg);
        let s = issue_x509(&state, A, "e1", "t1", Duration::hours(1));
        state
            .report_task_ends(&sid(A), &[task_end("t1", &[&s], &[])])
            .unwrap();
        (s, crl_number(&state))
    };
    let state = open(&cfg);
    assert!(state.is_revoked(&CredentialId::Serial(serial.clone())));
    assert_eq!(crl_serials(&state), vec![serial]);
    assert!(crl_number(&state) > number);
}
