//! The node API client over real TCP and mutual TLS against a stand-in
//! server: the server is verified the SPIFFE way, the agent presents its SVID
//! on every call but `Attest`, and `insecure_bootstrap` applies only to the
//! first attestation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;

use mayfly::clock::SystemClock;
use mayfly_agent::attest::{JoinToken, JoinTokenAttestor};
use mayfly_agent::cache::Cache;
use mayfly_agent::client::tls::TrustAnchors;
use mayfly_agent::client::{ServerClient, TlsTransport};
use mayfly_agent::config::AgentConfig;
use mayfly_agent::storage::Storage;
use mayfly_agent::sync::{self, Syncer};
use support::tls::start_tls_server;
use support::*;
use tokio::sync::watch;
use zeroize::Zeroizing;

struct Agent {
    client: ServerClient,
    anchors: TrustAnchors,
    storage: Storage,
    cache: Cache,
    _dir: tempfile::TempDir,
}

fn agent(addr: SocketAddr, anchors: Vec<Vec<u8>>, insecure_bootstrap: bool) -> Agent {
    let dir = tempfile::tempdir().unwrap();
    let config = AgentConfig::parse(
        &format!(
            "[agent]\nserver_address = \"{addr}\"\ninsecure_bootstrap = {insecure_bootstrap}\n"
        ),
        std::path::Path::new("test.toml"),
    )
    .unwrap();
    let anchors = TrustAnchors::new(anchors);
    Agent {
        client: ServerClient::new(td(), Arc::new(TlsTransport::new(&config, anchors.clone()))),
        anchors,
        storage: Storage::open(&dir.path().join("agent")).unwrap(),
        cache: Cache::new(),
        _dir: dir,
    }
}

impl Agent {
    async fn enroll(&self) -> anyhow::Result<()> {
        let attestor =
            JoinTokenAttestor::new(JoinToken::new(Zeroizing::new(GOOD_TOKEN.into())).unwrap());
        sync::enroll(
            &self.client,
            &self.storage,
            &self.anchors,
            &self.cache,
            &attestor,
        )
        .await
    }
}

const SERVER_ID: &str = "spiffe://example.org/mayfly/server";

#[tokio::test]
async fn attest_and_sync_over_mutual_tls() {
    let state = MockState::new();
    let addr = start_tls_server(state.clone(), &state.ca, SERVER_ID).await;
    let a = agent(addr, vec![state.ca.cert_der().to_vec()], false);
    a.enroll().await.unwrap();
    let identity = a.client.identity().unwrap();

    let syncer = Syncer::new(
        a.client.clone(),
        a.cache.clone(),
        a.storage.clone(),
        a.anchors.clone(),
        Arc::new(SystemClock),
        None,
    );
    let (tx, rx) = watch::channel(false);
    let task = tokio::spawn(syncer.run(rx));
    wait_for_cache(&a.cache, |s| s.ready && s.svids.len() == 2).await;
    tx.send_replace(true);
    task.await.unwrap();

    let seen = state.peer_certs.lock().unwrap().clone();
    let attest: Vec<_> = seen.iter().filter(|(c, _)| c == "Attest").collect();
    assert_eq!(attest.len(), 1);
    assert!(
        attest[0].1.is_none(),
        "Attest is sent without a client certificate"
    );
    for call in ["Sync", "SignX509"] {
        let presented = seen.iter().find(|(c, _)| c == call).expect(call);
        assert_eq!(
            presented.1.as_deref(),
            Some(identity.chain_der[0].as_slice()),
            "{call} presents the agent SVID"
        );
    }
    assert!(a.client.is_reachable());
}

#[tokio::test]
async fn a_server_with_another_spiffe_id_is_refused() {
    let state = MockState::new();
    let addr = start_tls_server(state.clone(), &state.ca, "spiffe://example.org/web").await;
    let a = agent(addr, vec![state.ca.cert_der().to_vec()], false);
    let err = a.enroll().await.unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("invalid peer certificate") && msg.contains("NotValidForName"),
        "{msg}"
    );
    assert_eq!(state.calls("Attest"), 0, "nothing was sent to the impostor");
    assert!(a.client.identity().is_none());
}

#[tokio::test]
async fn a_server_from_another_ca_is_refused() {
    let state = MockState::new();
    let other = new_ca();
    let addr = start_tls_server(state.clone(), &other, SERVER_ID).await;
    let a = agent(addr, vec![state.ca.cert_der().to_vec()], false);
    let msg = format!("{:#}", a.enroll().await.unwrap_err());
    assert!(msg.contains("UnknownIssuer"), "{msg}");
    assert_eq!(state.calls("Attest"), 0);
}

#[tokio::test]
async fn insecure_bootstrap_trusts_only_the_first_attestation() {
    let state = MockState::new();
    let addr = start_tls_server(state.clone(), &state.ca, SERVER_ID).await;
    let a = agent(addr, vec![], true);
    a.enroll().await.unwrap();
    assert_eq!(state.calls("Attest"), 1);
    // The bundle the server returned is now what the agent trusts.
    assert_eq!(a.anchors.current()[0].as_ref(), state.ca.cert_der());

    // An impostor from another CA: with a bundle known, insecure_bootstrap
    // no longer applies, even for Attest.
    let impostor_state = MockState::new();
    let impostor = start_tls_server(impostor_state.clone(), &impostor_state.ca, SERVER_ID).await;
    let b = agent(impostor, vec![state.ca.cert_der().to_vec()], true);
    assert!(b.enroll().await.is_err());
    assert_eq!(impostor_state.calls("Attest"), 0);
}
