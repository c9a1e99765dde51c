//! The `x509pop` node attestor, verifier side: the node presents a
//! certificate chain to a CA of `[server.node_attestors.x509pop]
//! ca_bundle_path` and proves that it holds the leaf's private key by signing
//! the server's challenge bound to the attestation's CSR
//! ([`mayfly::x509pop::signed_message`]).
//!
//! The chain is verified with `rustls-webpki` (signatures, validity at the
//! injected `now`, CA basic constraints and path length on issuers, a leaf
//! that is a CA refused, extended key usage `clientAuth` when the leaf has
//! one). We add what webpki leaves to the caller: the CA certificate the path
//! ends at must itself be a CA valid at `now`, and the leaf's key usage, when
//! present, must allow `digitalSignature`. The proof is checked with
//! `aws-lc-rs`.

use std::path::Path;
use std::time::Duration;

use aws_lc_rs::signature::{self, UnparsedPublicKey, VerificationAlgorithm};
use mayfly::selector::{Selector, SelectorSet};
use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::oid_registry;

use crate::error::ServiceError;

/// The most certificates a node may present (leaf and intermediates).
pub const MAX_CHAIN_LEN: usize = 8;

/// Why an x509pop attestation was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum X509PopError {
    /// The evidence is malformed.
    #[error("x509pop evidence: {0}")]
    Evidence(String),
    /// The server's CA bundle cannot be used (a server-side configuration
    /// problem; the agent is told only that the server failed).
    #[error("server.node_attestors.x509pop.ca_bundle_path {path}: {message}")]
    CaBundle {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The node certificate is not trusted.
    #[error("the node certificate is not trusted: {0}")]
    Untrusted(String),
    /// The node's key cannot be used for a proof of possession.
    #[error("the node certificate's key is not supported: {0}")]
    UnsupportedKey(String),
    /// The challenge signature does not verify.
    #[error(
        "proof of possession failed: the challenge signature does not verify with the node \
         certificate's key"
    )]
    BadProof,
}

impl From<X509PopError> for ServiceError {
    fn from(e: X509PopError) -> Self {
        match e {
            X509PopError::Evidence(_) => ServiceError::InvalidArgument(e.to_string()),
            X509PopError::CaBundle { .. } => ServiceError::Internal(e.to_string()),
            X509PopError::Untrusted(_)
            | X509PopError::UnsupportedKey(_)
            | X509PopError::BadProof => ServiceError::PermissionDenied(e.to_string()),
        }
    }
}

/// The CA certificates node certificates must chain to.
#[derive(Debug, Clone)]
pub struct TrustedCas {
    certs: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
}

impl TrustedCas {
    /// Reads a PEM file of CA certificates. Blocking.
    pub fn load(path: &Path) -> Result<Self, X509PopError> {
        let bad = |message: String| X509PopError::CaBundle {
            path: path.display().to_string(),
            message,
        };
        let text = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let ders: Vec<Vec<u8>> = pem::parse_many(&text)
            .map_err(|e| bad(format!("not PEM: {e}")))?
            .into_iter()
            .filter(|p| p.tag() == "CERTIFICATE")
            .map(pem::Pem::into_contents)
            .collect();
        Self::from_der(ders).map_err(bad)
    }

    /// CA certificates from DER; each must be a CA certificate.
    pub fn from_der(ders: Vec<Vec<u8>>) -> Result<Self, String> {
        if ders.is_empty() {
            return Err("no CERTIFICATE in the file".into());
        }
        let mut certs = Vec::with_capacity(ders.len());
        let mut anchors = Vec::with_capacity(ders.len());
        for (i, der) in ders.into_iter().enumerate() {
            let (_, cert) = x509_parser::parse_x509_certificate(&der)
                .map_err(|e| format!("certificate #{}: {e}", i + 1))?;
            if !cert.is_ca() {
                return Err(format!(
                    "certificate #{} ({}) is not a CA certificate (basicConstraints cA=true)",
                    i + 1,
                    cert.subject()
                ));
            }
            let der = CertificateDer::from(der);
            let anchor = webpki::anchor_from_trusted_cert(&der)
                .map_err(|e| format!("certificate #{}: {e:?}", i + 1))?
                .to_owned();
            anchors.push(anchor);
            certs.push(der);
        }
        Ok(Self { certs, anchors })
    }
}

