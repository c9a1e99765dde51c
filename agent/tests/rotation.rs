//! Rotation, taint and outage behaviour end to end inside one process: the sync task against
//! the stand-in node API (short TTLs), and the Workload API on a real Unix socket, watched by
//! a client the way `X509Source` watches it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration as StdDuration;

use mayfly::clock::SystemClock;
use mayfly::proto::node as pb;
use mayfly::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use mayfly::proto::workload::{X509svidRequest, X509svidResponse};
use mayfly::selector::SelectorSet;
use mayfly::x509::chain_from_concatenated_der;
use mayfly_agent::api::{self, WorkloadApi};
use mayfly_agent::attest::{JoinToken, JoinTokenAttestor};
use mayfly_agent::cache::Cache;
use mayfly_agent::client::ServerClient;
use mayfly_agent::client::tls::TrustAnchors;
use mayfly_agent::storage::Storage;
use mayfly_agent::sync::{self, Syncer, signed_by_any};
use mayfly_agent::workload::{AttestError, PeerInfo, WorkloadAttestor};
use support::*;
use time::{Duration, OffsetDateTime};
use tokio::sync::{oneshot, watch};
use tonic::Code;
use zeroize::Zeroizing;

/// Every caller is `unix:uid:1000`, the selector of the stand-in's entries.
#[derive(Debug)]
struct Uid1000;

#[tonic::async_trait]
impl WorkloadAttestor for Uid1000 {
    async fn attest(&self, _: &PeerInfo) -> Result<SelectorSet, AttestError> {
        Ok(["unix:uid:1000".parse().unwrap()].into_iter().collect())
    }
}

struct Agent {
    state: Arc<MockState>,
    client: ServerClient,
    cache: Cache,
    socket: PathBuf,
    stop_sync: watch::Sender<bool>,
    sync_task: tokio::task::JoinHandle<()>,
    stop_api: oneshot::Sender<()>,
    api_task: tokio::task::JoinHandle<anyhow::Result<()>>,
    _dir: tempfile::TempDir,
}

/// An enrolled agent with workload SVIDs of `svid_ttl`, syncing and serving.
async fn agent(svid_ttl: Duration) -> Agent {
    let state = MockState::new();
    *state.svid_ttl.lock().unwrap() = svid_ttl;
    let transport = MemTransport::start(state.clone());
    let dir = tempfile::tempdir().unwrap();
    let client = ServerClient::new(td(), transport);
    let cache = Cache::new();
    let storage = Storage::open(&dir.path().join("agent")).unwrap();
    let anchors = TrustAnchors::default();
    let attestor =
        JoinTokenAttestor::new(JoinToken::new(Zeroizing::new(GOOD_TOKEN.into())).unwrap());
    sync::enroll(&client, &storage, &anchors, &cache, &attestor)
        .await
        .unwrap();
    let syncer = Syncer::new(
        client.clone(),
        cache.clone(),
        storage,
        anchors,
        Arc::new(SystemClock),
        None,
    );
    let (stop_sync, rx) = watch::channel(false);
    let sync_task = tokio::spawn(syncer.run(rx));
    let socket = dir.path().join("api.sock");
    let minter: Arc<dyn api::JwtMinter> = Arc::new(client.clone());
    let service = WorkloadApi::new(cache.clone(), Arc::new(Uid1000), minter, td())
        .with_pending_wait(StdDuration::from_secs(2));
    let (stop_api, stop_rx) = oneshot::channel::<()>();
    let api_task = tokio::spawn({
        let socket = socket.clone();
        async move {
            api::serve_api(&socket, service, async move {
                let _ = stop_rx.await;
            })
            .await
        }
    });
    wait_for_cache(&cache, |s| s.ready && s.svids.len() == 2).await;
    wait_for_socket(&socket).await;
    Agent {
        state,
        client,
        cache,
        socket,
        stop_sync,
        sync_task,
        stop_api,
        api_task,
        _dir: dir,
    }
}

impl Agent {
    async fn fetch(&self) -> Result<tonic::Streaming<X509svidResponse>, tonic::Status> {
        let channel = api::connect(&self.socket).await.unwrap();
        Ok(SpiffeWorkloadApiClient::new(channel)
            .fetch_x509svid(api::request(X509svidRequest {}))
            .await?
            .into_inner())
    }

