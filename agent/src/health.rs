//! The agent's health endpoints on `health_address` (default
//! `127.0.0.1:8088`): `GET /healthz` answers 200 while the process runs;
//! `GET /readyz` answers 200 when the agent is attested, has synced with the
//! server and holds a valid SVID, and 503 otherwise. Both carry a JSON body
//! ([`HealthBody`]) with the state that matters to an operator: the agent's
//! SPIFFE ID and SVID expiry, whether the server is reachable and when it
//! last answered, how many entries, SVIDs and authorities the agent holds,
//! and whether it needs a new join token.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use mayfly::clock::Clock;
use serde::Serialize;

use crate::cache::Cache;
use crate::client::ServerClient;

/// What the endpoints read.
#[derive(Debug, Clone)]
pub struct HealthState {
    /// The node API client (agent SVID, reachability).
    pub client: ServerClient,
    /// The Workload API's cache.
    pub cache: Cache,
    /// The time source.
    pub clock: Arc<dyn Clock>,
}

/// The JSON body of both endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct HealthBody {
    /// `ok`, or `not ready` with [`HealthBody::reason`].
    pub status: String,
    /// Why the agent is not ready (only from `/readyz`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The agent's SPIFFE ID, once attested.
    pub agent_id: Option<String>,
    /// NotAfter of the agent SVID, RFC 3339.
    pub svid_expires_at: Option<String>,
    /// Whether the last exchange with the server succeeded.
    pub server_reachable: bool,
    /// When the server last answered, RFC 3339.
    #[serde(default)]
    pub last_server_contact: Option<String>,
    /// Authorized entries held.
    pub entries: usize,
    /// Valid X.509-SVIDs held for entries.
    #[serde(default)]
    pub svids: usize,
    /// X.509 authorities (CA certificates) in the trust bundle.
    #[serde(default)]
    pub x509_authorities: usize,
    /// JWT signing keys in the trust bundle.
    #[serde(default)]
    pub jwt_authorities: usize,
    /// True when only an operator can bring the agent back: its SVID expired (or the server
    /// refused it) and a join-token agent cannot attest again by itself.
    #[serde(default)]
    pub needs_join_token: bool,
}

/// A structured log field for machines (and people grepping): what an operator must do.
pub const OPERATOR_ACTION: &str = "restart the agent with a new join token";

/// What an operator must do when a join-token agent's SVID expired.
pub fn expired_join_token_message(expired_at: time::OffsetDateTime) -> String {
    format!(
        "the agent SVID expired at {}; join_token agents cannot re-attest: generate a new token \
         with `mayfly-server token generate` and start the agent with --join-token",
        rfc3339(expired_at)
    )
}

/// Whether an agent with this SPIFFE ID attested with a join token (and so cannot attest
/// again by itself).
pub fn is_join_token_agent(agent_id: &mayfly::SpiffeId) -> bool {
    agent_id.to_string().contains("/mayfly/agent/join_token/")
}

impl HealthState {
    /// The body, and why the agent is not ready (`None` when ready).
    pub fn check(&self) -> (HealthBody, Option<String>) {
        let now = self.clock.now();
        let identity = self.client.identity();
        let snapshot = self.cache.current();
        let rejected = self.client.rejected();
        let mut needs_join_token = false;
        let reason = match &identity {
            None => Some("the agent has not attested yet".to_owned()),
            Some(svid) if now >= svid.expires_at => {
                if is_join_token_agent(&svid.spiffe_id) {
                    needs_join_token = true;
                    Some(expired_join_token_message(svid.expires_at))
                } else {
                    Some(format!(
                        "the agent SVID expired at {}; the agent is attesting again",
                        rfc3339(svid.expires_at)
                    ))
                }
            }
            Some(svid) if !svid.is_valid_at(now) => Some(format!(
                "the agent SVID is not valid before {}; check the clock",
                rfc3339(svid.not_before)
            )),
            Some(svid) if rejected.is_some() => {
                needs_join_token = is_join_token_agent(&svid.spiffe_id);
                rejected
            }
            Some(_) if !snapshot.ready => {
                Some("the agent has not synced with the server yet".to_owned())
            }
            Some(_) => None,
        };
        let bundle = snapshot.bundle.as_deref();
        let body = HealthBody {
            status: if reason.is_none() { "ok" } else { "not ready" }.to_owned(),
            reason: None,
            agent_id: identity.as_ref().map(|s| s.spiffe_id.to_string()),
            svid_expires_at: identity.as_ref().map(|s| rfc3339(s.expires_at)),
            server_reachable: self.client.is_reachable(),
            last_server_contact: self.client.last_contact().map(rfc3339),
            entries: snapshot.entries.len(),
            svids: snapshot
                .svids
                .values()
                .filter(|s| s.is_valid_at(now))
                .count(),
            x509_authorities: bundle.map_or(0, |b| b.x509_authorities.len()),
            jwt_authorities: bundle.map_or(0, |b| b.jwt_authorities.len()),
            needs_join_token,
        };
        (body, reason)
    }
}

