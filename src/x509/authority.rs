use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType, SerialNumber,
    SubjectPublicKeyInfo,
};
use spiffe::{SpiffeId, TrustDomain};
use time::{Duration, OffsetDateTime};
use zeroize::Zeroizing;

use super::{VerifiedCsr, X509Error};

/// How far back NotBefore is set, to tolerate clock skew between hosts.
const BACKDATE: Duration = Duration::seconds(10);

/// Parameters of a new self-signed CA.
#[derive(Debug, Clone)]
pub struct CaParams {
    /// The trust domain the CA signs for (its URI SAN).
    pub trust_domain: TrustDomain,
    /// Lifetime.
    pub ttl: Duration,
    /// Subject organisation / common name prefix.
    pub subject: String,
}

/// What an X509-SVID is issued for.
#[derive(Debug, Clone)]
pub struct SvidParams<'a> {
    /// The identity (the one URI SAN).
    pub spiffe_id: &'a SpiffeId,
    /// DNS SANs; the first also becomes the subject CN.
    pub dns_names: &'a [String],
    /// Requested lifetime; clamped to the authority's NotAfter.
    pub ttl: Duration,
}

/// A signed certificate and the facts callers need about it.
#[derive(Debug, Clone)]
pub struct SignedCert {
    /// DER.
    pub der: Vec<u8>,
    /// Serial number, big-endian bytes (16 random bytes).
    pub serial: Vec<u8>,
    /// NotAfter.
    pub not_after: OffsetDateTime,
}

impl SignedCert {
    /// Serial as lower-case hex, the form used in APIs and CRLs.
    pub fn serial_hex(&self) -> String {
        hex::encode(&self.serial)
    }
}

/// An X.509 signing authority: a CA certificate and its private key.
pub struct X509Authority {
    cert_der: Vec<u8>,
    key_pkcs8: Zeroizing<Vec<u8>>,
    issuer: Issuer<'static, KeyPair>,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
}

impl std::fmt::Debug for X509Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("X509Authority")
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// A random positive serial of exactly 16 content bytes: the first byte is
/// kept in 0x01..=0x7f so that DER needs neither a sign byte nor trimming,
/// and the serial reads the same in the certificate, CRLs and our records
/// (about 127 bits of randomness).
fn random_serial() -> [u8; 16] {
    let mut serial: [u8; 16] = rand::random();
    serial[0] = (serial[0] & 0x7f).max(1);
    serial
}

fn td_uri(td: &TrustDomain) -> Result<SanType, X509Error> {
    Ok(SanType::URI(
        format!("spiffe://{}", td.as_str())
            .try_into()
            .map_err(|e: rcgen::Error| X509Error::Generate(e.to_string()))?,
    ))
}