/// A node certificate that verified, with what the server derives from it.
#[derive(Debug, Clone)]
pub struct VerifiedNode {
    /// The leaf, DER.
    pub leaf_der: Vec<u8>,
    /// SHA-256 (hex) of the configured CA certificate the chain ends at.
    pub ca_fingerprint: String,
    /// The node selectors (`x509pop:...`).
    pub selectors: SelectorSet,
    /// The leaf's subject common name, if any.
    pub subject_cn: Option<String>,
    /// The leaf's serial number, hex.
    pub serial_hex: String,
}

impl VerifiedNode {
    /// What an agent path template can use.
    pub fn path_facts(&self) -> mayfly::x509pop::PathFacts<'_> {
        mayfly::x509pop::PathFacts {
            leaf_der: &self.leaf_der,
            ca_fingerprint: &self.ca_fingerprint,
            subject_cn: self.subject_cn.as_deref(),
            serial_hex: &self.serial_hex,
        }
    }
}

/// Verifies `chain` (DER, leaf first) against `cas` at `now`.
pub fn verify_chain(
    cas: &TrustedCas,
    chain: &[Vec<u8>],
    now: OffsetDateTime,
) -> Result<VerifiedNode, X509PopError> {
    let (leaf_der, intermediates) = chain
        .split_first()
        .ok_or_else(|| X509PopError::Evidence("no certificate".into()))?;
    if chain.len() > MAX_CHAIN_LEN {
        return Err(X509PopError::Evidence(format!(
            "at most {MAX_CHAIN_LEN} certificates, got {}",
            chain.len()
        )));
    }
    let leaf = CertificateDer::from(leaf_der.as_slice());
    let ee = webpki::EndEntityCert::try_from(&leaf)
        .map_err(|e| X509PopError::Untrusted(format!("the leaf does not parse: {e:?}")))?;
    let intermediates: Vec<CertificateDer<'_>> = intermediates
        .iter()
        .map(|d| CertificateDer::from(d.as_slice()))
        .collect();
    let seconds = u64::try_from(now.unix_timestamp())
        .map_err(|_| X509PopError::Untrusted("the server clock is before 1970".into()))?;
    let time = UnixTime::since_unix_epoch(Duration::from_secs(seconds));
    let path = ee
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &cas.anchors,
            &intermediates,
            time,
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| X509PopError::Untrusted(describe(&e)))?;
    let anchor = path.anchor();
    let ca_der = cas
        .anchors
        .iter()
        .position(|a| a == anchor)
        .and_then(|i| cas.certs.get(i))
        .ok_or_else(|| X509PopError::Untrusted("the chain ends at an unknown CA".into()))?;
    let (_, ca) = x509_parser::parse_x509_certificate(ca_der)
        .map_err(|e| X509PopError::Untrusted(format!("the CA certificate does not parse: {e}")))?;
    if !valid_at(&ca, now) {
        return Err(X509PopError::Untrusted(format!(
            "the CA certificate {} is not valid now",
            ca.subject()
        )));
    }
    let (_, cert) = x509_parser::parse_x509_certificate(leaf_der)
        .map_err(|e| X509PopError::Untrusted(format!("the leaf does not parse: {e}")))?;
    if let Ok(Some(ku)) = cert.key_usage()
        && !ku.value.digital_signature()
    {
        return Err(X509PopError::Untrusted(
            "the leaf's key usage does not allow digitalSignature".into(),
        ));
    }
    let ca_fingerprint = mayfly::x509pop::fingerprint(ca_der);
    let selectors = selectors(&cert, &ca_fingerprint);
    let subject_cn = cert
        .subject()
        .iter_common_name()
        .find_map(|cn| cn.as_str().ok())
        .map(str::to_owned);
    Ok(VerifiedNode {
        leaf_der: leaf_der.clone(),
        ca_fingerprint,
        selectors,
        subject_cn,
        serial_hex: hex::encode(cert.raw_serial()),
    })
}

