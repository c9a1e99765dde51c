//! The audit log: every attestation, issuance, denial, revocation and
//! admin action as an append-only, hash-chained record, kept in the store
//! and copied as JSON lines to `audit_log_path`. See `docs/audit.md`.
//!
//! - [`record`]: the types and the canonical hash
//! - [`log`]: the appender ([`AuditLog`], in `ServerState::audit`)
//! - [`verify`]: checking a chain, its head and the file
//! - [`jsonl`]: the JSON-lines file

pub mod jsonl;
pub mod log;
pub mod record;
pub mod verify;

use std::path::Path;

use time::OffsetDateTime;

pub use self::log::AuditLog;
pub use self::record::{Actor, ActorKind, AuditEvent, AuditHead, AuditRecord, Decision, Outcome};
pub use self::verify::{Problem, VerifyReport};
use crate::error::{ServiceError, ServiceResult};
use crate::state::ServerState;
use crate::store::{Store, StoreError};

/// Default and largest page of `list`.
pub const DEFAULT_PAGE: usize = 100;
/// The largest page of `list`.
pub const MAX_PAGE: usize = 1000;
/// Records read from the store at a time while verifying.
const VERIFY_PAGE: usize = 1000;

/// Which records to list.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// Only records at or after this time.
    pub since: Option<OffsetDateTime>,
    /// Only this action, or actions under this dotted prefix (`node`
    /// matches `node.attest`; `admin` every admin call).
    pub action: Option<String>,
}

impl AuditFilter {
    fn matches(&self, r: &AuditRecord) -> bool {
        self.since.is_none_or(|s| r.time >= s)
            && self.action.as_deref().is_none_or(|a| {
                r.event.action == a
                    || r.event
                        .action
                        .strip_prefix(a)
                        .is_some_and(|rest| rest.starts_with('.'))
            })
    }
}

/// Records after `after` matching `filter`, at most `limit`; and the seq
/// to pass as `after` for the next page (`None` at the end).
pub fn list(
    store: &dyn Store,
    filter: &AuditFilter,
    after: u64,
    limit: usize,
) -> ServiceResult<(Vec<AuditRecord>, Option<u64>)> {
    if limit == 0 || limit > MAX_PAGE {
        return Err(ServiceError::InvalidArgument(format!(
            "limit must be between 1 and {MAX_PAGE}, not {limit}"
        )));
    }
    let mut out = Vec::new();
    let mut cursor = after;
    loop {
        let page = store.list_audit(cursor, VERIFY_PAGE)?;
        let Some(last) = page.last().map(|r| r.seq) else {
            return Ok((out, None));
        };
        for r in page {
            cursor = r.seq;
            if filter.matches(&r) {
                out.push(r);
                if out.len() == limit {
                    let more = !store.list_audit(cursor, 1)?.is_empty();
                    return Ok((out, more.then_some(cursor)));
                }
            }
        }
        cursor = last;
    }
}

/// Verifies every record in `store` against its head and, with
/// `file`, the JSON-lines copy. Blocking; reads the whole log.
pub fn verify_store(store: &dyn Store, file: Option<&Path>) -> ServiceResult<VerifyReport> {
    let head = store.audit_head()?.unwrap_or_else(AuditHead::empty);
    let items = read_all(store)?;
    let lines = file
        .map(|p| {
            jsonl::read_lines(p).map_err(|e| {
                ServiceError::Internal(format!(
                    "cannot read the audit log file {}: {e}",
                    p.display()
                ))
            })
        })
        .transpose()?;
    Ok(verify::verify(items, &head, lines))
}

/// Every record in seq order; a record that cannot be decoded ends the
/// list as an error item naming its seq.
fn read_all(store: &dyn Store) -> ServiceResult<Vec<verify::StoredItem>> {
    let mut items = Vec::new();
    let mut cursor = 0;
    loop {
        match store.list_audit(cursor, VERIFY_PAGE) {
            Ok(page) => {
                let Some(last) = page.last().map(|r| r.seq) else {
                    return Ok(items);
                };
                items.extend(page.into_iter().map(Ok));
                cursor = last;
            }
            Err(StoreError::Corrupt { kind: "audit", .. }) => {
                // Find the unreadable one: the readable records before it
                // still count, one at a time.
                loop {
                    match store.list_audit(cursor, 1) {
                        Ok(one) => match one.into_iter().next() {
                            Some(r) => {
                                cursor = r.seq;
                                items.push(Ok(r));
                            }
                            None => return Ok(items),
                        },
                        Err(StoreError::Corrupt {
                            kind: "audit",
                            key,
                            reason,
                        }) => {
                            let seq = key.parse().unwrap_or(cursor + 1);
                            items.push(Err((seq, reason)));
                            return Ok(items);
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

impl ServerState {
    /// Records one audit event; `Err` when it could not be stored (treat
    /// the audited operation as failed). Blocking.
    pub fn audit(&self, event: AuditEvent) -> ServiceResult<()> {
        self.audit.append(self.now(), vec![event]).map(|_| ())
    }

    /// Records several events in order with one durable write. Blocking.
    pub fn audit_all(&self, events: Vec<AuditEvent>) -> ServiceResult<()> {
        self.audit.append(self.now(), events).map(|_| ())
    }

    /// The actor for things the server does on its own.
    pub fn server_actor(&self) -> Actor {
        Actor::new(ActorKind::Server, self.server_id.to_string(), "self")
    }

    /// Verifies the log while no record is appended (store and file agree
    /// at that moment). Blocking; holds appends for the duration.
    pub fn verify_audit(&self) -> ServiceResult<VerifyReport> {
        let file = self.config.audit_log_file();
        self.audit
            .quiesced(|_| verify_store(self.store.as_ref(), file.as_deref()))
    }

    /// One page of audit records (see [`list`]).
    pub fn list_audit(
        &self,
        filter: &AuditFilter,
        after: u64,
        limit: usize,
    ) -> ServiceResult<(Vec<AuditRecord>, Option<u64>)> {
        list(self.store.as_ref(), filter, after, limit)
    }
}

#[cfg(test)]
mod tests;
