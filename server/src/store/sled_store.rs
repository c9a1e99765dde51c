//! The embedded sled backend: one tree per record kind, JSON values, a
//! flush after every write (shared by concurrent writers: see
//! [`super::group_flush`]), except for issued-credential and audit records,
//! which are made durable by the issuance journal ([`super::journal`]).

use std::path::Path;
use std::sync::Arc;

use mayfly::entry::{Entry, EntryId};
use serde::Serialize;
use serde::de::DeserializeOwned;
use time::OffsetDateTime;

use mayfly::revocation::{CredentialId, Revocation};

use crate::audit::record::{AuditHead, AuditRecord};

use super::group_flush::GroupFlush;
use super::journal::{Journal, Line, LineRef};
use super::{IssuedRecord, JoinTokenRecord, NodeRecord, Store, StoreError};

/// sled-backed [`Store`].
#[derive(Debug, Clone)]
pub struct SledStore {
    db: sled::Db,
    entries: sled::Tree,
    nodes: sled::Tree,
    tokens: sled::Tree,
    meta: sled::Tree,
    issued: sled::Tree,
    revocations: sled::Tree,
    audit: sled::Tree,
    flush: Arc<GroupFlush>,
    journal: Arc<Journal>,
}

/// The meta key holding the audit head (JSON [`AuditHead`]).
const AUDIT_HEAD_KEY: &str = "audit_head";

/// sled's page cache. The server holds every entry in its in-memory index
/// and reads the store for entries only at start-up, so the cache serves
/// the writes and the small lookups (nodes, tokens, issued records);
/// sled's default (1 GiB) kept a second copy of a large registry in memory
/// (about 1 GB for a million entries).
const CACHE_BYTES: u64 = 128 * 1024 * 1024;

fn backend(e: sled::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Backend(format!("encode: {e}")))
}

fn decode<T: DeserializeOwned>(
    kind: &'static str,
    key: &[u8],
    bytes: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        kind,
        key: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    })
}

