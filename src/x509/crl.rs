//! Signed X.509 v2 certificate revocation lists (RFC 5280 §5), one per
//! authority, and reading them back.

use rcgen::{
    CertificateRevocationListParams, KeyIdMethod, RevocationReason, RevokedCertParams, SerialNumber,
};
use time::OffsetDateTime;

use super::{X509Authority, X509Error};
use crate::revocation::Reason;

/// One revoked certificate as listed in a CRL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrlEntry {
    /// Serial, big-endian bytes (as in the certificate).
    pub serial: Vec<u8>,
    /// When it was revoked.
    pub revoked_at: OffsetDateTime,
    /// Why.
    pub reason: Reason,
}

/// The RFC 5280 reason code written for a revocation reason; `None` for an
/// operator's revocation (RFC 5280 asks that "unspecified" be left out).
pub fn reason_code(reason: Reason) -> Option<u8> {
    crl_reason(reason).map(|r| r as u8)
}

fn crl_reason(reason: Reason) -> Option<RevocationReason> {
    match reason {
        // The holder stopped operating: nothing was compromised.
        Reason::TaskEnded | Reason::TaskCompleted => Some(RevocationReason::CessationOfOperation),
        Reason::EntryDeleted => Some(RevocationReason::AffiliationChanged),
        Reason::AgentBanned | Reason::AgentEvicted => Some(RevocationReason::PrivilegeWithdrawn),
        Reason::Operator => None,
    }
}

impl X509Authority {
    /// Signs a CRL listing `revoked`, numbered `crl_number` (callers keep it
    /// strictly increasing), issued at `now` and valid until `next_update`
    /// (after `now`). DER.
    pub fn sign_crl(
        &self,
        revoked: &[CrlEntry],
        crl_number: u64,
        now: OffsetDateTime,
        next_update: OffsetDateTime,
    ) -> Result<Vec<u8>, X509Error> {
        let whole = |t: OffsetDateTime| t.replace_nanosecond(0).unwrap_or(t);
        let params = CertificateRevocationListParams {
            this_update: whole(now),
            next_update: whole(next_update),
            crl_number: SerialNumber::from_slice(&crl_number.to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|r| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&r.serial),
                    revocation_time: whole(r.revoked_at),
                    reason_code: crl_reason(r.reason),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(self.issuer())?.der().to_vec())
    }
}

/// What a verified CRL says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrlInfo {
    /// The CRL number.
    pub crl_number: Option<u64>,
    /// thisUpdate.
    pub this_update: OffsetDateTime,
    /// nextUpdate.
    pub next_update: Option<OffsetDateTime>,
    /// Revoked serials (lower-case hex) with their reason codes.
    pub revoked: Vec<(String, Option<u8>)>,
}

impl CrlInfo {
    /// Whether the serial (lower-case hex) is listed.
    pub fn is_revoked(&self, serial_hex: &str) -> bool {
        self.revoked.iter().any(|(s, _)| s == serial_hex)
    }
}

