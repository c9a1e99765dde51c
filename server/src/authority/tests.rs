use std::os::unix::fs::PermissionsExt as _;
use std::sync::Arc;

use mayfly::clock::Clock as _;
use mayfly::x509::{SvidInfo, VerifiedCsr, new_key_and_csr};
use time::OffsetDateTime;

use super::*;
use crate::service::sign::tests::test_state;
use crate::state::ChangeEvent;

fn config(dir: &std::path::Path, ca_ttl: &str) -> ServerConfig {
    ServerConfig::parse(
        &format!(
            "[server]\ndata_dir = {:?}\nca_ttl = \"{ca_ttl}\"\ndefault_x509_svid_ttl = \"4s\"\n",
            dir.display().to_string()
        ),
        std::path::Path::new("test.toml"),
    )
    .unwrap()
}

fn t0() -> OffsetDateTime {
    OffsetDateTime::now_utc().replace_nanosecond(0).unwrap()
}

fn count(a: &Authorities, kind: Kind) -> usize {
    let b = a.bundle();
    match kind {
        Kind::X509 => b.x509_authorities.len(),
        Kind::Jwt => b.jwt_authorities.len(),
    }
}

fn phases(a: &Authorities, kind: Kind) -> Vec<Phase> {
    a.list(kind).into_iter().map(|i| i.phase).collect()
}

/// Prepare at 1/2 (in the bundle, not signing), activate at 5/6 (signing,
/// the old one still in the bundle), drop the old one after its NotAfter:
/// for the X.509 CA and the JWT key alike.
#[test]
fn full_cycle_on_the_schedule_for_both_kinds() {
    for kind in Kind::ALL {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), "600s");
        let start = t0();
        let m = AuthorityManager::load_or_create(&cfg, start).unwrap();
        let first = m.snapshot().in_phase(kind, Phase::Active).unwrap();
        let life = first.lifetime();
        let prepare_at = life.at_fraction(1, 2);
        let activate_at = life.at_fraction(5, 6);

        // Before the prepare point nothing happens, and the task is told
        // to come back no later than then.
        let r = m.rotate(start + Duration::seconds(10)).unwrap();
        assert!(!r.changed, "{kind}");
        assert!(r.next_check <= prepare_at, "{kind}");
        assert_eq!(phases(&m.snapshot(), kind), [Phase::Active]);

        // Prepared: published, not signing.
        let r = m.rotate(prepare_at).unwrap();
        assert!(r.changed);
        let a = m.snapshot();
        assert_eq!(phases(&a, kind), [Phase::Active, Phase::Prepared], "{kind}");
        assert_eq!(count(&a, kind), 2);
        assert_eq!(a.in_phase(kind, Phase::Active).unwrap().id, first.id);
        let prepared = a.in_phase(kind, Phase::Prepared).unwrap();
        assert_eq!(
            prepared.not_after - prepared.issued_at,
            Duration::seconds(600)
        );
        assert_eq!(
            prepared.not_after - prepared.not_before,
            match kind {
                Kind::X509 => Duration::seconds(610), // backdated 10 s
                Kind::Jwt => Duration::seconds(600),
            }
        );

        // Not yet.
        let r = m.rotate(activate_at - Duration::seconds(1)).unwrap();
        assert_eq!(
            phases(&m.snapshot(), kind),
            [Phase::Active, Phase::Prepared]
        );
        assert!(r.next_check <= activate_at);

        // Activated: the new one signs, the old one stays published.
        m.rotate(activate_at).unwrap();
        let a = m.snapshot();
        assert_eq!(phases(&a, kind), [Phase::Old, Phase::Active], "{kind}");
        assert_eq!(count(&a, kind), 2);
        assert_eq!(a.in_phase(kind, Phase::Active).unwrap().id, prepared.id);
        match kind {
            Kind::X509 => assert_eq!(a.active_x509().unwrap().0, prepared.id),
            Kind::Jwt => assert_eq!(a.active_jwt().unwrap().0.key_id(), prepared.id),
        }

        // The old one stays until what it signed has expired (its NotAfter).
        // (By then the successor is at half its own life: its successor
        // is prepared.)
        let ids = |a: &Authorities| a.list(kind).into_iter().map(|i| i.id).collect::<Vec<_>>();
        let r = m.rotate(life.not_after).unwrap();
        assert!(r.next_check <= life.not_after + DROP_GRACE);
        let a = m.snapshot();
        assert_eq!(ids(&a)[0], first.id);
        assert_eq!(
            phases(&a, kind),
            [Phase::Old, Phase::Active, Phase::Prepared]
        );
        assert_eq!(count(&a, kind), 3);
        m.rotate(life.not_after + DROP_GRACE).unwrap();
        let a = m.snapshot();
        assert_eq!(phases(&a, kind), [Phase::Active, Phase::Prepared], "{kind}");
        assert!(!ids(&a).contains(&first.id));
        assert_eq!(count(&a, kind), 2);
        let gone = match kind {
            Kind::X509 => m.files.x509_paths(&first.id).1,
            Kind::Jwt => m.files.jwt_path(&first.id),
        };
        assert!(!gone.exists(), "{} should be deleted", gone.display());
    }
}

