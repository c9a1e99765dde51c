//! Node attestation, evidence side: how this agent proves to the server which
//! node it runs on, and the agent SVID it gets in return.
//!
//! The server verifies the evidence; the agent only gathers it. Each attestor
//! is a small type behind the narrow [`NodeAttestor`] trait, used as `dyn`.

pub mod join_token;
pub mod k8s_psat;
pub mod x509pop;

use mayfly::SpiffeId;
use mayfly::x509::SvidInfo;
use time::OffsetDateTime;
use zeroize::Zeroizing;

pub use join_token::{JoinToken, JoinTokenAttestor};
pub use k8s_psat::K8sPsatAttestor;
pub use x509pop::X509PopAttestor;

/// Why evidence could not be produced.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttestError {
    /// The attestor has nothing to present (for example, no join token).
    #[error("{attestor}: {message}")]
    NoEvidence {
        /// The attestor's name.
        attestor: &'static str,
        /// What is missing and how to provide it.
        message: String,
    },
    /// The server sent a challenge this attestor does not answer.
    #[error("{attestor} does not answer challenges, but the server sent one")]
    UnexpectedChallenge {
        /// The attestor's name.
        attestor: &'static str,
    },
    /// The challenge could not be answered.
    #[error("{attestor}: cannot answer the server's challenge: {message}")]
    BadChallenge {
        /// The attestor's name.
        attestor: &'static str,
        /// Why.
        message: String,
    },
}

/// Gathers a node's attestation evidence. Implementations must never log or
/// expose the evidence: for bearer attestors it is a secret.
#[tonic::async_trait]
pub trait NodeAttestor: Send + Sync + std::fmt::Debug {
    /// The attestor's name as the server knows it (`AttestParams.attestor`).
    fn name(&self) -> &'static str;

    /// Whether this attestor can prove the node again at any time, without
    /// an operator (then the agent re-attests instead of renewing, and
    /// re-attests when the server asks for a fresh proof).
    fn can_reattest(&self) -> bool {
        false
    }

    /// The evidence payload sent in `AttestParams.payload`.
    async fn evidence(&self) -> Result<Zeroizing<Vec<u8>>, AttestError>;

    /// The answer to a server challenge, for the attestation whose CSR is
    /// `csr_der`. Attestors that need no challenge keep the default, which
    /// refuses.
    async fn answer_challenge(
        &self,
        _challenge: &[u8],
        _csr_der: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, AttestError> {
        Err(AttestError::UnexpectedChallenge {
            attestor: self.name(),
        })
    }
}

/// The agent's own X.509-SVID and its private key.
#[derive(Clone)]
pub struct AgentSvid {
    /// `spiffe://<td>/mayfly/agent/...`.
    pub spiffe_id: SpiffeId,
    /// DER certificates, leaf first.
    pub chain_der: Vec<Vec<u8>>,
    /// PKCS#8 DER private key (secret).
    pub key_pkcs8: Zeroizing<Vec<u8>>,
    /// NotBefore of the leaf.
    pub not_before: OffsetDateTime,
    /// NotAfter of the leaf.
    pub expires_at: OffsetDateTime,
    /// Serial of the leaf, lower-case hex.
    pub serial_hex: String,
}

impl std::fmt::Debug for AgentSvid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentSvid")
            .field("spiffe_id", &self.spiffe_id)
            .field("serial", &self.serial_hex)
            .field("not_before", &self.not_before)
            .field("expires_at", &self.expires_at)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// Why an agent SVID was rejected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentSvidError {
    /// The chain is empty.
    #[error("the agent SVID chain is empty")]
    EmptyChain,
    /// The leaf is not an X509-SVID.
    #[error("the agent SVID is not an X509-SVID: {0}")]
    NotSvid(String),
    /// The private key does not parse or does not belong to the leaf.
    #[error("the agent key does not match the agent SVID")]
    KeyMismatch,
}

impl AgentSvid {
    /// Builds from a DER chain (leaf first) and the PKCS#8 key it was issued
    /// for, checking that the leaf is an SVID and that the key matches it.
    pub fn new(
        chain_der: Vec<Vec<u8>>,
        key_pkcs8: Zeroizing<Vec<u8>>,
    ) -> Result<Self, AgentSvidError> {
        let leaf = chain_der.first().ok_or(AgentSvidError::EmptyChain)?;
        let info = SvidInfo::from_der(leaf).map_err(|e| AgentSvidError::NotSvid(e.to_string()))?;
        let key = rcgen::KeyPair::try_from(key_pkcs8.as_slice())
            .map_err(|_| AgentSvidError::KeyMismatch)?;
        let (_, cert) = x509_parser::parse_x509_certificate(leaf)
            .map_err(|e| AgentSvidError::NotSvid(e.to_string()))?;
        if cert.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice() {
            return Err(AgentSvidError::KeyMismatch);
        }
        Ok(Self {
            spiffe_id: info.spiffe_id,
            chain_der,
            key_pkcs8,
            not_before: info.not_before,
            expires_at: info.not_after,
            serial_hex: info.serial_hex,
        })
    }

    /// Whether the SVID can still be presented at `now`.
    pub fn is_valid_at(&self, now: OffsetDateTime) -> bool {
        self.not_before <= now && now < self.expires_at
    }
}
