//! The `x509pop` attestor: the node presents a certificate (chain) issued by
//! a CA the server trusts and proves that it holds the certificate's private
//! key by signing the server's challenge, bound to the CSR of the same
//! attestation ([`mayfly::x509pop::signed_message`]). Its assurance is high
//! and it can attest again at any time, so the agent re-attests instead of
//! renewing, and recovers by itself when its SVID is rejected or expired.
//!
//! Both files are read at every attestation, so a node certificate rotated
//! on disk is used from the next attestation on. The key is never logged.

use std::path::{Path, PathBuf};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _, RsaKeyPair};
use mayfly::proto::node::X509PopEvidence;
use prost::Message as _;
use zeroize::Zeroizing;

use super::{AttestError, NodeAttestor};

/// A node key loaded from PEM, able to sign the proof of possession.
pub enum NodeKey {
    /// ECDSA P-256 (signs with SHA-256, ASN.1 DER signature).
    EcdsaP256(EcdsaKeyPair),
    /// ECDSA P-384 (signs with SHA-384, ASN.1 DER signature).
    EcdsaP384(EcdsaKeyPair),
    /// Ed25519.
    Ed25519(Ed25519KeyPair),
    /// RSA (signs with PKCS#1 v1.5 and SHA-256).
    Rsa(RsaKeyPair),
}

impl std::fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self {
            Self::EcdsaP256(_) => "EcdsaP256",
            Self::EcdsaP384(_) => "EcdsaP384",
            Self::Ed25519(_) => "Ed25519",
            Self::Rsa(_) => "Rsa",
        };
        write!(f, "NodeKey::{kind}(<redacted>)")
    }
}

impl NodeKey {
    /// Parses a PEM private key: `PRIVATE KEY` (PKCS#8), `EC PRIVATE KEY`
    /// (SEC1) or `RSA PRIVATE KEY` (PKCS#1). The message never contains key
    /// material.
    pub fn from_pem(pem_text: &[u8]) -> Result<Self, String> {
        let block = pem::parse(pem_text).map_err(|e| format!("not a PEM private key: {e}"))?;
        let tag = block.tag().to_owned();
        let der = Zeroizing::new(block.into_contents());
        let ec = |der: &[u8]| {
            EcdsaKeyPair::from_private_key_der(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, der)
                .map(Self::EcdsaP256)
                .or_else(|_| {
                    EcdsaKeyPair::from_private_key_der(
                        &signature::ECDSA_P384_SHA384_ASN1_SIGNING,
                        der,
                    )
                    .map(Self::EcdsaP384)
                })
                .ok()
        };
        let key = match tag.as_str() {
            "PRIVATE KEY" => ec(&der)
                .or_else(|| {
                    Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
                        .ok()
                        .map(Self::Ed25519)
                })
                .or_else(|| RsaKeyPair::from_pkcs8(&der).ok().map(Self::Rsa)),
            "EC PRIVATE KEY" => ec(&der),
            "RSA PRIVATE KEY" => RsaKeyPair::from_der(&der).ok().map(Self::Rsa),
            other => {
                return Err(format!(
                    "a PEM block {other:?}; expected PRIVATE KEY, EC PRIVATE KEY or RSA PRIVATE KEY"
                ));
            }
        };
        key.ok_or_else(|| {
            format!(
                "a {tag} that is not an unencrypted ECDSA P-256/P-384, Ed25519 or RSA \
                 (2048 bits or more) key"
            )
        })
    }

    /// The public key as it appears in a certificate's SubjectPublicKeyInfo
    /// bit string.
    pub fn public_key(&self) -> &[u8] {
        match self {
            Self::EcdsaP256(k) | Self::EcdsaP384(k) => k.public_key().as_ref(),
            Self::Ed25519(k) => k.public_key().as_ref(),
            Self::Rsa(k) => k.public_key().as_ref(),
        }
    }

