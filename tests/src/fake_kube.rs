//! A local HTTPS server that answers the Kubernetes API calls Mayfly makes
//! (TokenReview, get pod, get node, ConfigMaps) the way a real API server
//! does: the same paths, JSON shapes, status codes and `Status` errors, and
//! the same TokenReview semantics (audiences intersected with the token's,
//! expired tokens and tokens of deleted pods refused with `error`). No
//! cluster is available to the tests; this is what stands in for one.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, Result};
use base64::Engine as _;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use serde_json::{Value, json};

/// A service account token the fake cluster issued.
#[derive(Debug, Clone)]
pub struct FakeToken {
    /// `(namespace, name)` of the service account.
    pub service_account: (String, String),
    /// The pod it is bound to: `(name, uid)`.
    pub pod: (String, String),
    /// Its `aud` claim.
    pub audiences: Vec<String>,
    /// Whether it has expired.
    pub expired: bool,
}

/// What the fake cluster holds.
#[derive(Debug, Default)]
pub struct KubeState {
    /// The bearer token Mayfly's server must present.
    pub client_token: String,
    /// Tokens by value.
    pub tokens: HashMap<String, FakeToken>,
    /// Pods by `(namespace, name)`.
    pub pods: HashMap<(String, String), Value>,
    /// Nodes by name.
    pub nodes: HashMap<String, Value>,
    /// ConfigMaps by `(namespace, name)`.
    pub configmaps: HashMap<(String, String), Value>,
    /// Every TokenReview request body received.
    pub reviews: Vec<Value>,
}

/// The running fake API server.
#[derive(Debug)]
pub struct FakeKube {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The CA certificate (PEM) that signed its serving certificate.
    pub ca_pem: String,
    /// Its state; change it at any time.
    pub state: Arc<Mutex<KubeState>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Full<Bytes>> {
    json_response(
        code,
        &json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code.as_u16(),
        }),
    )
}

