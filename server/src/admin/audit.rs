//! Records every admin request in the audit log (except `GET /healthz` and
//! `GET /v1/openapi.json`): who called (the [`AdminCaller`]), what
//! (`admin.<METHOD> <route>`), on what (the path parameters), the decision
//! (`deny` for 401 and 403 answers, `allow` otherwise), the result and the
//! error message and policy reasons from the error body.
//!
//! If the record cannot be stored, the answer becomes a 500 saying so:
//! the operation may have happened, but nothing it produced (a minted
//! credential, a token) is handed out unaudited.

use axum::body::Body;
use axum::extract::{FromRequestParts as _, MatchedPath, RawPathParams, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse as _, Response};
use http_body_util::BodyExt as _;
use serde::Deserialize;

use super::caller::AdminCaller;
use super::error::ApiError;
use super::{AppState, blocking};
use crate::audit::{Actor, ActorKind, AuditEvent, Decision, Outcome};

/// The largest error body read for the audit message. Error bodies are
/// small, except a failed batch's per-item results, which are bounded by
/// the request body limit.
const MAX_ERROR_BODY: usize = 4 * super::BODY_LIMIT;

/// Requests that are not audited: probes and the API description.
fn unaudited(method: &Method, path: &str) -> bool {
    method == Method::GET && matches!(path, "/healthz" | "/v1/openapi.json")
}

#[derive(Deserialize)]
struct Envelope {
    error: Body_,
}

#[derive(Deserialize)]
struct Body_ {
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    reasons: Vec<String>,
}

/// The middleware (install inside `caller::attach`).
pub async fn record(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    if unaudited(&method, req.uri().path()) {
        return next.run(req).await;
    }
    let (mut parts, body) = req.into_parts();
    let route = parts
        .extensions
        .get::<MatchedPath>()
        .map_or_else(|| parts.uri.path().to_owned(), |m| m.as_str().to_owned());
    let caller = parts.extensions.get::<AdminCaller>().cloned();
    let target = RawPathParams::from_request_parts(&mut parts, &state)
        .await
        .ok()
        .map(|p| {
            p.iter()
                .map(|(_, v)| v.to_owned())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .filter(|t| !t.is_empty());
    let resp = next.run(Request::from_parts(parts, body)).await;

    let status = resp.status();
    let (resp, message, reasons) = if status.is_client_error() || status.is_server_error() {
        let (parts, body) = resp.into_parts();
        let bytes = match http_body_util::Limited::new(body, MAX_ERROR_BODY)
            .collect()
            .await
        {
            Ok(c) => c.to_bytes(),
            Err(e) => {
                let text = serde_json::json!({ "error": {
                    "code": "internal",
                    "message": format!("cannot read the error answer: {e}"),
                }});
                bytes::Bytes::from(text.to_string())
            }
        };
        let parsed = serde_json::from_slice::<Envelope>(&bytes).ok();
        let (message, reasons) = parsed.map_or_else(
            || (Some(format!("HTTP {}", status.as_u16())), Vec::new()),
            |e| (e.error.message, e.error.reasons),
        );
        let mut resp = Response::from_parts(parts, Body::from(bytes));
        // The body was re-wrapped: let hyper compute its length again.
        resp.headers_mut()
            .remove(axum::http::header::CONTENT_LENGTH);
        (resp, message, reasons)
    } else {
        (resp, None, Vec::new())
    };

    let actor = match &caller {
        Some(c) => Actor::new(ActorKind::Operator, c.id(), c.authenticated_by),
        None => Actor::new(ActorKind::Operator, "unknown", "none"),
    };
    let mut event =
        AuditEvent::ok(actor, format!("admin.{method} {route}")).detail("status", status.as_u16());
    if let Some(pid) = caller.and_then(|c| c.pid) {
        event = event.detail("pid", pid);
    }
    event.target = target;
    event.decision = if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
        Decision::Deny
    } else {
        Decision::Allow
    };
    event.result = if status.is_success() {
        Outcome::Ok
    } else {
        Outcome::Error
    };
    event.message = message;
    event.reasons = reasons;
    match blocking(state, move |s| s.audit(event)).await {
        Ok(()) => resp,
        Err(e) => ApiError::internal(format!(
            "the request was carried out but could not be recorded in the audit log, so its result is withheld: {}",
            e.message
        ))
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use axum::Router;
    use axum::http::Request as HttpRequest;
    use axum::routing::post;
    use tower::ServiceExt as _;

    use super::*;
    use crate::error::ServiceError;

    async fn denied() -> ApiError {
        ApiError::from(ServiceError::PolicyDenied {
            message: "operators may not ban agents".into(),
            reasons: vec!["policy0".into(), "no-bans".into()],
        })
    }

    #[tokio::test]
    async fn a_policy_denial_is_recorded_as_deny_with_its_reasons_and_caller() {
        let (state, _clock, _dir) = crate::service::sign::tests::test_state();
        let app: Router = Router::new()
            .route("/v1/agents/{id}/ban", post(denied))
            .route("/healthz", axum::routing::get(|| async { "ok" }))
            .layer(axum::middleware::from_fn_with_state(
                Arc::clone(&state),
                record,
            ))
            .layer(axum::middleware::from_fn(super::super::caller::attach))
            .with_state(Arc::clone(&state));
        let req = |method: &str, uri: &str| {
            let mut r = HttpRequest::builder()
                .method(method)
                .uri(uri)
                .body(Body::empty())
                .unwrap();
            r.extensions_mut()
                .insert(axum::extract::ConnectInfo(AdminCaller::unix(
                    1234,
                    Some(99),
                )));
            r
        };
        let resp = app
            .clone()
            .oneshot(req("POST", "/v1/agents/mayfly%2Fagent%2Fx/ban"))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v["error"]["reasons"],
            serde_json::json!(["policy0", "no-bans"])
        );
        // Probes are not recorded.
        app.oneshot(req("GET", "/healthz")).await.unwrap();

        let records = state.store.list_audit(0, 10).unwrap();
        assert_eq!(records.len(), 1, "{records:?}");
        let e = &records[0].event;
        assert_eq!(e.actor.id, "unix:uid:1234");
        assert_eq!(e.actor.authenticated_by, "unix_peer_credentials");
        assert_eq!(e.action, "admin.POST /v1/agents/{id}/ban");
        assert_eq!(e.target.as_deref(), Some("mayfly/agent/x"));
        assert_eq!(e.decision, Decision::Deny);
        assert_eq!(e.result, Outcome::Error);
        assert_eq!(e.reasons, vec!["policy0".to_owned(), "no-bans".to_owned()]);
        assert_eq!(e.message.as_deref(), Some("operators may not ban agents"));
        assert_eq!(e.details["pid"], 99);
        assert_eq!(e.details["status"], 403);
    }
}
