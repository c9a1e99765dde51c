//! The sync task against an in-memory stand-in for the server's node API:
//! attestation, snapshot and deltas into the cache, SVID signing, agent SVID
//! renewal, reconnection, and what happens when the server rejects the agent.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration as StdDuration;

use mayfly::clock::SystemClock;
use mayfly::entry::EntryId;
use mayfly::proto::node as pb;
use mayfly_agent::api::JwtMinter;
use mayfly_agent::attest::{JoinToken, JoinTokenAttestor, NodeAttestor};
use mayfly_agent::cache::Cache;
use mayfly_agent::client::ServerClient;
use mayfly_agent::client::tls::TrustAnchors;
use mayfly_agent::storage::Storage;
use mayfly_agent::sync::{self, Syncer};
use support::*;
use time::Duration;
use tokio::sync::watch;
use zeroize::Zeroizing;

struct Harness {
    state: Arc<support::MockState>,
    transport: Arc<MemTransport>,
    client: ServerClient,
    cache: Cache,
    storage: Storage,
    anchors: TrustAnchors,
    _dir: tempfile::TempDir,
}

fn harness() -> Harness {
    let state = MockState::new();
    let transport = MemTransport::start(state.clone());
    let dir = tempfile::tempdir().unwrap();
    Harness {
        client: ServerClient::new(td(), transport.clone()),
        state,
        transport,
        cache: Cache::new(),
        storage: Storage::open(&dir.path().join("agent")).unwrap(),
        anchors: TrustAnchors::default(),
        _dir: dir,
    }
}

fn token(t: &str) -> Arc<dyn NodeAttestor> {
    Arc::new(JoinTokenAttestor::new(
        JoinToken::new(Zeroizing::new(t.to_owned())).unwrap(),
    ))
}

impl Harness {
    fn start(
        &self,
        recovery: Option<Arc<dyn NodeAttestor>>,
    ) -> (watch::Sender<bool>, tokio::task::JoinHandle<()>) {
        let syncer = Syncer::new(
            self.client.clone(),
            self.cache.clone(),
            self.storage.clone(),
            self.anchors.clone(),
            Arc::new(SystemClock),
            recovery,
        );
        let (tx, rx) = watch::channel(false);
        (tx, tokio::spawn(syncer.run(rx)))
    }

    async fn enroll(&self) {
        sync::enroll(
            &self.client,
            &self.storage,
            &self.anchors,
            &self.cache,
            token(GOOD_TOKEN).as_ref(),
        )
        .await
        .unwrap();
    }
}

fn ids(snap: &mayfly_agent::cache::Snapshot) -> BTreeSet<String> {
    snap.svids.keys().map(ToString::to_string).collect()
}

fn set(v: &[&str]) -> BTreeSet<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

async fn stop(tx: watch::Sender<bool>, task: tokio::task::JoinHandle<()>) {
    tx.send_replace(true);
    tokio::time::timeout(StdDuration::from_secs(5), task)
        .await
        .expect("the sync task stops promptly on shutdown")
        .unwrap();
}

#[tokio::test]
async fn attests_syncs_signs_and_follows_deltas() {
    let h = harness();
    h.enroll().await;
    let identity = h.client.identity().expect("attested");
    assert_eq!(
        identity.spiffe_id.to_string(),
        "spiffe://example.org/mayfly/agent/join_token/tok1"
    );
    // Stored for the next start, and the returned bundle is now trusted.
    let stored = h.storage.load_agent_svid().unwrap().unwrap();
    assert_eq!(stored.serial_hex, identity.serial_hex);
    assert_eq!(h.anchors.current().len(), 1);
    assert!(h.storage.load_bundle(&td()).unwrap().is_some());
    // Attest went over a bootstrap channel without a client certificate.
    assert_eq!(h.transport.channels.lock().unwrap()[0], (None, true));

    let (tx, task) = h.start(None);
    let snap = wait_for_cache(&h.cache, |s| s.ready && s.svids.len() == 2).await;
    assert_eq!(ids(&snap), set(&["a", "b"]));
    for (id, svid) in &snap.svids {
        assert_eq!(
            svid.spiffe_id.to_string(),
            format!("spiffe://example.org/{id}")
        );
        assert!(svid.expires_at > time::OffsetDateTime::now_utc() + Duration::minutes(50));
    }
    assert_eq!(snap.bundle.as_ref().unwrap().x509_authorities.len(), 1);
    // The authenticated channel presents the agent SVID.
    assert!(
        h.transport
            .channels
            .lock()
            .unwrap()
            .contains(&(Some(identity.serial_hex.clone()), false))
    );

    // A delta: a removed, c added.
    h.state.entries.lock().unwrap().retain(|e| e.id != "a");
    h.state.entries.lock().unwrap().push(entry("c", "c"));
    h.state
        .updates
        .send(pb::SyncResponse {
            revision: 2,
            full: false,
            upserted: vec![entry("c", "c")],
            removed_entry_ids: vec!["a".into()],
            bundle: None,
            ..Default::default()
        })
        .unwrap();
    let snap = wait_for_cache(&h.cache, |s| s.revision == 2 && s.svids.len() == 2).await;
    assert_eq!(ids(&snap), set(&["b", "c"]));
    assert!(!snap.entries.contains_key(&"a".parse::<EntryId>().unwrap()));

    // JWT-SVIDs come from the server; its refusals reach the workload as they are.
    let minter: &dyn JwtMinter = &h.client;
    let (jwt, exp) = minter
        .mint_jwt(&"b".parse().unwrap(), &["aud".to_owned()])
        .await
        .unwrap();
    assert_eq!((jwt.as_str(), exp), ("jwt-for-b", 1234));
    let err = minter
        .mint_jwt(&"a".parse().unwrap(), &["aud".to_owned()])
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);

    stop(tx, task).await;
    assert_eq!(h.state.calls("Sync"), 1);
}

