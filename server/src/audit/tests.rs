//! The audit log over a real store and file: restarts, catch-up, listing.

use std::sync::Arc;

use super::*;
use crate::store::sled_store::SledStore;

fn event(n: u64) -> AuditEvent {
    AuditEvent::ok(
        Actor::new(
            ActorKind::Operator,
            "unix:uid:1000",
            "unix_peer_credentials",
        ),
        if n.is_multiple_of(2) {
            "node.attest"
        } else {
            "admin.GET /v1/entries"
        },
    )
    .detail("n", n)
}

#[test]
fn a_restart_continues_the_chain_and_the_file_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("audit.jsonl");
    let t = OffsetDateTime::now_utc();
    {
        let store: Arc<dyn Store> = Arc::new(SledStore::open(&dir.path().join("store")).unwrap());
        let log = AuditLog::open(Arc::clone(&store), Some(&file)).unwrap();
        let r = log.append(t, vec![event(1), event(2)]).unwrap();
        assert_eq!(r[0].seq, 1);
        assert_eq!(r[0].prev_hash, record::GENESIS_HASH);
        assert_eq!(r[1].prev_hash, r[0].hash);
        log.append(t, vec![event(3)]).unwrap();
        assert_eq!(log.head().seq, 3);
    }
    // A crash lost the file's last line and tore the one before.
    let lines = jsonl::read_lines(&file).unwrap();
    assert_eq!(lines.len(), 3);
    std::fs::write(&file, format!("{}\n{}", lines[0], &lines[1][..10])).unwrap();

    let store: Arc<dyn Store> = Arc::new(SledStore::open(&dir.path().join("store")).unwrap());
    let log = AuditLog::open(Arc::clone(&store), Some(&file)).unwrap();
    assert_eq!(log.head().seq, 3);
    let r = log.append(t, vec![event(4)]).unwrap();
    assert_eq!(r[0].seq, 4);
    let report = verify_store(store.as_ref(), Some(&file)).unwrap();
    assert!(report.ok && report.file_checked, "{report:?}");
    assert_eq!(report.records, 4);
    assert_eq!(jsonl::read_lines(&file).unwrap().len(), 4);

    // Listing: after, limit, action prefix, since.
    let (page, next) = list(store.as_ref(), &AuditFilter::default(), 0, 3).unwrap();
    assert_eq!(
        page.iter().map(|r| r.seq).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert_eq!(next, Some(3));
    let (page, next) = list(store.as_ref(), &AuditFilter::default(), 3, 3).unwrap();
    assert_eq!((page.len(), next), (1, None));
    let node = AuditFilter {
        action: Some("node".into()),
        ..Default::default()
    };
    let (page, _) = list(store.as_ref(), &node, 0, 100).unwrap();
    assert_eq!(page.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![2, 4]);
    let nothing = AuditFilter {
        action: Some("nod".into()),
        ..Default::default()
    };
    assert!(list(store.as_ref(), &nothing, 0, 100).unwrap().0.is_empty());
    let later = AuditFilter {
        since: Some(t + time::Duration::seconds(1)),
        ..Default::default()
    };
    assert!(list(store.as_ref(), &later, 0, 100).unwrap().0.is_empty());
    assert!(list(store.as_ref(), &later, 0, 0).is_err());
}

#[test]
fn tampering_in_the_store_is_named_by_seq() {
    let dir = tempfile::tempdir().unwrap();
    let sled = SledStore::open(dir.path()).unwrap();
    let store: Arc<dyn Store> = Arc::new(sled.clone());
    let log = AuditLog::open(Arc::clone(&store), None).unwrap();
    log.append(OffsetDateTime::now_utc(), (1..=5).map(event).collect())
        .unwrap();
    assert!(verify_store(store.as_ref(), None).unwrap().ok);

    let tree = sled.raw_audit_tree();
    let original = tree.get(3u64.to_be_bytes()).unwrap().unwrap();
    let altered = String::from_utf8(original.to_vec())
        .unwrap()
        .replace("unix:uid:1000", "unix:uid:1001");
    tree.insert(3u64.to_be_bytes(), altered.as_bytes()).unwrap();
    let r = verify_store(store.as_ref(), None).unwrap();
    assert_eq!(
        (r.first_bad_seq, r.problem),
        (Some(3), Some(Problem::Modified))
    );

    tree.insert(3u64.to_be_bytes(), &b"not json"[..]).unwrap();
    let r = verify_store(store.as_ref(), None).unwrap();
    assert_eq!(
        (r.records, r.first_bad_seq, r.problem),
        (2, Some(3), Some(Problem::Unreadable))
    );

    tree.insert(3u64.to_be_bytes(), original.clone()).unwrap();
    tree.remove(5u64.to_be_bytes()).unwrap();
    let r = verify_store(store.as_ref(), None).unwrap();
    assert_eq!(
        (r.first_bad_seq, r.problem),
        (Some(5), Some(Problem::Truncated))
    );
}

#[test]
fn concurrent_appends_are_batched_into_one_intact_chain() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("audit.jsonl");
    let store: Arc<dyn Store> = Arc::new(SledStore::open(&dir.path().join("store")).unwrap());
    let log = Arc::new(AuditLog::open(Arc::clone(&store), Some(&file)).unwrap());
    let t = OffsetDateTime::now_utc();
    let threads: Vec<_> = (0..8u64)
        .map(|i| {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                let mut seqs = Vec::new();
                for n in 0..25u64 {
                    // Two events of one call are consecutive in the chain.
                    let r = log
                        .append(t, vec![event(i * 100 + n), event(i * 100 + n)])
                        .unwrap();
                    assert_eq!(r.len(), 2);
                    assert_eq!(r[1].seq, r[0].seq + 1);
                    assert_eq!(r[1].prev_hash, r[0].hash);
                    seqs.extend(r.iter().map(|r| r.seq));
                }
                seqs
            })
        })
        .collect();
    let mut all: Vec<u64> = threads
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    all.sort_unstable();
    assert_eq!(all, (1..=400).collect::<Vec<_>>());
    assert_eq!(log.head().seq, 400);
    let report = log.quiesced(|_| verify_store(store.as_ref(), Some(&file)).unwrap());
    assert!(report.ok && report.file_checked, "{report:?}");
    assert_eq!(report.records, 400);
}
