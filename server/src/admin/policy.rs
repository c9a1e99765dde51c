//! Policy on the admin API: every request is decided from its caller
//! ([`AdminCaller`]) and its operation (the matched route and method, see
//! [`OPERATIONS`]), and `POST /v1/policy/check` dry-runs a decision.

use axum::Json;
use axum::extract::{MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse as _, Response};
use mayfly::entry::{Assurance, Entry, EntryId, EntrySpec};
use mayfly::selector::SelectorSet;
use mayfly::ttl::Ttl;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::caller::AdminCaller;
use super::error::ApiError;
use super::extract::JsonBody;
use super::{AppState, blocking};
use crate::error::{ServiceError, ServiceResult};
use crate::policy::{Action, AdminCall, Decision, Issue, PolicyRequest};
use crate::state::ServerState;
use crate::store::NodeRecord;

/// Every admin operation: `(method, route, operation)`. The operation is
/// the policy action (`Mayfly::Action::"<operation>"`, in the group
/// `Mayfly::Action::"admin"`). A test checks that every route and method of
/// the OpenAPI document (itself checked against `routes()`) is here and
/// that the schema defines every operation.
pub const OPERATIONS: &[(&str, &str, &str)] = &[
    ("GET", "/healthz", "health.read"),
    ("GET", "/v1/openapi.json", "openapi.read"),
    ("POST", "/v1/entries", "entry.create"),
    ("GET", "/v1/entries", "entry.list"),
    ("GET", "/v1/entries/{id}", "entry.show"),
    ("PUT", "/v1/entries/{id}", "entry.update"),
    ("DELETE", "/v1/entries/{id}", "entry.delete"),
    ("POST", "/v1/join-tokens", "token.create"),
    ("GET", "/v1/agents", "agent.list"),
    ("GET", "/v1/agents/{id}", "agent.show"),
    ("POST", "/v1/agents/{id}/ban", "agent.ban"),
    ("POST", "/v1/agents/{id}/unban", "agent.unban"),
    ("POST", "/v1/agents/{id}/evict", "agent.evict"),
    ("GET", "/v1/bundle", "bundle.show"),
    ("GET", "/v1/authorities", "authority.list"),
    (
        "POST",
        "/v1/authorities/{type}/prepare",
        "authority.prepare",
    ),
    (
        "POST",
        "/v1/authorities/{type}/activate",
        "authority.activate",
    ),
    ("POST", "/v1/authorities/{type}/taint", "authority.taint"),
    ("POST", "/v1/authorities/{type}/revoke", "authority.revoke"),
    ("POST", "/v1/x509/mint", "x509.mint"),
    ("POST", "/v1/jwt/mint", "jwt.mint"),
    ("POST", "/v1/revocations", "revocation.create"),
    ("GET", "/v1/revocations", "revocation.list"),
    ("POST", "/v1/policy/check", "policy.check"),
    ("GET", "/v1/audit", "audit.read"),
    ("GET", "/v1/audit/verify", "audit.verify"),
];

/// The operation of `method` on `route`, if any.
pub fn operation(method: &str, route: &str) -> Option<&'static str> {
    OPERATIONS
        .iter()
        .find(|(m, r, _)| *m == method && *r == route)
        .map(|(_, _, op)| *op)
}

fn unauthenticated() -> Response {
    ApiError {
        status: StatusCode::UNAUTHORIZED,
        code: "unauthenticated",
        message: "the admin API caller is unknown (no peer credentials); connect through the admin socket".into(),
        reasons: Vec::new(),
    }
    .into_response()
}

/// Middleware (a route layer, so the route is known): decides the request
/// with the policy in force. No caller → 401; denied → 403
/// `permission_denied` naming the reasons. A route with no operation for
/// this method is left to the router's 405; a route absent from
/// [`OPERATIONS`] is refused.
pub async fn authorize(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(caller) = req.extensions().get::<AdminCaller>().cloned() else {
        return unauthenticated();
    };
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_default();
    let method = req.method().as_str().to_owned();
    let Some(op) = operation(&method, &route) else {
        if OPERATIONS.iter().any(|(_, r, _)| *r == route) {
            return next.run(req).await;
        }
        return ApiError::from(ServiceError::PermissionDenied(format!(
            "{method} {route} has no policy operation; it is refused"
        )))
        .into_response();
    };
    let path = req.uri().path().to_owned();
    let call = AdminCall {
        caller: &caller,
        operation: op,
        method: &method,
        route: &route,
        path: &path,
    };
    let d = state
        .policy
        .decide(&PolicyRequest::Admin(call), state.now());
    if d.allowed {
        tracing::debug!(operation = op, caller = %caller.id(), reasons = %d.reasons_text(), "policy allowed admin operation");
        return next.run(req).await;
    }
    tracing::warn!(operation = op, caller = %caller.id(), reasons = %d.reasons_text(), "policy denied admin operation");
    ApiError::from(ServiceError::PolicyDenied {
        message: format!(
            "policy denies {op} to {}: {}",
            caller.id(),
            d.reasons_text()
        ),
        reasons: d.reasons,
    })
    .into_response()
}

