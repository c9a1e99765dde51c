//! Registration entries as operators manage them: batch creation with
//! duplicate checks, reads, filtered and paginated listing, replacement and
//! deletion. Every write goes through [`ServerState::upsert_entry`] or
//! [`ServerState::remove_entry`], which persist, bump the revision and tell
//! the agents.
//!
//! All methods are blocking (they touch the store); async callers run them
//! in `tokio::task::spawn_blocking`.

use std::sync::{Arc, Mutex};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use mayfly::SpiffeId;
use mayfly::entry::{Entry, EntryId, EntrySpec};
use mayfly::selector::Selector;

use crate::error::{ServiceError, ServiceResult};
use crate::state::ServerState;

/// Page size used when the caller gives none.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// The largest page a caller may ask for.
pub const MAX_PAGE_SIZE: usize = 1000;
/// The most entries one create request may carry.
pub const MAX_BATCH: usize = 1000;

// Serialises "check for a duplicate, then write" so that two concurrent
// requests cannot both create the same entry. Reads do not take it.
static ENTRY_WRITES: Mutex<()> = Mutex::new(());

/// Which entries a listing returns; every given field must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntryFilter {
    /// Entries with exactly this SPIFFE ID.
    pub spiffe_id: Option<SpiffeId>,
    /// Entries with exactly this parent.
    pub parent_id: Option<SpiffeId>,
    /// Entries having this selector (among others).
    pub selector: Option<Selector>,
}

impl EntryFilter {
    /// Parses the raw query values, naming the field that is invalid.
    pub fn parse(
        spiffe_id: Option<&str>,
        parent_id: Option<&str>,
        selector: Option<&str>,
    ) -> ServiceResult<Self> {
        let id = |field: &str, v: Option<&str>| {
            v.filter(|s| !s.is_empty())
                .map(|s| {
                    SpiffeId::new(s).map_err(|e| {
                        ServiceError::InvalidArgument(format!(
                            "{field} {s:?} is not a valid SPIFFE ID: {e}"
                        ))
                    })
                })
                .transpose()
        };
        Ok(Self {
            spiffe_id: id("spiffe_id", spiffe_id)?,
            parent_id: id("parent_id", parent_id)?,
            selector: selector
                .filter(|s| !s.is_empty())
                .map(|s| {
                    s.parse::<Selector>()
                        .map_err(|e| ServiceError::InvalidArgument(e.to_string()))
                })
                .transpose()?,
        })
    }

    fn matches(&self, e: &Entry) -> bool {
        self.spiffe_id.as_ref().is_none_or(|id| &e.spiffe_id == id)
            && self.parent_id.as_ref().is_none_or(|id| &e.parent_id == id)
            && self
                .selector
                .as_ref()
                .is_none_or(|s| e.selectors.contains(s))
    }
}

/// The opaque page token for "entries after `id`".
pub fn page_token_for(id: &EntryId) -> String {
    URL_SAFE_NO_PAD.encode(id.as_str())
}

fn page_token_to_id(token: &str) -> ServiceResult<EntryId> {
    let bad = || ServiceError::InvalidArgument(format!("page_token {token:?} is not valid"));
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?;
    let s = String::from_utf8(bytes).map_err(|_| bad())?;
    s.parse().map_err(|_| bad())
}

/// Checks a requested page size: `None` or 0 means the default.
pub fn page_size(requested: Option<usize>) -> ServiceResult<usize> {
    match requested {
        None | Some(0) => Ok(DEFAULT_PAGE_SIZE),
        Some(n) if n <= MAX_PAGE_SIZE => Ok(n),
        Some(n) => Err(ServiceError::InvalidArgument(format!(
            "page_size {n} is larger than the maximum of {MAX_PAGE_SIZE}"
        ))),
    }
}

/// Parses an entry id given by a caller.
pub fn parse_entry_id(id: &str) -> ServiceResult<EntryId> {
    id.parse()
        .map_err(|e: mayfly::entry::EntryError| ServiceError::InvalidArgument(e.to_string()))
}

/// Parses an entry id an operator chose for a new entry: a valid id that
/// does not claim the namespace of template-derived entries.
pub fn parse_registrable_id(id: &str) -> ServiceResult<EntryId> {
    if id.starts_with(mayfly::template::ENTRY_ID_PREFIX) {
        return Err(ServiceError::InvalidArgument(format!(
            "entry id {id:?}: ids starting with {:?} name entries derived from \
             identity templates and cannot be registered",
            mayfly::template::ENTRY_ID_PREFIX
        )));
    }
    parse_entry_id(id)
}