    /// Signs `message`.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, String> {
        let rng = SystemRandom::new();
        match self {
            Self::EcdsaP256(k) | Self::EcdsaP384(k) => k
                .sign(&rng, message)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| "ECDSA signing failed".to_owned()),
            Self::Ed25519(k) => Ok(k.sign(message).as_ref().to_vec()),
            Self::Rsa(k) => {
                let mut sig = vec![0; k.public_modulus_len()];
                k.sign(&signature::RSA_PKCS1_SHA256, &rng, message, &mut sig)
                    .map_err(|_| "RSA signing failed".to_owned())?;
                Ok(sig)
            }
        }
    }
}

/// Presents a node certificate and proves possession of its key.
#[derive(Debug, Clone)]
pub struct X509PopAttestor {
    certificate_path: PathBuf,
    private_key_path: PathBuf,
}

impl X509PopAttestor {
    /// The attestor's name on the wire.
    pub const NAME: &'static str = mayfly::x509pop::NAME;

    /// An attestor reading the PEM certificate chain (leaf first) and the
    /// PEM private key from these files at every attestation.
    pub fn new(certificate_path: PathBuf, private_key_path: PathBuf) -> Self {
        Self {
            certificate_path,
            private_key_path,
        }
    }

    fn no_evidence(&self, path: &Path, message: impl std::fmt::Display) -> AttestError {
        AttestError::NoEvidence {
            attestor: Self::NAME,
            message: format!("{}: {message}", path.display()),
        }
    }

    /// The certificate chain, DER, leaf first.
    pub fn read_chain(&self) -> Result<Vec<Vec<u8>>, AttestError> {
        crate::storage::read_pem_certificates(&self.certificate_path).map_err(|e| {
            AttestError::NoEvidence {
                attestor: Self::NAME,
                message: format!("agent.x509pop.certificate_path: {e}"),
            }
        })
    }

    /// The private key, checked against the leaf certificate.
    pub fn read_key(&self) -> Result<NodeKey, AttestError> {
        let path = &self.private_key_path;
        let text =
            Zeroizing::new(std::fs::read(path).map_err(|e| {
                self.no_evidence(path, format!("agent.x509pop.private_key_path: {e}"))
            })?);
        let key = NodeKey::from_pem(&text)
            .map_err(|e| self.no_evidence(path, format!("agent.x509pop.private_key_path: {e}")))?;
        let chain = self.read_chain()?;
        let leaf = chain
            .first()
            .ok_or_else(|| self.no_evidence(&self.certificate_path, "no certificate"))?;
        let (_, cert) = x509_parser::parse_x509_certificate(leaf)
            .map_err(|e| self.no_evidence(&self.certificate_path, e))?;
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key() {
            return Err(self.no_evidence(
                path,
                format!(
                    "this private key does not belong to the certificate in {}",
                    self.certificate_path.display()
                ),
            ));
        }
        Ok(key)
    }
}

#[tonic::async_trait]
impl NodeAttestor for X509PopAttestor {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn can_reattest(&self) -> bool {
        true
    }

    async fn evidence(&self) -> Result<Zeroizing<Vec<u8>>, AttestError> {
        let chain = self.read_chain()?;
        // Fail here, with a local message, rather than after the server's challenge.
        self.read_key()?;
        Ok(Zeroizing::new(X509PopEvidence { chain }.encode_to_vec()))
    }