impl X509Authority {
    /// Creates a self-signed EC P-256 CA for `params.trust_domain`, valid
    /// from `now` for `params.ttl`: `cA=true`, key usage keyCertSign and
    /// cRLSign, the trust domain's URI SAN.
    pub fn generate(params: &CaParams, now: OffsetDateTime) -> Result<Self, X509Error> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut cp = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, params.subject.clone());
        dn.push(
            DnType::CommonName,
            format!(
                "{} CA {}",
                params.subject,
                hex::encode(&random_serial()[..4])
            ),
        );
        cp.distinguished_name = dn;
        cp.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        cp.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        cp.subject_alt_names = vec![td_uri(&params.trust_domain)?];
        cp.serial_number = Some(SerialNumber::from_slice(&random_serial()));
        cp.not_before = now - BACKDATE;
        cp.not_after = now + params.ttl;
        let cert = cp.self_signed(&key)?;
        Self::from_der(cert.der().to_vec(), Zeroizing::new(key.serialize_der()))
    }

    /// Loads an authority from its certificate and PKCS#8 key, both DER.
    pub fn from_der(cert_der: Vec<u8>, key_pkcs8: Zeroizing<Vec<u8>>) -> Result<Self, X509Error> {
        let key = KeyPair::try_from(key_pkcs8.as_slice())
            .map_err(|e| X509Error::BadCertificate(format!("CA key: {e}")))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|e| X509Error::BadCertificate(format!("CA certificate: {e}")))?;
        if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(X509Error::BadCertificate(
                "the CA key does not match the CA certificate".into(),
            ));
        }
        let not_before = parsed.validity().not_before.to_datetime();
        let not_after = parsed.validity().not_after.to_datetime();
        let issuer = Issuer::from_ca_cert_der(&cert_der.clone().into(), key)
            .map_err(|e| X509Error::BadCertificate(format!("CA certificate: {e}")))?;
        Ok(Self {
            cert_der,
            key_pkcs8,
            issuer,
            not_before,
            not_after,
        })
    }

    /// Loads from PEM text (certificate, PKCS#8 key).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, X509Error> {
        let cert = pem::parse(cert_pem)
            .map_err(|e| X509Error::BadCertificate(format!("CA certificate PEM: {e}")))?;
        let key = pem::parse(key_pem)
            .map_err(|_| X509Error::BadCertificate("CA key PEM is malformed".into()))?;
        Self::from_der(cert.into_contents(), Zeroizing::new(key.into_contents()))
    }

    /// The certificate as PEM.
    pub fn cert_pem(&self) -> String {
        pem::encode(&pem::Pem::new("CERTIFICATE", self.cert_der.clone()))
    }

    /// The private key as PKCS#8 PEM (a secret: write it owner-only).
    pub fn key_pem(&self) -> Zeroizing<String> {
        Zeroizing::new(pem::encode(&pem::Pem::new(
            "PRIVATE KEY",
            self.key_pkcs8.to_vec(),
        )))
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// NotBefore of the CA certificate.
    pub fn not_before(&self) -> OffsetDateTime {
        self.not_before
    }

    /// NotAfter of the CA certificate: no SVID it signs outlives it.
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// The rcgen issuer (certificate and key), for signing CRLs.
    pub(super) fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }

    /// Signs an X509-SVID for the CSR's public key. The identity comes only
    /// from `params`. The leaf has exactly one URI SAN, `cA=false`, critical
    /// key usage digitalSignature, EKU serverAuth and clientAuth, a random
    /// 128-bit serial, and a NotAfter clamped to the authority's.
    pub fn sign_svid(
        &self,
        csr: &VerifiedCsr,
        params: &SvidParams<'_>,
        now: OffsetDateTime,
    ) -> Result<SignedCert, X509Error> {
        if now >= self.not_after {
            return Err(X509Error::AuthorityExpired(self.not_after));
        }
        let public_key = SubjectPublicKeyInfo::from_der(csr.public_key_der())
            .map_err(|e| X509Error::BadCsr(format!("unsupported public key: {e}")))?;
        let mut cp = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "SPIFFE");
        if let Some(first) = params.dns_names.first() {
            dn.push(DnType::CommonName, first.clone());
        }
        cp.distinguished_name = dn;
        cp.is_ca = IsCa::ExplicitNoCa;
        cp.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        cp.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let mut sans = vec![SanType::URI(
            params
                .spiffe_id
                .to_string()
                .try_into()
                .map_err(|e: rcgen::Error| X509Error::Generate(e.to_string()))?,
        )];
        for name in params.dns_names {
            sans.push(SanType::DnsName(
                name.clone()
                    .try_into()
                    .map_err(|e: rcgen::Error| X509Error::Generate(e.to_string()))?,
            ));
        }
        cp.subject_alt_names = sans;
        cp.use_authority_key_identifier_extension = true;
        let serial = random_serial();
        cp.serial_number = Some(SerialNumber::from_slice(&serial));
        cp.not_before = (now - BACKDATE).max(self.not_before);
        let not_after = (now + params.ttl).min(self.not_after);
        // rcgen writes whole seconds; keep our record identical to the cert.
        let not_after = not_after.replace_nanosecond(0).unwrap_or(not_after);
        cp.not_after = not_after;
        let cert = cp.signed_by(&public_key, &self.issuer)?;
        Ok(SignedCert {
            der: cert.der().to_vec(),
            serial: serial.to_vec(),
            not_after,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x509::{SvidInfo, new_key_and_csr};
    use x509_parser::extensions::{GeneralName, ParsedExtension};

    fn ca(now: OffsetDateTime, ttl: Duration) -> X509Authority {
        X509Authority::generate(
            &CaParams {
                trust_domain: TrustDomain::new("example.org").unwrap(),
                ttl,
                subject: "Mayfly".into(),
            },
            now,
        )
        .unwrap()
    }

    #[test]
    fn ca_certificate_is_a_spiffe_ca() {
        let now = OffsetDateTime::now_utc();
        let ca = ca(now, Duration::hours(24));
        let (_, cert) = x509_parser::parse_x509_certificate(ca.cert_der()).unwrap();
        let bc = cert.basic_constraints().unwrap().unwrap().value;
        assert!(bc.ca);
        let ku = cert.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign() && ku.crl_sign());
        let san = cert.subject_alternative_name().unwrap().unwrap().value;
        assert!(matches!(
            san.general_names.as_slice(),
            [GeneralName::URI("spiffe://example.org")]
        ));
        // PEM round trip keeps the key and certificate together.
        let again = X509Authority::from_pem(&ca.cert_pem(), &ca.key_pem()).unwrap();
        assert_eq!(again.cert_der(), ca.cert_der());
        assert!(!format!("{ca:?}").contains("PRIVATE"));
    }

    #[test]
    fn svid_follows_the_x509_svid_standard() {
        let now = OffsetDateTime::now_utc();
        let ca = ca(now, Duration::hours(24));
        let k = new_key_and_csr().unwrap();
        let csr = VerifiedCsr::from_der(&k.csr_der).unwrap();
        let id = SpiffeId::new("spiffe://example.org/web").unwrap();
        let dns = vec!["web.example.org".to_owned()];
        let signed = ca
            .sign_svid(
                &csr,
                &SvidParams {
                    spiffe_id: &id,
                    dns_names: &dns,
                    ttl: Duration::hours(1),
                },
                now,
            )
            .unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&signed.der).unwrap();
        // Exactly one URI SAN, and it is the entry's ID.
        let san = cert.subject_alternative_name().unwrap().unwrap().value;
        let uris: Vec<_> = san
            .general_names
            .iter()
            .filter(|n| matches!(n, GeneralName::URI(_)))
            .collect();
        assert_eq!(uris.len(), 1);
        assert!(matches!(
            uris[0],
            GeneralName::URI("spiffe://example.org/web")
        ));
        // Leaf: cA=false, critical digitalSignature only, EKU server+client.
        assert!(!cert.basic_constraints().unwrap().unwrap().value.ca);
        let ku = cert.key_usage().unwrap().unwrap();
        assert!(ku.critical);
        assert!(ku.value.digital_signature() && !ku.value.key_cert_sign() && !ku.value.crl_sign());
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        assert_eq!(cert.raw_serial().len(), 16);
        assert_eq!(cert.public_key().raw, csr.public_key_der());
        // Signed by the CA.
        let (_, ca_cert) = x509_parser::parse_x509_certificate(ca.cert_der()).unwrap();
        cert.verify_signature(Some(ca_cert.public_key())).unwrap();
        for ext in cert.extensions() {
            if let ParsedExtension::UnsupportedExtension { .. } = ext.parsed_extension() {
                panic!("unexpected extension {}", ext.oid);
            }
        }
        let info = SvidInfo::from_der(&signed.der).unwrap();
        assert_eq!(info.spiffe_id, id);
        assert_eq!(info.serial_hex, signed.serial_hex());
    }

    #[test]
    fn not_after_is_clamped_to_the_ca_and_serials_differ() {
        let now = OffsetDateTime::now_utc();
        let ca = ca(now, Duration::minutes(5));
        let k = new_key_and_csr().unwrap();
        let csr = VerifiedCsr::from_der(&k.csr_der).unwrap();
        let id = SpiffeId::new("spiffe://example.org/web").unwrap();
        let p = SvidParams {
            spiffe_id: &id,
            dns_names: &[],
            ttl: Duration::hours(1),
        };
        let a = ca.sign_svid(&csr, &p, now).unwrap();
        let b = ca.sign_svid(&csr, &p, now).unwrap();
        assert!(a.not_after <= ca.not_after());
        assert_ne!(a.serial, b.serial);
        assert!(matches!(
            ca.sign_svid(&csr, &p, now + Duration::hours(1)),
            Err(X509Error::AuthorityExpired(_))
        ));
    }
}