/// Parses a DER CRL and verifies its signature with the key of
/// `ca_cert_der` (and that the CA is its issuer).
pub fn verify_crl(crl_der: &[u8], ca_cert_der: &[u8]) -> Result<CrlInfo, X509Error> {
    let (rest, crl) = x509_parser::parse_x509_crl(crl_der)
        .map_err(|e| X509Error::BadCertificate(format!("CRL: {e}")))?;
    if !rest.is_empty() {
        return Err(X509Error::BadCertificate("CRL: trailing bytes".into()));
    }
    let (_, ca) = x509_parser::parse_x509_certificate(ca_cert_der)
        .map_err(|e| X509Error::BadCertificate(format!("CA certificate: {e}")))?;
    if crl.issuer() != ca.subject() {
        return Err(X509Error::BadCertificate(
            "CRL: issued by another CA".into(),
        ));
    }
    crl.verify_signature(ca.public_key())
        .map_err(|e| X509Error::BadCertificate(format!("CRL signature: {e}")))?;
    let crl_number = crl.crl_number().and_then(|n| {
        let bytes = n.to_bytes_be();
        (bytes.len() <= 8).then(|| bytes.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    });
    Ok(CrlInfo {
        crl_number,
        this_update: crl.last_update().to_datetime(),
        next_update: crl.next_update().map(|t| t.to_datetime()),
        revoked: crl
            .iter_revoked_certificates()
            .map(|r| {
                (
                    hex::encode(r.raw_serial()),
                    r.reason_code().map(|(_, c)| c.0),
                )
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x509::{CaParams, SvidParams, VerifiedCsr, new_key_and_csr};
    use spiffe::{SpiffeId, TrustDomain};
    use time::Duration;

    fn ca(now: OffsetDateTime) -> X509Authority {
        X509Authority::generate(
            &CaParams {
                trust_domain: TrustDomain::new("example.org").unwrap(),
                ttl: Duration::days(1),
                subject: "Mayfly".into(),
            },
            now,
        )
        .unwrap()
    }

    fn svid(ca: &X509Authority, now: OffsetDateTime) -> crate::x509::SignedCert {
        let csr = VerifiedCsr::from_der(&new_key_and_csr().unwrap().csr_der).unwrap();
        let id = SpiffeId::new("spiffe://example.org/web").unwrap();
        ca.sign_svid(
            &csr,
            &SvidParams {
                spiffe_id: &id,
                dns_names: &[],
                ttl: Duration::hours(1),
            },
            now,
        )
        .unwrap()
    }

    #[test]
    fn crl_verifies_against_its_ca_and_lists_exactly_the_serials() {
        let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
        let ca = ca(now);
        let revoked = svid(&ca, now);
        let live = svid(&ca, now);
        let der = ca
            .sign_crl(
                &[CrlEntry {
                    serial: revoked.serial.clone(),
                    revoked_at: now,
                    reason: Reason::TaskEnded,
                }],
                7,
                now,
                now + Duration::hours(1),
            )
            .unwrap();
        let info = verify_crl(&der, ca.cert_der()).unwrap();
        assert_eq!(info.crl_number, Some(7));
        assert_eq!(info.this_update, now);
        assert_eq!(info.next_update, Some(now + Duration::hours(1)));
        assert_eq!(info.revoked, vec![(revoked.serial_hex(), Some(5))]);
        assert!(info.is_revoked(&revoked.serial_hex()));
        assert!(!info.is_revoked(&live.serial_hex()));

        // Another CA's key does not verify it.
        let other = super::tests::ca(now);
        assert!(verify_crl(&der, other.cert_der()).is_err());
    }

    #[test]
    fn empty_crl_and_large_numbers() {
        let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
        let ca = ca(now);
        let der = ca
            .sign_crl(&[], u64::MAX, now, now + Duration::minutes(5))
            .unwrap();
        let info = verify_crl(&der, ca.cert_der()).unwrap();
        assert_eq!(info.crl_number, Some(u64::MAX));
        assert!(info.revoked.is_empty());
        // nextUpdate must follow thisUpdate.
        assert!(ca.sign_crl(&[], 1, now, now).is_err());
    }

    #[test]
    fn operator_revocations_carry_no_reason_code() {
        let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
        let ca = ca(now);
        let s = svid(&ca, now);
        let der = ca
            .sign_crl(
                &[CrlEntry {
                    serial: s.serial.clone(),
                    revoked_at: now,
                    reason: Reason::Operator,
                }],
                1,
                now,
                now + Duration::minutes(5),
            )
            .unwrap();
        let info = verify_crl(&der, ca.cert_der()).unwrap();
        assert_eq!(info.revoked, vec![(s.serial_hex(), None)]);
        assert_eq!(reason_code(Reason::AgentBanned), Some(9));
    }
}