    async fn answer_challenge(
        &self,
        challenge: &[u8],
        csr_der: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, AttestError> {
        if challenge.len() != mayfly::x509pop::CHALLENGE_LEN {
            return Err(AttestError::BadChallenge {
                attestor: Self::NAME,
                message: format!(
                    "expected {} bytes, got {}",
                    mayfly::x509pop::CHALLENGE_LEN,
                    challenge.len()
                ),
            });
        }
        let key = self.read_key()?;
        let message = mayfly::x509pop::signed_message(challenge, csr_der);
        key.sign(&message)
            .map(Zeroizing::new)
            .map_err(|message| AttestError::BadChallenge {
                attestor: Self::NAME,
                message,
            })
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, KeyPair};

    use super::*;

    fn write_node(
        dir: &Path,
        alg: &'static rcgen::SignatureAlgorithm,
    ) -> (PathBuf, PathBuf, KeyPair) {
        let key = KeyPair::generate_for(alg).unwrap();
        let cert = CertificateParams::new(vec!["node".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let c = dir.join("node.pem");
        let k = dir.join("node.key");
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k, key)
    }

    #[test]
    fn pkcs8_keys_of_every_supported_kind_load_and_match() {
        for alg in [
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
            &rcgen::PKCS_ED25519,
            &rcgen::PKCS_RSA_SHA256,
        ] {
            let dir = tempfile::tempdir().unwrap();
            let (c, k, _) = write_node(dir.path(), alg);
            let a = X509PopAttestor::new(c, k);
            let key = a.read_key().unwrap();
            assert!(!format!("{key:?}").is_empty());
            assert!(key.sign(b"m").is_ok());
        }
    }

    #[test]
    fn sec1_and_pkcs1_keys_load() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let pkcs8 = key.serialize_der();
        let ec =
            EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, &pkcs8).unwrap();
        let sec1: aws_lc_rs::encoding::EcPrivateKeyRfc5915Der<'_> =
            aws_lc_rs::encoding::AsDer::as_der(&ec.private_key()).unwrap();
        let pem_text = pem::encode(&pem::Pem::new("EC PRIVATE KEY", sec1.as_ref().to_vec()));
        let loaded = NodeKey::from_pem(pem_text.as_bytes()).unwrap();
        assert_eq!(loaded.public_key(), ec.public_key().as_ref());

        let rsa = KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
        let pair = RsaKeyPair::from_pkcs8(&rsa.serialize_der()).unwrap();
        // PKCS#8 PrivateKeyInfo = SEQUENCE { version, algorithm, privateKey OCTET STRING
        // holding the PKCS#1 RSAPrivateKey }.
        let pkcs8 = rsa.serialize_der();
        let (_, info) = x509_parser::der_parser::parse_der(&pkcs8).unwrap();
        let seq = info.as_sequence().unwrap();
        let inner = seq[2].as_slice().unwrap().to_vec();
        let pkcs1 = pem::encode(&pem::Pem::new("RSA PRIVATE KEY", inner));
        let loaded = NodeKey::from_pem(pkcs1.as_bytes()).unwrap();
        assert_eq!(loaded.public_key(), pair.public_key().as_ref());

        assert!(NodeKey::from_pem(b"nonsense").is_err());
        let wrong = pem::encode(&pem::Pem::new("CERTIFICATE", vec![1, 2, 3]));
        assert!(
            NodeKey::from_pem(wrong.as_bytes())
                .unwrap_err()
                .contains("CERTIFICATE")
        );
    }

    #[tokio::test]
    async fn evidence_and_challenge_answer() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k, key) = write_node(dir.path(), &rcgen::PKCS_ECDSA_P256_SHA256);
        let a = X509PopAttestor::new(c, k.clone());
        assert!(a.can_reattest());
        let ev = X509PopEvidence::decode(a.evidence().await.unwrap().as_slice()).unwrap();
        assert_eq!(ev.chain.len(), 1);
        let sig = a.answer_challenge(&[1; 32], b"csr").await.unwrap();
        let spki = signature::UnparsedPublicKey::new(
            &signature::ECDSA_P256_SHA256_ASN1,
            key.public_key_raw(),
        );
        spki.verify(&mayfly::x509pop::signed_message(&[1; 32], b"csr"), &sig)
            .unwrap();
        assert!(a.answer_challenge(&[1; 3], b"csr").await.is_err());
        // A key that does not belong to the certificate is refused locally.
        let other = KeyPair::generate().unwrap();
        std::fs::write(&k, other.serialize_pem()).unwrap();
        let err = a.evidence().await.unwrap_err().to_string();
        assert!(err.contains("does not belong"), "{err}");
        assert!(!err.contains("PRIVATE"), "{err}");
    }
}