#[tokio::test]
async fn reconnects_after_the_server_was_unreachable() {
    let h = harness();
    h.enroll().await;
    h.state.sync_plan.lock().unwrap().extend([
        Some(tonic::Status::unavailable("down")),
        Some(tonic::Status::unavailable("down")),
    ]);
    let (tx, task) = h.start(None);
    wait_for_cache(&h.cache, |s| s.ready && s.svids.len() == 2).await;
    assert_eq!(h.state.calls("Sync"), 3, "two failures, then the stream");
    assert!(h.client.is_reachable());
    stop(tx, task).await;
}

#[tokio::test]
async fn a_superseded_agent_attests_again_with_the_token_given_at_start() {
    let h = harness();
    // A stored SVID from an earlier run, which the server no longer accepts.
    let old = h.state.agent_svid(Duration::hours(1));
    h.anchors.replace(vec![h.state.ca.cert_der().to_vec()]);
    h.client.set_identity(old.clone());
    h.state
        .sync_plan
        .lock()
        .unwrap()
        .push_back(Some(tonic::Status::unauthenticated(
            "agent SVID has been superseded",
        )));
    let (tx, task) = h.start(Some(token(GOOD_TOKEN)));
    wait_for_cache(&h.cache, |s| s.ready && s.svids.len() == 2).await;
    assert_eq!(h.state.calls("Attest"), 1);
    assert!(h.client.rejected().is_none(), "cleared by the new identity");
    let now = h.client.identity().unwrap();
    assert_ne!(now.serial_hex, old.serial_hex);
    assert_eq!(
        h.storage.load_agent_svid().unwrap().unwrap().serial_hex,
        now.serial_hex,
        "the new identity is stored"
    );
    stop(tx, task).await;
}

#[tokio::test]
async fn a_rejected_agent_without_a_token_keeps_running_and_stops_on_shutdown() {
    let h = harness();
    h.client
        .set_identity(h.state.agent_svid(Duration::hours(1)));
    h.state.sync_plan.lock().unwrap().extend((0..5).map(|_| {
        Some(tonic::Status::unauthenticated(
            "agent is not attested; attest again",
        ))
    }));
    let (tx, task) = h.start(None);
    eventually("the first Sync", || h.state.calls("Sync") == 1).await;
    tokio::time::sleep(StdDuration::from_millis(500)).await;
    assert!(!task.is_finished(), "the task keeps running");
    assert_eq!(
        h.state.calls("Sync"),
        1,
        "and retries slowly, not in a loop"
    );
    assert!(!h.cache.current().ready);
    let why = h
        .client
        .rejected()
        .expect("the rejection is remembered for /readyz");
    assert!(why.contains("not attested"), "{why}");
    stop(tx, task).await;
}

#[tokio::test]
async fn a_used_token_is_refused_with_the_servers_message() {
    let h = harness();
    h.enroll().await;
    let err = sync::enroll(
        &h.client,
        &h.storage,
        &h.anchors,
        &h.cache,
        token(GOOD_TOKEN).as_ref(),
    )
    .await
    .unwrap_err();
    assert!(format!("{err:#}").contains("already used"), "{err:#}");
    let err = sync::enroll(
        &h.client,
        &h.storage,
        &h.anchors,
        &h.cache,
        token("nope").as_ref(),
    )
    .await
    .unwrap_err();
    assert!(
        !format!("{err:#}").contains("nope"),
        "the token never appears in errors"
    );
}

#[tokio::test]
async fn renews_its_own_svid_at_half_life_and_moves_to_a_new_connection() {
    let h = harness();
    // A short agent SVID: past half its life almost at once.
    *h.state.agent_ttl.lock().unwrap() = Duration::seconds(2);
    h.enroll().await;
    let first = h.client.identity().unwrap();
    let (tx, task) = h.start(None);
    eventually("a renewal", || h.state.calls("Renew") >= 1).await;
    wait_for_cache(&h.cache, |s| s.ready && s.svids.len() == 2).await;
    eventually("the new identity", || {
        h.client.identity().unwrap().serial_hex != first.serial_hex
    })
    .await;
    let renewed = h.client.identity().unwrap();
    assert_eq!(renewed.spiffe_id, first.spiffe_id);
    assert!(renewed.expires_at > first.expires_at);
    assert_eq!(
        h.storage.load_agent_svid().unwrap().unwrap().serial_hex,
        renewed.serial_hex
    );
    // Calls after the renewal present the new SVID on a new connection.
    eventually("a channel with the renewed SVID", || {
        h.transport
            .channels
            .lock()
            .unwrap()
            .contains(&(Some(renewed.serial_hex.clone()), false))
    })
    .await;
    stop(tx, task).await;
    assert_eq!(h.state.calls("Renew"), 1, "renewed once, not in a loop");
}