impl ServerState {
    /// Creates entries, one result per spec in the same order. Each spec is
    /// validated on its own; one bad spec does not stop the others. An
    /// entry with the same SPIFFE ID, parent and selectors as an existing
    /// one, or with an explicit id already in use, is `AlreadyExists`.
    pub fn create_entries(
        &self,
        specs: Vec<EntrySpec>,
    ) -> ServiceResult<Vec<ServiceResult<Entry>>> {
        if specs.is_empty() {
            return Err(ServiceError::InvalidArgument(
                "entries must hold at least one entry".into(),
            ));
        }
        if specs.len() > MAX_BATCH {
            return Err(ServiceError::InvalidArgument(format!(
                "at most {MAX_BATCH} entries may be created at once, got {}",
                specs.len()
            )));
        }
        let _w = ENTRY_WRITES.lock().unwrap_or_else(|p| p.into_inner());
        Ok(specs.iter().map(|spec| self.create_one(spec)).collect())
    }

    fn create_one(&self, spec: &EntrySpec) -> ServiceResult<Entry> {
        let id = match &spec.id {
            Some(id) => {
                let id = parse_registrable_id(id)?;
                if self.with_index(|ix| ix.get(&id).is_some()) {
                    return Err(ServiceError::AlreadyExists(format!(
                        "an entry with id {id} already exists"
                    )));
                }
                id
            }
            None => EntryId::random(),
        };
        let entry = spec.validate(self.trust_domain(), id, 0)?;
        self.reject_duplicate(&entry)?;
        let entry = self.upsert_entry(entry)?;
        tracing::info!(entry_id = %entry.id, spiffe_id = %entry.spiffe_id, parent_id = %entry.parent_id, "entry created");
        Ok(entry)
    }

    fn reject_duplicate(&self, entry: &Entry) -> ServiceResult<()> {
        let existing = self.with_index(|ix| {
            ix.children(&entry.parent_id)
                .find(|e| {
                    e.id != entry.id
                        && e.spiffe_id == entry.spiffe_id
                        && e.selectors == entry.selectors
                })
                .map(|e| e.id.clone())
        });
        match existing {
            Some(other) => Err(ServiceError::AlreadyExists(format!(
                "entry {other} already has spiffe_id {}, parent_id {} and the same selectors",
                entry.spiffe_id, entry.parent_id
            ))),
            None => Ok(()),
        }
    }

    /// One entry by id.
    pub fn get_entry(&self, id: &EntryId) -> ServiceResult<Entry> {
        self.with_index(|ix| ix.get(id).map(|e| Entry::clone(e)))
            .ok_or_else(|| ServiceError::NotFound(format!("no entry {id}")))
    }

    /// Entries matching `filter`, ordered by id, at most `page_size` (see
    /// [`page_size`]) after the entry named by `page_token`. Returns the
    /// page and, when more entries follow, the token for the next page.
    pub fn list_entries(
        &self,
        filter: &EntryFilter,
        page_size: Option<usize>,
        page_token: Option<&str>,
    ) -> ServiceResult<(Vec<Entry>, Option<String>)> {
        let size = self::page_size(page_size)?;
        let after = page_token
            .filter(|t| !t.is_empty())
            .map(page_token_to_id)
            .transpose()?;
        let mut page: Vec<Arc<Entry>> = self.with_index(|ix| {
            ix.iter()
                .filter(|e| after.as_ref().is_none_or(|a| &e.id > a) && filter.matches(e))
                .cloned()
                .collect()
        });
        // Only the first `size + 1` in id order matter: select them without
        // sorting the whole remainder.
        if page.len() > size + 1 {
            page.select_nth_unstable_by(size, |a, b| a.id.cmp(&b.id));
            page.truncate(size + 1);
        }
        page.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        let next = if page.len() > size {
            page.truncate(size);
            page.last().map(|e| page_token_for(&e.id))
        } else {
            None
        };
        Ok((page.into_iter().map(Arc::unwrap_or_clone).collect(), next))
    }

    /// Replaces entry `id` with `spec`, keeping its id. A spec that names a
    /// different id is rejected.
    pub fn update_entry(&self, id: &EntryId, spec: &EntrySpec) -> ServiceResult<Entry> {
        if let Some(given) = &spec.id
            && given != id.as_str()
        {
            return Err(ServiceError::InvalidArgument(format!(
                "the body names entry {given:?} but the URL names {id}; an entry's id cannot change"
            )));
        }
        let _w = ENTRY_WRITES.lock().unwrap_or_else(|p| p.into_inner());
        self.get_entry(id)?;
        let entry = spec.validate(self.trust_domain(), id.clone(), 0)?;
        self.reject_duplicate(&entry)?;
        let entry = self.upsert_entry(entry)?;
        tracing::info!(entry_id = %entry.id, spiffe_id = %entry.spiffe_id, revision = entry.revision, "entry updated");
        Ok(entry)
    }

