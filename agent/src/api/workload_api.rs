//! The SPIFFE Workload API service (`/SpiffeWorkloadAPI/*`), answered from the agent's
//! [`Cache`].
//!
//! Every call: the `workload.spiffe.io: true` metadata must be present (else `InvalidArgument`);
//! an agent that has not synced yet answers `Unavailable`; the caller is attested from the
//! connection's peer credentials and matched against the cached entries, and a caller that
//! matches none gets `PermissionDenied`. Streams send the full state at once and again whenever
//! what this caller would get changes; a missing item means it was removed.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use mayfly::bundle::TrustBundle;
use mayfly::clock::{Clock, SystemClock};
use mayfly::entry::{Entry, EntryId};
use mayfly::matching::matching_entries;
use mayfly::proto::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use mayfly::proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, Jwtsvid, JwtsvidRequest, JwtsvidResponse,
    ValidateJwtsvidRequest, ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse,
    X509svid, X509svidRequest, X509svidResponse,
};
use mayfly::selector::SelectorSet;
use mayfly::{SpiffeId, TrustDomain};
use time::OffsetDateTime;
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::Span;

use super::jwt_cache::{JwtKey, JwtSvidCache};
use crate::cache::{Cache, CachedSvid, Snapshot};
use crate::task::registry::TaskJwt;
use crate::task::{TaskId, TaskState, Tasks};
use crate::workload::{AttestError, PeerInfo, WorkloadAttestor};

/// The metadata key every Workload API request must carry, with the value `true`.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

/// How long a stream waits for a matched entry's first X.509-SVID (or the first bundle) before
/// it ends with `Unavailable`.
pub const DEFAULT_PENDING_WAIT: Duration = Duration::from_secs(30);

/// Mints JWT-SVIDs for the Workload API. The agent implements it with a call to the server
/// (`MintJwt`); tests implement it with a local key.
#[tonic::async_trait]
pub trait JwtMinter: Send + Sync {
    /// A JWT-SVID for the entry `entry_id` and `audience` (never empty): the compact token and
    /// its expiry (Unix seconds). Errors are returned to the workload as they are.
    async fn mint_jwt(
        &self,
        entry_id: &EntryId,
        audience: &[String],
    ) -> Result<(String, i64), tonic::Status>;

    /// A JWT-SVID for the entry `entry_id` and `audience`, issued to the task `task_id`
    /// (recorded by the server for revocation): the token, its expiry and its `jti`. By default
    /// [`JwtMinter::mint_jwt`], with the `jti` read from the token.
    async fn mint_task_jwt(
        &self,
        entry_id: &EntryId,
        audience: &[String],
        task_id: &str,
    ) -> Result<MintedJwt, tonic::Status> {
        let _ = task_id;
        let (token, expires_at) = self.mint_jwt(entry_id, audience).await?;
        let jti = token_jti(&token).unwrap_or_default();
        Ok(MintedJwt {
            token,
            expires_at,
            jti,
        })
    }
}

/// A JWT-SVID minted for a task.
pub struct MintedJwt {
    /// The compact token.
    pub token: String,
    /// Its expiry (Unix seconds).
    pub expires_at: i64,
    /// Its `jti`.
    pub jti: String,
}

impl std::fmt::Debug for MintedJwt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MintedJwt")
            .field("jti", &self.jti)
            .field("expires_at", &self.expires_at)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// The `jti` claim of a compact JWT, read without verifying it (only to look it up).
pub fn token_jti(token: &str) -> Option<String> {
    use base64::Engine as _;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("jti")?.as_str().map(str::to_owned)
}

