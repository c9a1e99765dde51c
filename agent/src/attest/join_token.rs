//! The `join_token` attestor: a single-use bearer secret an operator created
//! with `mayfly-server token generate`. Its assurance is low and it cannot
//! attest again: once the agent SVID it bought has expired or been rejected,
//! the agent needs a new token.

use serde::Deserialize;
use zeroize::Zeroizing;

use super::{AttestError, NodeAttestor};

/// A join token (secret). Its `Debug` is redacted and it is zeroized on drop.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken(Zeroizing<String>);

impl JoinToken {
    /// Wraps a token; surrounding white space is removed. `None` when empty.
    pub fn new(token: Zeroizing<String>) -> Option<Self> {
        let trimmed = token.trim();
        if trimmed.is_empty() {
            None
        } else if trimmed.len() == token.len() {
            Some(Self(token))
        } else {
            Some(Self(Zeroizing::new(trimmed.to_owned())))
        }
    }

    /// The secret itself; only for sending it to the server.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JoinToken(<redacted>)")
    }
}

impl<'de> Deserialize<'de> for JoinToken {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Zeroizing::new(String::deserialize(d)?);
        Self::new(s).ok_or_else(|| serde::de::Error::custom("join_token must not be empty"))
    }
}

/// Presents a join token as evidence.
#[derive(Debug, Clone)]
pub struct JoinTokenAttestor {
    token: JoinToken,
}

impl JoinTokenAttestor {
    /// The attestor's name on the wire.
    pub const NAME: &'static str = "join_token";

    /// An attestor presenting `token`.
    pub fn new(token: JoinToken) -> Self {
        Self { token }
    }
}

#[tonic::async_trait]
impl NodeAttestor for JoinTokenAttestor {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    async fn evidence(&self) -> Result<Zeroizing<Vec<u8>>, AttestError> {
        Ok(Zeroizing::new(self.token.expose().as_bytes().to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn evidence_is_the_token_and_debug_is_redacted() {
        let token = JoinToken::new(Zeroizing::new(" s3cret-token\n".to_owned())).unwrap();
        assert_eq!(token.expose(), "s3cret-token");
        let attestor = JoinTokenAttestor::new(token.clone());
        assert_eq!(attestor.name(), "join_token");
        assert_eq!(
            attestor.evidence().await.unwrap().as_slice(),
            b"s3cret-token"
        );
        assert!(!format!("{token:?} {attestor:?}").contains("s3cret"));
        assert!(attestor.answer_challenge(b"x", b"csr").await.is_err());
        assert!(JoinToken::new(Zeroizing::new("  ".to_owned())).is_none());
    }
}