    /// Deletes entry `id`, returning it, and revokes every credential
    /// issued under it.
    pub fn delete_entry(&self, id: &EntryId) -> ServiceResult<Entry> {
        let _w = ENTRY_WRITES.lock().unwrap_or_else(|p| p.into_inner());
        let entry = self.remove_entry(id)?;
        tracing::info!(entry_id = %entry.id, spiffe_id = %entry.spiffe_id, "entry deleted");
        let revoked = self.revoke_entry_credentials(entry.id.as_str()).map_err(|e| {
            ServiceError::Internal(format!(
                "entry {} was deleted but its credentials could not be revoked ({e}); revoke them with `mayfly-server revocation add --spiffe-id {}`",
                entry.id, entry.spiffe_id
            ))
        })?;
        if !revoked.is_empty() {
            tracing::info!(entry_id = %entry.id, revoked = revoked.len(), "revoked the deleted entry's credentials");
        }
        Ok(entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::sign::tests::test_state;

    fn spec(path: &str, sel: &str) -> EntrySpec {
        EntrySpec {
            spiffe_id: format!("spiffe://example.org/{path}"),
            parent_id: "spiffe://example.org/mayfly/agent/join_token/a".into(),
            selectors: vec![sel.into()],
            ..Default::default()
        }
    }

    #[test]
    fn create_reports_each_item_and_rejects_duplicates() {
        let (state, _clock, _dir) = test_state();
        let mut with_id = spec("b", "unix:uid:2");
        with_id.id = Some("fixed-id".into());
        let results = state
            .create_entries(vec![
                spec("a", "unix:uid:1"),
                spec("a", "unix:uid:1"),
                spec("a", "nope"),
                with_id.clone(),
                with_id,
            ])
            .unwrap();
        assert!(results[0].is_ok());
        assert!(matches!(results[1], Err(ServiceError::AlreadyExists(_))));
        assert!(matches!(results[2], Err(ServiceError::InvalidArgument(_))));
        assert_eq!(results[3].as_ref().unwrap().id.as_str(), "fixed-id");
        assert!(matches!(results[4], Err(ServiceError::AlreadyExists(_))));
        assert_eq!(state.with_index(|ix| ix.len()), 2);
        assert!(state.create_entries(vec![]).is_err());
    }

    #[test]
    fn update_keeps_the_id_and_delete_removes() {
        let (state, _clock, _dir) = test_state();
        let e = state
            .create_entries(vec![spec("a", "unix:uid:1")])
            .unwrap()
            .remove(0)
            .unwrap();
        let mut s = e.to_spec();
        s.selectors = vec!["unix:uid:9".into()];
        let u = state.update_entry(&e.id, &s).unwrap();
        assert_eq!(u.id, e.id);
        assert!(u.revision > e.revision);
        assert_eq!(state.get_entry(&e.id).unwrap(), u);
        s.id = Some("other".into());
        assert!(matches!(
            state.update_entry(&e.id, &s),
            Err(ServiceError::InvalidArgument(_))
        ));
        state.delete_entry(&e.id).unwrap();
        assert!(matches!(
            state.get_entry(&e.id),
            Err(ServiceError::NotFound(_))
        ));
        assert!(matches!(
            state.delete_entry(&e.id),
            Err(ServiceError::NotFound(_))
        ));
    }

    #[test]
    fn pages_cover_every_entry_once_in_order() {
        let (state, _clock, _dir) = test_state();
        let specs = (0..25)
            .map(|i| spec(&format!("w{i}"), "unix:uid:1"))
            .collect();
        assert!(
            state
                .create_entries(specs)
                .unwrap()
                .iter()
                .all(Result::is_ok)
        );
        let mut seen = Vec::new();
        let mut token = None;
        loop {
            let (page, next) = state
                .list_entries(&EntryFilter::default(), Some(7), token.as_deref())
                .unwrap();
            assert!(page.len() <= 7);
            seen.extend(page.into_iter().map(|e| e.id));
            match next {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        let mut sorted = seen.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(seen, sorted);
        assert_eq!(seen.len(), 25);
        assert!(
            state
                .list_entries(&EntryFilter::default(), Some(1001), None)
                .is_err()
        );
        assert!(
            state
                .list_entries(&EntryFilter::default(), None, Some("!!"))
                .is_err()
        );
    }
}