/// `t` as RFC 3339.
pub fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

async fn healthz(State(state): State<HealthState>) -> Json<HealthBody> {
    let (mut body, _) = state.check();
    body.status = "ok".to_owned();
    Json(body)
}

async fn readyz(State(state): State<HealthState>) -> (StatusCode, Json<HealthBody>) {
    let (mut body, reason) = state.check();
    match reason {
        None => (StatusCode::OK, Json(body)),
        Some(r) => {
            body.reason = Some(r);
            (StatusCode::SERVICE_UNAVAILABLE, Json(body))
        }
    }
}

/// The health routes.
pub fn app(state: HealthState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// Binds `address` (port 0 picks a free port), so that a taken port is an
/// error at start.
pub async fn bind(address: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    tracing::info!(address = %listener.local_addr()?, "health endpoints listening");
    Ok(listener)
}

/// Serves [`app`] on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: HealthState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attest::AgentSvid;
    use crate::client::{ClientError, Transport};
    use http_body_util::BodyExt as _;
    use mayfly::TrustDomain;
    use mayfly::clock::ManualClock;
    use mayfly::x509::{CaParams, SvidParams, VerifiedCsr, X509Authority, new_key_and_csr};
    use time::{Duration, OffsetDateTime};
    use tower::ServiceExt as _;

    #[derive(Debug)]
    struct NoTransport;
    impl Transport for NoTransport {
        fn channel(
            &self,
            _: Option<&AgentSvid>,
            _: bool,
        ) -> Result<tonic::transport::Channel, ClientError> {
            Err(ClientError::NoIdentity)
        }
    }

    async fn get(app: Router, path: &str) -> (StatusCode, HealthBody) {
        let resp = app
            .oneshot(
                http::Request::get(path)
                    .body(axum::body::Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn ready_only_when_attested_synced_and_valid() {
        let now = OffsetDateTime::now_utc();
        let td = TrustDomain::new("example.org").unwrap();
        let clock = ManualClock::new(now);
        let client = ServerClient::new(td.clone(), Arc::new(NoTransport));
        let cache = Cache::new();
        let state = HealthState {
            client: client.clone(),
            cache: cache.clone(),
            clock: Arc::new(clock.clone()),
        };

        let (code, body) = get(app(state.clone()), "/healthz").await;
        assert_eq!((code, body.status.as_str()), (StatusCode::OK, "ok"));
        let (code, body) = get(app(state.clone()), "/readyz").await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.reason.unwrap().contains("attested"));
        assert_eq!(body.agent_id, None);

        let ca = X509Authority::generate(
            &CaParams {
                trust_domain: td.clone(),
                ttl: Duration::hours(24),
                subject: "T".into(),
            },
            now,
        )
        .unwrap();
        let k = new_key_and_csr().unwrap();
        let id = mayfly::SpiffeId::new("spiffe://example.org/mayfly/agent/join_token/t").unwrap();
        let der = ca
            .sign_svid(
                &VerifiedCsr::from_der(&k.csr_der).unwrap(),
                &SvidParams {
                    spiffe_id: &id,
                    dns_names: &[],
                    ttl: Duration::hours(1),
                },
                now,
            )
            .unwrap()
            .der;
        client.set_identity(AgentSvid::new(vec![der], k.key_pkcs8).unwrap());
        let (code, body) = get(app(state.clone()), "/readyz").await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.reason.unwrap().contains("synced"));
        assert_eq!(body.agent_id.as_deref(), Some(id.to_string().as_str()));

        cache.update(|s| s.ready = true);
        let (code, body) = get(app(state.clone()), "/readyz").await;
        assert_eq!(code, StatusCode::OK, "{body:?}");
        assert_eq!(body.status, "ok");
        assert!(body.svid_expires_at.is_some());
        assert!(!body.server_reachable);
        assert_eq!(body.entries, 0);

        assert!(!body.needs_join_token);

        // The agent SVID expired (the host slept, or the server was down too long): a
        // join-token agent says it needs a new token.
        let expiry = client.identity().unwrap().expires_at;
        clock.set(expiry - Duration::seconds(1));
        assert_eq!(get(app(state.clone()), "/readyz").await.0, StatusCode::OK);
        clock.set(expiry);
        let (code, body) = get(app(state.clone()), "/readyz").await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.needs_join_token);
        assert_eq!(
            body.reason.as_deref(),
            Some(expired_join_token_message(expiry).as_str())
        );
        assert!(
            body.reason
                .unwrap()
                .contains("join_token agents cannot re-attest: generate a new token with `mayfly-server token generate` and start the agent with --join-token")
        );
        // Alive all the same.
        assert_eq!(get(app(state), "/healthz").await.0, StatusCode::OK);
    }
}