/// Why a Workload API call was refused. Mapped to a gRPC status in one place
/// (`From<ApiError> for Status`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// The request lacks `workload.spiffe.io: true` (`InvalidArgument`).
    #[error("security header missing from request")]
    MissingSecurityHeader,
    /// A request field is missing or invalid (`InvalidArgument`).
    #[error("{0}")]
    InvalidArgument(String),
    /// The agent has not completed its first sync (`Unavailable`).
    #[error("agent is not ready yet; retry")]
    NotReady,
    /// Something the caller is entitled to is not available yet (`Unavailable`).
    #[error("{0} is not available yet; retry")]
    Pending(&'static str),
    /// The agent is shutting down (`Unavailable`).
    #[error("agent is shutting down")]
    ShuttingDown,
    /// Every X.509-SVID the caller is entitled to has expired and no new one could be obtained
    /// (`Unavailable`): the agent never sends an expired certificate.
    #[error("no valid SVID; the agent cannot reach the server")]
    NoValidSvid,
    /// The server returned a JWT-SVID that is already expired by the agent's clock
    /// (`Unavailable`; check the clocks).
    #[error("the server returned a JWT-SVID that expired at {0} (Unix time); check the clocks")]
    ExpiredJwtSvid(i64),
    /// The connection carries no peer credentials, so the caller cannot be attested
    /// (`PermissionDenied`).
    #[error("caller cannot be identified")]
    NoPeer,
    /// Attesting the caller failed, for example because it exited (`PermissionDenied`; or
    /// `Unavailable` when the kubelet could not be asked about the caller's pod).
    #[error("could not attest the caller: {0}")]
    Attestation(#[from] AttestError),
    /// The caller matches no entry (`PermissionDenied`).
    #[error("no identity issued")]
    NoIdentity,
    /// The caller asked for a SPIFFE ID it does not match (`PermissionDenied`).
    #[error("no identity issued for {0}")]
    NotEntitled(String),
    /// A JWT-SVID did not validate (`InvalidArgument`).
    #[error("{0}")]
    InvalidToken(#[from] mayfly::jwt::JwtError),
    /// The JWT-SVID's `jti` was revoked (`InvalidArgument`).
    #[error("token revoked")]
    TokenRevoked,
    /// The caller's task is over (it called `Task/Complete`, or it was completed for it): a
    /// new process is a new task (`PermissionDenied`).
    #[error("task completed")]
    TaskCompleted,
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        let msg = e.to_string();
        match e {
            ApiError::MissingSecurityHeader
            | ApiError::InvalidArgument(_)
            | ApiError::InvalidToken(_)
            | ApiError::TokenRevoked => Status::invalid_argument(msg),
            // The kubelet being unreachable is the agent's trouble, not a lack of identity:
            // the caller should try again.
            ApiError::Attestation(AttestError::Kubelet(_))
            | ApiError::NotReady
            | ApiError::Pending(_)
            | ApiError::ShuttingDown
            | ApiError::NoValidSvid
            | ApiError::ExpiredJwtSvid(_) => Status::unavailable(msg),
            ApiError::NoPeer
            | ApiError::Attestation(_)
            | ApiError::NoIdentity
            | ApiError::NotEntitled(_)
            | ApiError::TaskCompleted => Status::permission_denied(msg),
        }
    }
}

/// The Workload API service. Build it with [`WorkloadApi::new`], then serve
/// [`WorkloadApi::into_server`] over [`super::listener::incoming`] connections (which supply
/// each request's [`PeerInfo`]), or use [`super::serve`].
pub struct WorkloadApi {
    cache: Cache,
    attestor: Arc<dyn WorkloadAttestor>,
    minter: Arc<dyn JwtMinter>,
    trust_domain: TrustDomain,
    clock: Arc<dyn Clock>,
    pending_wait: Duration,
    stop: Arc<watch::Sender<bool>>,
    jwt_cache: Arc<Mutex<JwtSvidCache>>,
    tasks: Option<Arc<Tasks>>,
}

impl std::fmt::Debug for WorkloadApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadApi")
            .field("trust_domain", &self.trust_domain)
            .field("attestor", &self.attestor)
            .field("pending_wait", &self.pending_wait)
            .finish_non_exhaustive()
    }
}

/// Ends every open stream of a [`WorkloadApi`] (with `Unavailable`, so that clients reconnect
/// to the next agent), so that a graceful shutdown does not wait for them forever.
#[derive(Debug, Clone)]
pub struct StopStreams(Arc<watch::Sender<bool>>);

impl StopStreams {
    /// Ends every open stream, and every stream opened from now on.
    pub fn stop(&self) {
        self.0.send_replace(true);
    }
}

impl WorkloadApi {
    /// A service answering from `cache`, attesting callers with `attestor`, minting JWT-SVIDs
    /// with `minter`, and keying bundles by `trust_domain`.
    pub fn new(
        cache: Cache,
        attestor: Arc<dyn WorkloadAttestor>,
        minter: Arc<dyn JwtMinter>,
        trust_domain: TrustDomain,
    ) -> Self {
        let (stop, _) = watch::channel(false);
        Self {
            cache,
            attestor,
            minter,
            trust_domain,
            clock: Arc::new(SystemClock),
            pending_wait: DEFAULT_PENDING_WAIT,
            stop: Arc::new(stop),
            jwt_cache: Arc::new(Mutex::new(JwtSvidCache::default())),
            tasks: None,
        }
    }

    /// Serves task-scoped entries per task through `tasks` (a key pair and X.509-SVID per
    /// task, JWT-SVIDs recorded under the task), refuses completed tasks, and serves
    /// `mayfly.task.v1.Task` beside the Workload API. Without it every entry is served from
    /// the per-entry SVIDs in the cache.
    pub fn with_tasks(mut self, tasks: Arc<Tasks>) -> Self {
        self.tasks = Some(tasks);
        self
    }

    /// The task machinery, when enabled.
    pub fn tasks(&self) -> Option<&Arc<Tasks>> {
        self.tasks.as_ref()
    }

    /// Keeps at most `capacity` JWT-SVIDs for reuse (default
    /// [`jwt_cache::DEFAULT_CAPACITY`](super::jwt_cache::DEFAULT_CAPACITY)).
    pub fn with_jwt_cache_capacity(mut self, capacity: usize) -> Self {
        self.jwt_cache = Arc::new(Mutex::new(JwtSvidCache::new(capacity)));
        self
    }

    fn lock_jwt_cache(&self) -> std::sync::MutexGuard<'_, JwtSvidCache> {
        // The cache is only changed by whole operations that cannot panic half-way.
        self.jwt_cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A JWT-SVID for `entry` and `audience`: a cached one with at least half its life left,
    /// else a new one from the minter (kept for reuse).
    async fn jwt_svid_for(&self, entry: &Entry, audience: &[String]) -> Result<String, Status> {
        let key = JwtKey::new(&entry.id, audience);
        let revocations = self.cache.current();
        if let Some(token) = self
            .lock_jwt_cache()
            .get(&key, self.clock.now().unix_timestamp())
            && !token_jti(&token).is_some_and(|j| revocations.revocations.jti(&j))
        {
            return Ok(token);
        }
        let (token, expires_at) = self.minter.mint_jwt(&entry.id, audience).await?;
        let now = self.clock.now().unix_timestamp();
        if expires_at <= now {
            return Err(ApiError::ExpiredJwtSvid(expires_at).into());
        }
        self.lock_jwt_cache().insert(key, &token, expires_at, now);
        Ok(token)
    }

