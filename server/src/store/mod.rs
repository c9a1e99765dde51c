//! Durable state behind a narrow [`Store`] trait: registration entries,
//! attested nodes, join tokens, the trust bundle, issued credentials and
//! revocations. The default backend is
//! sled ([`sled_store::SledStore`]), embedded in the data directory.
//!
//! Every write returns only once it is durable (flushed), so that an
//! acknowledged change survives a crash.

mod group_flush;
pub mod journal;
#[cfg(test)]
mod journal_tests;
pub mod sled_store;

use mayfly::SpiffeId;
use mayfly::entry::{Assurance, Entry, EntryId, spiffe_id_serde};
use mayfly::revocation::{CredentialId, Revocation};
use mayfly::selector::SelectorSet;

use crate::audit::record::{AuditHead, AuditRecord};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// Errors from a store backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The backend failed (I/O, corruption).
    #[error("store backend error: {0}")]
    Backend(String),
    /// A stored record could not be decoded.
    #[error("stored {kind} record {key:?} is corrupt: {reason}")]
    Corrupt {
        /// Which table.
        kind: &'static str,
        /// Which key.
        key: String,
        /// Decoder message.
        reason: String,
    },
}

/// An attested agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The agent's SPIFFE ID.
    #[serde(with = "spiffe_id_serde")]
    pub spiffe_id: SpiffeId,
    /// Node attestor that enrolled it (`join_token`, ...).
    pub attestor: String,
    /// Assurance level of that attestor.
    pub assurance: Assurance,
    /// Selectors from node attestation.
    pub selectors: SelectorSet,
    /// Aliases it was enrolled with (a join token's SPIFFE ID).
    #[serde(default)]
    pub enrolled_aliases: Vec<String>,
    /// Last full attestation (not renewal).
    #[serde(with = "time::serde::rfc3339")]
    pub attested_at: OffsetDateTime,
    /// Serial (hex) of the agent SVID currently accepted.
    pub current_serial: String,
    /// Serial (hex) of a renewed SVID not yet used; accepted too, and becomes
    /// current on first use.
    #[serde(default)]
    pub next_serial: Option<String>,
    /// NotAfter of the current agent SVID.
    #[serde(with = "time::serde::rfc3339")]
    pub svid_expires_at: OffsetDateTime,
    /// Banned agents are refused on every call and cannot attest again.
    #[serde(default)]
    pub banned: bool,
    /// Whether the attestor can prove itself again without an operator.
    #[serde(default)]
    pub can_reattest: bool,
}

/// A join token as stored: only a hash of the secret is kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTokenRecord {
    /// Public identifier (shown in lists and audit; not the secret).
    pub id: String,
    /// SHA-256 of the token, hex. The token itself is never stored.
    pub token_sha256: String,
    /// Optional SPIFFE ID the enrolled agent becomes an alias of.
    #[serde(default)]
    pub alias: Option<String>,
    /// When the token was created.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When it stops working.
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
}

/// A credential the server issued, kept until it expires so that it can be
/// revoked by the agent it was issued to, with its entry, or by identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedRecord {
    /// The credential (X.509 serial or JWT `jti`).
    pub id: CredentialId,
    /// Its SPIFFE ID.
    pub spiffe_id: String,
    /// The agent it was issued to (`None` when an operator minted it).
    #[serde(default)]
    pub agent_id: Option<String>,
    /// The entry it was issued under (`None` when an operator minted it).
    #[serde(default)]
    pub entry_id: Option<String>,
    /// The agent-local task it belongs to (`None` for shared SVIDs).
    #[serde(default)]
    pub task_id: Option<String>,
    /// The X.509 authority id or JWT key id that signed it.
    pub authority_id: String,
    /// When it expires.
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
}

/// Durable storage used by the server. Implementations must make every
/// write durable before returning.
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Inserts or replaces an entry.
    fn put_entry(&self, entry: &Entry) -> Result<(), StoreError>;
    /// Inserts or replaces several entries, all applied and durable
    /// together (the offline import's batches). By default, one
    /// [`Store::put_entry`] each.
    fn put_entries(&self, entries: &[Entry]) -> Result<(), StoreError> {
        entries.iter().try_for_each(|e| self.put_entry(e))
    }
    /// Removes an entry, returning it if it existed.
    fn delete_entry(&self, id: &EntryId) -> Result<Option<Entry>, StoreError>;
    /// Every entry (used to build the in-memory index at start-up).
    fn list_entries(&self) -> Result<Vec<Entry>, StoreError>;

    /// Inserts or replaces a node.
    fn put_node(&self, node: &NodeRecord) -> Result<(), StoreError>;
    /// One node by SPIFFE ID.
    fn get_node(&self, spiffe_id: &str) -> Result<Option<NodeRecord>, StoreError>;
    /// Removes a node, returning it.
    fn delete_node(&self, spiffe_id: &str) -> Result<Option<NodeRecord>, StoreError>;
    /// Every node.
    fn list_nodes(&self) -> Result<Vec<NodeRecord>, StoreError>;

    /// Stores a new join token.
    fn put_join_token(&self, token: &JoinTokenRecord) -> Result<(), StoreError>;
    /// Atomically removes and returns the token with this hash, so that a
    /// token can be redeemed at most once even under concurrent attempts.
    fn take_join_token(&self, token_sha256: &str) -> Result<Option<JoinTokenRecord>, StoreError>;
    /// Removes tokens that expired before `now`; returns how many.
    fn prune_join_tokens(&self, now: OffsetDateTime) -> Result<usize, StoreError>;

    /// Records issued credentials, all durable with one flush.
    fn put_issued(&self, records: &[IssuedRecord]) -> Result<(), StoreError>;
    /// Writes issued credentials without waiting for a flush: they become
    /// durable with this store's next durable write that starts after this
    /// returns (every kind of record shares one log). A caller must make
    /// one (the audit append recording the issuance) before relying on
    /// them. By default, [`Store::put_issued`].
    fn put_issued_pending(&self, records: &[IssuedRecord]) -> Result<(), StoreError> {
        self.put_issued(records)
    }
    /// One issued credential.
    fn get_issued(&self, id: &CredentialId) -> Result<Option<IssuedRecord>, StoreError>;
    /// Every issued credential not yet pruned.
    fn list_issued(&self) -> Result<Vec<IssuedRecord>, StoreError>;
    /// Records revocations (new or replaced), all durable with one flush.
    fn put_revocations(&self, revocations: &[Revocation]) -> Result<(), StoreError>;
    /// Every revocation not yet pruned.
    fn list_revocations(&self) -> Result<Vec<Revocation>, StoreError>;
    /// Removes issuance records and revocations of credentials that expired
    /// at `now`; returns how many of each.
    fn prune_expired(&self, now: OffsetDateTime) -> Result<(usize, usize), StoreError>;

    /// Appends audit records (consecutive, continuing the head) and sets the
    /// head to the last one, atomically and durably with one flush.
    fn append_audit(&self, records: &[AuditRecord]) -> Result<(), StoreError>;
    /// At most `limit` audit records with a seq above `after_seq`, in seq
    /// order. A record that cannot be decoded is
    /// `StoreError::Corrupt { kind: "audit", key: <seq>, .. }`.
    fn list_audit(&self, after_seq: u64, limit: usize) -> Result<Vec<AuditRecord>, StoreError>;
    /// The last appended record's seq and hash, `None` before the first.
    fn audit_head(&self) -> Result<Option<AuditHead>, StoreError>;

    /// A small named value (bundle sequence, revision counter, ...).
    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Sets a small named value.
    fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError>;
}