impl SledStore {
    /// Opens (or creates) the store in `dir`.
    /// Replays the issuance journal left by a crash, if any.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(CACHE_BYTES)
            .open()
            .map_err(|e| StoreError::Backend(format!("{}: {e}", dir.display())))?;
        let (journal, lines) = Journal::open(dir)?;
        let store = Self {
            entries: db.open_tree("entries").map_err(backend)?,
            nodes: db.open_tree("nodes").map_err(backend)?,
            tokens: db.open_tree("join_tokens").map_err(backend)?,
            meta: db.open_tree("meta").map_err(backend)?,
            issued: db.open_tree("issued").map_err(backend)?,
            revocations: db.open_tree("revocations").map_err(backend)?,
            audit: db.open_tree("audit").map_err(backend)?,
            flush: Arc::new(GroupFlush::default()),
            journal: Arc::new(journal),
            db,
        };
        if !lines.is_empty() {
            store.replay(lines)?;
        }
        Ok(store)
    }

    /// Applies journal lines the store may have lost: issued records it
    /// does not have, audit records after its head (those up to the head
    /// were written with it: a record changed or removed since is left as
    /// it is, for `audit verify` to find). Then empties the journal.
    fn replay(&self, lines: Vec<Line>) -> Result<(), StoreError> {
        let head = self.audit_head()?.map_or(0, |h| h.seq);
        let (mut issued, mut audit) = (0usize, Vec::new());
        for line in lines {
            for r in line.issued {
                let key = r.id.key();
                if !self.issued.contains_key(key.as_bytes()).map_err(backend)? {
                    self.issued
                        .insert(key.as_bytes(), encode(&r)?)
                        .map_err(backend)?;
                    issued += 1;
                }
            }
            audit.extend(line.audit.into_iter().filter(|r| r.seq > head));
        }
        audit.sort_by_key(|r| r.seq);
        audit.dedup_by_key(|r| r.seq);
        let recovered = audit.len();
        if !audit.is_empty() {
            self.write_audit(&audit)?;
        }
        tracing::info!(issued, audit = recovered, "replayed the issuance journal");
        self.journal
            .checkpoint(|| self.db.flush().map(drop).map_err(backend))
    }

    /// Writes audit records, then the head, to sled (no flush), and
    /// returns the records' JSON. Plain inserts, not a sled transaction: a
    /// transaction makes sled write and sync its log at once, which is what
    /// the journal avoids. sled recovers a prefix of its log after a crash,
    /// so a recovered head has its records; records after the recovered
    /// head come back from the journal.
    fn write_audit(&self, records: &[AuditRecord]) -> Result<Vec<Vec<u8>>, StoreError> {
        let Some(last) = records.last() else {
            return Ok(Vec::new());
        };
        let head = encode(&last.head())?;
        let mut values = Vec::with_capacity(records.len());
        for r in records {
            let v = encode(r)?;
            self.audit
                .insert(r.seq.to_be_bytes(), v.as_slice())
                .map_err(backend)?;
            values.push(v);
        }
        self.meta
            .insert(AUDIT_HEAD_KEY, head.as_slice())
            .map_err(backend)?;
        Ok(values)
    }

    /// Writes issued records to sled (no flush; plain inserts, see
    /// [`Self::write_audit`]) and returns their JSON.
    fn write_issued(&self, records: &[IssuedRecord]) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut values = Vec::with_capacity(records.len());
        for r in records {
            let v = encode(r)?;
            self.issued
                .insert(r.id.key().as_bytes(), v.as_slice())
                .map_err(backend)?;
            values.push(v);
        }
        Ok(values)
    }

    /// Writes issued records to sled and the journal (synced with `sync`).
    fn journal_issued(&self, records: &[IssuedRecord], sync: bool) -> Result<(), StoreError> {
        let issued = self.write_issued(records)?;
        let line = LineRef {
            issued: &issued,
            audit: &[],
        };
        self.journal(&line, sync)
    }

    /// Journals `line` (already written to sled) and, with `sync`, waits
    /// until it is on disk; empties the journal when it has grown large.
    fn journal(&self, line: &LineRef<'_>, sync: bool) -> Result<(), StoreError> {
        let size = self.journal.write(line)?;
        if sync {
            self.journal.sync()?;
        }
        if Journal::wants_checkpoint(size) {
            self.journal.checkpoint(|| {
                self.flush
                    .durable(|| self.db.flush().map(drop).map_err(backend))
            })?;
        }
        Ok(())
    }

    /// The raw `audit` tree (keys: big-endian seq; values: JSON records).
    /// For forensics and for tests that tamper with records behind the
    /// audit log's back: a write here breaks the chain, which is the point.
    pub fn raw_audit_tree(&self) -> &sled::Tree {
        &self.audit
    }

    /// Makes every write applied so far durable before returning.
    fn durable(&self) -> Result<(), StoreError> {
        self.flush
            .durable(|| self.db.flush().map(drop).map_err(backend))
    }

    fn all<T: DeserializeOwned>(
        tree: &sled::Tree,
        kind: &'static str,
    ) -> Result<Vec<T>, StoreError> {
        tree.iter()
            .map(|kv| {
                let (k, v) = kv.map_err(backend)?;
                decode(kind, &k, &v)
            })
            .collect()
    }
}

impl Store for SledStore {
    fn put_entry(&self, entry: &Entry) -> Result<(), StoreError> {
        self.entries
            .insert(entry.id.as_str(), encode(entry)?)
            .map_err(backend)?;
        self.durable()
    }

    fn put_entries(&self, entries: &[Entry]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for e in entries {
            batch.insert(e.id.as_str(), encode(e)?);
        }
        self.entries.apply_batch(batch).map_err(backend)?;
        self.durable()
    }

    fn delete_entry(&self, id: &EntryId) -> Result<Option<Entry>, StoreError> {
        let old = self.entries.remove(id.as_str()).map_err(backend)?;
        self.durable()?;
        old.map(|v| decode("entry", id.as_str().as_bytes(), &v))
            .transpose()
    }

    fn list_entries(&self) -> Result<Vec<Entry>, StoreError> {
        Self::all(&self.entries, "entry")
    }

    fn put_node(&self, node: &NodeRecord) -> Result<(), StoreError> {
        self.nodes
            .insert(node.spiffe_id.to_string(), encode(node)?)
            .map_err(backend)?;
        self.durable()
    }

    fn get_node(&self, spiffe_id: &str) -> Result<Option<NodeRecord>, StoreError> {
        self.nodes
            .get(spiffe_id)
            .map_err(backend)?
            .map(|v| decode("node", spiffe_id.as_bytes(), &v))
            .transpose()
    }

