//! The admin API through its router, request by request (`oneshot`), on a
//! real store in a temporary directory.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use http_body_util::BodyExt as _;
use mayfly::clock::SystemClock;
use serde_json::{Value, json};
use tower::ServiceExt as _;

use super::router;
use crate::authority::AuthorityManager;
use crate::config::ServerConfig;
use crate::state::ServerState;
use crate::store::NodeRecord;
use crate::store::sled_store::SledStore;

struct Api {
    state: Arc<ServerState>,
    app: Router,
    _dir: tempfile::TempDir,
}

fn api() -> Api {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::development();
    config.data_dir = dir.path().to_owned();
    let now = time::OffsetDateTime::now_utc();
    let authorities = AuthorityManager::load_or_create(&config, now).unwrap();
    let store = SledStore::open(&dir.path().join("store")).unwrap();
    let state = Arc::new(
        ServerState::new(config, Arc::new(store), Arc::new(SystemClock), authorities).unwrap(),
    );
    Api {
        app: router(Arc::clone(&state)),
        state,
        _dir: dir,
    }
}

impl Api {
    async fn raw(&self, method: Method, uri: &str, body: Option<&str>) -> (StatusCode, Vec<u8>) {
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header("content-type", "application/json")
            .body(body.map_or_else(Body::empty, |b| Body::from(b.to_owned())))
            .unwrap();
        // What the real listener attaches: the peer's credentials.
        req.extensions_mut().insert(axum::extract::ConnectInfo(
            super::caller::AdminCaller::unix(0, Some(1)),
        ));
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, bytes.to_vec())
    }

    async fn call(&self, method: Method, uri: &str, body: Option<Value>) -> (StatusCode, Value) {
        let text = body.map(|b| b.to_string());
        let (status, bytes) = self.raw(method, uri, text.as_deref()).await;
        let v = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            panic!(
                "{uri}: non-JSON answer ({e}): {}",
                String::from_utf8_lossy(&bytes)
            )
        });
        (status, v)
    }
}

const PARENT: &str = "spiffe://example.org/mayfly/agent/join_token/a";

fn spec(path: &str, selector: &str) -> Value {
    json!({
        "spiffe_id": format!("spiffe://example.org/{path}"),
        "parent_id": PARENT,
        "selectors": [selector],
    })
}