#[test]
fn a_server_down_past_activation_catches_up_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "600s");
    let start = t0();
    let first = AuthorityManager::load_or_create(&cfg, start).unwrap();
    let first_id = first.snapshot().active_x509().unwrap().0.to_owned();
    drop(first);
    // Back after its whole life: a new CA signs at once, the expired one is gone.
    let m = AuthorityManager::load_or_create(&cfg, start + Duration::seconds(700)).unwrap();
    let a = m.snapshot();
    assert_eq!(phases(&a, Kind::X509), [Phase::Active]);
    assert_ne!(a.active_x509().unwrap().0, first_id);
    assert_eq!(phases(&a, Kind::Jwt), [Phase::Active]);
}

#[test]
fn a_restart_keeps_every_slot_and_phase() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "600s");
    let now = t0();
    let m = AuthorityManager::load_or_create(&cfg, now).unwrap();
    for kind in Kind::ALL {
        let old = m.snapshot().in_phase(kind, Phase::Active).unwrap();
        m.prepare(kind, now).unwrap();
        m.activate(kind).unwrap();
        m.taint(kind, &old.id).unwrap();
        m.prepare(kind, now).unwrap();
    }
    let before = m.snapshot();
    drop(m);
    let again = AuthorityManager::load_or_create(&cfg, now).unwrap();
    let after = again.snapshot();
    for kind in Kind::ALL {
        assert_eq!(before.list(kind), after.list(kind), "{kind}");
        assert_eq!(
            phases(&after, kind),
            [Phase::Old, Phase::Active, Phase::Prepared]
        );
        assert!(after.list(kind)[0].tainted);
    }
    assert_eq!(
        before.bundle().x509_authorities,
        after.bundle().x509_authorities
    );
    assert_eq!(
        before.bundle().tainted_jwt_key_ids,
        after.bundle().tainted_jwt_key_ids
    );
    // Every key and the state file are owner-only.
    for sub in ["x509", "jwt"] {
        for f in std::fs::read_dir(dir.path().join("ca").join(sub)).unwrap() {
            let f = f.unwrap();
            let mode = f.metadata().unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", f.path().display());
        }
    }
    let mode = std::fs::metadata(dir.path().join("ca/authorities.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // A corrupt key is an error naming the file, not a panic.
    let kid = &after.list(Kind::Jwt)[0].id;
    std::fs::write(again.files.jwt_path(kid), "garbage").unwrap();
    let err = AuthorityManager::load_or_create(&cfg, now).unwrap_err();
    assert!(err.to_string().contains(&format!("{kid}.key.pem")), "{err}");
}

#[test]
fn the_single_file_layout_becomes_the_active_slots() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "24h");
    let now = t0();
    let ca_dir = dir.path().join("ca");
    std::fs::create_dir_all(&ca_dir).unwrap();
    let ca = X509Authority::generate(
        &CaParams {
            trust_domain: cfg.trust_domain.clone(),
            ttl: Duration::hours(24),
            subject: "Mayfly".into(),
        },
        now,
    )
    .unwrap();
    let jwt = JwtSigningKey::generate().unwrap();
    write_private(&ca_dir.join("x509-ca.crt.pem"), ca.cert_pem().as_bytes()).unwrap();
    write_private(&ca_dir.join("x509-ca.key.pem"), ca.key_pem().as_bytes()).unwrap();
    let jwt_pem = pem::encode(&pem::Pem::new("PRIVATE KEY", jwt.pkcs8_der().to_vec()));
    write_private(&ca_dir.join("jwt.key.pem"), jwt_pem.as_bytes()).unwrap();

    let m = AuthorityManager::load_or_create(&cfg, now).unwrap();
    let a = m.snapshot();
    let (id, active) = a.active_x509().unwrap();
    assert_eq!(active.cert_der(), ca.cert_der());
    assert_eq!(id, x509_id(ca.cert_der()).unwrap());
    assert_eq!(id.len(), 40, "20 bytes of hex: {id}");
    assert!(
        id.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    );
    assert_eq!(a.active_jwt().unwrap().0.key_id(), jwt.key_id());
    assert_eq!(phases(&a, Kind::X509), [Phase::Active]);
    assert_eq!(phases(&a, Kind::Jwt), [Phase::Active]);
    for old in ["x509-ca.crt.pem", "x509-ca.key.pem", "jwt.key.pem"] {
        assert!(!ca_dir.join(old).exists(), "{old} should be gone");
    }
    assert!(ca_dir.join(format!("x509/{id}.crt.pem")).exists());
    assert!(
        ca_dir
            .join(format!("jwt/{}.key.pem", jwt.key_id()))
            .exists()
    );
    // And it loads again from the new layout.
    let again = AuthorityManager::load_or_create(&cfg, now).unwrap();
    assert_eq!(again.snapshot().active_x509().unwrap().0, id);
}

