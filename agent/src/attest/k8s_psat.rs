//! `k8s_psat`: the agent presents a projected service account token of its
//! own pod, audience-bound to the server, with the name of its cluster. The
//! kubelet rotates the token in place, so it is read again at every
//! attestation. Medium assurance; the agent can prove itself again at any
//! time, so it re-attests instead of renewing.

use std::path::PathBuf;

use mayfly::k8s_psat::ClusterName;
use mayfly::proto::node::K8sPsatEvidence;
use prost::Message as _;
use zeroize::Zeroizing;

use super::{AttestError, NodeAttestor};

/// Where the Helm chart mounts the projected token.
pub const DEFAULT_TOKEN_PATH: &str = "/var/run/secrets/tokens/mayfly-agent";

/// Reads the projected token at each attestation.
#[derive(Debug, Clone)]
pub struct K8sPsatAttestor {
    cluster: ClusterName,
    token_path: PathBuf,
}

impl K8sPsatAttestor {
    /// An attestor for `cluster` reading its token from `token_path`.
    pub fn new(cluster: ClusterName, token_path: PathBuf) -> Self {
        Self {
            cluster,
            token_path,
        }
    }

    fn read_token(&self) -> Result<Zeroizing<String>, AttestError> {
        let no = |message: String| AttestError::NoEvidence {
            attestor: mayfly::k8s_psat::NAME,
            message,
        };
        let raw = Zeroizing::new(std::fs::read(&self.token_path).map_err(|e| {
            no(format!(
                "cannot read the service account token {}: {e} (mount a projected \
                 serviceAccountToken volume with the server's audience there)",
                self.token_path.display()
            ))
        })?);
        let text = std::str::from_utf8(&raw)
            .map_err(|_| {
                no(format!(
                    "{} is not a token (not UTF-8)",
                    self.token_path.display()
                ))
            })?
            .trim();
        if text.is_empty() {
            return Err(no(format!("{} is empty", self.token_path.display())));
        }
        Ok(Zeroizing::new(text.to_owned()))
    }
}

#[tonic::async_trait]
impl NodeAttestor for K8sPsatAttestor {
    fn name(&self) -> &'static str {
        mayfly::k8s_psat::NAME
    }

    fn can_reattest(&self) -> bool {
        true
    }

    async fn evidence(&self) -> Result<Zeroizing<Vec<u8>>, AttestError> {
        let token = self.read_token()?;
        let evidence = K8sPsatEvidence {
            cluster: self.cluster.to_string(),
            token: token.as_str().to_owned(),
        };
        let bytes = Zeroizing::new(evidence.encode_to_vec());
        // The protobuf struct holds a copy of the token: wipe it.
        let mut token_copy = evidence.token;
        zeroize::Zeroize::zeroize(&mut token_copy);
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn evidence_carries_the_cluster_and_the_current_token() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "first.token.value\n").unwrap();
        let a = K8sPsatAttestor::new("prod".parse().unwrap(), path.clone());
        assert!(a.can_reattest());
        let e = K8sPsatEvidence::decode(a.evidence().await.unwrap().as_slice()).unwrap();
        assert_eq!(
            (e.cluster.as_str(), e.token.as_str()),
            ("prod", "first.token.value")
        );
        // The kubelet rotates the file: the next attestation reads the new one.
        std::fs::write(&path, "second.token.value").unwrap();
        let e = K8sPsatEvidence::decode(a.evidence().await.unwrap().as_slice()).unwrap();
        assert_eq!(e.token, "second.token.value");
        std::fs::write(&path, "  \n").unwrap();
        assert!(a.evidence().await.is_err());
        let missing = K8sPsatAttestor::new("prod".parse().unwrap(), dir.path().join("nope"));
        let err = missing.evidence().await.unwrap_err().to_string();
        assert!(err.contains("projected"), "{err}");
    }
}