/// Node facts for a dry run of a node that is not stored.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeFacts {
    /// Attestor name, e.g. `x509pop`.
    pub attestor: String,
    /// `low`, `medium` or `high`.
    pub assurance: String,
    /// Node selectors, `type:value`.
    #[serde(default)]
    pub selectors: Vec<String>,
    /// Last full attestation (RFC 3339); default: the decision time.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub attested_at: Option<OffsetDateTime>,
    /// Whether it can re-attest; default false.
    #[serde(default)]
    pub can_reattest: bool,
}

/// `POST /v1/policy/check` body.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckRequest {
    /// `attest_node`, `renew_agent`, `issue_x509`, `issue_jwt` or an admin
    /// operation (decided for the calling operator).
    pub action: String,
    /// A stored agent (SPIFFE ID or the path after the trust domain).
    #[serde(default)]
    pub agent_id: Option<String>,
    /// A stored entry.
    #[serde(default)]
    pub entry_id: Option<String>,
    /// Without `entry_id`: a hypothetical entry with this SPIFFE ID.
    #[serde(default)]
    pub spiffe_id: Option<String>,
    /// JWT audience.
    #[serde(default)]
    pub audience: Vec<String>,
    /// Requested TTL (`5m`); default the entry's or the server default.
    #[serde(default)]
    pub ttl: Option<String>,
    /// Decision time (RFC 3339); default now.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub at: Option<OffsetDateTime>,
    /// Without `agent_id`: the facts of a hypothetical node.
    #[serde(default)]
    pub node: Option<NodeFacts>,
    /// The task id, for issuance; default empty.
    #[serde(default)]
    pub task_id: Option<String>,
}

/// `POST /v1/policy/check` answer.
#[derive(Debug, Clone, Serialize)]
pub struct CheckResponse {
    /// `allow` or `deny`.
    pub decision: &'static str,
    /// The policies that determined it (or the default-deny sentence).
    pub reasons: Vec<String>,
    /// The TTL cap, if a permit that fired has `@max_ttl`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl_cap: Option<String>,
    /// Evaluation errors.
    pub errors: Vec<String>,
}

impl From<Decision> for CheckResponse {
    fn from(d: Decision) -> Self {
        Self {
            decision: if d.allowed { "allow" } else { "deny" },
            reasons: d.reasons,
            ttl_cap: d.ttl_cap.map(|t| t.to_string()),
            errors: d.errors,
        }
    }
}

fn node_for(s: &ServerState, req: &CheckRequest, now: OffsetDateTime) -> ServiceResult<NodeRecord> {
    if let Some(id) = &req.agent_id {
        return s.get_agent(&s.resolve_agent_id(id)?);
    }
    let facts = req.node.as_ref().ok_or_else(|| {
        ServiceError::InvalidArgument(format!(
            "action {} needs agent_id (a stored agent) or node (its facts)",
            req.action
        ))
    })?;
    let assurance: Assurance = facts
        .assurance
        .parse()
        .map_err(|e| ServiceError::InvalidArgument(format!("node.assurance: {e}")))?;
    let mut selectors = SelectorSet::default();
    for sel in &facts.selectors {
        selectors.insert(
            sel.parse()
                .map_err(|e| ServiceError::InvalidArgument(format!("node.selectors: {e}")))?,
        );
    }
    let spiffe_id = mayfly::id::agent_id(s.trust_domain(), &facts.attestor, &["policy-check"])
        .map_err(|e| ServiceError::InvalidArgument(format!("node.attestor: {e}")))?;
    Ok(NodeRecord {
        spiffe_id,
        attestor: facts.attestor.clone(),
        assurance,
        selectors,
        enrolled_aliases: Vec::new(),
        attested_at: facts.attested_at.unwrap_or(now),
        current_serial: String::new(),
        next_serial: None,
        svid_expires_at: now,
        banned: false,
        can_reattest: facts.can_reattest,
    })
}