fn json_response(code: StatusCode, v: &Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = code;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

impl FakeKube {
    /// Starts the server on 127.0.0.1 with a fresh CA; the client token is
    /// `mayfly-server-sa-token`.
    pub fn start() -> Result<Self> {
        let ca_key = rcgen::KeyPair::generate()?;
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new())?;
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "fake kubernetes CA");
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = p.self_signed(&ca_key)?;
        let key = rcgen::KeyPair::generate()?;
        let mut p = rcgen::CertificateParams::new(vec!["localhost".to_owned()])?;
        p.subject_alt_names
            .push(rcgen::SanType::IpAddress("127.0.0.1".parse()?));
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "kube-apiserver");
        let issuer = rcgen::Issuer::from_ca_cert_der(ca.der(), &ca_key)?;
        let cert = p.signed_by(&key, &issuer)?;

        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )?;
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

        let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let state = Arc::new(Mutex::new(KubeState {
            client_token: "mayfly-server-sa-token".into(),
            ..Default::default()
        }));
        let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let st = Arc::clone(&state);
        let thread = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(std_listener) else {
                    return;
                };
                loop {
                    let (tcp, _) = tokio::select! {
                        _ = &mut stop_rx => return,
                        a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                    };
                    let acceptor = acceptor.clone();
                    let st = Arc::clone(&st);
                    tokio::spawn(async move {
                        let Ok(tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let svc = hyper::service::service_fn(move |req| {
                            let st = Arc::clone(&st);
                            async move { Ok::<_, std::convert::Infallible>(handle(&st, req).await) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                            .await;
                    });
                }
            });
        });
        Ok(Self {
            addr,
            ca_pem: ca.pem(),
            state,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// Writes a kubeconfig for this server (CA data, bearer token) to `path`.
    pub fn write_kubeconfig(&self, path: &Path) -> Result<()> {
        let ca = base64::engine::general_purpose::STANDARD.encode(self.ca_pem.as_bytes());
        let token = self.lock().client_token.clone();
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: https://127.0.0.1:{}\n    certificate-authority-data: {ca}\nusers:\n- name: mayfly-server\n  user:\n    token: {token}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: mayfly-server\ncurrent-context: fake\n",
            self.addr.port()
        );
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, KubeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a node.
    pub fn add_node(&self, name: &str, uid: &str, labels: &[(&str, &str)]) {
        let labels: BTreeMap<_, _> = labels.iter().copied().collect();
        self.lock().nodes.insert(
            name.to_owned(),
            json!({
                "kind": "Node",
                "apiVersion": "v1",
                "metadata": {"name": name, "uid": uid, "labels": labels, "resourceVersion": "1"},
                "spec": {},
                "status": {"nodeInfo": {"kubeletVersion": "v1.33.0"}},
            }),
        );
    }

    /// Adds a pod scheduled on `node`.
    pub fn add_pod(&self, ns: &str, name: &str, uid: &str, node: &str, labels: &[(&str, &str)]) {
        let labels: BTreeMap<_, _> = labels.iter().copied().collect();
        self.lock().pods.insert(
            (ns.to_owned(), name.to_owned()),
            json!({
                "kind": "Pod",
                "apiVersion": "v1",
                "metadata": {"name": name, "namespace": ns, "uid": uid, "labels": labels, "resourceVersion": "1"},
                "spec": {"nodeName": node, "serviceAccountName": "mayfly-agent", "containers": [{"name": "agent", "image": "mayfly-agent:dev"}]},
                "status": {"phase": "Running"},
            }),
        );
    }

    /// Deletes a pod.
    pub fn delete_pod(&self, ns: &str, name: &str) {
        self.lock().pods.remove(&(ns.to_owned(), name.to_owned()));
    }

    /// Issues `token` for a service account, bound to a pod.
    pub fn add_token(&self, token: &str, t: FakeToken) {
        self.lock().tokens.insert(token.to_owned(), t);
    }

    /// The TokenReview request bodies received so far.
    pub fn reviews(&self) -> Vec<Value> {
        self.lock().reviews.clone()
    }

    /// The data of a ConfigMap, if it exists.
    pub fn configmap_data(&self, ns: &str, name: &str) -> Option<Value> {
        self.lock()
            .configmaps
            .get(&(ns.to_owned(), name.to_owned()))
            .map(|c| c["data"].clone())
    }
}

async fn handle(state: &Mutex<KubeState>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return status(StatusCode::BAD_REQUEST, "BadRequest", "unreadable body"),
    };
    let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
    let authorized = parts
        .headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {}", st.client_token));
    if !authorized {
        return status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
    }
    let path = parts.uri.path().to_owned();
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (&parts.method, segs.as_slice()) {
        (&Method::POST, ["apis", "authentication.k8s.io", "v1", "tokenreviews"]) => {
            let Ok(review) = serde_json::from_slice::<Value>(&body) else {
                return status(StatusCode::BAD_REQUEST, "BadRequest", "not JSON");
            };
            st.reviews.push(review.clone());
            let token = review["spec"]["token"].as_str().unwrap_or_default();
            let wanted: Vec<String> = review["spec"]["audiences"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            let st_status = token_status(&st, token, &wanted);
            json_response(
                StatusCode::CREATED,
                &json!({
                    "kind": "TokenReview",
                    "apiVersion": "authentication.k8s.io/v1",
                    "metadata": {"creationTimestamp": null},
                    "spec": review["spec"],
                    "status": st_status,
                }),
            )
        }
        (&Method::GET, ["api", "v1", "namespaces", ns, "pods", name]) => {
            match st.pods.get(&((*ns).to_owned(), (*name).to_owned())) {
                Some(p) => json_response(StatusCode::OK, p),
                None => status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("pods \"{name}\" not found"),
                ),
            }
        }
        (&Method::GET, ["api", "v1", "nodes", name]) => match st.nodes.get(*name) {
            Some(n) => json_response(StatusCode::OK, n),
            None => status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("nodes \"{name}\" not found"),
            ),
        },
        (&Method::GET, ["api", "v1", "namespaces", ns, "configmaps", name]) => {
            match st.configmaps.get(&((*ns).to_owned(), (*name).to_owned())) {
                Some(c) => json_response(StatusCode::OK, c),
                None => status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("configmaps \"{name}\" not found"),
                ),
            }
        }
        (&Method::PATCH, ["api", "v1", "namespaces", ns, "configmaps", name]) => {
            let key = ((*ns).to_owned(), (*name).to_owned());
            let Ok(patch) = serde_json::from_slice::<Value>(&body) else {
                return status(StatusCode::BAD_REQUEST, "BadRequest", "not JSON");
            };
            let Some(cm) = st.configmaps.get_mut(&key) else {
                return status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("configmaps \"{name}\" not found"),
                );
            };
            if let Some(data) = patch["data"].as_object() {
                if !cm["data"].is_object() {
                    cm["data"] = json!({});
                }
                for (k, v) in data {
                    cm["data"][k] = v.clone();
                }
            }
            let cm = cm.clone();
            json_response(StatusCode::OK, &cm)
        }
        (&Method::POST, ["api", "v1", "namespaces", ns, "configmaps"]) => {
            let Ok(mut cm) = serde_json::from_slice::<Value>(&body) else {
                return status(StatusCode::BAD_REQUEST, "BadRequest", "not JSON");
            };
            let name = cm["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let key = ((*ns).to_owned(), name.clone());
            if st.configmaps.contains_key(&key) {
                return status(
                    StatusCode::CONFLICT,
                    "AlreadyExists",
                    &format!("configmaps \"{name}\" already exists"),
                );
            }
            cm["metadata"]["namespace"] = json!(ns);
            cm["metadata"]["uid"] = json!(format!("cm-{name}"));
            cm["kind"] = json!("ConfigMap");
            cm["apiVersion"] = json!("v1");
            st.configmaps.insert(key, cm.clone());
            json_response(StatusCode::CREATED, &cm)
        }
        _ => status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("the server could not find the requested resource ({path})"),
        ),
    }
}

