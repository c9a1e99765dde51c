//! End to end: a real server, a real agent, and the Rust `spiffe` crate's
//! Workload API client, X509Source and JwtSource.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use mayfly_e2e::{Agent, Server, TRUST_DOMAIN, my_uid, wait_for};
use spiffe::{BundleSource as _, SpiffeId, TrustDomain, WorkloadApiClient};
use x509_parser::extensions::GeneralName;

fn check_x509_svid_rules(leaf_der: &[u8], expected_id: &str) {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf_der).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap().value;
    let uris: Vec<_> = san
        .general_names
        .iter()
        .filter(|n| matches!(n, GeneralName::URI(_)))
        .collect();
    assert_eq!(uris.len(), 1, "exactly one URI SAN");
    assert!(matches!(uris[0], GeneralName::URI(u) if *u == expected_id));
    assert!(
        !cert.basic_constraints().unwrap().unwrap().value.ca,
        "leaf must not be a CA"
    );
    let ku = cert.key_usage().unwrap().unwrap();
    assert!(
        ku.critical && ku.value.digital_signature(),
        "critical digitalSignature"
    );
    assert!(!ku.value.key_cert_sign() && !ku.value.crl_sign());
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    assert!(cert.raw_serial().len() >= 16, "128-bit class random serial");
}

fn verifies_to(leaf_der: &[u8], authorities: &[Vec<u8>]) -> bool {
    let (_, leaf) = x509_parser::parse_x509_certificate(leaf_der).unwrap();
    authorities.iter().any(|ca| {
        let (_, ca) = x509_parser::parse_x509_certificate(ca).unwrap();
        leaf.issuer() == ca.subject() && leaf.verify_signature(Some(ca.public_key())).is_ok()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn svids_and_bundles_through_the_spiffe_crate() {
    let server = Server::start().unwrap();
    let agent = Agent::start(&server).unwrap();
    let uid = my_uid();
    let web = format!("spiffe://{TRUST_DOMAIN}/e2e/web");
    server
        .create_entry(&web, &agent.spiffe_id, &[&format!("unix:uid:{uid}")])
        .unwrap();

    let client = WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .unwrap();
    // The entry reaches the agent through Sync; wait for its SVID.
    let mut svid = None;
    for _ in 0..100 {
        match client.fetch_x509_svid().await {
            Ok(s) => {
                svid = Some(s);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let svid = svid.expect("an X.509-SVID within 10 s");
    assert_eq!(svid.spiffe_id().to_string(), web);
    let leaf = svid.leaf().as_ref().to_vec();
    check_x509_svid_rules(&leaf, &web);

    // The chain verifies to the bundle the Workload API gives.
    let bundles = client.fetch_x509_bundles().await.unwrap();
    let td = TrustDomain::new(TRUST_DOMAIN).unwrap();
    let bundle = bundles.get(&td).expect("own trust domain bundle");
    let cas: Vec<Vec<u8>> = bundle
        .authorities()
        .iter()
        .map(|c| c.as_ref().to_vec())
        .collect();
    assert!(
        verifies_to(&leaf, &cas),
        "SVID chain verifies to the bundle"
    );

    // X509Source keeps a live SVID.
    let source = spiffe::X509Source::builder()
        .endpoint(agent.endpoint())
        .build()
        .await
        .unwrap();
    let from_source = source.svid().unwrap();
    assert_eq!(from_source.spiffe_id().to_string(), web);
    assert!(source.bundle_for_trust_domain(&td).unwrap().is_some());
    source.shutdown().await;

    // JWT-SVID: fetch, validate offline with the JWT bundle, and with ValidateJWTSVID.
    let jwt = client.fetch_jwt_svid(["e2e-audience"], None).await.unwrap();
    assert_eq!(jwt.spiffe_id().to_string(), web);
    let jwt_bundles = client.fetch_jwt_bundles().await.unwrap();
    let offline =
        spiffe::JwtSvid::parse_and_validate(jwt.token(), &jwt_bundles, &["e2e-audience"]).unwrap();
    assert_eq!(offline.spiffe_id().to_string(), web);
    assert!(
        spiffe::JwtSvid::parse_and_validate(jwt.token(), &jwt_bundles, &["someone-else"]).is_err()
    );
    let validated = client
        .validate_jwt_token("e2e-audience", jwt.token())
        .await
        .unwrap();
    assert_eq!(validated.spiffe_id().to_string(), web);
    assert!(
        client
            .validate_jwt_token("someone-else", jwt.token())
            .await
            .is_err()
    );

    // JwtSource mints on demand.
    let jwt_source = spiffe::JwtSource::builder()
        .endpoint(agent.endpoint())
        .build()
        .await
        .unwrap();
    let minted = jwt_source.fetch_jwt_svid(["other-audience"]).await.unwrap();
    assert_eq!(minted.spiffe_id(), &SpiffeId::new(&web).unwrap());
    jwt_source.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_entry_is_pushed_into_an_open_stream() {
    use futures::StreamExt as _;
    let server = Server::start().unwrap();
    let agent = Agent::start(&server).unwrap();
    let uid = my_uid();
    let first = format!("spiffe://{TRUST_DOMAIN}/e2e/first");
    server
        .create_entry(&first, &agent.spiffe_id, &[&format!("unix:uid:{uid}")])
        .unwrap();
    let client = WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .unwrap();
    wait_for("first SVID", Duration::from_secs(10), || {
        futures::executor::block_on(client.fetch_x509_svid()).ok()
    })
    .unwrap();

    let mut stream = client.stream_x509_contexts().await.unwrap();
    let initial = stream.next().await.unwrap().unwrap();
    assert_eq!(initial.svids().len(), 1);

    let second = format!("spiffe://{TRUST_DOMAIN}/e2e/second");
    server
        .create_entry(&second, &agent.spiffe_id, &[&format!("unix:uid:{uid}")])
        .unwrap();
    let update = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let ctx = stream.next().await.unwrap().unwrap();
            if ctx.svids().len() == 2 {
                return ctx;
            }
        }
    })
    .await
    .expect("the new SVID is pushed on the same stream");
    let mut ids: Vec<String> = update
        .svids()
        .iter()
        .map(|s| s.spiffe_id().to_string())
        .collect();
    ids.sort();
    assert_eq!(ids, vec![first, second]);
}
