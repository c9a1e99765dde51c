//! Scenario 1b, `x509-mint-http`: the admin API's `POST /v1/x509/mint`
//! with a CSR (base64 DER), over the admin Unix socket: HTTP/1.1 with
//! keep-alive, one connection per concurrent client. This is the path to
//! set beside other CAs' HTTP signing APIs: JSON in, PEM out, the caller
//! authorized by its socket credentials and the admin policy, the issued
//! credential and audit records written.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context as _, Result, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

use crate::crypto::Ceiling;
use crate::harness::{Row, Server, TRUST_DOMAIN, Worker, measure_variant};
use crate::scenario::{Csrs, Settings, check_svid};

struct MintWorker {
    sender: SendRequest<Full<Bytes>>,
    spiffe_id: String,
    csrs: Arc<Csrs>,
    index: usize,
    calls: u64,
    check_every: bool,
}

/// An HTTP/1.1 connection to the admin API's Unix socket.
pub async fn connect(socket: &Path) -> Result<SendRequest<Full<Bytes>>> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| format!("cannot connect to {}", socket.display()))?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        // Ends when the worker drops its sender.
        let _ = conn.await;
    });
    Ok(sender)
}

impl Worker for MintWorker {
    async fn call(&mut self) -> Result<()> {
        let csr = STANDARD.encode(self.csrs.get(self.index, self.calls));
        self.calls += 1;
        let body = serde_json::to_vec(&serde_json::json!({
            "spiffe_id": self.spiffe_id,
            "csr": csr,
        }))?;
        let req = http::Request::post("http://localhost/v1/x509/mint")
            .header(http::header::HOST, "localhost")
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))?;
        self.sender.ready().await?;
        let resp = self.sender.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            bail!(
                "POST /v1/x509/mint: {status}: {}",
                String::from_utf8_lossy(&body)
            );
        }
        if self.check_every || self.calls == 1 {
            let v: serde_json::Value =
                serde_json::from_slice(&body).context("the mint answer is not JSON")?;
            let chain = v["svid_chain_pem"]
                .as_str()
                .context("no svid_chain_pem in the mint answer")?;
            let leaf = pem::parse(chain).context("svid_chain_pem is not PEM")?;
            check_svid(leaf.contents(), &self.spiffe_id)?;
            if v.get("private_key_pem").is_some() {
                bail!("the server returned a private key for a request with a CSR");
            }
        }
        Ok(())
    }
}

/// Runs the scenario on a new server; one row per concurrency.
pub async fn run(settings: &Settings, csrs: &Arc<Csrs>, ceiling: Ceiling) -> Result<Vec<Row>> {
    let mut server = Server::start()?;
    let spiffe_id = format!("spiffe://{TRUST_DOMAIN}/bench/minted");
    let mut rows = Vec::new();
    for &c in &settings.concurrencies {
        let mut workers = Vec::with_capacity(c);
        for index in 0..c {
            workers.push(MintWorker {
                sender: connect(&server.admin_socket).await?,
                spiffe_id: spiffe_id.clone(),
                csrs: Arc::clone(csrs),
                index,
                calls: 0,
                check_every: settings.smoke,
            });
        }
        let mut row = measure_variant(
            &mut server,
            "x509-mint-http",
            "POST /v1/x509/mint, CSR",
            workers,
            settings.duration,
        )
        .await?;
        row.ratio_to_ceiling = Some(row.per_second / ceiling.x509_per_second);
        eprintln!("{}", row.progress());
        rows.push(row);
    }
    server.stop();
    Ok(rows)
}