#[test]
fn prepare_activate_taint_revoke_preconditions() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "600s");
    let now = t0();
    let m = AuthorityManager::load_or_create(&cfg, now).unwrap();
    for kind in Kind::ALL {
        let first = m.snapshot().in_phase(kind, Phase::Active).unwrap();
        assert!(matches!(
            m.activate(kind),
            Err(ServiceError::FailedPrecondition(_))
        ));
        let prepared = m.prepare(kind, now).unwrap();
        assert_eq!(prepared.phase, Phase::Prepared);
        assert!(matches!(
            m.prepare(kind, now),
            Err(ServiceError::AlreadyExists(_))
        ));
        // Neither the signing authority nor a prepared one can be tainted.
        assert!(matches!(
            m.taint(kind, &first.id),
            Err(ServiceError::FailedPrecondition(_))
        ));
        assert!(matches!(
            m.taint(kind, &prepared.id),
            Err(ServiceError::FailedPrecondition(_))
        ));
        assert!(matches!(
            m.taint(kind, "nope"),
            Err(ServiceError::NotFound(_))
        ));
        let active = m.activate(kind).unwrap();
        assert_eq!(
            (active.id.as_str(), active.phase),
            (prepared.id.as_str(), Phase::Active)
        );
        assert!(matches!(
            m.revoke(kind, &first.id),
            Err(ServiceError::FailedPrecondition(_))
        ));
        assert!(matches!(
            m.revoke(kind, "nope"),
            Err(ServiceError::NotFound(_))
        ));
        let tainted = m.taint(kind, &first.id).unwrap();
        assert!(tainted.tainted && tainted.phase == Phase::Old);
        let b = m.snapshot().bundle();
        match kind {
            Kind::X509 => assert_eq!(b.tainted_x509_authorities.len(), 1),
            Kind::Jwt => assert_eq!(b.tainted_jwt_key_ids, std::slice::from_ref(&first.id)),
        }
        let revoked = m.revoke(kind, &first.id).unwrap();
        assert_eq!(revoked.id, first.id);
        let a = m.snapshot();
        assert_eq!(phases(&a, kind), [Phase::Active]);
        assert_eq!(count(&a, kind), 1);
        assert!(matches!(
            m.revoke(kind, &first.id),
            Err(ServiceError::NotFound(_))
        ));
    }
    let b = m.snapshot().bundle();
    assert!(b.tainted_x509_authorities.is_empty() && b.tainted_jwt_key_ids.is_empty());
}

fn csr() -> VerifiedCsr {
    VerifiedCsr::from_der(&new_key_and_csr().unwrap().csr_der).unwrap()
}

