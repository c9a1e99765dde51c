//! Revocation on the server: which credentials were issued to whom
//! (`issued` records), which are revoked (kept until they would have
//! expired), and the signed CRL of every X.509 authority.
//!
//! Every change is durable before it is acknowledged, and is then pushed
//! to `Sync` streams as a [`ChangeEvent::Revocations`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use mayfly::SpiffeId;
use mayfly::proto::node::TaskEnd;
use mayfly::revocation::{CredentialId, Reason, Revocation, RevocationSet};
use mayfly::x509::CrlEntry;
use time::OffsetDateTime;

use crate::authority::Authorities;
use crate::error::{ServiceError, ServiceResult};
use crate::service::entries::page_size;
use crate::state::{ChangeEvent, ServerState};
use crate::store::{IssuedRecord, Store};

#[cfg(test)]
mod tests;

/// The store's meta key of the last CRL number used.
const CRL_NUMBER_KEY: &str = "crl_number";
/// The most credential ids one `ReportTaskEnd` call may carry.
pub const MAX_REPORTED_IDS: usize = 10_000;
/// The longest operator note kept in the audit log.
const MAX_NOTE: usize = 256;

/// The revocation set and the current CRLs.
#[derive(Debug, Default)]
pub struct Revocations {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    set: RevocationSet,
    /// Authority id → signed CRL (DER).
    crls: Arc<BTreeMap<String, Vec<u8>>>,
    /// Moves whenever the CRLs are re-signed.
    generation: u64,
    /// When the CRLs were last signed.
    signed_at: Option<OffsetDateTime>,
}

/// What an operator revokes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OperatorTarget {
    /// One credential.
    Credential(CredentialId),
    /// Every unexpired credential issued for this identity.
    SpiffeId(SpiffeId),
}

