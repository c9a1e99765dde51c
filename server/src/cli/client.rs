//! A small HTTP/1.1 client for the admin API over its Unix socket: one
//! connection per request, JSON in and out, API errors turned into
//! [`ClientError::Api`] with the server's code and message.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::UnixStream;

/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one request may take, answer included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a request to the admin API failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// Nothing answers on the socket.
    #[error(
        "cannot connect to the admin API at {}: {reason} (is the server running? start it with `mayfly-server run`, or pass --socket-path)",
        socket.display()
    )]
    Connect {
        /// The socket.
        socket: PathBuf,
        /// Why (part of the message rather than a `source`, so that it is
        /// printed once).
        reason: std::io::Error,
    },
    /// The server answered with an error.
    #[error("{message}")]
    Api {
        /// HTTP status.
        status: StatusCode,
        /// The error code (`invalid_argument`, `not_found`, ...).
        code: String,
        /// The server's message.
        message: String,
        /// The whole answer, for commands that print per-item results.
        body: Value,
    },
    /// The exchange broke off or the answer is not what the API sends.
    #[error("admin API at {}: {message}", socket.display())]
    Protocol {
        /// The socket.
        socket: PathBuf,
        /// What went wrong.
        message: String,
    },
}

/// A client for one admin socket.
#[derive(Debug, Clone)]
pub struct AdminClient {
    socket: PathBuf,
}

/// A raw answer: status, content type and body.
#[derive(Debug)]
pub struct RawResponse {
    /// HTTP status.
    pub status: StatusCode,
    /// The body.
    pub body: Bytes,
}

/// Percent-encodes `s` for use as one path segment or query value.
pub fn encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

impl AdminClient {
    /// A client for the socket at `socket`.
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_owned(),
        }
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn protocol(&self, message: impl Into<String>) -> ClientError {
        ClientError::Protocol {
            socket: self.socket.clone(),
            message: message.into(),
        }
    }

    /// Sends one request and reads the whole answer, whatever its status.
    pub async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<&Value>,
    ) -> Result<RawResponse, ClientError> {
        let connect = |reason| ClientError::Connect {
            socket: self.socket.clone(),
            reason,
        };
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, UnixStream::connect(&self.socket))
            .await
            .map_err(|_| {
                connect(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connection timed out",
                ))
            })?
            .map_err(connect)?;
        let exchange = async {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| self.protocol(format!("HTTP handshake failed: {e}")))?;
            let driver = tokio::spawn(conn);
            let payload = match body {
                Some(v) => Bytes::from(
                    serde_json::to_vec(v)
                        .map_err(|e| self.protocol(format!("encoding the request: {e}")))?,
                ),
                None => Bytes::new(),
            };
            let mut req = Request::builder()
                .method(method.clone())
                .uri(path_and_query)
                .header(header::HOST, "localhost")
                .header(header::ACCEPT, "application/json");
            if body.is_some() {
                req = req.header(header::CONTENT_TYPE, "application/json");
            }
            let req = req
                .body(Full::new(payload))
                .map_err(|e| self.protocol(format!("building the request: {e}")))?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| self.protocol(format!("{method} {path_and_query}: {e}")))?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| self.protocol(format!("reading the answer: {e}")))?
                .to_bytes();
            driver.abort();
            Ok(RawResponse { status, body })
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| self.protocol(format!("{method} {path_and_query} timed out")))?
    }

    /// Sends a request and parses a JSON answer; a non-2xx answer becomes
    /// [`ClientError::Api`].
    pub async fn json(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let raw = self.send(method, path_and_query, body).await?;
        let value: Value = serde_json::from_slice(&raw.body).map_err(|e| {
            self.protocol(format!(
                "answered {} with a body that is not JSON ({e}): {}",
                raw.status,
                String::from_utf8_lossy(&raw.body)
            ))
        })?;
        if raw.status.is_success() {
            return Ok(value);
        }
        Err(api_error(raw.status, value))
    }

    /// `GET` returning JSON.
    pub async fn get(&self, path_and_query: &str) -> Result<Value, ClientError> {
        self.json(Method::GET, path_and_query, None).await
    }

    /// `POST` with a JSON body (or none), returning JSON.
    pub async fn post(&self, path: &str, body: Option<&Value>) -> Result<Value, ClientError> {
        self.json(Method::POST, path, body).await
    }

    /// `GET` returning text (for PEM documents); a non-2xx answer becomes
    /// [`ClientError::Api`].
    pub async fn get_text(&self, path_and_query: &str) -> Result<String, ClientError> {
        let raw = self.send(Method::GET, path_and_query, None).await?;
        if !raw.status.is_success() {
            let value = serde_json::from_slice(&raw.body).unwrap_or(Value::Null);
            return Err(api_error(raw.status, value));
        }
        String::from_utf8(raw.body.to_vec()).map_err(|_| self.protocol("the answer is not UTF-8"))
    }
}

fn api_error(status: StatusCode, body: Value) -> ClientError {
    let code = body["error"]["code"]
        .as_str()
        .unwrap_or("unknown")
        .to_owned();
    let message = body["error"]["message"]
        .as_str()
        .map_or_else(|| format!("the server answered {status}"), str::to_owned);
    ClientError::Api {
        status,
        code,
        message,
        body,
    }
}