/// Every change publishes: a higher sequence, the event `Sync` streams
/// follow, the store's copy and `bundle.pem`; tainted authorities are
/// listed.
#[test]
fn changes_publish_the_bundle_with_a_new_sequence() {
    let (state, _clock, dir) = test_state();
    let mut events = state.subscribe();
    let seq0 = state.bundle().sequence;
    let old_ca = state.bundle().x509_authorities[0].clone();
    let old_x509 = state.list_authorities(Kind::X509)[0].id.clone();
    let old_jwt = state.list_authorities(Kind::Jwt)[0].id.clone();

    state.prepare_authority(Kind::X509).unwrap();
    assert_eq!(events.try_recv().unwrap(), ChangeEvent::Bundle);
    let b = state.bundle();
    assert_eq!(b.sequence, seq0 + 1);
    assert_eq!(b.x509_authorities.len(), 2);
    let pem_text = std::fs::read_to_string(dir.path().join("bundle.pem")).unwrap();
    assert_eq!(pem::parse_many(pem_text).unwrap().len(), 2);
    let stored = state.store.get_meta("bundle").unwrap().unwrap();
    let stored =
        mayfly::bundle::TrustBundle::from_spiffe_json(b.trust_domain.clone(), &stored).unwrap();
    assert_eq!(stored.sequence, b.sequence);
    assert_eq!(stored.x509_authorities, b.x509_authorities);

    state.activate_authority(Kind::X509).unwrap();
    state.prepare_authority(Kind::Jwt).unwrap();
    state.activate_authority(Kind::Jwt).unwrap();
    assert_eq!(state.bundle().sequence, seq0 + 4);
    state.taint_authority(Kind::X509, &old_x509).unwrap();
    state.taint_authority(Kind::Jwt, &old_jwt).unwrap();
    let b = state.bundle();
    assert_eq!(b.sequence, seq0 + 6);
    assert_eq!(b.tainted_x509_authorities, std::slice::from_ref(&old_ca));
    assert_eq!(b.tainted_jwt_key_ids, std::slice::from_ref(&old_jwt));
    // The node API carries the taint.
    let proto = b.to_proto();
    assert_eq!(
        proto.tainted_x509_authorities,
        std::slice::from_ref(&old_ca)
    );

    state.revoke_authority(Kind::X509, &old_x509).unwrap();
    let b = state.bundle();
    assert_eq!(b.sequence, seq0 + 7);
    assert_eq!(b.x509_authorities.len(), 1);
    assert!(!b.x509_authorities.contains(&old_ca));
    let mut n = 0;
    while events.try_recv().is_ok() {
        n += 1;
    }
    assert_eq!(n, 6);
    // A failed request changes nothing.
    assert!(state.activate_authority(Kind::X509).is_err());
    assert_eq!(state.bundle().sequence, seq0 + 7);
    assert!(events.try_recv().is_err());
}

