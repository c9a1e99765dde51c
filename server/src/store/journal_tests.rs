//! The issuance journal with the sled store: what a crash leaves behind is
//! replayed, and only that.

use std::io::Write as _;
use std::sync::Arc;

use mayfly::revocation::CredentialId;
use time::OffsetDateTime;

use super::journal::FILE_NAME;
use super::sled_store::SledStore;
use super::{IssuedRecord, Store, StoreError};
use crate::audit::record::{Actor, ActorKind, AuditEvent, AuditRecord, GENESIS_HASH};

fn issued(serial: &str) -> IssuedRecord {
    IssuedRecord {
        id: CredentialId::Serial(serial.into()),
        spiffe_id: "spiffe://example.org/w".into(),
        agent_id: Some("spiffe://example.org/mayfly/agent/join_token/a".into()),
        entry_id: Some("e1".into()),
        task_id: Some("pid:1:2".into()),
        authority_id: "ca1".into(),
        expires_at: OffsetDateTime::now_utc() + time::Duration::hours(1),
    }
}

/// `n` chained audit records after `prev`.
fn chain(prev: Option<&AuditRecord>, n: u64) -> Vec<AuditRecord> {
    let mut out: Vec<AuditRecord> = Vec::new();
    let (mut seq, mut hash) =
        prev.map_or((0, GENESIS_HASH.to_owned()), |p| (p.seq, p.hash.clone()));
    for _ in 0..n {
        let event = AuditEvent::ok(
            Actor::new(
                ActorKind::Server,
                "spiffe://example.org/mayfly/server",
                "self",
            ),
            "x509.issue",
        )
        .detail("serial", format!("s{}", seq + 1));
        let r = AuditRecord::new(seq + 1, OffsetDateTime::now_utc(), event, hash);
        (seq, hash) = (r.seq, r.hash.clone());
        out.push(r);
    }
    out
}

/// Appends a journal line the way the store writes one.
fn journal_line(dir: &std::path::Path, issued: &[IssuedRecord], audit: &[AuditRecord]) {
    let line = serde_json::json!({ "issued": issued, "audit": audit });
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(FILE_NAME))
        .unwrap();
    writeln!(f, "{line}").unwrap();
}

fn journal_len(dir: &std::path::Path) -> u64 {
    std::fs::metadata(dir.join(FILE_NAME)).unwrap().len()
}

#[test]
fn issued_and_audit_records_are_journaled_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    store.put_issued_pending(&[issued("aa")]).unwrap();
    let audit = chain(None, 2);
    store.append_audit(&audit).unwrap();
    assert!(
        journal_len(dir.path()) > 0,
        "the records are in the journal"
    );
    let got = store
        .get_issued(&CredentialId::Serial("aa".into()))
        .unwrap()
        .expect("issued record stored");
    assert_eq!(got.task_id.as_deref(), Some("pid:1:2"));
    assert_eq!(store.audit_head().unwrap().unwrap().seq, 2);
    assert_eq!(store.list_audit(0, 10).unwrap(), audit);
}

#[test]
fn what_sled_lost_in_a_crash_comes_back_from_the_journal() {
    // A store that never saw the records (sled lost its unflushed tail),
    // with the journal that was synced before the answers went out.
    let dir = tempfile::tempdir().unwrap();
    let audit = chain(None, 3);
    journal_line(dir.path(), &[issued("01"), issued("02")], &[]);
    journal_line(dir.path(), &[], &audit[..2]);
    journal_line(dir.path(), &[issued("03")], &audit[2..]);

    let store = SledStore::open(dir.path()).unwrap();
    for s in ["01", "02", "03"] {
        assert!(
            store
                .get_issued(&CredentialId::Serial(s.into()))
                .unwrap()
                .is_some(),
            "issued record {s} replayed"
        );
    }
    assert_eq!(store.audit_head().unwrap().unwrap(), audit[2].head());
    assert_eq!(store.list_audit(0, 10).unwrap(), audit);
    assert_eq!(journal_len(dir.path()), 0, "emptied once sled has them");
}

#[test]
fn replay_continues_after_the_stored_head_and_never_rewrites_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let audit = chain(None, 3);
    {
        let store = SledStore::open(dir.path()).unwrap();
        store.append_audit(&audit[..2]).unwrap();
    }
    // The journal holds a different record 2 (as if the stored one had
    // been altered since) and record 3, which sled lost.
    let mut other = chain(None, 2);
    other[1].event.action = "forged".into();
    journal_line(dir.path(), &[], &other[1..]);
    journal_line(dir.path(), &[], &audit[2..]);

    let store = SledStore::open(dir.path()).unwrap();
    let listed = store.list_audit(0, 10).unwrap();
    assert_eq!(listed, audit, "record 2 left as stored; record 3 recovered");
    assert_eq!(store.audit_head().unwrap().unwrap().seq, 3);
}

#[test]
fn a_torn_last_line_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    journal_line(dir.path(), &[issued("01")], &[]);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.path().join(FILE_NAME))
        .unwrap();
    f.write_all(br#"{"issued":[{"id":"#).unwrap();
    drop(f);

    let store = SledStore::open(dir.path()).unwrap();
    assert!(
        store
            .get_issued(&CredentialId::Serial("01".into()))
            .unwrap()
            .is_some()
    );
    // The store keeps working after the repair.
    store.put_issued(&[issued("02")]).unwrap();
    assert!(
        store
            .get_issued(&CredentialId::Serial("02".into()))
            .unwrap()
            .is_some()
    );
}

#[test]
fn a_damaged_line_before_the_last_is_corruption() {
    let dir = tempfile::tempdir().unwrap();
    journal_line(dir.path(), &[issued("01")], &[]);
    std::fs::OpenOptions::new()
        .append(true)
        .open(dir.path().join(FILE_NAME))
        .unwrap()
        .write_all(b"{not json}\n")
        .unwrap();
    journal_line(dir.path(), &[issued("02")], &[]);
    match SledStore::open(dir.path()) {
        Err(StoreError::Corrupt { kind, .. }) => assert_eq!(kind, "issuance journal"),
        other => panic!("expected a corrupt journal, got {other:?}"),
    }
}

#[test]
fn concurrent_writers_are_all_journaled() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SledStore::open(dir.path()).unwrap());
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let store = Arc::clone(&store);
            std::thread::spawn(move || {
                for i in 0..25 {
                    store
                        .put_issued(&[issued(&format!("{t:02x}{i:02x}"))])
                        .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    drop(store);
    // Every line is whole: reopening replays 200 records without error.
    let text = std::fs::read_to_string(dir.path().join(FILE_NAME)).unwrap();
    assert_eq!(text.lines().count(), 200);
    let store = SledStore::open(dir.path()).unwrap();
    assert_eq!(store.list_issued().unwrap().len(), 200);
}