fn entry_for(s: &ServerState, req: &CheckRequest, node: &NodeRecord) -> ServiceResult<Entry> {
    if let Some(id) = &req.entry_id {
        let id: EntryId = id
            .parse()
            .map_err(|e| ServiceError::InvalidArgument(format!("entry_id: {e}")))?;
        return s.get_entry(&id);
    }
    let spiffe_id = req.spiffe_id.clone().ok_or_else(|| {
        ServiceError::InvalidArgument(format!(
            "action {} needs entry_id (a stored entry) or spiffe_id",
            req.action
        ))
    })?;
    // A registered entry needs a selector; the hypothetical one has none.
    let mut entry = EntrySpec {
        spiffe_id,
        parent_id: node.spiffe_id.to_string(),
        selectors: vec!["policy:check".into()],
        ..Default::default()
    }
    .validate(s.trust_domain(), EntryId::random(), 0)
    .map_err(|e| ServiceError::InvalidArgument(e.to_string()))?;
    entry.selectors.clear();
    Ok(entry)
}

/// Decides `req` as the server would, without doing anything.
pub fn check(s: &ServerState, caller: &AdminCaller, req: &CheckRequest) -> ServiceResult<Decision> {
    let now = req.at.unwrap_or_else(|| s.now());
    let engine = s.policy.engine();
    if !engine.knows_action(&req.action) || req.action == "admin" {
        return Err(ServiceError::InvalidArgument(format!(
            "unknown action {:?}; see `mayfly-server policy schema`",
            req.action
        )));
    }
    let ttl = req
        .ttl
        .as_deref()
        .map(str::parse::<Ttl>)
        .transpose()
        .map_err(|e| ServiceError::InvalidArgument(format!("ttl: {e}")))?;
    let action = Action::from_name(&req.action);
    let decision = match action {
        Action::AttestNode | Action::RenewAgent => {
            let node = node_for(s, req, now)?;
            let r = if action == Action::AttestNode {
                PolicyRequest::Attest(&node)
            } else {
                PolicyRequest::Renew(&node)
            };
            engine.decide(&r, now)
        }
        Action::IssueX509 | Action::IssueJwt => {
            let jwt = action == Action::IssueJwt;
            let node = node_for(s, req, now)?;
            let entry = entry_for(s, req, &node)?;
            let default = if jwt {
                entry.jwt_svid_ttl.unwrap_or(s.config.default_jwt_svid_ttl)
            } else {
                entry
                    .x509_svid_ttl
                    .unwrap_or(s.config.default_x509_svid_ttl)
            };
            engine.decide(
                &PolicyRequest::Issue(Issue {
                    node: &node,
                    entry: &entry,
                    task_id: req.task_id.as_deref().unwrap_or(""),
                    audience: &req.audience,
                    requested_ttl: ttl.unwrap_or(default).as_secs(),
                    jwt,
                }),
                now,
            )
        }
        Action::Admin(op) => {
            let (method, route) = OPERATIONS
                .iter()
                .find(|(_, _, o)| *o == op)
                .map_or(("", ""), |(m, r, _)| (*m, *r));
            engine.decide(
                &PolicyRequest::Admin(AdminCall {
                    caller,
                    operation: &op,
                    method,
                    route,
                    path: route,
                }),
                now,
            )
        }
    };
    Ok(decision)
}

/// `POST /v1/policy/check`: the decision the server would make.
pub async fn check_handler(
    State(state): State<AppState>,
    caller: Option<axum::Extension<AdminCaller>>,
    JsonBody(req): JsonBody<CheckRequest>,
) -> Result<Json<CheckResponse>, ApiError> {
    let caller = caller
        .map(|c| c.0)
        .ok_or_else(|| ApiError::from(ServiceError::Unauthenticated("unknown caller".into())))?;
    let d = blocking(state, move |s| check(s, &caller, &req)).await?;
    Ok(Json(d.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_route_has_an_operation_known_to_the_schema() {
        let doc: serde_json::Value = serde_json::from_str(include_str!("openapi.json")).unwrap();
        let engine = crate::policy::Engine::builtin().unwrap();
        let mut seen = 0;
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                let m = method.to_uppercase();
                if !["GET", "POST", "PUT", "DELETE", "PATCH"].contains(&m.as_str()) {
                    continue;
                }
                let op = operation(&m, path)
                    .unwrap_or_else(|| panic!("no policy operation for {m} {path}"));
                seen += 1;
                assert!(engine.knows_action(op), "schema lacks action {op}");
            }
        }
        assert!(seen >= 20);
        for (_, _, op) in OPERATIONS {
            assert!(engine.knows_action(op), "schema lacks action {op}");
        }
    }
}
