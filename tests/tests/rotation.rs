//! Workload X.509-SVID rotation seen by a real workload: a server issuing
//! 4-second SVIDs, a real agent, and the Rust `spiffe` crate's `X509Source`
//! watched every 100 ms. The source must follow at least three rotations
//! without reconnecting, and at every observation hold a certificate that is
//! inside its validity window and whose chain verifies against the bundle
//! the source holds at that same moment.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mayfly_e2e::{Agent, Server, TRUST_DOMAIN, my_uid};
use spiffe::{TrustDomain, WorkloadApiClient, X509Source};

const SVID_TTL_SECS: i64 = 4;

fn unix_now() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap()
}

/// Checks one observation: the leaf is valid at `now`, each certificate of
/// the chain is signed by the next, and the last one by an authority of
/// `authorities` (subject = issuer, signature verifies, valid at `now`).
/// Returns the leaf's (serial, not_before, not_after) or what is wrong.
fn check_chain(
    chain: &[Vec<u8>],
    authorities: &[Vec<u8>],
    now: i64,
) -> Result<(Vec<u8>, i64, i64), String> {
    let certs: Vec<_> = chain
        .iter()
        .map(|der| x509_parser::parse_x509_certificate(der).map(|(_, c)| c))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("unparsable chain: {e}"))?;
    let leaf = certs.first().ok_or("empty chain")?;
    let nb = leaf.validity().not_before.timestamp();
    let na = leaf.validity().not_after.timestamp();
    if now < nb {
        return Err(format!("leaf not yet valid: now {now} < not_before {nb}"));
    }
    if now >= na {
        return Err(format!("leaf expired: now {now} >= not_after {na}"));
    }
    for pair in certs.windows(2) {
        if pair[0].issuer() != pair[1].subject()
            || pair[0]
                .verify_signature(Some(pair[1].public_key()))
                .is_err()
        {
            return Err(format!(
                "chain link {} -> {} does not verify",
                pair[0].subject(),
                pair[1].subject()
            ));
        }
    }
    let last = certs.last().ok_or("empty chain")?;
    let anchored = authorities.iter().any(|der| {
        let Ok((_, ca)) = x509_parser::parse_x509_certificate(der) else {
            return false;
        };
        last.issuer() == ca.subject()
            && last.verify_signature(Some(ca.public_key())).is_ok()
            && ca.validity().not_before.timestamp() <= now
            && now < ca.validity().not_after.timestamp()
    });
    if !anchored {
        return Err(format!(
            "chain does not verify to any of the {} authorities of the current bundle",
            authorities.len()
        ));
    }
    Ok((leaf.raw_serial().to_vec(), nb, na))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x509_source_follows_rotations_and_always_holds_a_valid_chain() {
    let server =
        Server::start_with(&format!("default_x509_svid_ttl = \"{SVID_TTL_SECS}s\"")).unwrap();
    let agent = Agent::start(&server).unwrap();
    let id = format!("spiffe://{TRUST_DOMAIN}/e2e/rotating");
    server
        .create_entry(&id, &agent.spiffe_id, &[&format!("unix:uid:{}", my_uid())])
        .unwrap();

    // Wait until the entry has reached the agent.
    let client = WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while client.fetch_x509_svid().await.is_err() {
        assert!(Instant::now() < deadline, "no X.509-SVID within 20 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let source = X509Source::builder()
        .endpoint(agent.endpoint())
        .build()
        .await
        .unwrap();
    let td = TrustDomain::new(TRUST_DOMAIN).unwrap();

    // (serial, first seen at (unix seconds), not_before, not_after)
    let mut seen: Vec<(Vec<u8>, f64, i64, i64)> = Vec::new();
    let mut violations = Vec::new();
    let mut observations = 0u32;
    let start = Instant::now();
    let min_window = Duration::from_secs(10);
    let max_window = Duration::from_secs(20);
    loop {
        let elapsed = start.elapsed();
        let rotations = seen.len().saturating_sub(1);
        if (elapsed >= min_window && rotations >= 3) || elapsed >= max_window {
            break;
        }
        observations += 1;
        // One coherent snapshot: the SVID and the bundle the source holds together.
        let state = source.state();
        let result = match (state.svid(), state.context()) {
            (Ok(svid), Ok(ctx)) => {
                let chain: Vec<Vec<u8>> = svid
                    .cert_chain()
                    .iter()
                    .map(|c| c.as_ref().to_vec())
                    .collect();
                let authorities: Vec<Vec<u8>> = ctx
                    .bundle_set()
                    .get(&td)
                    .map(|b| {
                        b.authorities()
                            .iter()
                            .map(|c| c.as_ref().to_vec())
                            .collect()
                    })
                    .unwrap_or_default();
                if svid.spiffe_id().to_string() != id {
                    Err(format!("unexpected SPIFFE ID {}", svid.spiffe_id()))
                } else {
                    check_chain(&chain, &authorities, unix_now())
                }
            }
            (Err(e), _) | (_, Err(e)) => Err(format!("source has no usable SVID: {e}")),
        };
        match result {
            Ok((serial, nb, na)) => {
                if seen.last().is_none_or(|(s, ..)| *s != serial) {
                    assert!(
                        !seen.iter().any(|(s, ..)| *s == serial),
                        "an older SVID came back after it was replaced"
                    );
                    let at = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
                    seen.push((serial, at.as_secs_f64(), nb, na));
                }
            }
            Err(e) => violations.push(format!("at {elapsed:?}: {e}")),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    source.shutdown().await;

    println!(
        "observed {} SVIDs in {observations} observations over {:?}",
        seen.len(),
        start.elapsed()
    );
    for pair in seen.windows(2) {
        let (_, t0, _, na0) = &pair[0];
        let (_, t1, nb1, na1) = &pair[1];
        // How much of the old SVID's TTL was left when the new one arrived
        // (certificate times have one-second precision).
        println!(
            "rotation after {:.2} s (new SVID: not_before {nb1}, not_after {na1}; the old one had {:.2} s of its {SVID_TTL_SECS} s TTL left)",
            t1 - t0,
            *na0 as f64 - t1,
        );
    }
    assert!(
        violations.is_empty(),
        "{} of {observations} observations held no valid, verifiable SVID:\n{}",
        violations.len(),
        violations.join("\n")
    );
    assert!(
        seen.len() >= 4,
        "expected at least three rotations (4 distinct SVIDs) of a {SVID_TTL_SECS} s SVID, saw {} SVIDs in {:?}",
        seen.len(),
        start.elapsed()
    );
}
