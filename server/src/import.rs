//! Offline bulk import of registration entries into the store of a stopped
//! server: `mayfly-server entry import FILE`.
//!
//! The input is JSON lines, one entry spec per line with the fields that
//! `POST /v1/entries` takes (blank lines are skipped). It is for seeding a
//! deployment or moving a registry from another system at a size where one
//! admin call per thousand entries, each a durable write, is slow: the
//! import writes thousands of entries per durable write instead.
//!
//! - Every line is checked as the admin API checks a new entry: the spec is
//!   validated against the trust domain, an explicit id must be new and
//!   may not claim the template namespace, and an entry with the same
//!   SPIFFE ID, parent and selectors as an existing or earlier one is
//!   refused. The whole file is checked before anything is written: a file
//!   with one bad line writes nothing, and the error names the line.
//! - Entries get consecutive revisions after the store's highest, as the
//!   server would have given them; the server reads them at start-up.
//! - The server must be stopped: the store is opened exclusively, so an
//!   import next to a running server fails instead of racing it.
//! - The import is recorded in the audit log (who, which file, how many).

use std::collections::HashSet;
use std::io::BufRead;
use std::path::Path;
use std::sync::Arc;

use mayfly::entry::{Entry, EntryId, EntrySpec};
use spiffe::TrustDomain;

use crate::audit::{Actor, ActorKind, AuditEvent, AuditLog};
use crate::config::ServerConfig;
use crate::error::ServiceError;
use crate::service::entries::parse_registrable_id;
use crate::store::sled_store::SledStore;
use crate::store::{Store, StoreError};

/// Entries per durable write.
pub const BATCH: usize = 10_000;

/// Why an import failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImportError {
    /// The input could not be read.
    #[error("cannot read {input} at line {line}: {source}")]
    Read {
        /// The file name (or `stdin`).
        input: String,
        /// The line that could not be read.
        line: usize,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A line is not a JSON entry spec, or the entry it describes is
    /// invalid or already exists. Nothing was written.
    #[error("{input} line {line}: {reason}; nothing was imported")]
    Line {
        /// The file name (or `stdin`).
        input: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// The store could not be opened (for example because the server is
    /// running and holds it), read or written.
    #[error("{context}: {source}")]
    Store {
        /// What was being done, and how many entries were already written.
        context: String,
        /// The store's error.
        source: StoreError,
    },
    /// The entries were written but the audit record was not.
    #[error("{imported} entries were imported but the audit record failed: {reason}")]
    Audit {
        /// Entries written.
        imported: usize,
        /// The audit log's error.
        reason: String,
    },
}

/// What an import did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ImportSummary {
    /// Entries written.
    pub imported: usize,
    /// Durable writes made.
    pub batches: usize,
    /// Revision of the first imported entry (0 when none).
    pub first_revision: u64,
    /// Revision of the last imported entry (0 when none).
    pub last_revision: u64,
}

/// The key under which the admin API refuses a second entry.
fn duplicate_key(e: &Entry) -> String {
    let mut key = format!("{}\n{}", e.parent_id, e.spiffe_id);
    for s in &e.selectors {
        key.push('\n');
        key.push_str(&s.to_string());
    }
    key
}