/// The TokenReview `status` a real API server gives for `token` reviewed
/// for `wanted` audiences.
fn token_status(st: &KubeState, token: &str, wanted: &[String]) -> Value {
    let refused =
        |why: &str| json!({"user": {}, "error": format!("[invalid bearer token, {why}]")});
    let Some(t) = st.tokens.get(token) else {
        return refused("square/go-jose: error in cryptographic primitive");
    };
    if t.expired {
        return refused("service account token has expired");
    }
    let overlap: Vec<&String> = t.audiences.iter().filter(|a| wanted.contains(a)).collect();
    if overlap.is_empty() {
        return refused(&format!(
            "token audiences {:?} is invalid for the target audiences {:?}",
            t.audiences, wanted
        ));
    }
    let (ns, sa) = &t.service_account;
    let (pod, pod_uid) = &t.pod;
    match st.pods.get(&(ns.clone(), pod.clone())) {
        Some(p) if p["metadata"]["uid"] == json!(pod_uid) => {}
        _ => return refused(&format!("pod \"{pod}\" not found")),
    }
    json!({
        "authenticated": true,
        "user": {
            "username": format!("system:serviceaccount:{ns}:{sa}"),
            "uid": format!("sa-uid-{sa}"),
            "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{ns}"), "system:authenticated"],
            "extra": {
                "authentication.kubernetes.io/pod-name": [pod],
                "authentication.kubernetes.io/pod-uid": [pod_uid],
                "authentication.kubernetes.io/node-name": [p_node(st, ns, pod)],
            },
        },
        "audiences": overlap,
    })
}

fn p_node(st: &KubeState, ns: &str, pod: &str) -> String {
    st.pods
        .get(&(ns.to_owned(), pod.to_owned()))
        .and_then(|p| p["spec"]["nodeName"].as_str().map(str::to_owned))
        .unwrap_or_default()
}