    /// A JWT-SVID of `task` for the task-scoped `entry`: one this task already holds, else a
    /// new one minted for the task, whose `jti` is recorded under it. Never another task's.
    async fn task_jwt_svid_for(
        &self,
        task: &TaskId,
        entry: &Entry,
        audience: &[String],
    ) -> Result<String, Status> {
        let now = self.clock.now().unix_timestamp();
        if let Some(token) = self
            .cache
            .current()
            .tasks
            .jwt(task, &entry.id, audience, now)
        {
            return Ok(token.to_string());
        }
        let minted = self
            .minter
            .mint_task_jwt(&entry.id, audience, task.as_str())
            .await?;
        let now = self.clock.now().unix_timestamp();
        if minted.expires_at <= now {
            return Err(ApiError::ExpiredJwtSvid(minted.expires_at).into());
        }
        let jti = if minted.jti.is_empty() {
            token_jti(&minted.token).unwrap_or_default()
        } else {
            minted.jti
        };
        let held = TaskJwt {
            token: Arc::new(zeroize::Zeroizing::new(minted.token.clone())),
            jti,
            reuse_until: super::jwt_cache::reuse_until(now, minted.expires_at),
        };
        let mut kept = false;
        self.cache
            .update(|s| kept = s.tasks.insert_jwt(task, &entry.id, audience, held));
        if !kept {
            // The task ended meanwhile: its token would escape revocation.
            return Err(ApiError::TaskCompleted.into());
        }
        Ok(minted.token)
    }

    /// Uses `clock` for expiry decisions instead of the system clock.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// How long a stream waits for a pending SVID or bundle before answering `Unavailable`
    /// (default [`DEFAULT_PENDING_WAIT`]).
    pub fn with_pending_wait(mut self, wait: Duration) -> Self {
        self.pending_wait = wait;
        self
    }

    /// A handle that ends every open stream.
    pub fn stop_handle(&self) -> StopStreams {
        StopStreams(Arc::clone(&self.stop))
    }

    /// The tonic service.
    pub fn into_server(self) -> SpiffeWorkloadApiServer<Self> {
        SpiffeWorkloadApiServer::new(self)
    }

    /// The trust domain's bundle key in bundle maps: its SPIFFE ID (`spiffe://example.org`), as
    /// SPIRE sends it; the Rust `spiffe` crate and go-spiffe accept this form.
    fn bundle_key(&self) -> String {
        self.trust_domain.id_string()
    }

    /// The checks every call starts with: the security header, readiness, attestation.
    async fn admit<T>(&self, request: &Request<T>, method: &'static str) -> Result<Caller, Status> {
        let peer = request.extensions().get::<PeerInfo>().copied();
        let span = match peer {
            Some(p) => tracing::info_span!(
                "workload_api",
                method,
                pid = p.pid,
                uid = p.uid,
                task_id = tracing::field::Empty
            ),
            None => tracing::info_span!("workload_api", method, task_id = tracing::field::Empty),
        };
        let fail = |span: &Span, e: ApiError| {
            tracing::info!(parent: span, error = %e, "request refused");
            Status::from(e)
        };
        if !security_header_ok(request) {
            return Err(fail(&span, ApiError::MissingSecurityHeader));
        }
        if !self.cache.current().ready {
            return Err(fail(&span, ApiError::NotReady));
        }
        let Some(peer) = peer else {
            return Err(fail(&span, ApiError::NoPeer));
        };
        let selectors = match self.attestor.attest(&peer).await {
            Ok(s) => s,
            Err(e) => return Err(fail(&span, e.into())),
        };
        tracing::debug!(parent: &span, selectors = selectors.len(), "caller attested");
        self.derive_template_entries(&selectors, &span);
        let task = match &self.tasks {
            Some(tasks) => {
                let Some(task) = tasks.task_of(&peer) else {
                    return Err(fail(
                        &span,
                        ApiError::Attestation(AttestError::ProcessGone { pid: peer.pid }),
                    ));
                };
                if tasks.observe(&task) == TaskState::Completed {
                    return Err(fail(&span, ApiError::TaskCompleted));
                }
                span.record("task_id", task.as_str());
                Some(task)
            }
            None => None,
        };
        Ok(Caller {
            who: Who { selectors, task },
            span,
        })
    }

    /// Adds the entries the identity templates derive for a caller with
    /// `selectors` (automatic pod identities), if the agent does not hold
    /// them yet.
    fn derive_template_entries(&self, selectors: &SelectorSet, span: &Span) {
        let snap = self.cache.current();
        if snap.templates.is_empty()
            || crate::templates::missing(&snap, selectors, &self.trust_domain).is_empty()
        {
            return;
        }
        self.cache.update(|s| {
            for e in crate::templates::missing(s, selectors, &self.trust_domain) {
                tracing::info!(parent: span, entry_id = %e.id, spiffe_id = %e.spiffe_id, "entry derived from an identity template");
                s.entries.insert(e.id.clone(), std::sync::Arc::new(e));
            }
        });
    }

    /// The caller's matching entries in `snap`, or `PermissionDenied`.
    fn matches<'a>(&self, snap: &'a Snapshot, caller: &Caller) -> Result<Vec<&'a Entry>, ApiError> {
        let now = self.clock.now();
        let found = matching_entries(
            snap.entries.values().map(Arc::as_ref),
            &caller.who.selectors,
            now,
        );
        if found.is_empty() {
            return Err(ApiError::NoIdentity);
        }
        Ok(found)
    }

    /// Starts a stream: admission and an initial match, then `follow`.
    async fn open_stream<K, T>(
        &self,
        caller: Caller,
        view: impl Fn(&Snapshot, &Who, OffsetDateTime) -> View<K> + Send + 'static,
        render: impl Fn(&Snapshot, &K) -> T + Send + 'static,
    ) -> Result<ResponseStream<T>, Status>
    where
        K: PartialEq + Send + 'static,
        T: Send + 'static,
    {
        let snap = self.cache.current();
        if let Err(e) = self.matches(&snap, &caller) {
            tracing::info!(parent: &caller.span, error = %e, "request refused");
            return Err(e.into());
        }
        tracing::debug!(parent: &caller.span, "stream opened");
        Ok(follow(
            Follow {
                rx: self.cache.subscribe(),
                stop: self.stop.subscribe(),
                clock: Arc::clone(&self.clock),
                pending_wait: self.pending_wait,
                caller,
            },
            view,
            render,
        ))
    }
}

