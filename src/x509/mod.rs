//! X.509: the signing authority, CSR verification, SVID minting per the
//! SPIFFE X509-SVID standard, and reading SVIDs back.

mod authority;
mod crl;
mod csr;
mod inspect;

pub use authority::{CaParams, SignedCert, SvidParams, X509Authority};
pub use crl::{CrlEntry, CrlInfo, reason_code, verify_crl};
pub use csr::{KeyAndCsr, VerifiedCsr, new_key_and_csr};
pub use inspect::{SvidInfo, chain_from_concatenated_der};

/// Errors from X.509 operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum X509Error {
    /// The CSR is not valid DER, has trailing bytes, or its signature does not verify.
    #[error("invalid CSR: {0}")]
    BadCsr(String),
    /// A certificate or key could not be parsed.
    #[error("invalid certificate or key: {0}")]
    BadCertificate(String),
    /// The certificate is not an X509-SVID.
    #[error("not an X509-SVID: {0}")]
    NotSvid(String),
    /// The authority has expired or would outlive nothing useful.
    #[error("the signing authority expired at {0}")]
    AuthorityExpired(time::OffsetDateTime),
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Generate(String),
}

impl From<rcgen::Error> for X509Error {
    fn from(e: rcgen::Error) -> Self {
        Self::Generate(e.to_string())
    }
}
