//! `Sync`: an agent's authorized entries, the trust bundle, revocations and
//! CRLs, as a full snapshot and then deltas driven by the server's change
//! feed.
//!
//! Deltas are computed by diffing the agent's authorized set before and
//! after each change rather than from the changed ids alone, so that a
//! change to a node alias entry (which moves many entries in or out of an
//! agent's reach) is delivered correctly. Entries that expire are removed
//! when they expire, without any change event.
//!
//! A stream wakes only for changes that can concern its agent (see
//! [`crate::feed`]): entries under the agent, its enrolled aliases or its
//! node aliases, its own node record, and what concerns every agent. The
//! SPIFFE IDs it watches follow its node aliases as they change.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use mayfly::SpiffeId;
use mayfly::bundle::TrustBundle;
use mayfly::entry::{Entry, EntryId};
use mayfly::proto::node::SyncResponse;
use mayfly::revocation::Revocation;
use mayfly::template::IdentityTemplate;
use time::OffsetDateTime;
use tokio::sync::broadcast::error::RecvError;
use tonic::Status;

use super::auth::{self, Agent};
use super::{NodeCtx, blocking};
use crate::feed::Wake;
use crate::state::ChangeEvent;

/// The longest a stream sleeps before re-checking expiries; bounds the
/// effect of a wall clock that jumps.
const MAX_EXPIRY_WAIT: Duration = Duration::from_secs(300);

/// What the agent has been sent: entry ids with their revisions, and the
/// bundle.
#[derive(Debug, Default)]
struct Sent {
    entries: BTreeMap<EntryId, u64>,
    bundle: Option<TrustBundle>,
    /// Generation of the CRLs last sent.
    crl_generation: Option<u64>,
}

/// The agent's authorized set now, when the next entry in it (or node
/// alias granting it) expires, and the node aliases it belongs to.
struct View {
    entries: BTreeMap<EntryId, Arc<Entry>>,
    revision: u64,
    next_expiry: Option<OffsetDateTime>,
    node_aliases: Vec<SpiffeId>,
}

/// What a stream sends, and what it must do next: wait until
/// `next_expiry`, and watch the parents of `keys`.
struct Sending {
    msg: Option<SyncResponse>,
    next_expiry: Option<OffsetDateTime>,
    keys: Vec<String>,
}

/// The SPIFFE IDs an agent's authorized set hangs from: itself, its
/// enrolled aliases and its node aliases.
fn watch_keys(agent: &Agent, node_aliases: &[SpiffeId]) -> Vec<String> {
    std::iter::once(&agent.spiffe_id)
        .chain(&agent.aliases)
        .chain(node_aliases)
        .map(ToString::to_string)
        .collect()
}

fn view(ctx: &NodeCtx, agent: &Agent, now: OffsetDateTime) -> View {
    let state = &ctx.state;
    state.with_index(|index| {
        let agent_view = agent.view(&state.server_id);
        let node_aliases = index.node_aliases(&state.server_id, agent_view.node_selectors, now);
        let entries = index.authorized_for(&agent_view, now);
        let next_expiry = entries
            .values()
            .map(Arc::as_ref)
            .chain(index.children(&state.server_id).map(Arc::as_ref))
            .filter_map(|e| e.expires_at)
            .filter(|at| *at > now)
            .min();
        View {
            entries,
            revision: state.revision(),
            next_expiry,
            node_aliases,
        }
    })
}