fn valid_at(cert: &X509Certificate<'_>, now: OffsetDateTime) -> bool {
    let t = now.unix_timestamp();
    cert.validity().not_before.timestamp() <= t && t <= cert.validity().not_after.timestamp()
}

/// webpki's error, in words an operator can act on.
fn describe(e: &webpki::Error) -> String {
    match e {
        webpki::Error::CertExpired { .. } => {
            "the node certificate (or its chain) has expired".into()
        }
        webpki::Error::CertNotValidYet { .. } => {
            "the node certificate (or its chain) is not valid yet".into()
        }
        webpki::Error::UnknownIssuer => {
            "it does not chain to a CA of server.node_attestors.x509pop.ca_bundle_path".into()
        }
        webpki::Error::CaUsedAsEndEntity => "the leaf is a CA certificate".into(),
        webpki::Error::InvalidSignatureForPublicKey => {
            "a certificate signature in the chain does not verify".into()
        }
        webpki::Error::RequiredEkuNotFoundContext(_) => {
            "the leaf's extended key usage does not allow clientAuth".into()
        }
        other => format!("{other:?}"),
    }
}

/// `x509pop:subject:cn:<CN>`, `x509pop:ca:fingerprint:<hex>`,
/// `x509pop:serialnumber:<hex>`, `x509pop:san:dns:<name>`,
/// `x509pop:san:uri:<uri>`.
fn selectors(cert: &X509Certificate<'_>, ca_fingerprint: &str) -> SelectorSet {
    let mut values = vec![
        format!("ca:fingerprint:{ca_fingerprint}"),
        format!("serialnumber:{}", hex::encode(cert.raw_serial())),
    ];
    values.extend(
        cert.subject()
            .iter_common_name()
            .filter_map(|cn| cn.as_str().ok())
            .map(|cn| format!("subject:cn:{cn}")),
    );
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(d) => values.push(format!("san:dns:{d}")),
                GeneralName::URI(u) => values.push(format!("san:uri:{u}")),
                _ => {}
            }
        }
    }
    values
        .into_iter()
        .filter_map(|v| Selector::new(mayfly::x509pop::NAME, v).ok())
        .collect()
}