    async fn stop(self) {
        self.stop_sync.send_replace(true);
        let _ = self.stop_api.send(());
        tokio::time::timeout(StdDuration::from_secs(10), self.sync_task)
            .await
            .unwrap()
            .unwrap();
        tokio::time::timeout(StdDuration::from_secs(10), self.api_task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

async fn wait_for_socket(path: &Path) {
    for _ in 0..500 {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return;
        }
        tokio::time::sleep(StdDuration::from_millis(10)).await;
    }
    panic!("the Workload API socket never came up");
}

/// What a workload checks in every message it gets: each SVID is valid now (never expired,
/// never not-yet-valid) and its chain verifies to the bundle sent with it. Returns the
/// leaves by SPIFFE ID and the latest NotAfter.
fn check_message(msg: &X509svidResponse) -> (Vec<(String, Vec<u8>)>, OffsetDateTime) {
    let now = OffsetDateTime::now_utc();
    let mut leaves = Vec::new();
    let mut latest = OffsetDateTime::UNIX_EPOCH;
    assert!(!msg.svids.is_empty(), "a message with no SVID");
    for svid in &msg.svids {
        let chain = chain_from_concatenated_der(&svid.x509_svid).unwrap();
        let bundle = chain_from_concatenated_der(&svid.bundle).unwrap();
        let leaf = chain[0].clone();
        let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
        let nb = cert.validity().not_before.to_datetime();
        let na = cert.validity().not_after.to_datetime();
        assert!(
            nb <= now,
            "{} sent before its NotBefore {nb}",
            svid.spiffe_id
        );
        assert!(now < na, "{} sent expired (NotAfter {na})", svid.spiffe_id);
        assert!(
            signed_by_any(&leaf, &bundle),
            "{} does not verify against the bundle it came with",
            svid.spiffe_id
        );
        latest = latest.max(na);
        leaves.push((svid.spiffe_id.clone(), leaf));
    }
    (leaves, latest)
}

#[tokio::test]
async fn an_open_stream_sees_three_rotations_and_never_an_expired_certificate() {
    let agent = agent(Duration::seconds(4)).await;
    // An `X509Source` (the Rust spiffe crate) watches alongside: it must switch by itself and
    // never hold an invalid certificate.
    let source = spiffe::X509Source::builder()
        .endpoint(format!("unix:{}", agent.socket.display()))
        .build()
        .await
        .unwrap();
    let (stop_sampling, mut sampling) = watch::channel(false);
    let sampler = tokio::spawn({
        let source = source.clone();
        async move {
            let mut leaves = BTreeSet::new();
            // Until it saw the first SVID and three rotations (or is told to stop).
            while leaves.len() < 4 && !*sampling.borrow_and_update() {
                let svid = source.svid().unwrap();
                let leaf = svid.leaf().as_bytes().to_vec();
                let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
                assert!(
                    cert.validity().is_valid(),
                    "X509Source holds a certificate outside its validity"
                );
                leaves.insert(leaf);
                let _ =
                    tokio::time::timeout(StdDuration::from_millis(50), sampling.changed()).await;
            }
            leaves.len()
        }
    });
    let mut stream = agent.fetch().await.unwrap();
    let mut seen: BTreeSet<Vec<u8>> = BTreeSet::new();
    let started = tokio::time::Instant::now();
    let mut received_at = Vec::new();
    while seen.len() < 4 {
        let msg = tokio::time::timeout(StdDuration::from_secs(10), stream.message())
            .await
            .expect("a rotation within 10 s")
            .unwrap()
            .expect("the stream stays open");
        let (leaves, _) = check_message(&msg);
        assert_eq!(leaves.len(), 2, "both entries, every time");
        for (id, leaf) in leaves {
            if id == "spiffe://example.org/a" && seen.insert(leaf) {
                received_at.push(started.elapsed());
            }
        }
        assert!(
            started.elapsed() < StdDuration::from_secs(20),
            "rotations too slow"
        );
    }
    // The first SVID and three rotations, each roughly at half the 4 s lifetime.
    let gaps: Vec<_> = received_at.windows(2).map(|w| w[1] - w[0]).collect();
    println!("rotation intervals with a 4 s TTL: {gaps:?}");
    for gap in gaps {
        assert!(
            gap >= StdDuration::from_millis(800) && gap <= StdDuration::from_millis(3500),
            "rotation interval {gap:?}"
        );
    }
    let source_saw = tokio::time::timeout(StdDuration::from_secs(10), sampler)
        .await
        .expect("X509Source follows the rotations")
        .unwrap();
    drop(stop_sampling);
    assert!(source_saw >= 4, "X509Source saw {source_saw} certificates");
    source.shutdown().await;
    agent.stop().await;
}

#[tokio::test]
async fn a_tainted_authority_is_replaced_within_one_sync() {
    let agent = agent(Duration::hours(1)).await;
    let state = &agent.state;
    let old_ca = state.ca.cert_der().to_vec();
    let new_ca = state.ca2.cert_der().to_vec();
    let before = agent.cache.current();
    assert!(
        before
            .svids
            .values()
            .all(|s| signed_by_any(&s.chain_der[0], std::slice::from_ref(&old_ca)))
    );
    let agent_serial = agent.client.identity().unwrap().serial_hex.clone();
    let mut stream = agent.fetch().await.unwrap();
    let first = stream.message().await.unwrap().unwrap();
    check_message(&first);
    let signs = state.calls("SignX509");

    // The server rotated to ca2 and tainted ca: one sync message says so.
    let mut bundle = state.bundle();
    bundle.x509_authorities.push(new_ca.clone());
    bundle.tainted_x509_authorities = vec![old_ca.clone()];
    bundle.sequence = 2;
    *state.bundle_override.lock().unwrap() = Some(bundle.clone());
    state.use_ca2.store(true, Ordering::SeqCst);
    state
        .updates
        .send(pb::SyncResponse {
            revision: 2,
            full: false,
            bundle: Some(bundle.to_proto()),
            ..Default::default()
        })
        .unwrap();

    // The first state with the new bundle already holds the replacements.
    let snap = wait_for_cache(&agent.cache, |s| {
        s.bundle.as_ref().is_some_and(|b| b.sequence == 2)
    })
    .await;
    assert_eq!(snap.svids.len(), 2);
    for svid in snap.svids.values() {
        assert!(
            signed_by_any(&svid.chain_der[0], std::slice::from_ref(&new_ca)),
            "{} still signed by the tainted CA",
            svid.spiffe_id
        );
    }
    assert_eq!(
        state.calls("SignX509"),
        signs + 1,
        "one batch, in that sync round"
    );
    // The agent's own SVID too.
    eventually("the agent SVID renewed", || {
        agent
            .client
            .identity()
            .is_some_and(|s| s.serial_hex != agent_serial)
    })
    .await;
    let agent_svid = agent.client.identity().unwrap();
    assert!(signed_by_any(
        &agent_svid.chain_der[0],
        std::slice::from_ref(&new_ca)
    ));
    assert_eq!(state.calls("Renew"), 1, "renewed once, no loop");
    // The open stream got the new SVIDs and the two-CA bundle.
    let next = tokio::time::timeout(StdDuration::from_secs(5), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let (leaves, _) = check_message(&next);
    for (_, leaf) in leaves {
        assert!(signed_by_any(&leaf, std::slice::from_ref(&new_ca)));
    }
    assert_eq!(
        chain_from_concatenated_der(&next.svids[0].bundle)
            .unwrap()
            .len(),
        2,
        "both authorities served"
    );
    tokio::time::sleep(StdDuration::from_millis(300)).await;
    assert_eq!(state.calls("Renew"), 1, "still once");
    agent.stop().await;
}

#[tokio::test]
async fn during_an_outage_svids_are_served_until_they_expire_then_unavailable_then_recovered() {
    let agent = agent(Duration::seconds(4)).await;
    let mut stream = agent.fetch().await.unwrap();
    let (_, mut valid_until) = check_message(&stream.message().await.unwrap().unwrap());

    agent.state.set_down(true);
    let down_at = OffsetDateTime::now_utc();
    // The stream keeps what it has, never sends an expired certificate, and ends with
    // Unavailable only once nothing valid remains.
    let end = loop {
        match tokio::time::timeout(StdDuration::from_secs(10), stream.message())
            .await
            .expect("the stream ends when the SVIDs expire")
        {
            Ok(Some(msg)) => valid_until = valid_until.max(check_message(&msg).1),
            Ok(None) => panic!("the stream ended without a status"),
            Err(status) => break status,
        }
    };
    let ended_at = OffsetDateTime::now_utc();
    assert_eq!(end.code(), Code::Unavailable);
    assert_eq!(
        end.message(),
        "no valid SVID; the agent cannot reach the server"
    );
    assert!(
        ended_at >= valid_until,
        "ended at {ended_at}, before the last SVID expired at {valid_until}"
    );
    assert!(
        ended_at - down_at <= Duration::seconds(6),
        "no TTL was extended"
    );
    assert!(!agent.client.is_reachable());
    // A new caller meanwhile is told the same at once.
    let mut again = agent.fetch().await.unwrap();
    let status = tokio::time::timeout(StdDuration::from_secs(5), again.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);

    // The server is back: the agent resumes by itself.
    agent.state.set_down(false);
    let back_at = tokio::time::Instant::now();
    wait_for_cache_within(&agent.cache, StdDuration::from_secs(30), |s| {
        s.svids.len() == 2 && s.expired.is_empty()
    })
    .await;
    println!(
        "outage ended; valid SVIDs again after {:?}",
        back_at.elapsed()
    );
    let mut fresh = agent.fetch().await.unwrap();
    let msg = tokio::time::timeout(StdDuration::from_secs(5), fresh.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(check_message(&msg).0.len(), 2);
    assert!(agent.client.is_reachable());
    agent.stop().await;
}