/// An admitted caller.
struct Caller {
    who: Who,
    span: Span,
}

/// What a caller is: its selectors and, when tasks are enabled, its task.
struct Who {
    selectors: SelectorSet,
    task: Option<TaskId>,
}

impl Who {
    /// Whether `entry` is served to this caller per task.
    fn per_task(&self, entry: &Entry) -> Option<&TaskId> {
        self.task
            .as_ref()
            .filter(|_| entry.scope == mayfly::entry::Scope::Task)
    }

    /// Why this caller's task no longer gets anything, if it is over.
    fn task_over(&self, snap: &Snapshot) -> Option<ApiError> {
        let task = self.task.as_ref()?;
        (snap.tasks.state(task) != Some(TaskState::Live)).then_some(ApiError::TaskCompleted)
    }
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Aborts a spawned task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Follows the cache for one open `FetchX509SVID` stream of a task and signs
/// the task-scoped entries it matches that have no usable SVID yet.
async fn provision_task_svids(
    tasks: Arc<Tasks>,
    cache: Cache,
    clock: Arc<dyn Clock>,
    task: TaskId,
    selectors: SelectorSet,
) {
    let mut rx = cache.subscribe();
    loop {
        let snap = rx.borrow_and_update().clone();
        if snap.tasks.state(&task) != Some(TaskState::Live) {
            return;
        }
        let scoped: Vec<Entry> = matching_entries(
            snap.entries.values().map(Arc::as_ref),
            &selectors,
            clock.now(),
        )
        .into_iter()
        .filter(|e| e.scope == mayfly::entry::Scope::Task)
        .cloned()
        .collect();
        drop(snap);
        let refs: Vec<&Entry> = scoped.iter().collect();
        if let Err(status) = tasks.ensure_svids(&task, &refs).await {
            tracing::warn!(task_id = %task, code = ?status.code(), error = status.message(), "task X.509-SVID signing failed; retrying on the next change");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// What a stream's caller would get from one snapshot.
enum View<K> {
    /// Something to send, identified by `key` (sent only when it differs from the last one),
    /// to be looked at again at `refresh_at` at the latest (an SVID expires then).
    Ready {
        key: K,
        refresh_at: Option<OffsetDateTime>,
    },
    /// The caller is entitled to something not available yet; wait for a change (or until
    /// `retry_at`, when something becomes valid then).
    Pending {
        what: &'static str,
        retry_at: Option<OffsetDateTime>,
    },
    /// End the stream with this error.
    Denied(ApiError),
}

struct Follow {
    rx: watch::Receiver<Arc<Snapshot>>,
    stop: watch::Receiver<bool>,
    clock: Arc<dyn Clock>,
    pending_wait: Duration,
    caller: Caller,
}

/// What woke a stream up.
enum Wake {
    Changed,
    Timer,
    Closed,
    Stop,
}

/// Drives a stream: evaluates `view` on every cache change (and when the last answer's
/// `refresh_at` passes), sends `render`'s message when the key changed, waits at most
/// `pending_wait` for pending items, and ends on denial or shutdown.
fn follow<K, T>(
    f: Follow,
    view: impl Fn(&Snapshot, &Who, OffsetDateTime) -> View<K> + Send + 'static,
    render: impl Fn(&Snapshot, &K) -> T + Send + 'static,
) -> ResponseStream<T>
where
    K: PartialEq + Send + 'static,
    T: Send + 'static,
{
    let Follow {
        mut rx,
        mut stop,
        clock,
        pending_wait,
        caller,
    } = f;
    Box::pin(async_stream::stream! {
        let mut last: Option<K> = None;
        let mut pending_since: Option<tokio::time::Instant> = None;
        loop {
            if *stop.borrow_and_update() {
                yield Err(ApiError::ShuttingDown.into());
                break;
            }
            let snap = rx.borrow_and_update().clone();
            let now = clock.now();
            let (sleep_for, pending) = match view(&snap, &caller.who, now) {
                View::Denied(e) => {
                    tracing::info!(parent: &caller.span, error = %e, "stream ended");
                    yield Err(e.into());
                    break;
                }
                View::Pending { what, retry_at } => {
                    let since = *pending_since.get_or_insert_with(tokio::time::Instant::now);
                    let left = pending_wait.saturating_sub(since.elapsed());
                    if left.is_zero() {
                        let e = ApiError::Pending(what);
                        tracing::info!(parent: &caller.span, error = %e, "stream ended");
                        yield Err(e.into());
                        break;
                    }
                    let until_valid = retry_at.map(|at| {
                        Duration::try_from(at - clock.now()).unwrap_or(Duration::ZERO)
                    });
                    (Some(until_valid.map_or(left, |d| d.min(left))), Some(what))
                }
                View::Ready { key, refresh_at } => {
                    pending_since = None;
                    if last.as_ref() != Some(&key) {
                        let message = render(&snap, &key);
                        last = Some(key);
                        tracing::debug!(parent: &caller.span, "update sent");
                        yield Ok(message);
                    }
                    let sleep_for = refresh_at.map(|at| {
                        Duration::try_from(at - clock.now()).unwrap_or(Duration::ZERO)
                    });
                    (sleep_for, None)
                }
            };
            drop(snap);
            let wake = {
                let timer = async {
                    match sleep_for {
                        Some(d) => tokio::time::sleep(d).await,
                        None => std::future::pending::<()>().await,
                    }
                };
                tokio::select! {
                    changed = rx.changed() => if changed.is_ok() { Wake::Changed } else { Wake::Closed },
                    stopped = stop.changed() => if stopped.is_ok() { Wake::Stop } else { Wake::Closed },
                    () = timer => Wake::Timer,
                }
            };
            match wake {
                Wake::Changed | Wake::Timer => {}
                Wake::Stop => {
                    yield Err(ApiError::ShuttingDown.into());
                    break;
                }
                // The cache is gone: the agent is stopping.
                Wake::Closed => {
                    if let Some(what) = pending {
                        yield Err(ApiError::Pending(what).into());
                    } else {
                        yield Err(ApiError::ShuttingDown.into());
                    }
                    break;
                }
            }
        }
    })
}

/// One SVID as sent to a caller; equal when the same certificate would be sent with the same
/// hint (the certificate bytes include its serial, so a rotation is a change).
struct SvidKey {
    entry_id: EntryId,
    hint: String,
    svid: Arc<CachedSvid>,
}

impl PartialEq for SvidKey {
    fn eq(&self, other: &Self) -> bool {
        self.entry_id == other.entry_id
            && self.hint == other.hint
            && (Arc::ptr_eq(&self.svid, &other.svid) || self.svid.chain_der == other.svid.chain_der)
    }
}

/// The X.509 part of a bundle, compared by content.
struct X509BundleKey(Arc<TrustBundle>);

impl PartialEq for X509BundleKey {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0.x509_authorities == other.0.x509_authorities
    }
}

/// The CRLs handed out, compared by content.
struct CrlKey(Arc<Vec<Vec<u8>>>);

impl PartialEq for CrlKey {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0 == other.0
    }
}

#[derive(PartialEq)]
struct X509SvidKey {
    svids: Vec<SvidKey>,
    bundle: X509BundleKey,
    crls: CrlKey,
}

#[derive(PartialEq)]
struct X509BundlesKey {
    bundle: X509BundleKey,
    crls: CrlKey,
}

/// The bundle, or the reason to wait: none yet, or one without X.509 authorities (which no
/// client could verify anything with).
fn x509_bundle(snap: &Snapshot) -> Option<&Arc<TrustBundle>> {
    snap.bundle
        .as_ref()
        .filter(|b| !b.x509_authorities.is_empty())
}

fn x509_svid_view(snap: &Snapshot, who: &Who, now: OffsetDateTime) -> View<X509SvidKey> {
    if !snap.ready {
        return View::Pending {
            what: "the agent's state",
            retry_at: None,
        };
    }
    if let Some(e) = who.task_over(snap) {
        return View::Denied(e);
    }
    let entries = matching_entries(snap.entries.values().map(Arc::as_ref), &who.selectors, now);
    if entries.is_empty() {
        return View::Denied(ApiError::NoIdentity);
    }
    let Some(bundle) = x509_bundle(snap) else {
        return View::Pending {
            what: "the trust bundle",
            retry_at: None,
        };
    };
    let mut expired = false;
    let mut not_yet_valid: Option<OffsetDateTime> = None;
    let svids: Vec<SvidKey> = entries
        .iter()
        .filter_map(|e| {
            let held = match who.per_task(e) {
                Some(task) => snap.tasks.svid(task, &e.id),
                None => snap.svids.get(&e.id),
            };
            let Some(svid) = held else {
                expired |= snap.expired.contains(&e.id);
                return None;
            };
            // Never serve an SVID minted for the entry's previous identity.
            if svid.spiffe_id != e.spiffe_id {
                return None;
            }
            // Never serve an expired or not-yet-valid certificate: leave it out.
            if svid.expires_at <= now {
                expired = true;
                return None;
            }
            if svid.not_before > now {
                not_yet_valid =
                    Some(not_yet_valid.map_or(svid.not_before, |t| t.min(svid.not_before)));
                return None;
            }
            Some(SvidKey {
                entry_id: e.id.clone(),
                hint: e.hint.clone(),
                svid: Arc::clone(svid),
            })
        })
        .collect();
    let Some(expiry) = svids.iter().map(|s| s.svid.expires_at).min() else {
        if expired && not_yet_valid.is_none() {
            return View::Denied(ApiError::NoValidSvid);
        }
        return View::Pending {
            what: "an X.509-SVID",
            retry_at: not_yet_valid,
        };
    };
    let refresh_at = not_yet_valid.map_or(expiry, |t| t.min(expiry));
    View::Ready {
        key: X509SvidKey {
            svids,
            bundle: X509BundleKey(Arc::clone(bundle)),
            crls: CrlKey(Arc::clone(&snap.crls)),
        },
        refresh_at: Some(refresh_at),
    }
}

fn render_x509_svids(key: &X509SvidKey) -> X509svidResponse {
    let bundle = key.bundle.0.x509_der_concat();
    X509svidResponse {
        svids: key
            .svids
            .iter()
            .map(|s| X509svid {
                spiffe_id: s.svid.spiffe_id.to_string(),
                x509_svid: s.svid.chain_der.concat(),
                x509_svid_key: s.svid.key_pkcs8.to_vec(),
                bundle: bundle.clone(),
                hint: s.hint.clone(),
            })
            .collect(),
        crl: key.crls.0.to_vec(),
        federated_bundles: HashMap::new(),
    }
}

/// Bundle streams: denied when the caller's matches become empty, like SVID streams.
fn bundle_view<K>(
    snap: &Snapshot,
    who: &Who,
    now: OffsetDateTime,
    key: impl FnOnce(&Arc<TrustBundle>) -> Option<K>,
) -> View<K> {
    if !snap.ready {
        return View::Pending {
            what: "the agent's state",
            retry_at: None,
        };
    }
    if let Some(e) = who.task_over(snap) {
        return View::Denied(e);
    }
    if matching_entries(snap.entries.values().map(Arc::as_ref), &who.selectors, now).is_empty() {
        return View::Denied(ApiError::NoIdentity);
    }
    match snap.bundle.as_ref().and_then(key) {
        Some(key) => View::Ready {
            key,
            refresh_at: None,
        },
        None => View::Pending {
            what: "the trust bundle",
            retry_at: None,
        },
    }
}

/// The JWT authorities of a bundle, compared by their JWKS rendering.
struct JwtBundleKey {
    bundle: Arc<TrustBundle>,
    jwks: Vec<u8>,
}

impl PartialEq for JwtBundleKey {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.bundle, &other.bundle) || self.jwks == other.jwks
    }
}