/// A full snapshot; replaces what was sent.
fn full(ctx: &NodeCtx, agent: &Agent, sent: &mut Sent) -> Sending {
    let v = view(ctx, agent, ctx.state.now());
    let bundle = ctx.state.bundle();
    let (crls, generation) = ctx.state.crls();
    let msg = SyncResponse {
        revision: v.revision,
        full: true,
        upserted: v.entries.values().map(|e| e.to_proto()).collect(),
        removed_entry_ids: Vec::new(),
        bundle: Some(bundle.to_proto()),
        revocations: ctx
            .state
            .current_revocations()
            .iter()
            .map(Revocation::to_proto)
            .collect(),
        crls,
        templates: super::templates::for_node(&ctx.state.config, &agent.node)
            .iter()
            .map(IdentityTemplate::to_proto)
            .collect(),
    };
    sent.crl_generation = Some(generation);
    sent.entries = v
        .entries
        .iter()
        .map(|(id, e)| (id.clone(), e.revision))
        .collect();
    sent.bundle = Some(bundle);
    Sending {
        msg: Some(msg),
        next_expiry: v.next_expiry,
        keys: watch_keys(agent, &v.node_aliases),
    }
}

/// The changes since what was sent, or `None` when nothing the agent holds
/// changed.
fn delta(ctx: &NodeCtx, agent: &Agent, sent: &mut Sent, revoked: &[Revocation]) -> Sending {
    let v = view(ctx, agent, ctx.state.now());
    let upserted: Vec<_> = v
        .entries
        .iter()
        .filter(|(id, e)| sent.entries.get(*id) != Some(&e.revision))
        .map(|(_, e)| e.to_proto())
        .collect();
    let removed: Vec<String> = sent
        .entries
        .keys()
        .filter(|id| !v.entries.contains_key(*id))
        .map(ToString::to_string)
        .collect();
    let bundle = ctx.state.bundle();
    let bundle_changed = sent.bundle.as_ref() != Some(&bundle);
    let now = ctx.state.now();
    let revocations: Vec<_> = revoked
        .iter()
        .filter(|r| !r.expired(now))
        .map(Revocation::to_proto)
        .collect();
    let (crls, generation) = ctx.state.crls();
    let crls_changed = sent.crl_generation != Some(generation);
    if upserted.is_empty()
        && removed.is_empty()
        && !bundle_changed
        && revocations.is_empty()
        && !crls_changed
    {
        return Sending {
            msg: None,
            next_expiry: v.next_expiry,
            keys: watch_keys(agent, &v.node_aliases),
        };
    }
    sent.crl_generation = Some(generation);
    sent.entries = v
        .entries
        .iter()
        .map(|(id, e)| (id.clone(), e.revision))
        .collect();
    let msg = SyncResponse {
        revision: v.revision,
        full: false,
        upserted,
        removed_entry_ids: removed,
        bundle: bundle_changed.then(|| bundle.to_proto()),
        revocations,
        crls: if crls_changed { crls } else { Vec::new() },
        templates: Vec::new(),
    };
    sent.bundle = Some(bundle);
    Sending {
        msg: Some(msg),
        next_expiry: v.next_expiry,
        keys: watch_keys(agent, &v.node_aliases),
    }
}

fn wait_for(ctx: &NodeCtx, at: Option<OffsetDateTime>) -> Duration {
    at.map_or(MAX_EXPIRY_WAIT, |at| {
        let left = at - ctx.state.now();
        Duration::try_from(left)
            .unwrap_or(Duration::ZERO)
            .min(MAX_EXPIRY_WAIT)
    })
}

/// What a wake-up of the stream calls for.
enum Step {
    /// A change that does not concern this agent.
    Nothing,
    /// Recompute and send what changed, if anything, with these new
    /// revocations.
    Delta(Vec<Revocation>),
    /// Re-read the node (ban, eviction), then a delta or a full snapshot.
    Recheck { then_full: bool },
    /// End the stream: the CA of the agent's SVID left the bundle.
    IssuerRevoked,
    /// End the stream: the server is stopping.
    ShuttingDown,
}