    fn delete_node(&self, spiffe_id: &str) -> Result<Option<NodeRecord>, StoreError> {
        let old = self.nodes.remove(spiffe_id).map_err(backend)?;
        self.durable()?;
        old.map(|v| decode("node", spiffe_id.as_bytes(), &v))
            .transpose()
    }

    fn list_nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        Self::all(&self.nodes, "node")
    }

    fn put_join_token(&self, token: &JoinTokenRecord) -> Result<(), StoreError> {
        self.tokens
            .insert(token.token_sha256.as_str(), encode(token)?)
            .map_err(backend)?;
        self.durable()
    }

    fn take_join_token(&self, token_sha256: &str) -> Result<Option<JoinTokenRecord>, StoreError> {
        // `remove` is atomic in sled: of two concurrent redemptions only one
        // gets the record back.
        let old = self.tokens.remove(token_sha256).map_err(backend)?;
        self.durable()?;
        old.map(|v| decode("join token", token_sha256.as_bytes(), &v))
            .transpose()
    }

    fn prune_join_tokens(&self, now: OffsetDateTime) -> Result<usize, StoreError> {
        let mut n = 0;
        for t in Self::all::<JoinTokenRecord>(&self.tokens, "join token")? {
            if t.expires_at <= now {
                self.tokens
                    .remove(t.token_sha256.as_str())
                    .map_err(backend)?;
                n += 1;
            }
        }
        if n > 0 {
            self.durable()?;
        }
        Ok(n)
    }

    fn put_issued(&self, records: &[IssuedRecord]) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        self.journal_issued(records, true)
    }

    fn put_issued_pending(&self, records: &[IssuedRecord]) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        // The next synced journal line (the audit append that records the
        // issuance) makes this one durable too: lines are synced in order.
        self.journal_issued(records, false)
    }

    fn get_issued(&self, id: &CredentialId) -> Result<Option<IssuedRecord>, StoreError> {
        let key = id.key();
        self.issued
            .get(key.as_bytes())
            .map_err(backend)?
            .map(|v| decode("issued", key.as_bytes(), &v))
            .transpose()
    }

    fn list_issued(&self) -> Result<Vec<IssuedRecord>, StoreError> {
        Self::all(&self.issued, "issued")
    }

    fn put_revocations(&self, revocations: &[Revocation]) -> Result<(), StoreError> {
        if revocations.is_empty() {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for r in revocations {
            batch.insert(r.id.key().as_bytes(), encode(r)?);
        }
        self.revocations.apply_batch(batch).map_err(backend)?;
        self.durable()
    }

    fn list_revocations(&self) -> Result<Vec<Revocation>, StoreError> {
        Self::all(&self.revocations, "revocation")
    }

    fn prune_expired(&self, now: OffsetDateTime) -> Result<(usize, usize), StoreError> {
        let mut issued = sled::Batch::default();
        let mut n_issued = 0;
        for r in self.list_issued()? {
            if r.expires_at <= now {
                issued.remove(r.id.key().as_bytes());
                n_issued += 1;
            }
        }
        let mut revoked = sled::Batch::default();
        let mut n_revoked = 0;
        for r in self.list_revocations()? {
            if r.expired(now) {
                revoked.remove(r.id.key().as_bytes());
                n_revoked += 1;
            }
        }
        if n_issued + n_revoked > 0 {
            self.issued.apply_batch(issued).map_err(backend)?;
            self.revocations.apply_batch(revoked).map_err(backend)?;
            self.durable()?;
        }
        Ok((n_issued, n_revoked))
    }

    fn append_audit(&self, records: &[AuditRecord]) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let audit = self.write_audit(records)?;
        let line = LineRef {
            issued: &[],
            audit: &audit,
        };
        self.journal(&line, true)
    }

    fn list_audit(&self, after_seq: u64, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
        let start = after_seq.saturating_add(1);
        if start == 0 || after_seq == u64::MAX {
            return Ok(Vec::new());
        }
        self.audit
            .range(start.to_be_bytes()..)
            .take(limit)
            .map(|kv| {
                let (k, v) = kv.map_err(backend)?;
                let seq = <[u8; 8]>::try_from(k.as_ref()).map(u64::from_be_bytes).ok();
                serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt {
                    kind: "audit",
                    key: seq.map_or_else(|| hex::encode(&k), |s| s.to_string()),
                    reason: e.to_string(),
                })
            })
            .collect()
    }

    fn audit_head(&self) -> Result<Option<AuditHead>, StoreError> {
        self.meta
            .get(AUDIT_HEAD_KEY)
            .map_err(backend)?
            .map(|v| decode("audit head", AUDIT_HEAD_KEY.as_bytes(), &v))
            .transpose()
    }

    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.meta.get(key).map_err(backend)?.map(|v| v.to_vec()))
    }

    fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.meta.insert(key, value).map_err(backend)?;
        self.durable()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mayfly::entry::EntrySpec;

    /// Opens a store just closed in this process: sled's flusher thread
    /// may hold the directory lock for a moment after the last handle is
    /// dropped (a restarted server is a new process and never sees this).
    fn reopen(dir: &std::path::Path) -> SledStore {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match SledStore::open(dir) {
                Ok(s) => return s,
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("reopening {}: {e}", dir.display()),
            }
        }
    }

    fn entry() -> Entry {
        EntrySpec {
            spiffe_id: "spiffe://example.org/web".into(),
            parent_id: "spiffe://example.org/mayfly/agent/join_token/a".into(),
            selectors: vec!["unix:uid:1000".into()],
            ..Default::default()
        }
        .validate(
            &mayfly::TrustDomain::new("example.org").unwrap(),
            EntryId::random(),
            1,
        )
        .unwrap()
    }

    #[test]
    fn survives_reopen_and_tokens_are_single_use() {
        let dir = tempfile::tempdir().unwrap();
        let e = entry();
        let now = OffsetDateTime::now_utc();
        {
            let s = SledStore::open(dir.path()).unwrap();
            s.put_entry(&e).unwrap();
            s.put_join_token(&JoinTokenRecord {
                id: "t1".into(),
                token_sha256: "abc".into(),
                alias: None,
                created_at: now,
                expires_at: now + time::Duration::minutes(10),
            })
            .unwrap();
        }
        let s = reopen(dir.path());
        assert_eq!(s.list_entries().unwrap(), vec![e.clone()]);
        assert!(s.take_join_token("abc").unwrap().is_some());
        assert!(s.take_join_token("abc").unwrap().is_none());
        assert_eq!(s.delete_entry(&e.id).unwrap(), Some(e));
        assert!(s.list_entries().unwrap().is_empty());
    }

    #[test]
    fn audit_records_round_trip_in_seq_order_with_their_head() {
        use crate::audit::record::{Actor, ActorKind, AuditEvent, GENESIS_HASH};
        let dir = tempfile::tempdir().unwrap();
        let now = OffsetDateTime::now_utc();
        let mut prev = GENESIS_HASH.to_owned();
        let records: Vec<AuditRecord> = (1..=300u64)
            .map(|seq| {
                let e = AuditEvent::ok(Actor::new(ActorKind::Server, "s", "self"), "test")
                    .detail("n", seq);
                let r = AuditRecord::new(seq, now, e, prev.clone());
                prev = r.hash.clone();
                r
            })
            .collect();
        {
            let s = SledStore::open(dir.path()).unwrap();
            assert_eq!(s.audit_head().unwrap(), None);
            s.append_audit(&records[..1]).unwrap();
            s.append_audit(&records[1..]).unwrap();
        }
        let s = reopen(dir.path());
        assert_eq!(s.audit_head().unwrap(), Some(records[299].head()));
        // Big-endian keys: 256 sorts after 255, not after 1.
        assert_eq!(s.list_audit(0, 1000).unwrap(), records);
        assert_eq!(s.list_audit(254, 3).unwrap(), records[254..257].to_vec());
        assert!(s.list_audit(300, 10).unwrap().is_empty());
        s.raw_audit_tree()
            .insert(7u64.to_be_bytes(), &b"{oops"[..])
            .unwrap();
        match s.list_audit(0, 1000) {
            Err(StoreError::Corrupt {
                kind: "audit", key, ..
            }) => assert_eq!(key, "7"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn corrupt_records_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        s.entries.insert("x", &b"{not json"[..]).unwrap();
        assert!(matches!(s.list_entries(), Err(StoreError::Corrupt { .. })));
    }
}