fn security_header_ok<T>(request: &Request<T>) -> bool {
    request
        .metadata()
        .get(SECURITY_HEADER)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == "true")
}

/// Converts JWT claims to a protobuf `Struct`.
pub fn claims_to_struct(
    claims: &serde_json::Map<String, serde_json::Value>,
) -> prost_types::Struct {
    prost_types::Struct {
        fields: claims
            .iter()
            .map(|(k, v)| (k.clone(), json_to_value(v)))
            .collect(),
    }
}

fn json_to_value(v: &serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    use serde_json::Value as J;
    let kind = match v {
        J::Null => Kind::NullValue(prost_types::NullValue::NullValue.into()),
        J::Bool(b) => Kind::BoolValue(*b),
        // Protobuf numbers are doubles; integers past 2^53 lose precision, as in every
        // Workload API implementation.
        J::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        J::String(s) => Kind::StringValue(s.clone()),
        J::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(json_to_value).collect(),
        }),
        J::Object(o) => Kind::StructValue(claims_to_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    async fn fetch_jwtsvid(
        &self,
        request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        if security_header_ok(&request) && request.get_ref().audience.is_empty() {
            return Err(ApiError::InvalidArgument("audience must be specified".into()).into());
        }
        let caller = self.admit(&request, "FetchJWTSVID").await?;
        let req = request.into_inner();
        let wanted = if req.spiffe_id.is_empty() {
            None
        } else {
            Some(SpiffeId::new(&req.spiffe_id).map_err(|e| {
                Status::from(ApiError::InvalidArgument(format!(
                    "spiffe_id {:?} is not a SPIFFE ID: {e}",
                    req.spiffe_id
                )))
            })?)
        };
        let snap = self.cache.current();
        let denied = |e: ApiError| {
            tracing::info!(parent: &caller.span, error = %e, "request refused");
            Status::from(e)
        };
        let mut entries = self.matches(&snap, &caller).map_err(denied)?;
        if let Some(id) = &wanted {
            entries.retain(|e| &e.spiffe_id == id);
            if entries.is_empty() {
                return Err(denied(ApiError::NotEntitled(id.to_string())));
            }
        }
        if let Some(bundle) = &snap.bundle {
            for (entry_id, key_id) in self.lock_jwt_cache().apply_bundle(bundle) {
                tracing::warn!(
                    parent: &caller.span,
                    entry_id = %entry_id,
                    key_id,
                    "dropped a cached JWT-SVID signed by a tainted or removed key; a new one will be minted"
                );
            }
        }
        let minted = futures::future::try_join_all(entries.iter().map(|e| {
            let audience = &req.audience;
            let caller = &caller;
            async move {
                let token = match caller.who.per_task(e) {
                    Some(task) => self.task_jwt_svid_for(task, e, audience).await?,
                    None => self.jwt_svid_for(e, audience).await?,
                };
                Ok::<_, Status>(Jwtsvid {
                    spiffe_id: e.spiffe_id.to_string(),
                    svid: token,
                    hint: e.hint.clone(),
                })
            }
        }))
        .await
        .inspect_err(|s| {
            tracing::warn!(parent: &caller.span, code = ?s.code(), error = s.message(), "JWT-SVID minting failed");
        })?;
        tracing::info!(parent: &caller.span, count = minted.len(), audience = ?req.audience, "JWT-SVIDs issued");
        Ok(Response::new(JwtsvidResponse { svids: minted }))
    }

    type FetchJWTBundlesStream = ResponseStream<JwtBundlesResponse>;

    async fn fetch_jwt_bundles(
        &self,
        request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        let caller = self.admit(&request, "FetchJWTBundles").await?;
        let td = self.bundle_key();
        let stream = self
            .open_stream(
                caller,
                |snap, who, now| {
                    bundle_view(snap, who, now, |b| {
                        Some(JwtBundleKey {
                            bundle: Arc::clone(b),
                            jwks: b.jwt_jwks_json(),
                        })
                    })
                },
                move |_, key: &JwtBundleKey| JwtBundlesResponse {
                    bundles: HashMap::from([(td.clone(), key.jwks.clone())]),
                },
            )
            .await?;
        Ok(Response::new(stream))
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        if security_header_ok(&request) {
            let req = request.get_ref();
            if req.audience.is_empty() {
                return Err(ApiError::InvalidArgument("audience must be specified".into()).into());
            }
            if req.svid.is_empty() {
                return Err(ApiError::InvalidArgument("svid must be specified".into()).into());
            }
        }
        let caller = self.admit(&request, "ValidateJWTSVID").await?;
        let snap = self.cache.current();
        let refused = |e: ApiError| {
            tracing::info!(parent: &caller.span, error = %e, "request refused");
            Status::from(e)
        };
        self.matches(&snap, &caller).map_err(refused)?;
        let bundle = snap
            .bundle
            .as_ref()
            .ok_or_else(|| refused(ApiError::Pending("the trust bundle")))?;
        let req = request.into_inner();
        let valid = mayfly::jwt::validate(&req.svid, &req.audience, &[bundle], self.clock.now())
            .map_err(|e| refused(e.into()))?;
        if valid
            .jti
            .as_deref()
            .is_some_and(|j| snap.revocations.jti(j))
        {
            return Err(refused(ApiError::TokenRevoked));
        }
        tracing::info!(parent: &caller.span, subject = %valid.spiffe_id, "JWT-SVID validated");
        Ok(Response::new(ValidateJwtsvidResponse {
            spiffe_id: valid.spiffe_id.to_string(),
            claims: Some(claims_to_struct(&valid.claims)),
        }))
    }

    type FetchX509SVIDStream = ResponseStream<X509svidResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let caller = self.admit(&request, "FetchX509SVID").await?;
        if let (Some(tasks), Some(task)) = (&self.tasks, &caller.who.task) {
            let snap = self.cache.current();
            if let Ok(entries) = self.matches(&snap, &caller) {
                let scoped: Vec<&Entry> = entries
                    .into_iter()
                    .filter(|e| caller.who.per_task(e).is_some())
                    .collect();
                tasks.ensure_svids(task, &scoped).await.inspect_err(|s| {
                    tracing::warn!(parent: &caller.span, code = ?s.code(), error = s.message(), "task X.509-SVID signing failed");
                })?;
            }
        }
        // Task-scoped entries that start matching while the stream is open
        // (a new entry, or a replaced SVID from a tainted authority) are
        // signed for this task as they appear, so the stream pushes them
        // without the caller reconnecting.
        let provisioner = match (&self.tasks, &caller.who.task) {
            (Some(tasks), Some(task)) => Some(AbortOnDrop(tokio::spawn(provision_task_svids(
                Arc::clone(tasks),
                self.cache.clone(),
                Arc::clone(&self.clock),
                task.clone(),
                caller.who.selectors.clone(),
            )))),
            _ => None,
        };
        let stream = self
            .open_stream(caller, x509_svid_view, |_, key| render_x509_svids(key))
            .await?;
        let stream: ResponseStream<X509svidResponse> =
            Box::pin(futures::StreamExt::map(stream, move |item| {
                // The provisioner lives exactly as long as the stream.
                let _keep = &provisioner;
                item
            }));
        Ok(Response::new(stream))
    }

    type FetchX509BundlesStream = ResponseStream<X509BundlesResponse>;

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let caller = self.admit(&request, "FetchX509Bundles").await?;
        let td = self.bundle_key();
        let stream = self
            .open_stream(
                caller,
                |snap, who, now| {
                    bundle_view(snap, who, now, |b| {
                        (!b.x509_authorities.is_empty()).then(|| X509BundlesKey {
                            bundle: X509BundleKey(Arc::clone(b)),
                            crls: CrlKey(Arc::clone(&snap.crls)),
                        })
                    })
                },
                move |_, key: &X509BundlesKey| X509BundlesResponse {
                    crl: key.crls.0.to_vec(),
                    bundles: HashMap::from([(td.clone(), key.bundle.0.x509_der_concat())]),
                },
            )
            .await?;
        Ok(Response::new(stream))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_types::value::Kind;

    #[test]
    fn claims_convert_to_struct() {
        let claims: serde_json::Map<String, serde_json::Value> = serde_json::from_str(
            r#"{"sub":"spiffe://example.org/a","aud":["x","y"],"exp":1700000000,
                "ok":true,"none":null,"nested":{"n":1.5}}"#,
        )
        .unwrap();
        let s = claims_to_struct(&claims);
        assert_eq!(
            s.fields["sub"].kind,
            Some(Kind::StringValue("spiffe://example.org/a".into()))
        );
        assert_eq!(
            s.fields["exp"].kind,
            Some(Kind::NumberValue(1_700_000_000.0))
        );
        assert_eq!(s.fields["ok"].kind, Some(Kind::BoolValue(true)));
        assert!(matches!(s.fields["none"].kind, Some(Kind::NullValue(_))));
        let Some(Kind::ListValue(list)) = &s.fields["aud"].kind else {
            panic!("aud is not a list");
        };
        assert_eq!(list.values.len(), 2);
        let Some(Kind::StructValue(nested)) = &s.fields["nested"].kind else {
            panic!("nested is not a struct");
        };
        assert_eq!(nested.fields["n"].kind, Some(Kind::NumberValue(1.5)));
    }

    mod views {
        use super::super::*;
        use mayfly::entry::EntrySpec;
        use mayfly::x509::{CaParams, SvidParams, VerifiedCsr, X509Authority, new_key_and_csr};
        use time::Duration as TimeDuration;

        fn td() -> TrustDomain {
            TrustDomain::new("example.org").unwrap()
        }

        fn t0() -> OffsetDateTime {
            OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap()
        }

        fn entry(id: &str) -> Entry {
            EntrySpec {
                spiffe_id: format!("spiffe://example.org/{id}"),
                parent_id: "spiffe://example.org/mayfly/agent/join_token/a".into(),
                selectors: vec!["unix:uid:1000".into()],
                ..Default::default()
            }
            .validate(&td(), id.parse().unwrap(), 1)
            .unwrap()
        }

        fn svid(ca: &X509Authority, e: &Entry, issued: OffsetDateTime) -> Arc<CachedSvid> {
            let k = new_key_and_csr().unwrap();
            let signed = ca
                .sign_svid(
                    &VerifiedCsr::from_der(&k.csr_der).unwrap(),
                    &SvidParams {
                        spiffe_id: &e.spiffe_id,
                        dns_names: &[],
                        ttl: TimeDuration::minutes(10),
                    },
                    issued,
                )
                .unwrap();
            Arc::new(CachedSvid {
                entry_id: e.id.clone(),
                spiffe_id: e.spiffe_id.clone(),
                chain_der: vec![signed.der],
                key_pkcs8: k.key_pkcs8,
                not_before: issued - TimeDuration::seconds(10),
                expires_at: signed.not_after,
                received_at: issued,
                hint: String::new(),
            })
        }

        fn selectors() -> Who {
            Who {
                selectors: ["unix:uid:1000".parse().unwrap()].into_iter().collect(),
                task: None,
            }
        }

        fn sent(view: View<X509SvidKey>) -> Vec<String> {
            match view {
                View::Ready { key, .. } => key
                    .svids
                    .iter()
                    .map(|s| s.svid.spiffe_id.to_string())
                    .collect(),
                View::Pending { what, .. } => vec![format!("pending {what}")],
                View::Denied(e) => vec![format!("denied {e}")],
            }
        }

        #[test]
        fn expired_and_not_yet_valid_svids_are_left_out_and_none_left_is_unavailable() {
            let ca = X509Authority::generate(
                &CaParams {
                    trust_domain: td(),
                    ttl: TimeDuration::days(1),
                    subject: "T".into(),
                },
                t0() - TimeDuration::hours(1),
            )
            .unwrap();
            let (a, b) = (entry("a"), entry("b"));
            let mut snap = Snapshot {
                ready: true,
                ..Snapshot::default()
            };
            let mut bundle = TrustBundle::new(td());
            bundle.x509_authorities.push(ca.cert_der().to_vec());
            snap.bundle = Some(Arc::new(bundle));
            snap.entries.insert(a.id.clone(), Arc::new(a.clone()));
            snap.entries.insert(b.id.clone(), Arc::new(b.clone()));
            // a issued at t0, b five minutes later: both ten minutes long.
            snap.svids.insert(a.id.clone(), svid(&ca, &a, t0()));
            let b_svid = svid(&ca, &b, t0() + TimeDuration::minutes(5));
            snap.svids.insert(b.id.clone(), b_svid.clone());
            let at = |m: i64| t0() + TimeDuration::minutes(m);

            assert_eq!(
                sent(x509_svid_view(&snap, &selectors(), at(1))),
                ["spiffe://example.org/a"],
                "b is not valid yet (its NotBefore is in the future)"
            );
            let View::Ready { refresh_at, .. } = x509_svid_view(&snap, &selectors(), at(1)) else {
                panic!("ready");
            };
            assert_eq!(
                refresh_at,
                Some(b_svid.not_before),
                "looked at again when b becomes valid"
            );
            assert_eq!(
                sent(x509_svid_view(&snap, &selectors(), at(6))),
                ["spiffe://example.org/a", "spiffe://example.org/b"]
            );
            // a expired (the server was unreachable): the state is sent without it.
            assert_eq!(
                sent(x509_svid_view(&snap, &selectors(), at(10))),
                ["spiffe://example.org/b"]
            );
            // Nothing valid left: Unavailable, never an expired certificate.
            assert_eq!(
                sent(x509_svid_view(&snap, &selectors(), at(15))),
                ["denied no valid SVID; the agent cannot reach the server"]
            );
            // Once pruned, the record of the expiry says the same.
            snap.svids.clear();
            snap.expired = [a.id.clone(), b.id.clone()].into_iter().collect();
            assert_eq!(
                sent(x509_svid_view(&snap, &selectors(), at(15))),
                ["denied no valid SVID; the agent cannot reach the server"]
            );
            // A new entry that has just no SVID yet is pending, not an outage.
            snap.expired.clear();
            assert_eq!(
                sent(x509_svid_view(&snap, &selectors(), at(15))),
                ["pending an X.509-SVID"]
            );
            assert_eq!(
                Status::from(ApiError::NoValidSvid).code(),
                tonic::Code::Unavailable
            );
        }
    }

    #[test]
    fn errors_map_to_the_documented_codes() {
        use tonic::Code;
        let cases = [
            (ApiError::MissingSecurityHeader, Code::InvalidArgument),
            (ApiError::NotReady, Code::Unavailable),
            (ApiError::Pending("x"), Code::Unavailable),
            (ApiError::NoIdentity, Code::PermissionDenied),
            (
                ApiError::Attestation(AttestError::ProcessGone { pid: 1 }),
                Code::PermissionDenied,
            ),
            (ApiError::NoPeer, Code::PermissionDenied),
            (
                ApiError::Attestation(AttestError::Kubelet(
                    crate::workload::kubelet::KubeletError::Request {
                        url: "https://10.0.3.17:10250".into(),
                        reason: "connection refused".into(),
                    },
                )),
                Code::Unavailable,
            ),
            (
                ApiError::Attestation(AttestError::NotInKubelet {
                    pod_uid: "p".into(),
                    container_id: "c".into(),
                    attempts: 10,
                }),
                Code::PermissionDenied,
            ),
        ];
        for (e, code) in cases {
            assert_eq!(Status::from(e).code(), code);
        }
        assert_eq!(
            Status::from(ApiError::MissingSecurityHeader).message(),
            "security header missing from request"
        );
        assert_eq!(
            Status::from(ApiError::NoIdentity).message(),
            "no identity issued"
        );
    }
}