/// After an activation, SVIDs chain to the new CA and never outlive it;
/// JWT-SVIDs are signed by the new key and expire with it at the latest.
#[test]
fn svids_after_activation_come_from_the_new_authority() {
    let (state, clock, _dir) = test_state();
    let id = mayfly::SpiffeId::new("spiffe://example.org/web").unwrap();
    let before = state.sign_x509_svid(&id, &csr(), None, &[]).unwrap();

    // Move to the activation point of the first CA and let the schedule act.
    let first = state.list_authorities(Kind::X509)[0].clone();
    clock.set(first.lifetime().at_fraction(1, 2));
    state.rotate_authorities().unwrap();
    assert_eq!(state.list_authorities(Kind::X509).len(), 2);
    let still = state.sign_x509_svid(&id, &csr(), None, &[]).unwrap();
    let first_ca = ca_der(&state, &first.id);
    let (_, issuer) = x509_parser::parse_x509_certificate(&first_ca).unwrap();
    let (_, leaf) = x509_parser::parse_x509_certificate(&still.der).unwrap();
    leaf.verify_signature(Some(issuer.public_key()))
        .expect("prepared CA does not sign yet");

    clock.set(first.lifetime().at_fraction(5, 6));
    state.rotate_authorities().unwrap();
    let new = state
        .authorities
        .snapshot()
        .in_phase(Kind::X509, Phase::Active)
        .unwrap();
    assert_ne!(new.id, first.id);
    let (signed, by) = state
        .sign_x509_svid_by(&id, &csr(), mayfly::ttl::Ttl::from_secs(10 * 86_400), &[])
        .unwrap();
    assert_eq!(by, new.id);
    let (_, leaf) = x509_parser::parse_x509_certificate(&signed.der).unwrap();
    let new_ca_der = ca_der(&state, &new.id);
    let (_, new_ca) = x509_parser::parse_x509_certificate(&new_ca_der).unwrap();
    leaf.verify_signature(Some(new_ca.public_key())).unwrap();
    assert_eq!(leaf.issuer().to_string(), new_ca.subject().to_string());
    let info = SvidInfo::from_der(&signed.der).unwrap();
    assert!(info.not_after <= new.not_after);
    assert_eq!(
        signed.not_after,
        new.not_after.replace_nanosecond(0).unwrap()
    );
    // An SVID of the old CA still verifies against the bundle (it is still
    // published).
    assert!(
        state
            .bundle()
            .x509_authorities
            .contains(&ca_der(&state, &first.id))
    );
    assert!(before.not_after <= first.not_after);

    // JWT: the new key signs; exp is clamped to its NotAfter.
    let jwt_first = state.list_authorities(Kind::Jwt)[0].clone();
    clock.set(jwt_first.lifetime().at_fraction(5, 6));
    state.rotate_authorities().unwrap();
    let new_jwt = state
        .authorities
        .snapshot()
        .in_phase(Kind::Jwt, Phase::Active)
        .unwrap();
    assert_ne!(new_jwt.id, jwt_first.id);
    let (token, exp, _) = state
        .mint_jwt_svid(
            &id,
            &["db".into()],
            mayfly::ttl::Ttl::from_secs(10 * 86_400),
        )
        .unwrap();
    assert_eq!(exp, new_jwt.not_after.unix_timestamp());
    let bundle = state.bundle();
    let v = mayfly::jwt::validate(&token, "db", &[&bundle], clock.now()).unwrap();
    assert_eq!(v.spiffe_id, id);
    let header: serde_json::Value = serde_json::from_slice(
        &base64::Engine::decode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            token.split('.').next().unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(header["kid"], new_jwt.id);
}

fn ca_der(state: &crate::state::ServerState, id: &str) -> Vec<u8> {
    let a = state.authorities.snapshot();
    a.x509
        .iter()
        .find(|s| s.id == id)
        .map(|s| s.ca.cert_der().to_vec())
        .unwrap()
}

/// The background task follows the injected clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rotation_task_follows_the_clock() {
    let (state, clock, _dir) = test_state();
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(rotate::run(Arc::clone(&state), stop));
    let mut events = state.subscribe();
    let x509 = state.list_authorities(Kind::X509)[0].lifetime();
    let jwt = state.list_authorities(Kind::Jwt)[0].lifetime();
    clock.set(x509.at_fraction(1, 2).max(jwt.at_fraction(1, 2)));
    let wait = rotate::MAX_SLEEP + std::time::Duration::from_secs(3);
    let ev = tokio::time::timeout(wait, events.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ev, ChangeEvent::Bundle);
    let deadline = tokio::time::Instant::now() + wait;
    while state.list_authorities(Kind::Jwt).len() < 2 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(state.list_authorities(Kind::X509).len(), 2);
    assert_eq!(state.list_authorities(Kind::Jwt).len(), 2);
    stop_tx.send(true).unwrap();
    tokio::time::timeout(wait, task).await.unwrap().unwrap();
}

/// With a CA lifetime of seconds (tests), the schedule still leaves a third
/// of a lifetime between prepare and activate, and every CA signs for a
/// while: its backdated NotBefore does not count as life spent.
#[test]
fn short_lifetimes_keep_their_proportions() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "12s");
    let start = t0();
    let m = AuthorityManager::load_or_create(&cfg, start).unwrap();
    let mut prepared_at = std::collections::BTreeMap::new();
    let mut activated_at = std::collections::BTreeMap::new();
    for tick in 0..60 {
        let now = start + Duration::seconds(tick);
        m.rotate(now).unwrap();
        for kind in Kind::ALL {
            for a in m.snapshot().list(kind) {
                match a.phase {
                    Phase::Prepared => prepared_at.entry(a.id).or_insert(tick),
                    Phase::Active => activated_at.entry(a.id).or_insert(tick),
                    Phase::Old => continue,
                };
            }
        }
    }
    let mut rotations = 0;
    for (id, activated) in &activated_at {
        if let Some(prepared) = prepared_at.get(id) {
            rotations += 1;
            assert!(
                activated - prepared >= 3,
                "{id}: prepared at {prepared}s, activated at {activated}s"
            );
        }
    }
    assert!(rotations >= 10, "{rotations} rotations in a minute");
}
