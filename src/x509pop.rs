//! The parts of the `x509pop` node attestor that agent and server must agree
//! on: the agent's SPIFFE ID derived from its node certificate, and the bytes
//! the node key signs to prove possession. Pure functions, no I/O.
//!
//! The proof binds the server's fresh challenge to the CSR of the same
//! attestation, so that a signature cannot be replayed, nor moved onto
//! another agent key.

use aws_lc_rs::digest;

use spiffe::SpiffeIdError;

use crate::{SpiffeId, TrustDomain};

/// The attestor's name on the wire and in agent IDs.
pub const NAME: &str = "x509pop";

/// Domain separation prefix of the signed message (NUL included).
pub const CONTEXT: &[u8] = b"mayfly-x509pop-v1\0";

/// Length of the server's challenge, in bytes.
pub const CHALLENGE_LEN: usize = 32;

/// SHA-256 of `der`, lower-case hex: how certificates are fingerprinted
/// (agent IDs, CA selectors).
pub fn fingerprint(der: &[u8]) -> String {
    hex_lower(digest::digest(&digest::SHA256, der).as_ref())
}

/// `spiffe://<td>/mayfly/agent/x509pop/<sha256 of the leaf DER, hex>`.
pub fn agent_id(td: &TrustDomain, leaf_der: &[u8]) -> Result<SpiffeId, SpiffeIdError> {
    crate::id::agent_id(td, NAME, &[fingerprint(leaf_der).as_str()])
}

/// What the node key signs: [`CONTEXT`] || `challenge` || SHA-256(`csr_der`).
pub fn signed_message(challenge: &[u8], csr_der: &[u8]) -> Vec<u8> {
    let csr_hash = digest::digest(&digest::SHA256, csr_der);
    let mut m = Vec::with_capacity(CONTEXT.len() + challenge.len() + 32);
    m.extend_from_slice(CONTEXT);
    m.extend_from_slice(challenge);
    m.extend_from_slice(csr_hash.as_ref());
    m
}

fn hex_lower(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_binds_challenge_and_csr() {
        let m = signed_message(&[7; 32], b"csr");
        assert!(m.starts_with(b"mayfly-x509pop-v1\0"));
        assert_eq!(m.len(), CONTEXT.len() + 32 + 32);
        assert_ne!(m, signed_message(&[7; 32], b"other csr"));
        assert_ne!(m, signed_message(&[8; 32], b"csr"));
    }

    #[test]
    fn agent_id_is_the_leaf_fingerprint() {
        let td = TrustDomain::new("example.org").unwrap();
        let id = agent_id(&td, b"leaf").unwrap();
        assert_eq!(
            id.to_string(),
            format!(
                "spiffe://example.org/mayfly/agent/x509pop/{}",
                fingerprint(b"leaf")
            )
        );
        assert_eq!(fingerprint(b"leaf").len(), 64);
    }
}