/// Reads and checks every line of `input` against the entries already in
/// `store`; the entries to write, with their revisions.
pub fn check(
    store: &dyn Store,
    td: &TrustDomain,
    input: impl BufRead,
    input_name: &str,
) -> Result<Vec<Entry>, ImportError> {
    let existing = store.list_entries().map_err(|source| ImportError::Store {
        context: "reading the existing entries".into(),
        source,
    })?;
    let mut revision = existing.iter().map(|e| e.revision).max().unwrap_or(0);
    let mut ids: HashSet<EntryId> = existing.iter().map(|e| e.id.clone()).collect();
    let mut keys: HashSet<String> = existing.iter().map(duplicate_key).collect();
    drop(existing);

    let mut out = Vec::new();
    for (i, line) in input.lines().enumerate() {
        let line_no = i + 1;
        let line = line.map_err(|source| ImportError::Read {
            input: input_name.to_owned(),
            line: line_no,
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |reason: String| ImportError::Line {
            input: input_name.to_owned(),
            line: line_no,
            reason,
        };
        let spec: EntrySpec =
            serde_json::from_str(&line).map_err(|e| bad(format!("not a JSON entry spec: {e}")))?;
        let id = match &spec.id {
            Some(id) => {
                let id = parse_registrable_id(id).map_err(|e| bad(e.to_string()))?;
                if ids.contains(&id) {
                    return Err(bad(format!("an entry with id {id} already exists")));
                }
                id
            }
            None => EntryId::random(),
        };
        revision += 1;
        let entry = spec
            .validate(td, id, revision)
            .map_err(|e| bad(ServiceError::from(e).to_string()))?;
        if !keys.insert(duplicate_key(&entry)) {
            return Err(bad(format!(
                "an entry with spiffe_id {}, parent_id {} and the same selectors already exists",
                entry.spiffe_id, entry.parent_id
            )));
        }
        ids.insert(entry.id.clone());
        out.push(entry);
    }
    Ok(out)
}

/// Writes checked entries in batches of [`BATCH`], each durable before the
/// next; the number of batches.
pub fn write(store: &dyn Store, entries: &[Entry]) -> Result<usize, ImportError> {
    let mut batches = 0;
    for (n, chunk) in entries.chunks(BATCH).enumerate() {
        store
            .put_entries(chunk)
            .map_err(|source| ImportError::Store {
                context: format!(
                    "writing entries (the first {} of {} were written)",
                    n * BATCH,
                    entries.len()
                ),
                source,
            })?;
        batches += 1;
    }
    Ok(batches)
}

/// Imports `input` into the store of the server configured by `config`,
/// which must not be running, and audits it as done by `actor`. Blocking.
pub fn run(
    config: &ServerConfig,
    input: impl BufRead,
    input_name: &str,
    actor: Actor,
) -> Result<ImportSummary, ImportError> {
    let store_dir = config.data_dir.join("store");
    let open_error = |source| ImportError::Store {
        context: format!(
            "opening the store {} (is the server running? stop it first)",
            store_dir.display()
        ),
        source,
    };
    crate::run::create_private_dir(&config.data_dir)
        .map_err(|e| open_error(StoreError::Backend(format!("{e:#}"))))?;
    let store: Arc<dyn Store> = Arc::new(SledStore::open(&store_dir).map_err(open_error)?);
    let entries = check(store.as_ref(), &config.trust_domain, input, input_name)?;
    let batches = write(store.as_ref(), &entries)?;
    let summary = ImportSummary {
        imported: entries.len(),
        batches,
        first_revision: entries.first().map_or(0, |e| e.revision),
        last_revision: entries.last().map_or(0, |e| e.revision),
    };
    let audit_failed = |e: ServiceError| ImportError::Audit {
        imported: summary.imported,
        reason: e.to_string(),
    };
    let log = AuditLog::open(Arc::clone(&store), config.audit_log_file().as_deref())
        .map_err(audit_failed)?;
    log.append(
        time::OffsetDateTime::now_utc(),
        vec![
            AuditEvent::ok(actor, "entry.import")
                .target(input_name.to_owned())
                .detail("entries", summary.imported)
                .detail("first_revision", summary.first_revision)
                .detail("last_revision", summary.last_revision),
        ],
    )
    .map_err(audit_failed)?;
    Ok(summary)
}

/// The operator running this process, as the audit log names operators.
pub fn local_operator() -> Actor {
    Actor::new(
        ActorKind::Operator,
        format!("unix:uid:{}", nix::unistd::getuid()),
        "local_store_access",
    )
}

/// Opens `path` ("-" for stdin) for [`run`].
pub fn open_input(path: &Path) -> std::io::Result<(Box<dyn BufRead>, String)> {
    if path == Path::new("-") {
        Ok((Box::new(std::io::stdin().lock()), "stdin".into()))
    } else {
        let file = std::fs::File::open(path)?;
        Ok((
            Box::new(std::io::BufReader::with_capacity(1 << 20, file)),
            path.display().to_string(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    fn line(spiffe: &str, parent: &str) -> String {
        serde_json::json!({
            "spiffe_id": spiffe,
            "parent_id": parent,
            "selectors": ["unix:uid:1000"],
        })
        .to_string()
    }

    #[test]
    fn imports_in_batches_with_consecutive_revisions_after_the_existing_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let first = EntrySpec {
            spiffe_id: "spiffe://example.org/existing".into(),
            parent_id: "spiffe://example.org/node/0".into(),
            selectors: vec!["unix:uid:1".into()],
            ..Default::default()
        }
        .validate(&td(), EntryId::random(), 7)
        .unwrap();
        store.put_entry(&first).unwrap();

        let n = BATCH + 5;
        let mut text: String = (0..n)
            .map(|i| {
                line(
                    &format!("spiffe://example.org/w/{i}"),
                    "spiffe://example.org/node/1",
                ) + "\n"
            })
            .collect();
        text.push_str("\n   \n");
        let entries = check(&store, &td(), Cursor::new(text), "t").unwrap();
        assert_eq!(entries.len(), n);
        assert_eq!(entries[0].revision, 8);
        assert_eq!(entries[n - 1].revision, 7 + n as u64);
        assert_eq!(write(&store, &entries).unwrap(), 2);
        let stored = store.list_entries().unwrap();
        assert_eq!(stored.len(), n + 1);
        assert!(stored.iter().any(|e| e.revision == 7 + n as u64));
    }

    #[test]
    fn a_bad_or_duplicate_line_is_named_and_nothing_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let a = line("spiffe://example.org/a", "spiffe://example.org/node/1");
        let cases = [
            (format!("{a}\n{a}\n"), 2, "already exists"),
            (format!("{a}\nnot json\n"), 2, "not a JSON entry spec"),
            (
                format!("{a}\n{}\n", line("spiffe://other.org/a", "spiffe://example.org/n")),
                2,
                "trust domain",
            ),
            (
                r#"{"id":"template:x","spiffe_id":"spiffe://example.org/a","parent_id":"spiffe://example.org/n","selectors":["unix:uid:1"]}"#
                    .to_owned(),
                1,
                "template",
            ),
            (
                r#"{"spiffe_id":"spiffe://example.org/a","parent_id":"spiffe://example.org/n","selectors":["unix:uid:1"],"bogus":1}"#
                    .to_owned(),
                1,
                "bogus",
            ),
        ];
        for (text, at, why) in cases {
            let err = check(&store, &td(), Cursor::new(text.clone()), "f.jsonl").unwrap_err();
            match &err {
                ImportError::Line { line, reason, .. } => {
                    assert_eq!(*line, at, "{text}: {err}");
                    assert!(reason.contains(why), "{text}: {err}");
                }
                other => panic!("{text}: {other}"),
            }
        }
        assert!(store.list_entries().unwrap().is_empty());
    }

    #[test]
    fn an_entry_already_in_the_store_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let text = line("spiffe://example.org/a", "spiffe://example.org/node/1");
        let entries = check(&store, &td(), Cursor::new(text.clone()), "f").unwrap();
        write(&store, &entries).unwrap();
        let err = check(&store, &td(), Cursor::new(text), "f").unwrap_err();
        assert!(err.to_string().contains("already exists"), "{err}");
        let explicit = format!(
            r#"{{"id":"{}","spiffe_id":"spiffe://example.org/b","parent_id":"spiffe://example.org/n","selectors":["unix:uid:1"]}}"#,
            entries[0].id
        );
        let err = check(&store, &td(), Cursor::new(explicit), "f").unwrap_err();
        assert!(err.to_string().contains("already exists"), "{err}");
    }
}
