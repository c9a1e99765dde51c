//! The policy in force, and how it is replaced.
//!
//! [`PolicyStore`] holds the current [`Engine`] behind an `ArcSwap`, so a
//! decision never waits for a reload. A reload compiles the new set aside
//! and swaps it in only if every file is valid; otherwise the previous set
//! stays in force and the errors are returned (and logged by
//! [`PolicyStore::reload_logged`]).

use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;
use sha2::{Digest as _, Sha256};
use time::OffsetDateTime;

use super::engine::{Decision, Engine};
use super::loader::{self, LoadErrors, PolicySources};
use super::request::PolicyRequest;

/// The policy in force and where it comes from.
#[derive(Debug)]
pub struct PolicyStore {
    current: ArcSwap<Engine>,
    sources: Mutex<PolicySources>,
    // Hash of the source files last loaded (or last seen broken), so that
    // polling reloads only on change and reports a broken file once.
    fingerprint: Mutex<Option<[u8; 32]>>,
}

impl PolicyStore {
    /// A store with the built-in policies only.
    pub fn builtin() -> Result<Self, LoadErrors> {
        Ok(Self {
            current: ArcSwap::from_pointee(Engine::builtin()?),
            sources: Mutex::new(PolicySources::default()),
            fingerprint: Mutex::new(None),
        })
    }

    /// Switches to `sources` and loads them. On error nothing changes.
    /// Returns the number of policies in force.
    pub fn configure(&self, sources: PolicySources) -> Result<usize, LoadErrors> {
        let (engine, fp) = Self::compile(&sources)?;
        let n = engine.len();
        self.current.store(Arc::new(engine));
        *self.sources.lock().unwrap_or_else(PoisonError::into_inner) = sources;
        *self
            .fingerprint
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(fp);
        Ok(n)
    }

    /// Whether policy files are configured (and so worth watching).
    pub fn has_files(&self) -> bool {
        !self
            .sources
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .paths
            .is_empty()
    }

    fn compile(sources: &PolicySources) -> Result<(Engine, [u8; 32]), LoadErrors> {
        let files = loader::read_sources(sources)?;
        let fp = fingerprint(sources.default_policy, &files);
        let engine = Engine::new(loader::compile(sources.default_policy, &files)?)?;
        Ok((engine, fp))
    }

    fn sources(&self) -> PolicySources {
        self.sources
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Reloads the configured sources. On error the previous set stays in
    /// force. Returns the number of policies now in force.
    pub fn reload(&self) -> Result<usize, LoadErrors> {
        let sources = self.sources();
        let result = Self::compile(&sources);
        let mut fp_slot = self
            .fingerprint
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match result {
            Ok((engine, fp)) => {
                let n = engine.len();
                self.current.store(Arc::new(engine));
                *fp_slot = Some(fp);
                Ok(n)
            }
            Err(e) => {
                *fp_slot = Some(current_fingerprint(&sources));
                Err(e)
            }
        }
    }

    /// Reloads when the files changed since the last load (or last failed
    /// load); `None` when nothing changed.
    pub fn reload_if_changed(&self) -> Option<Result<usize, LoadErrors>> {
        let sources = self.sources();
        let fp = current_fingerprint(&sources);
        let last = *self
            .fingerprint
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if last == Some(fp) {
            return None;
        }
        Some(self.reload())
    }

    /// [`Self::reload`] (or [`Self::reload_if_changed`] when `only_if_changed`),
    /// logging the outcome: every error at ERROR, the policy count at INFO.
    pub fn reload_logged(&self, why: &str, only_if_changed: bool) {
        let result = if only_if_changed {
            match self.reload_if_changed() {
                Some(r) => r,
                None => return,
            }
        } else {
            self.reload()
        };
        match result {
            Ok(n) => tracing::info!(policies = n, trigger = why, "policy reloaded"),
            Err(errors) => {
                for e in &errors.0 {
                    tracing::error!(trigger = why, error = %e, "policy reload rejected: {e}");
                }
                tracing::error!(
                    trigger = why,
                    errors = errors.0.len(),
                    "policy reload rejected; the previous policy stays in force"
                );
            }
        }
    }

    /// The engine in force.
    pub fn engine(&self) -> Arc<Engine> {
        self.current.load_full()
    }

    /// Decides with the policy in force.
    pub fn decide(&self, req: &PolicyRequest<'_>, now: OffsetDateTime) -> Decision {
        self.current.load().decide(req, now)
    }
}

/// The fingerprint of what `sources` name now; when they cannot be read,
/// of the errors (so that a missing file is reported once, not every poll).
fn current_fingerprint(sources: &PolicySources) -> [u8; 32] {
    match loader::read_sources(sources) {
        Ok(files) => fingerprint(sources.default_policy, &files),
        Err(e) => Sha256::digest(e.to_string().as_bytes()).into(),
    }
}

fn fingerprint(default_policy: bool, files: &[loader::SourceFile]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update([u8::from(default_policy)]);
    for f in files {
        h.update(f.name.as_bytes());
        h.update([0]);
        h.update((f.text.len() as u64).to_le_bytes());
        h.update(f.text.as_bytes());
    }
    h.finalize().into()
}