fn error_code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn entry_lifecycle_create_show_update_delete() {
    let api = api();
    let (status, v) = api
        .call(
            Method::POST,
            "/v1/entries",
            Some(json!({"entries": [spec("web", "unix:uid:1000")]})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let entry = &v["results"][0]["entry"];
    let id = entry["id"].as_str().unwrap().to_owned();
    assert_eq!(entry["spiffe_id"], "spiffe://example.org/web");
    assert_eq!(entry["scope"], "task");
    assert_eq!(api.state.with_index(|ix| ix.len()), 1);

    let (status, shown) = api
        .call(Method::GET, &format!("/v1/entries/{id}"), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(&shown, entry);

    let mut changed = spec("web", "unix:uid:2000");
    changed["x509_svid_ttl"] = json!("30m");
    let (status, updated) = api
        .call(Method::PUT, &format!("/v1/entries/{id}"), Some(changed))
        .await;
    assert_eq!(status, StatusCode::OK, "{updated}");
    assert_eq!(updated["id"], id.as_str());
    assert_eq!(updated["selectors"], json!(["unix:uid:2000"]));
    assert_eq!(updated["x509_svid_ttl"], "30m");
    assert!(updated["revision"].as_u64() > entry["revision"].as_u64());

    let (status, deleted) = api
        .call(Method::DELETE, &format!("/v1/entries/{id}"), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(deleted["id"], id.as_str());
    let (status, v) = api
        .call(Method::GET, &format!("/v1/entries/{id}"), None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&v), "not_found");
    let (status, _) = api
        .call(Method::DELETE, &format!("/v1/entries/{id}"), None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = api
        .call(
            Method::PUT,
            &format!("/v1/entries/{id}"),
            Some(spec("web", "unix:uid:1")),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn list_filters_and_paginates_over_several_pages() {
    let api = api();
    let mut specs: Vec<Value> = (0..23)
        .map(|i| spec(&format!("w{i:02}"), "unix:uid:1"))
        .collect();
    let mut other_parent = spec("special", "k8s:ns:payments");
    other_parent["parent_id"] = json!("spiffe://example.org/mayfly/agent/join_token/b");
    specs.push(other_parent);
    let (status, v) = api
        .call(
            Method::POST,
            "/v1/entries",
            Some(json!({ "entries": specs })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");

    let mut ids = Vec::new();
    let mut token: Option<String> = None;
    let mut pages = 0;
    loop {
        let uri = match &token {
            Some(t) => format!("/v1/entries?page_size=5&page_token={t}"),
            None => "/v1/entries?page_size=5".to_owned(),
        };
        let (status, v) = api.call(Method::GET, &uri, None).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        let page = v["entries"].as_array().unwrap();
        assert!(page.len() <= 5);
        ids.extend(page.iter().map(|e| e["id"].as_str().unwrap().to_owned()));
        pages += 1;
        match v["next_page_token"].as_str() {
            Some(t) => token = Some(t.to_owned()),
            None => break,
        }
    }
    assert_eq!(pages, 5);
    assert_eq!(ids.len(), 24);
    let mut sorted = ids.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(ids, sorted, "pages are in id order without repeats");

    let (_, v) = api
        .call(Method::GET, "/v1/entries?selector=k8s:ns:payments", None)
        .await;
    assert_eq!(v["entries"].as_array().unwrap().len(), 1);
    assert_eq!(v["entries"][0]["spiffe_id"], "spiffe://example.org/special");
    let (_, v) = api
        .call(
            Method::GET,
            "/v1/entries?parent_id=spiffe%3A%2F%2Fexample.org%2Fmayfly%2Fagent%2Fjoin_token%2Fa",
            None,
        )
        .await;
    assert_eq!(v["entries"].as_array().unwrap().len(), 23);
    let (_, v) = api
        .call(
            Method::GET,
            "/v1/entries?spiffe_id=spiffe://example.org/w07",
            None,
        )
        .await;
    assert_eq!(v["entries"].as_array().unwrap().len(), 1);
    assert!(v["next_page_token"].is_null());

    for bad in [
        "/v1/entries?page_size=5000",
        "/v1/entries?page_token=@@@",
        "/v1/entries?selector=nope",
        "/v1/entries?colour=red",
        "/v1/entries?page_size=many",
    ] {
        let (status, v) = api.call(Method::GET, bad, None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {v}");
        assert_eq!(error_code(&v), "invalid_argument", "{bad}");
    }
}

#[tokio::test]
async fn bad_bodies_are_400_with_the_reason() {
    let api = api();
    let mut with_colour = spec("web", "unix:uid:1");
    with_colour["colour"] = json!("red");
    let (status, v) = api
        .call(
            Method::POST,
            "/v1/entries",
            Some(json!({"entries": [with_colour]})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_code(&v), "invalid_argument");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("colour"),
        "{v}"
    );

    let (status, v) = api
        .call(
            Method::POST,
            "/v1/entries",
            Some(json!({"entries": [], "extra": 1})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        v["error"]["message"].as_str().unwrap().contains("extra"),
        "{v}"
    );

    for body in [
        "{\"entries\": [",
        "not json",
        "",
        "[1,2]",
        "{\"entries\": 5}",
    ] {
        let (status, bytes) = api.raw(Method::POST, "/v1/entries", Some(body)).await;
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body:?}: {v}");
        assert_eq!(error_code(&v), "invalid_argument");
        assert!(!v["error"]["message"].as_str().unwrap().is_empty());
    }

    let (status, v) = api
        .call(
            Method::POST,
            "/v1/entries",
            Some(json!({"entries": [spec("web", "nope")]})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(error_code(&v), "invalid_argument");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("\"nope\""),
        "{v}"
    );
    assert!(
        v["results"][0]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("nope")
    );

    let huge = format!(
        "{{\"entries\": [\"{}\"]}}",
        "x".repeat(super::BODY_LIMIT + 1)
    );
    let (status, bytes) = api.raw(Method::POST, "/v1/entries", Some(&huge)).await;
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(error_code(&v), "payload_too_large");

    let (status, v) = api.call(Method::GET, "/v1/entries/no.such", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    let (status, v) = api.call(Method::GET, "/v1/entries/missing", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&v), "not_found");
    let (status, v) = api.call(Method::GET, "/v1/nothing-here", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&v), "not_found");
    let (status, v) = api.call(Method::PATCH, "/v1/entries", None).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(error_code(&v), "method_not_allowed");
}

#[tokio::test]
async fn duplicates_are_409_and_mixed_batches_207() {
    let api = api();
    let body = json!({"entries": [spec("web", "unix:uid:1")]});
    let (status, _) = api
        .call(Method::POST, "/v1/entries", Some(body.clone()))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, v) = api.call(Method::POST, "/v1/entries", Some(body)).await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    assert_eq!(error_code(&v), "already_exists");

    let mut fixed = spec("db", "unix:uid:2");
    fixed["id"] = json!("db-entry");
    let (status, v) = api
        .call(
            Method::POST,
            "/v1/entries",
            Some(json!({"entries": [fixed.clone(), spec("web", "unix:uid:1")]})),
        )
        .await;
    assert_eq!(status, StatusCode::MULTI_STATUS, "{v}");
    assert_eq!(v["results"][0]["entry"]["id"], "db-entry");
    assert_eq!(v["results"][1]["error"]["code"], "already_exists");
    assert!(v.get("error").is_none());

    fixed["selectors"] = json!(["unix:uid:3"]);
    let (status, v) = api
        .call(
            Method::POST,
            "/v1/entries",
            Some(json!({"entries": [fixed]})),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");

    // Updating an entry into a copy of another is a conflict too.
    let (status, v) = api
        .call(
            Method::PUT,
            "/v1/entries/db-entry",
            Some(spec("web", "unix:uid:1")),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
}

#[tokio::test]
async fn join_token_is_created_and_redeemable_once() {
    let api = api();
    let (status, v) = api
        .call(
            Method::POST,
            "/v1/join-tokens",
            Some(json!({"spiffe_id": "spiffe://example.org/cluster/a", "ttl": "5m"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let token = v["token"].as_str().unwrap().to_owned();
    let id = v["id"].as_str().unwrap();
    assert_eq!(
        v["agent_id"],
        format!("spiffe://example.org/mayfly/agent/join_token/{id}")
    );
    let expires = time::OffsetDateTime::parse(
        v["expires_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert!(expires > time::OffsetDateTime::now_utc() + time::Duration::minutes(4));

    let record = api.state.redeem_join_token(&token).unwrap();
    assert_eq!(record.id, id);
    assert_eq!(
        record.alias.as_deref(),
        Some("spiffe://example.org/cluster/a")
    );
    assert!(api.state.redeem_join_token(&token).is_err());

    let (status, v) = api
        .call(Method::POST, "/v1/join-tokens", Some(json!({})))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    for bad in [
        json!({"ttl": "soon"}),
        json!({"spiffe_id": "nope"}),
        json!({"who": 1}),
    ] {
        let (status, v) = api
            .call(Method::POST, "/v1/join-tokens", Some(bad.clone()))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {v}");
    }
}

fn node(id: &str) -> NodeRecord {
    let now = time::OffsetDateTime::now_utc();
    NodeRecord {
        spiffe_id: mayfly::SpiffeId::new(id).unwrap(),
        attestor: "join_token".into(),
        assurance: mayfly::entry::Assurance::Low,
        selectors: Default::default(),
        enrolled_aliases: vec![],
        attested_at: now,
        current_serial: "0a".into(),
        next_serial: None,
        svid_expires_at: now,
        banned: false,
        can_reattest: false,
    }
}

#[tokio::test]
async fn admin_calls_are_audited_with_the_caller_and_listed() {
    let api = api();
    let (status, _) = api
        .call(Method::POST, "/v1/join-tokens", Some(json!({})))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = api.call(Method::GET, "/v1/entries/nope", None).await;
    assert!(status.is_client_error());
    let (status, v) = api
        .call(Method::GET, "/v1/audit?action=admin&limit=1", None)
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let r = &v["records"][0];
    assert_eq!(r["seq"], 1);
    assert_eq!(r["actor"]["id"], "unix:uid:0");
    assert_eq!(r["actor"]["kind"], "operator");
    assert_eq!(r["action"], "admin.POST /v1/join-tokens");
    assert_eq!(r["decision"], "allow");
    assert_eq!(r["result"], "ok");
    assert_eq!(v["next_after"], 1);
    assert!(!r.to_string().contains("token\":"), "no token value: {r}");

    let (_, v) = api.call(Method::GET, "/v1/audit?after=1", None).await;
    let failed = &v["records"][0];
    assert_eq!(failed["action"], "admin.GET /v1/entries/{id}");
    assert_eq!(failed["target"], "nope");
    assert_eq!(failed["result"], "error");
    assert_eq!(failed["decision"], "allow");
    assert!(
        failed["message"].as_str().unwrap().contains("nope"),
        "{failed}"
    );
    // The first list call is itself recorded (seq 3).
    assert_eq!(v["records"][1]["action"], "admin.GET /v1/audit");

    let (status, v) = api.call(Method::GET, "/v1/audit/verify", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["file_checked"], true, "{v}");
    assert!(v["records"].as_u64().unwrap() >= 4);

    let (status, v) = api
        .call(Method::GET, "/v1/audit?since=yesterday", None)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error_code(&v) == "invalid_argument");
    let (status, _) = api.call(Method::GET, "/v1/audit?limit=1001", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (_, v) = api
        .call(Method::GET, "/v1/audit?since=2999-01-01T00:00:00Z", None)
        .await;
    assert_eq!(v["records"], json!([]));
}

#[tokio::test]
async fn agents_can_be_unbanned() {
    let api = api();
    api.state
        .store
        .put_node(&node("spiffe://example.org/mayfly/agent/join_token/u1"))
        .unwrap();
    let path = "/v1/agents/mayfly%2Fagent%2Fjoin_token%2Fu1";
    let (status, v) = api.call(Method::POST, &format!("{path}/unban"), None).await;
    assert_eq!(status, StatusCode::PRECONDITION_FAILED, "{v}");
    let (status, _) = api.call(Method::POST, &format!("{path}/ban"), None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, v) = api.call(Method::POST, &format!("{path}/unban"), None).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["banned"], false);
    let (status, _) = api
        .call(
            Method::POST,
            "/v1/agents/mayfly%2Fagent%2Fjoin_token%2Fnone/unban",
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, v) = api.call(Method::GET, "/v1/audit?action=admin", None).await;
    let actions: Vec<&str> = v["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        vec![
            "admin.POST /v1/agents/{id}/unban",
            "admin.POST /v1/agents/{id}/ban",
            "admin.POST /v1/agents/{id}/unban",
            "admin.POST /v1/agents/{id}/unban",
        ]
    );
}

#[tokio::test]
async fn agents_show_ban_evict_by_either_id_form() {
    let api = api();
    for bad in [
        "spiffe%3A%2F%2Fexample.org%2Fmayfly%2Fagent%2Fx%2Fnope",
        "mayfly%2Fagent%2Fx%2Fnope",
    ] {
        for action in ["ban", "evict"] {
            let (status, v) = api
                .call(Method::POST, &format!("/v1/agents/{bad}/{action}"), None)
                .await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{action} {bad}: {v}");
            assert_eq!(error_code(&v), "not_found");
        }
        let (status, _) = api
            .call(Method::GET, &format!("/v1/agents/{bad}"), None)
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }

    let id = "spiffe://example.org/mayfly/agent/join_token/abc";
    api.state.store.put_node(&node(id)).unwrap();
    let (status, v) = api.call(Method::GET, "/v1/agents", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["agents"][0]["spiffe_id"], id);
    assert!(v["next_page_token"].is_null());

    let full = "spiffe%3A%2F%2Fexample.org%2Fmayfly%2Fagent%2Fjoin_token%2Fabc";
    let (status, v) = api
        .call(Method::GET, &format!("/v1/agents/{full}"), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["spiffe_id"], id);
    let (status, v) = api
        .call(
            Method::POST,
            "/v1/agents/mayfly%2Fagent%2Fjoin_token%2Fabc/ban",
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["banned"], true);
    assert!(api.state.store.get_node(id).unwrap().unwrap().banned);
    let (status, _) = api
        .call(Method::POST, &format!("/v1/agents/{full}/evict"), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(api.state.store.get_node(id).unwrap().is_none());
    let (status, _) = api
        .call(Method::GET, &format!("/v1/agents/{full}"), None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (status, v) = api
        .call(Method::GET, "/v1/agents/spiffe%3A%2F%2Fother.org%2Fx", None)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
}

#[tokio::test]
async fn x509_mint_without_csr_returns_the_identity_and_a_key() {
    let api = api();
    let (status, v) = api
        .call(
            Method::POST,
            "/v1/x509/mint",
            Some(json!({"spiffe_id": "spiffe://example.org/ops/backup", "ttl": "10m", "dns_names": ["backup.example.org"]})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let chain = pem::parse_many(v["svid_chain_pem"].as_str().unwrap()).unwrap();
    assert_eq!(chain.len(), 1);
    let (_, cert) = x509_parser::parse_x509_certificate(chain[0].contents()).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    assert_eq!(uris, ["spiffe://example.org/ops/backup"]);
    let lifetime =
        cert.validity().not_after.timestamp() - time::OffsetDateTime::now_utc().unix_timestamp();
    assert!((500..=600).contains(&lifetime), "{lifetime}");

    let key = pem::parse(v["private_key_pem"].as_str().unwrap()).unwrap();
    assert_eq!(key.tag(), "PRIVATE KEY");
    // The key is the certificate's.
    let pair = rcgen::KeyPair::try_from(key.contents()).unwrap();
    assert_eq!(
        pair.public_key_raw(),
        &*cert.public_key().subject_public_key.data
    );
    let bundle = pem::parse_many(v["bundle_pem"].as_str().unwrap()).unwrap();
    assert_eq!(
        bundle[0].contents(),
        api.state
            .authorities
            .snapshot()
            .active_x509()
            .unwrap()
            .1
            .cert_der()
    );

    // With a CSR (PEM or base64 DER): no key comes back.
    let k = mayfly::x509::new_key_and_csr().unwrap();
    let csr_pem = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", k.csr_der.clone()));
    use base64::Engine as _;
    let csr_b64 = base64::engine::general_purpose::STANDARD.encode(&k.csr_der);
    for csr in [csr_pem, csr_b64] {
        let (status, v) = api
            .call(
                Method::POST,
                "/v1/x509/mint",
                Some(json!({"spiffe_id": "spiffe://example.org/ops/backup", "csr": csr})),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        assert!(v.get("private_key_pem").is_none());
    }

    for (bad, want) in [
        (
            json!({"spiffe_id": "spiffe://example.org/x", "csr": "garbage!"}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"spiffe_id": "spiffe://other.org/x"}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"spiffe_id": "spiffe://example.org/x", "ttl": "later"}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"spiffe_id": "spiffe://example.org/mayfly/server"}),
            StatusCode::FORBIDDEN,
        ),
        (
            json!({"spiffe_id": "spiffe://example.org/x", "key": "x"}),
            StatusCode::BAD_REQUEST,
        ),
    ] {
        let (status, v) = api
            .call(Method::POST, "/v1/x509/mint", Some(bad.clone()))
            .await;
        assert_eq!(status, want, "{bad}: {v}");
    }
}

#[tokio::test]
async fn jwt_mint_validates_against_the_bundle() {
    let api = api();
    let (status, v) = api
        .call(
            Method::POST,
            "/v1/jwt/mint",
            Some(json!({"spiffe_id": "spiffe://example.org/ops/report", "audience": ["db", "cache"], "ttl": "2m"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let token = v["token"].as_str().unwrap();
    let bundle = api.state.bundle();
    let now = time::OffsetDateTime::now_utc();
    let valid = mayfly::jwt::validate(token, "cache", &[&bundle], now).unwrap();
    assert_eq!(
        valid.spiffe_id.to_string(),
        "spiffe://example.org/ops/report"
    );
    assert_eq!(valid.jti.as_deref(), v["jti"].as_str());
    assert!(valid.expires_at <= now.unix_timestamp() + 121);
    assert!(mayfly::jwt::validate(token, "web", &[&bundle], now).is_err());

    let (status, _) = api
        .call(
            Method::POST,
            "/v1/jwt/mint",
            Some(json!({"spiffe_id": "spiffe://example.org/x", "audience": []})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = api
        .call(
            Method::POST,
            "/v1/jwt/mint",
            Some(json!({"spiffe_id": "spiffe://example.org/x"})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn bundle_and_health() {
    let api = api();
    let (status, v) = api.call(Method::GET, "/v1/bundle", None).await;
    assert_eq!(status, StatusCode::OK);
    let parsed = mayfly::bundle::TrustBundle::from_spiffe_json(
        api.state.trust_domain().clone(),
        v.to_string().as_bytes(),
    )
    .unwrap();
    assert_eq!(parsed.x509_authorities, api.state.bundle().x509_authorities);
    let (status, bytes) = api.raw(Method::GET, "/v1/bundle?format=pem", None).await;
    assert_eq!(status, StatusCode::OK);
    let certs = pem::parse_many(&bytes).unwrap();
    assert_eq!(
        certs[0].contents(),
        api.state
            .authorities
            .snapshot()
            .active_x509()
            .unwrap()
            .1
            .cert_der()
    );
    let (status, _) = api.call(Method::GET, "/v1/bundle?format=der", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let (status, v) = api.call(Method::GET, "/healthz", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["status"], "ok");
    assert_eq!(v["trust_domain"], "example.org");
    assert_eq!(v["entries"], 0);
    assert!(v["ca_not_after"].as_str().is_some());
    assert_eq!(v["authorities"]["x509"][0]["phase"], "active");
    assert_eq!(v["authorities"]["jwt"][0]["phase"], "active");
    assert_eq!(v["authorities"]["x509"][0]["not_after"], v["ca_not_after"]);
    assert!(v["bundle_sequence"].as_u64().is_some());
}

fn authority_shape(a: &Value) {
    let o = a.as_object().unwrap();
    let mut keys: Vec<&str> = o.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        ["id", "not_after", "not_before", "phase", "tainted"],
        "{a}"
    );
    for t in ["not_before", "not_after"] {
        time::OffsetDateTime::parse(
            a[t].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap();
    }
}

#[tokio::test]
async fn authorities_show_prepare_activate_taint_revoke() {
    let api = api();
    let (status, v) = api.call(Method::GET, "/v1/authorities", None).await;
    assert_eq!(status, StatusCode::OK);
    for kind in ["x509", "jwt"] {
        let list = v[kind].as_array().unwrap();
        assert_eq!(list.len(), 1);
        authority_shape(&list[0]);
        assert_eq!(list[0]["phase"], "active");
        assert_eq!(list[0]["tainted"], false);
    }
    for kind in ["x509", "jwt"] {
        let (_, v) = api.call(Method::GET, "/v1/authorities", None).await;
        let first = v[kind][0]["id"].as_str().unwrap().to_owned();
        let url = |op: &str| format!("/v1/authorities/{kind}/{op}");
        let (status, v) = api.call(Method::POST, &url("activate"), None).await;
        assert_eq!(status, StatusCode::PRECONDITION_FAILED, "{v}");
        assert_eq!(error_code(&v), "failed_precondition");
        // No body, or {}.
        let (status, prepared) = api.raw(Method::POST, &url("prepare"), None).await;
        assert_eq!(status, StatusCode::OK);
        let prepared: Value = serde_json::from_slice(&prepared).unwrap();
        authority_shape(&prepared);
        assert_eq!(prepared["phase"], "prepared");
        let (status, v) = api
            .call(Method::POST, &url("prepare"), Some(json!({})))
            .await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(error_code(&v), "already_exists");
        let (status, _) = api
            .call(Method::POST, &url("prepare"), Some(json!({"x": 1})))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let taint = json!({"authority_id": first});
        let (status, v) = api
            .call(Method::POST, &url("taint"), Some(taint.clone()))
            .await;
        assert_eq!(
            status,
            StatusCode::PRECONDITION_FAILED,
            "the active one signs: {v}"
        );
        let (status, active) = api
            .call(Method::POST, &url("activate"), Some(json!({})))
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(active["id"], prepared["id"]);
        assert_eq!(active["phase"], "active");
        let (status, v) = api
            .call(Method::POST, &url("revoke"), Some(taint.clone()))
            .await;
        assert_eq!(status, StatusCode::PRECONDITION_FAILED, "not tainted: {v}");
        let (status, v) = api
            .call(
                Method::POST,
                &url("taint"),
                Some(json!({"authority_id": "nope"})),
            )
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(error_code(&v), "not_found");
        let (status, v) = api
            .call(Method::POST, &url("taint"), Some(taint.clone()))
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            (v["phase"].as_str(), v["tainted"].as_bool()),
            (Some("old"), Some(true))
        );
        let (_, v) = api.call(Method::GET, "/v1/authorities", None).await;
        assert_eq!(v[kind].as_array().unwrap().len(), 2);
        let (status, v) = api
            .call(Method::POST, &url("revoke"), Some(taint.clone()))
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(v["id"], first);
        let (_, v) = api.call(Method::GET, "/v1/authorities", None).await;
        assert_eq!(v[kind].as_array().unwrap().len(), 1);
        assert_eq!(v[kind][0]["id"], prepared["id"]);
    }
    let (status, v) = api
        .call(Method::POST, "/v1/authorities/rsa/prepare", None)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("x509 or jwt")
    );
}

const METHODS: [&str; 5] = ["get", "post", "put", "delete", "patch"];

/// Every routed path is documented, every documented operation is routed,
/// and no undocumented method is accepted on a documented path.
#[tokio::test]
async fn openapi_covers_every_route_and_only_routes() {
    let api = api();
    let (status, doc) = api.call(Method::GET, "/v1/openapi.json", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().unwrap();

    let routed: Vec<&str> = super::routes().into_iter().map(|(p, _)| p).collect();
    for p in &routed {
        assert!(
            paths.contains_key(*p),
            "route {p} is not in the OpenAPI document"
        );
    }
    for (p, item) in paths {
        assert!(
            routed.contains(&p.as_str()),
            "documented path {p} is not routed"
        );
        let concrete = p.replace("{id}", "missing-id").replace("{type}", "x509");
        for m in METHODS {
            let method = Method::from_bytes(m.to_uppercase().as_bytes()).unwrap();
            let (status, _) = api.raw(method, &concrete, Some("{}")).await;
            if item.get(m).is_some() {
                assert_ne!(
                    status,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{m} {p} is documented but not routed"
                );
                let responses = item[m]["responses"].as_object().unwrap();
                assert!(
                    responses.contains_key(status.as_str()),
                    "{m} {p} answered {status}, which the document does not list"
                );
            } else {
                assert_eq!(
                    status,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{m} {p} is routed but not documented"
                );
            }
        }
    }
    // Every $ref resolves.
    fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(r)) = m.get("$ref") {
                    out.push(r);
                }
                m.values().for_each(|v| refs(v, out));
            }
            Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    refs(&doc, &mut all);
    for r in all {
        let pointer = r.trim_start_matches('#');
        assert!(doc.pointer(pointer).is_some(), "dangling $ref {r}");
    }
}

#[tokio::test]
async fn serve_binds_an_owner_only_socket_and_replaces_a_stale_one() {
    use std::os::unix::fs::PermissionsExt as _;
    let api = api();
    let path = api._dir.path().join("sock").join("admin.sock");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    // A stale socket left by a crashed server.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn({
        let state = Arc::clone(&api.state);
        let path = path.clone();
        async move {
            super::serve(state, &path, async {
                let _ = rx.await;
            })
            .await
        }
    });
    let mut client = None;
    for _ in 0..200 {
        if let Ok(c) = crate::cli::client::AdminClient::new(&path)
            .get("/healthz")
            .await
        {
            client = Some(c);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let health = client.expect("server answered");
    assert_eq!(health["status"], "ok");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // A second server on the same socket is refused.
    assert!(super::bind(&path).await.is_err());
    tx.send(()).unwrap();
    task.await.unwrap().unwrap();
    assert!(!path.exists());
    // Something that is not a socket is never replaced.
    std::fs::write(&path, "keep me").unwrap();
    assert!(super::bind(&path).await.is_err());
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "keep me");
}

// --- Policy on the admin API ---

fn use_policy(api: &Api, text: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("local.cedar"), text).unwrap();
    api.state
        .policy
        .configure(crate::policy::PolicySources {
            paths: vec![dir.path().to_owned()],
            default_policy: true,
        })
        .unwrap();
    dir
}

#[tokio::test]
async fn a_policy_forbidding_entry_delete_answers_403_with_the_reason() {
    let api = api();
    let _dir = use_policy(
        &api,
        r#"@id("no-deletes")
forbid (principal, action == Mayfly::Action::"entry.delete", resource);"#,
    );
    let (status, v) = api
        .call(
            Method::POST,
            "/v1/entries",
            Some(json!({"entries": [spec("web", "unix:uid:1000")]})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let id = v["results"][0]["entry"]["id"].as_str().unwrap().to_owned();
    let (status, v) = api
        .call(Method::DELETE, &format!("/v1/entries/{id}"), None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{v}");
    assert_eq!(error_code(&v), "permission_denied");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("no-deletes") && msg.contains("entry.delete"),
        "{msg}"
    );
    assert_eq!(api.state.with_index(|ix| ix.len()), 1, "not deleted");
    // Reading is still allowed.
    let (status, _) = api
        .call(Method::GET, &format!("/v1/entries/{id}"), None)
        .await;
    assert_eq!(status, StatusCode::OK);

    // The refusal is in the audit log: who, what, deny, and the policy.
    let (status, v) = api
        .call(Method::GET, "/v1/audit?action=admin&limit=1000", None)
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let denied: Vec<&Value> = v["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["action"] == "admin.DELETE /v1/entries/{id}")
        .collect();
    assert_eq!(denied.len(), 1, "{v}");
    let r = denied[0];
    assert_eq!(r["decision"], "deny", "{r}");
    assert_eq!(r["result"], "error", "{r}");
    assert_eq!(r["actor"]["id"], "unix:uid:0", "{r}");
    assert_eq!(r["actor"]["kind"], "operator", "{r}");
    assert_eq!(r["target"], id.as_str(), "{r}");
    assert_eq!(r["reasons"], json!(["no-deletes"]), "{r}");
}

#[tokio::test]
async fn an_admin_request_without_a_caller_is_refused() {
    let api = api();
    let req = Request::builder()
        .method(Method::GET)
        .uri("/v1/entries")
        .body(Body::empty())
        .unwrap();
    let resp = api.app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn policy_check_answers_allow_and_deny_with_reasons() {
    let api = api();
    let _dir = use_policy(
        &api,
        r#"@id("payments.business_hours")
forbid (principal is Mayfly::Workload, action, resource is Mayfly::Entry)
when { resource.spiffe_id like "spiffe://example.org/payments/*" && (context.hour < 9 || context.hour >= 17) };"#,
    );
    let node = json!({"attestor": "x509pop", "assurance": "high"});
    let (status, v) = api
        .call(
            Method::POST,
            "/v1/policy/check",
            Some(
                json!({"action": "issue_x509", "spiffe_id": "spiffe://example.org/payments/api",
                        "node": node, "at": "2026-11-23T03:00:00Z"}),
            ),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["decision"], "deny");
    assert_eq!(v["reasons"], json!(["payments.business_hours"]));
    let (status, v) = api
        .call(
            Method::POST,
            "/v1/policy/check",
            Some(
                json!({"action": "issue_x509", "spiffe_id": "spiffe://example.org/payments/api",
                        "node": node, "at": "2026-11-23T10:00:00Z"}),
            ),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["decision"], "allow");
    assert_eq!(v["reasons"], json!(["mayfly.default.issue"]));
    // Admin operations are decided for the caller.
    let (_, v) = api
        .call(
            Method::POST,
            "/v1/policy/check",
            Some(json!({"action": "entry.delete"})),
        )
        .await;
    assert_eq!(v["decision"], "allow", "{v}");
    // Unknown actions and missing facts are the caller's error.
    let (status, v) = api
        .call(
            Method::POST,
            "/v1/policy/check",
            Some(json!({"action": "fly"})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    let (status, _) = api
        .call(
            Method::POST,
            "/v1/policy/check",
            Some(json!({"action": "issue_jwt"})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}
