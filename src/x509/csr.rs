use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::FromDer;
use zeroize::Zeroizing;

use super::X509Error;

/// A CSR whose self-signature verified. Only its public key is kept: the
/// identity always comes from the registration entry, never from the CSR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedCsr {
    spki_der: Vec<u8>,
}

impl VerifiedCsr {
    /// Parses a DER PKCS#10 request and verifies its signature.
    pub fn from_der(der: &[u8]) -> Result<Self, X509Error> {
        let (rest, csr) = X509CertificationRequest::from_der(der)
            .map_err(|e| X509Error::BadCsr(format!("not a DER PKCS#10 request: {e}")))?;
        if !rest.is_empty() {
            return Err(X509Error::BadCsr(format!("{} trailing bytes", rest.len())));
        }
        csr.verify_signature()
            .map_err(|e| X509Error::BadCsr(format!("signature does not verify: {e}")))?;
        Ok(Self {
            spki_der: csr.certification_request_info.subject_pki.raw.to_vec(),
        })
    }

    /// The requested key's SubjectPublicKeyInfo, DER.
    pub fn public_key_der(&self) -> &[u8] {
        &self.spki_der
    }
}

/// A freshly generated key pair and a CSR for it.
pub struct KeyAndCsr {
    /// PKCS#8 DER private key; zeroized on drop.
    pub key_pkcs8: Zeroizing<Vec<u8>>,
    /// PKCS#10 DER request.
    pub csr_der: Vec<u8>,
}

impl std::fmt::Debug for KeyAndCsr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyAndCsr")
            .field("key_pkcs8", &"<redacted>")
            .field("csr_der", &self.csr_der.len())
            .finish()
    }
}

/// Generates an EC P-256 key and a CSR for it (empty subject: the server sets
/// the identity).
pub fn new_key_and_csr() -> Result<KeyAndCsr, X509Error> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let csr = CertificateParams::default().serialize_request(&key)?;
    Ok(KeyAndCsr {
        key_pkcs8: Zeroizing::new(key.serialize_der()),
        csr_der: csr.der().to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifies_good_and_rejects_garbage() {
        let k = new_key_and_csr().unwrap();
        let v = VerifiedCsr::from_der(&k.csr_der).unwrap();
        assert!(!v.public_key_der().is_empty());
        assert!(matches!(
            VerifiedCsr::from_der(b"garbage"),
            Err(X509Error::BadCsr(_))
        ));
        let mut trailing = k.csr_der.clone();
        trailing.push(0);
        assert!(VerifiedCsr::from_der(&trailing).is_err());
        // Flip a bit in the signature (the last byte): verification must fail.
        let mut tampered = k.csr_der.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(matches!(
            VerifiedCsr::from_der(&tampered),
            Err(X509Error::BadCsr(_))
        ));
        assert!(format!("{k:?}").contains("redacted"));
    }
}
