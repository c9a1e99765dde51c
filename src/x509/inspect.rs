use spiffe::SpiffeId;
use time::OffsetDateTime;
use x509_parser::extensions::GeneralName;

use super::X509Error;

/// The facts of an X509-SVID that callers act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SvidInfo {
    /// The single URI SAN.
    pub spiffe_id: SpiffeId,
    /// Serial, lower-case hex of the DER integer's content bytes.
    pub serial_hex: String,
    /// NotBefore.
    pub not_before: OffsetDateTime,
    /// NotAfter.
    pub not_after: OffsetDateTime,
}

impl SvidInfo {
    /// Reads a leaf certificate (DER) that must carry exactly one SPIFFE URI SAN.
    pub fn from_der(der: &[u8]) -> Result<Self, X509Error> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| X509Error::BadCertificate(e.to_string()))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| X509Error::NotSvid(e.to_string()))?
            .ok_or_else(|| X509Error::NotSvid("no subject alternative name".into()))?;
        let uris: Vec<&str> = san
            .value
            .general_names
            .iter()
            .filter_map(|n| {
                if let GeneralName::URI(u) = n {
                    Some(*u)
                } else {
                    None
                }
            })
            .collect();
        let [uri] = uris.as_slice() else {
            return Err(X509Error::NotSvid(format!(
                "{} URI SANs, expected exactly one",
                uris.len()
            )));
        };
        let spiffe_id = SpiffeId::new(uri).map_err(|e| X509Error::NotSvid(e.to_string()))?;
        Ok(Self {
            spiffe_id,
            serial_hex: hex::encode(cert.raw_serial()),
            not_before: cert.validity().not_before.to_datetime(),
            not_after: cert.validity().not_after.to_datetime(),
        })
    }
}

/// Splits concatenated DER certificates (the Workload API's `x509_svid` and
/// `bundle` fields) into individual certificates.
pub fn chain_from_concatenated_der(mut der: &[u8]) -> Result<Vec<Vec<u8>>, X509Error> {
    let mut out = Vec::new();
    while !der.is_empty() {
        let (rest, _) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| X509Error::BadCertificate(e.to_string()))?;
        let len = der.len() - rest.len();
        out.push(der[..len].to_vec());
        der = rest;
    }
    Ok(out)
}