/// Checks the node's challenge signature over
/// [`mayfly::x509pop::signed_message`] with the leaf's public key.
pub fn verify_proof(
    node: &VerifiedNode,
    challenge: &[u8],
    csr_der: &[u8],
    signature: &[u8],
) -> Result<(), X509PopError> {
    let (_, cert) = x509_parser::parse_x509_certificate(&node.leaf_der)
        .map_err(|e| X509PopError::Untrusted(format!("the leaf does not parse: {e}")))?;
    let spki = cert.public_key();
    let key = spki.subject_public_key.data.as_ref();
    let alg = &spki.algorithm.algorithm;
    let algs: &[&'static dyn VerificationAlgorithm] = if *alg
        == oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
    {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        match curve {
            Some(c) if c == oid_registry::OID_EC_P256 => &[&signature::ECDSA_P256_SHA256_ASN1],
            Some(c) if c == oid_registry::OID_NIST_EC_P384 => &[&signature::ECDSA_P384_SHA384_ASN1],
            _ => {
                return Err(X509PopError::UnsupportedKey(
                    "only the EC curves P-256 and P-384 are supported".into(),
                ));
            }
        }
    } else if *alg == oid_registry::OID_SIG_ED25519 {
        &[&signature::ED25519]
    } else if *alg == oid_registry::OID_PKCS1_RSAENCRYPTION {
        &[
            &signature::RSA_PKCS1_2048_8192_SHA256,
            &signature::RSA_PSS_2048_8192_SHA256,
        ]
    } else {
        return Err(X509PopError::UnsupportedKey(format!(
            "key algorithm {alg}; use ECDSA P-256/P-384, Ed25519 or RSA (2048 bits or more)"
        )));
    };
    let message = mayfly::x509pop::signed_message(challenge, csr_der);
    if algs.iter().any(|a| {
        UnparsedPublicKey::new(*a, key)
            .verify(&message, signature)
            .is_ok()
    }) {
        Ok(())
    } else {
        Err(X509PopError::BadProof)
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose, SanType, SignatureAlgorithm,
    };

    use super::*;

    struct Ca {
        cert: rcgen::Certificate,
        key: KeyPair,
    }

    fn ca(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = p.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    fn node_with(
        ca: &Ca,
        alg: &'static SignatureAlgorithm,
        edit: impl FnOnce(&mut CertificateParams),
    ) -> (Vec<u8>, KeyPair) {
        let key = KeyPair::generate_for(alg).unwrap();
        let mut p = CertificateParams::new(vec!["node1.example.org".to_owned()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, "node1");
        p.subject_alt_names
            .push(SanType::URI("urn:node:1".try_into().unwrap()));
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        edit(&mut p);
        let issuer = rcgen::Issuer::from_ca_cert_der(ca.cert.der(), &ca.key).unwrap();
        let cert = p.signed_by(&key, &issuer).unwrap();
        (cert.der().to_vec(), key)
    }

    fn node(ca: &Ca) -> (Vec<u8>, KeyPair) {
        node_with(ca, &rcgen::PKCS_ECDSA_P256_SHA256, |_| {})
    }

    fn cas(list: &[&Ca]) -> TrustedCas {
        TrustedCas::from_der(list.iter().map(|c| c.cert.der().to_vec()).collect()).unwrap()
    }

    fn now() -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }

    fn sign(key: &KeyPair, challenge: &[u8], csr: &[u8]) -> Vec<u8> {
        let message = mayfly::x509pop::signed_message(challenge, csr);
        let pkcs8 = key.serialize_der();
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let alg = key.algorithm();
        if alg == &rcgen::PKCS_ECDSA_P256_SHA256 {
            let k = signature::EcdsaKeyPair::from_pkcs8(
                &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
                &pkcs8,
            )
            .unwrap();
            k.sign(&rng, &message).unwrap().as_ref().to_vec()
        } else if alg == &rcgen::PKCS_ECDSA_P384_SHA384 {
            let k = signature::EcdsaKeyPair::from_pkcs8(
                &signature::ECDSA_P384_SHA384_ASN1_SIGNING,
                &pkcs8,
            )
            .unwrap();
            k.sign(&rng, &message).unwrap().as_ref().to_vec()
        } else if alg == &rcgen::PKCS_ED25519 {
            let k = signature::Ed25519KeyPair::from_pkcs8(&pkcs8).unwrap();
            k.sign(&message).as_ref().to_vec()
        } else {
            let k = signature::RsaKeyPair::from_pkcs8(&pkcs8).unwrap();
            let mut sig = vec![0; k.public_modulus_len()];
            k.sign(&signature::RSA_PKCS1_SHA256, &rng, &message, &mut sig)
                .unwrap();
            sig
        }
    }

    #[test]
    fn a_good_chain_verifies_with_its_selectors() {
        let ca1 = ca("ca1");
        let (leaf, _) = node(&ca1);
        let v = verify_chain(
            &cas(&[&ca("other"), &ca1]),
            std::slice::from_ref(&leaf),
            now(),
        )
        .unwrap();
        assert_eq!(
            v.ca_fingerprint,
            mayfly::x509pop::fingerprint(ca1.cert.der())
        );
        let sel: Vec<String> = v.selectors.iter().map(ToString::to_string).collect();
        assert!(
            sel.contains(&"x509pop:subject:cn:node1".to_owned()),
            "{sel:?}"
        );
        assert!(
            sel.contains(&"x509pop:san:dns:node1.example.org".to_owned()),
            "{sel:?}"
        );
        assert!(
            sel.contains(&"x509pop:san:uri:urn:node:1".to_owned()),
            "{sel:?}"
        );
        assert!(sel.contains(&format!("x509pop:ca:fingerprint:{}", v.ca_fingerprint)));
        assert!(sel.iter().any(|s| s.starts_with("x509pop:serialnumber:")));
        assert_eq!(v.leaf_der, leaf);
    }

    #[test]
    fn an_intermediate_is_followed() {
        let root = ca("root");
        let ikey = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name
            .push(DnType::CommonName, "intermediate");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let issuer = rcgen::Issuer::from_ca_cert_der(root.cert.der(), &root.key).unwrap();
        let icert = p.signed_by(&ikey, &issuer).unwrap();
        let inter = Ca {
            cert: icert,
            key: ikey,
        };
        let (leaf, _) = node(&inter);
        let chain = [leaf.clone(), inter.cert.der().to_vec()];
        let v = verify_chain(&cas(&[&root]), &chain, now()).unwrap();
        assert_eq!(
            v.ca_fingerprint,
            mayfly::x509pop::fingerprint(root.cert.der())
        );
        // Without the intermediate there is no path.
        assert!(verify_chain(&cas(&[&root]), &[leaf], now()).is_err());
    }

    #[test]
    fn another_ca_an_expired_leaf_and_a_ca_leaf_are_refused() {
        let ca1 = ca("ca1");
        let (leaf, _) = node(&ca1);
        let err = verify_chain(&cas(&[&ca("other")]), &[leaf], now()).unwrap_err();
        assert!(err.to_string().contains("does not chain"), "{err}");

        let (expired, _) = node_with(&ca1, &rcgen::PKCS_ECDSA_P256_SHA256, |p| {
            p.not_before = now() - time::Duration::days(10);
            p.not_after = now() - time::Duration::days(1);
        });
        let err = verify_chain(&cas(&[&ca1]), std::slice::from_ref(&expired), now()).unwrap_err();
        assert!(err.to_string().contains("expired"), "{err}");
        // Validity is judged at the injected time.
        assert!(verify_chain(&cas(&[&ca1]), &[expired], now() - time::Duration::days(5)).is_ok());

        let (ca_leaf, _) = node_with(&ca1, &rcgen::PKCS_ECDSA_P256_SHA256, |p| {
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        });
        let err = verify_chain(&cas(&[&ca1]), &[ca_leaf], now()).unwrap_err();
        assert!(err.to_string().contains("is a CA"), "{err}");

        let (no_ds, _) = node_with(&ca1, &rcgen::PKCS_ECDSA_P256_SHA256, |p| {
            p.key_usages = vec![KeyUsagePurpose::KeyEncipherment];
        });
        let err = verify_chain(&cas(&[&ca1]), &[no_ds], now()).unwrap_err();
        assert!(err.to_string().contains("digitalSignature"), "{err}");

        assert!(matches!(
            verify_chain(&cas(&[&ca1]), &[], now()),
            Err(X509PopError::Evidence(_))
        ));
        // A non-CA certificate is not accepted as a CA.
        let (leaf2, _) = node(&ca1);
        assert!(TrustedCas::from_der(vec![leaf2]).is_err());
    }

    #[test]
    fn the_proof_must_sign_this_challenge_and_this_csr() {
        let ca1 = ca("ca1");
        for alg in [
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
            &rcgen::PKCS_ED25519,
            &rcgen::PKCS_RSA_SHA256,
        ] {
            let (leaf, key) = node_with(&ca1, alg, |_| {});
            let v = verify_chain(&cas(&[&ca1]), &[leaf], now()).unwrap();
            let nonce = [9u8; 32];
            let sig = sign(&key, &nonce, b"csr-1");
            verify_proof(&v, &nonce, b"csr-1", &sig).unwrap();
            assert!(matches!(
                verify_proof(&v, &[8u8; 32], b"csr-1", &sig),
                Err(X509PopError::BadProof)
            ));
            assert!(matches!(
                verify_proof(&v, &nonce, b"csr-2", &sig),
                Err(X509PopError::BadProof)
            ));
            // Another key's signature.
            let (_, other) = node_with(&ca1, alg, |_| {});
            let wrong = sign(&other, &nonce, b"csr-1");
            assert!(matches!(
                verify_proof(&v, &nonce, b"csr-1", &wrong),
                Err(X509PopError::BadProof)
            ));
        }
    }
}
