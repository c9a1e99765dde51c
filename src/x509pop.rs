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

/// The facts of a verified node certificate an agent path can use.
#[derive(Debug, Clone, Copy)]
pub struct PathFacts<'a> {
    /// The leaf, DER.
    pub leaf_der: &'a [u8],
    /// SHA-256 (hex) of the CA certificate the chain ends at.
    pub ca_fingerprint: &'a str,
    /// The leaf's subject common name, if any.
    pub subject_cn: Option<&'a str>,
    /// The leaf's serial number, hex.
    pub serial_hex: &'a str,
}

/// How an x509pop agent's ID is derived: the path after
/// `/mayfly/agent/x509pop/`, a template of literal text and the
/// placeholders `{fingerprint}` (SHA-256 of the leaf, the default),
/// `{ca_fingerprint}`, `{subject_cn}` and `{serialnumber}`. It must use at
/// least one placeholder, so that different nodes get different IDs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentPath(String);

/// The placeholders an [`AgentPath`] may use.
pub const PLACEHOLDERS: [&str; 4] = [
    "{fingerprint}",
    "{ca_fingerprint}",
    "{subject_cn}",
    "{serialnumber}",
];

impl Default for AgentPath {
    fn default() -> Self {
        Self("{fingerprint}".into())
    }
}

impl std::str::FromStr for AgentPath {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut rest = s.to_owned();
        let mut used = false;
        for p in PLACEHOLDERS {
            used |= rest.contains(p);
            rest = rest.replace(p, "x");
        }
        if !used {
            return Err(format!(
                "must use at least one of {}",
                PLACEHOLDERS.join(", ")
            ));
        }
        if rest.contains('{') || rest.contains('}') {
            return Err(format!(
                "unknown placeholder in {s:?}; the placeholders are {}",
                PLACEHOLDERS.join(", ")
            ));
        }
        if rest.starts_with('/') || rest.ends_with('/') || rest.contains("//") {
            return Err("must be path segments separated by single slashes".into());
        }
        let td = TrustDomain::new("example.org").map_err(|e| e.to_string())?;
        let segments: Vec<&str> = rest.split('/').collect();
        crate::id::agent_id(&td, NAME, &segments)
            .map_err(|e| format!("is not a valid SPIFFE ID path: {e}"))?;
        Ok(Self(s.to_owned()))
    }
}

impl AgentPath {
    /// The agent ID for a verified node certificate. Fails when a value
    /// is missing (no CN) or cannot be a SPIFFE ID path segment.
    pub fn agent_id(&self, td: &TrustDomain, facts: &PathFacts<'_>) -> Result<SpiffeId, String> {
        let mut path = self.0.clone();
        let values = [
            ("{fingerprint}", Some(fingerprint(facts.leaf_der))),
            ("{ca_fingerprint}", Some(facts.ca_fingerprint.to_owned())),
            ("{subject_cn}", facts.subject_cn.map(str::to_owned)),
            ("{serialnumber}", Some(facts.serial_hex.to_owned())),
        ];
        for (placeholder, value) in values {
            if path.contains(placeholder) {
                let value = value.ok_or_else(|| {
                    format!("the node certificate has no value for {placeholder}")
                })?;
                if value.contains('/') {
                    return Err(format!("{placeholder} {value:?} contains a slash"));
                }
                path = path.replace(placeholder, &value);
            }
        }
        let segments: Vec<&str> = path.split('/').collect();
        crate::id::agent_id(td, NAME, &segments)
            .map_err(|e| format!("agent path {path:?} is not a valid SPIFFE ID path: {e}"))
    }
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
    fn agent_path_templates() {
        let td = TrustDomain::new("example.org").unwrap();
        let facts = PathFacts {
            leaf_der: b"leaf",
            ca_fingerprint: "cafe",
            subject_cn: Some("node1"),
            serial_hex: "0a",
        };
        let default = AgentPath::default();
        assert_eq!(
            default.agent_id(&td, &facts).unwrap(),
            agent_id(&td, b"leaf").unwrap()
        );
        let p: AgentPath = "{ca_fingerprint}/{subject_cn}".parse().unwrap();
        assert_eq!(
            p.agent_id(&td, &facts).unwrap().to_string(),
            "spiffe://example.org/mayfly/agent/x509pop/cafe/node1"
        );
        let p: AgentPath = "node-{serialnumber}".parse().unwrap();
        assert!(
            p.agent_id(&td, &facts)
                .unwrap()
                .to_string()
                .ends_with("/node-0a")
        );
        let cn: AgentPath = "{subject_cn}".parse().unwrap();
        let no_cn = PathFacts {
            subject_cn: None,
            ..facts
        };
        assert!(
            cn.agent_id(&td, &no_cn)
                .unwrap_err()
                .contains("{subject_cn}")
        );
        let slash = PathFacts {
            subject_cn: Some("a/b"),
            ..facts
        };
        assert!(cn.agent_id(&td, &slash).is_err());
        for bad in [
            "static",
            "{cn}",
            "/{fingerprint}",
            "{fingerprint}//x",
            "{fingerprint} x",
        ] {
            assert!(bad.parse::<AgentPath>().is_err(), "{bad}");
        }
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