impl Revocations {
    /// Loads the unexpired revocations from the store.
    pub fn load(store: &dyn Store, now: OffsetDateTime) -> ServiceResult<Self> {
        let set: RevocationSet = store
            .list_revocations()?
            .into_iter()
            .filter(|r| !r.expired(now))
            .collect();
        Ok(Self {
            inner: Mutex::new(Inner {
                set,
                ..Inner::default()
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Signs a CRL for every X.509 authority of `authorities`, listing the
/// serial revocations it signed. Takes the next CRL number from the store
/// (durably) first, so that numbers never repeat across restarts.
fn sign_crls(
    store: &dyn Store,
    authorities: &Authorities,
    set: &RevocationSet,
    now: OffsetDateTime,
    ttl: time::Duration,
) -> ServiceResult<BTreeMap<String, Vec<u8>>> {
    let last = store
        .get_meta(CRL_NUMBER_KEY)?
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(0);
    let number = last + 1;
    store.put_meta(CRL_NUMBER_KEY, number.to_string().as_bytes())?;
    let mut out = BTreeMap::new();
    for (id, ca) in authorities.x509_authorities() {
        let mut revoked: Vec<CrlEntry> = set
            .iter()
            .filter(|r| r.authority_id == id && !r.expired(now))
            .filter_map(|r| {
                Some(CrlEntry {
                    serial: r.id.serial_bytes()?,
                    revoked_at: r.revoked_at,
                    reason: r.reason,
                })
            })
            .collect();
        revoked.sort_by(|a, b| a.serial.cmp(&b.serial));
        let der = ca.sign_crl(&revoked, number, now, now + ttl)?;
        out.insert(id.to_owned(), der);
    }
    Ok(out)
}

impl ServerState {
    /// Re-signs every CRL (new number, `nextUpdate` = now + `crl_ttl`) and
    /// tells `Sync` streams. Called after authority changes and when the
    /// CRLs are due. Blocking.
    pub fn refresh_crls(&self) -> ServiceResult<()> {
        self.resign_crls()?;
        self.notify_revocations(Vec::new());
        Ok(())
    }

    /// [`Self::refresh_crls`] without telling `Sync` streams: for callers
    /// that send their own event (a bundle change), whose delta carries
    /// the new CRLs. Blocking.
    pub(crate) fn resign_crls(&self) -> ServiceResult<()> {
        let mut inner = self.revocations.lock();
        self.resign(&mut inner)
    }

    fn resign(&self, inner: &mut Inner) -> ServiceResult<()> {
        let now = self.now();
        let crls = sign_crls(
            self.store.as_ref(),
            &self.authorities.snapshot(),
            &inner.set,
            now,
            self.config.crl_ttl.as_time(),
        )?;
        inner.crls = Arc::new(crls);
        inner.generation += 1;
        inner.signed_at = Some(now);
        tracing::debug!(
            authorities = inner.crls.len(),
            generation = inner.generation,
            "signed CRLs"
        );
        Ok(())
    }

    fn notify_revocations(&self, added: Vec<Revocation>) {
        self.send_event(ChangeEvent::Revocations { added });
    }

    /// The current CRL of one X.509 authority (DER).
    pub fn crl(&self, authority_id: &str) -> Option<Vec<u8>> {
        self.revocations.lock().crls.get(authority_id).cloned()
    }

    /// Every current CRL (DER) and their generation, which moves on every
    /// re-signing.
    pub fn crls(&self) -> (Vec<Vec<u8>>, u64) {
        let inner = self.revocations.lock();
        (inner.crls.values().cloned().collect(), inner.generation)
    }

    /// Every revocation of a credential not yet expired, ordered by id.
    pub fn current_revocations(&self) -> Vec<Revocation> {
        let now = self.now();
        let inner = self.revocations.lock();
        inner
            .set
            .sorted()
            .into_iter()
            .filter(|r| !r.expired(now))
            .cloned()
            .collect()
    }

    /// When the next revoked credential expires (and its revocation can
    /// be pruned).
    pub fn next_revocation_expiry(&self) -> Option<OffsetDateTime> {
        self.revocations
            .lock()
            .set
            .iter()
            .map(|r| r.expires_at)
            .min()
    }

    /// Whether the credential is revoked.
    pub fn is_revoked(&self, id: &CredentialId) -> bool {
        self.revocations.lock().set.contains(id)
    }

    /// Records issued credentials durably (one flush). Blocking.
    pub fn record_issued(&self, records: &[IssuedRecord]) -> ServiceResult<()> {
        Ok(self.store.put_issued(records)?)
    }

    /// Revokes the candidates not yet revoked (and not expired): durably,
    /// then in memory, then re-signs the CRLs when a serial was added, and
    /// tells `Sync` streams. Returns the newly revoked. Blocking.
    fn revoke(
        &self,
        candidates: Vec<Revocation>,
        agent: Option<&str>,
    ) -> ServiceResult<Vec<Revocation>> {
        let now = self.now();
        let added = {
            let mut inner = self.revocations.lock();
            let mut added: Vec<Revocation> = Vec::new();
            for c in candidates {
                if c.expired(now) || inner.set.contains(&c.id) || added.iter().any(|a| a.id == c.id)
                {
                    continue;
                }
                added.push(c);
            }
            if added.is_empty() {
                return Ok(added);
            }
            self.store.put_revocations(&added)?;
            for r in &added {
                inner.set.insert(r.clone());
            }
            if added
                .iter()
                .any(|r| matches!(r.id, CredentialId::Serial(_)))
            {
                self.resign(&mut inner)?;
            }
            added
        };
        for r in &added {
            match &r.id {
                CredentialId::Serial(s) => {
                    tracing::info!(serial = %s, reason = %r.reason, agent = agent.unwrap_or("-"), authority_id = %r.authority_id, "revoked X.509-SVID")
                }
                CredentialId::Jti(j) => {
                    tracing::info!(jti = %j, reason = %r.reason, agent = agent.unwrap_or("-"), authority_id = %r.authority_id, "revoked JWT-SVID")
                }
            }
        }
        self.notify_revocations(added.clone());
        Ok(added)
    }

    /// `ReportTaskEnd`: revokes each reported credential that was issued to
    /// `agent` (and, when a task id was recorded, to that task). Others are
    /// ignored with a warning: an agent never revokes another's
    /// credentials. Returns how many were newly revoked. Blocking.
    pub fn report_task_ends(&self, agent: &SpiffeId, tasks: &[TaskEnd]) -> ServiceResult<u32> {
        let total: usize = tasks
            .iter()
            .map(|t| t.x509_serials.len() + t.jwt_ids.len())
            .sum();
        if total > MAX_REPORTED_IDS {
            return Err(ServiceError::InvalidArgument(format!(
                "at most {MAX_REPORTED_IDS} credentials per call, got {total}"
            )));
        }
        let agent_id = agent.to_string();
        let now = self.now();
        let mut candidates = Vec::new();
        for t in tasks {
            let reason = match t.reason.as_str() {
                "" | "task_ended" => Reason::TaskEnded,
                "task_completed" => Reason::TaskCompleted,
                other => {
                    return Err(ServiceError::InvalidArgument(format!(
                        "task {:?}: reason must be task_ended or task_completed, not {other:?}",
                        t.task_id
                    )));
                }
            };
            let ids = t
                .x509_serials
                .iter()
                .map(|s| CredentialId::serial(s))
                .chain(t.jwt_ids.iter().map(|j| CredentialId::jti(j)));
            for id in ids {
                let id = id.map_err(|e| {
                    ServiceError::InvalidArgument(format!("task {:?}: {e}", t.task_id))
                })?;
                let Some(rec) = self.store.get_issued(&id)? else {
                    tracing::debug!(agent = %agent_id, task = %t.task_id, credential = %id, "reported credential is unknown or already expired");
                    continue;
                };
                if rec.agent_id.as_deref() != Some(agent_id.as_str()) {
                    tracing::warn!(agent = %agent_id, task = %t.task_id, credential = %id, "agent reported a credential that was not issued to it; ignored");
                    continue;
                }
                if rec.task_id.as_deref().is_some_and(|rt| rt != t.task_id) {
                    tracing::warn!(agent = %agent_id, task = %t.task_id, credential = %id, "agent reported a credential of another task; ignored");
                    continue;
                }
                candidates.push(Revocation {
                    id,
                    authority_id: rec.authority_id,
                    expires_at: rec.expires_at,
                    reason,
                    revoked_at: now,
                });
            }
        }
        let added = self.revoke(candidates, Some(&agent_id))?;
        Ok(u32::try_from(added.len()).unwrap_or(u32::MAX))
    }

    /// Revokes every unexpired credential whose issuance record matches.
    /// Blocking.
    fn revoke_issued(
        &self,
        matches: impl Fn(&IssuedRecord) -> bool,
        reason: Reason,
        agent: Option<&str>,
    ) -> ServiceResult<Vec<Revocation>> {
        let now = self.now();
        let candidates = self
            .store
            .list_issued()?
            .into_iter()
            .filter(|r| r.expires_at > now && matches(r))
            .map(|r| Revocation {
                id: r.id,
                authority_id: r.authority_id,
                expires_at: r.expires_at,
                reason,
                revoked_at: now,
            })
            .collect();
        self.revoke(candidates, agent)
    }

    /// Revokes everything issued under entry `entry_id`. Blocking.
    pub fn revoke_entry_credentials(&self, entry_id: &str) -> ServiceResult<Vec<Revocation>> {
        self.revoke_issued(
            |r| r.entry_id.as_deref() == Some(entry_id),
            Reason::EntryDeleted,
            None,
        )
    }

    /// Revokes everything issued to agent `agent_id` (ban: `AgentBanned`,
    /// evict: `AgentEvicted`). Blocking.
    pub fn revoke_agent_credentials(
        &self,
        agent_id: &SpiffeId,
        reason: Reason,
    ) -> ServiceResult<Vec<Revocation>> {
        let id = agent_id.to_string();
        self.revoke_issued(
            |r| r.agent_id.as_deref() == Some(id.as_str()),
            reason,
            Some(&id),
        )
    }

    /// An operator's revocation, by credential or SPIFFE ID; `note` goes to
    /// the audit log. A credential this server did not issue (or that has
    /// expired) is `NotFound`; revoking one already revoked returns
    /// nothing new. Blocking.
    pub fn revoke_by_operator(
        &self,
        target: &OperatorTarget,
        note: Option<&str>,
    ) -> ServiceResult<Vec<Revocation>> {
        let note: String = note.unwrap_or("").chars().take(MAX_NOTE).collect();
        let added = match target {
            OperatorTarget::Credential(id) => {
                let now = self.now();
                let rec = self
                    .store
                    .get_issued(id)?
                    .filter(|r| r.expires_at > now)
                    .ok_or_else(|| {
                        ServiceError::NotFound(format!(
                            "no unexpired credential with {id} was issued by this server"
                        ))
                    })?;
                self.revoke(
                    vec![Revocation {
                        id: rec.id,
                        authority_id: rec.authority_id,
                        expires_at: rec.expires_at,
                        reason: Reason::Operator,
                        revoked_at: now,
                    }],
                    rec.agent_id.as_deref(),
                )?
            }
            OperatorTarget::SpiffeId(sid) => {
                let s = sid.to_string();
                self.revoke_issued(|r| r.spiffe_id == s, Reason::Operator, None)?
            }
        };
        tracing::info!(target = ?target, note = %note, revoked = added.len(), "operator revocation");
        // The operator who asked is on the admin call's record; this one
        // keeps the note and what was revoked.
        let key = |id: &CredentialId| match id {
            CredentialId::Serial(v) => format!("serial {v}"),
            CredentialId::Jti(v) => format!("jti {v}"),
        };
        let target_text = match target {
            OperatorTarget::Credential(id) => key(id),
            OperatorTarget::SpiffeId(sid) => sid.to_string(),
        };
        let revoked: Vec<String> = added.iter().map(|r| key(&r.id)).collect();
        self.audit(
            crate::audit::AuditEvent::ok(self.server_actor(), "revocation.operator")
                .target(target_text)
                .detail("note", note)
                .detail("revoked", revoked),
        )?;
        Ok(added)
    }

    /// Revocations ordered by credential id, paginated like entries.
    pub fn list_revocations(
        &self,
        page_size: Option<usize>,
        page_token: Option<&str>,
    ) -> ServiceResult<(Vec<Revocation>, Option<String>)> {
        let size = self::page_size(page_size)?;
        let after = page_token
            .filter(|t| !t.is_empty())
            .map(|t| {
                URL_SAFE_NO_PAD
                    .decode(t)
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .ok_or_else(|| {
                        ServiceError::InvalidArgument(format!("page_token {t:?} is not valid"))
                    })
            })
            .transpose()?;
        let mut all: Vec<Revocation> = self
            .current_revocations()
            .into_iter()
            .filter(|r| after.as_deref().is_none_or(|a| r.id.key().as_str() > a))
            .collect();
        all.sort_by_cached_key(|r| r.id.key());
        let next = if all.len() > size {
            all.truncate(size);
            all.last().map(|r| URL_SAFE_NO_PAD.encode(r.id.key()))
        } else {
            None
        };
        Ok((all, next))
    }

    /// Drops issuance records and revocations of expired credentials, and
    /// re-signs the CRLs when they listed one or are past half their
    /// lifetime. Blocking.
    pub fn prune_revocations(&self) -> ServiceResult<()> {
        let now = self.now();
        let (issued, revoked) = self.store.prune_expired(now)?;
        let resigned = {
            let mut inner = self.revocations.lock();
            let gone = inner.set.prune(now);
            let half = self.config.crl_ttl.as_time() / 2;
            let due = inner.signed_at.is_none_or(|at| now >= at + half);
            let listed = gone.iter().any(|r| matches!(r.id, CredentialId::Serial(_)));
            if due || listed {
                self.resign(&mut inner)?;
            }
            due || listed
        };
        if issued + revoked > 0 {
            tracing::info!(issued, revoked, "pruned records of expired credentials");
        }
        if resigned {
            self.notify_revocations(Vec::new());
        }
        Ok(())
    }
}