/// The response stream of one `Sync` call. It ends with the node's status
/// when the agent is banned (`PermissionDenied`) or evicted
/// (`Unauthenticated`), when the CA that issued the agent's SVID (`issuer`)
/// is revoked (`Unauthenticated`), and with `Unavailable` when the server
/// shuts down.
pub fn stream(
    ctx: Arc<NodeCtx>,
    agent: Agent,
    issuer: Option<String>,
) -> impl Stream<Item = Result<SyncResponse, Status>> + Send + 'static {
    async_stream::stream! {
        // Watch before the snapshot so that no change falls between.
        let (mut watch, mut shared) = ctx.state.watch(watch_keys(&agent, &[]));
        let mut shutdown = ctx.shutdown.clone();
        let mut agent = agent;
        let mut sent = Sent::default();
        let agent_key = agent.spiffe_id.to_string();
        let mut sending = full(&ctx, &agent, &mut sent);
        let mut send_full = true;
        loop {
            // Newly watched node aliases: changes under them before the
            // watch began are picked up by one more recomputation.
            // (Empty once applied: keys always hold the agent's own ID.)
            let keys = std::mem::take(&mut sending.keys);
            if !keys.is_empty() && watch.set_keys(keys) {
                watch.wake_self();
            }
            let next_expiry = sending.next_expiry;
            if let Some(msg) = sending.msg.take() {
                if send_full {
                    tracing::debug!(agent = %agent_key, entries = msg.upserted.len(), "sync: full snapshot");
                } else {
                    tracing::debug!(
                        agent = %agent_key,
                        revision = msg.revision,
                        upserted = msg.upserted.len(),
                        removed = msg.removed_entry_ids.len(),
                        revocations = msg.revocations.len(),
                        crls = msg.crls.len(),
                        "sync: delta"
                    );
                }
                yield Ok(msg);
            }
            let sleep = tokio::time::sleep(wait_for(&ctx, next_expiry));
            let step = tokio::select! {
                _ = shutdown.wait_for(|stop| *stop) => Step::ShuttingDown,
                () = sleep => Step::Delta(Vec::new()),
                wake = watch.changed() => match wake {
                    Wake::Entries => Step::Delta(Vec::new()),
                    Wake::Node => Step::Recheck { then_full: false },
                },
                ev = shared.recv() => match ev {
                    Ok(ChangeEvent::Bundle) if issuer.as_deref().is_some_and(|id| !auth::issuer_trusted(&ctx, id)) => Step::IssuerRevoked,
                    Ok(ChangeEvent::Entries { .. } | ChangeEvent::Bundle) => Step::Delta(Vec::new()),
                    Ok(ChangeEvent::Revocations { added }) => Step::Delta(added),
                    // Node changes reach the agent's own watch only.
                    Ok(ChangeEvent::Node { .. }) => Step::Nothing,
                    Err(RecvError::Lagged(missed)) => {
                        tracing::warn!(agent = %agent_key, missed, "sync: fell behind the change feed; resending a full snapshot");
                        // A missed event may have been a ban: re-check too.
                        Step::Recheck { then_full: true }
                    }
                    Err(RecvError::Closed) => Step::ShuttingDown,
                },
            };
            let mut revoked = Vec::new();
            send_full = match step {
                Step::Nothing => continue,
                Step::IssuerRevoked => {
                    let e = auth::untrusted_issuer();
                    tracing::info!(agent = %agent_key, reason = %e, "sync: stream ended");
                    yield Err(e.into());
                    break;
                }
                Step::ShuttingDown => {
                    yield Err(Status::unavailable("the server is shutting down"));
                    break;
                }
                Step::Delta(added) => {
                    revoked = added;
                    false
                }
                Step::Recheck { then_full } => {
                    let task_ctx = Arc::clone(&ctx);
                    let id = agent.spiffe_id.clone();
                    match blocking(move || auth::recheck(&task_ctx, &id)).await {
                        Ok(a) => agent = a,
                        Err(e) => {
                            tracing::info!(agent = %agent_key, reason = %e, "sync: stream ended");
                            yield Err(e.into());
                            break;
                        }
                    }
                    then_full
                }
            };
            sending = if send_full {
                full(&ctx, &agent, &mut sent)
            } else {
                delta(&ctx, &agent, &mut sent, &revoked)
            };
        }
    }
}
