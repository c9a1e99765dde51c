//! A mutual-TLS server whose identity and trust come from the SPIFFE
//! Workload API. It accepts clients whose SPIFFE ID is in `--allow-id`, and
//! answers each connection with one line:
//!
//! ```text
//! server=<own SPIFFE ID> client=<client SPIFFE ID> client_serial=<hex> client_ca=<hex>
//! ```
//!
//! Rotated SVIDs and bundles are picked up without a restart: every
//! handshake uses the source's current SVID and bundle.
//!
//! `mtls_server --listen 127.0.0.1:8443 --allow-id spiffe://example.org/client [--socket PATH] [--spiffe-id ID]`

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::Parser;
use mayfly_examples::{ServerArgs, endpoint, summarize, x509_source};
use spiffe_rustls::{LocalOnly, authorizer, mtls_server};
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

/// mTLS server authenticated by SPIFFE X.509-SVIDs from the Workload API.
#[derive(Debug, Parser)]
struct Args {
    #[command(flatten)]
    server: ServerArgs,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse().server;
    let endpoint = endpoint(args.socket.as_deref())?;
    let source = x509_source(&endpoint, args.spiffe_id.as_deref()).await?;
    let own = source.svid().context("no usable X.509-SVID")?;
    let own_id = own.spiffe_id().to_string();
    let config = mtls_server(source.clone())
        .authorize(
            authorizer::exact(args.allow_id.iter().map(String::as_str))
                .context("invalid --allow-id")?,
        )
        .trust_domain_policy(LocalOnly(own.spiffe_id().trust_domain().clone()))
        .build()
        .context("cannot build the TLS server configuration")?;
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    eprintln!(
        "mtls_server: {own_id} listening on {} (accepting {})",
        listener.local_addr()?,
        args.allow_id.join(", ")
    );

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (tcp, peer) = accepted?;
                let acceptor = acceptor.clone();
                let own_id = own_id.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve(acceptor, tcp, &own_id).await {
                        eprintln!("mtls_server: {peer}: {e:#}");
                    }
                });
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
        }
    }
    source.shutdown().await;
    Ok(())
}

/// One connection: handshake (the verifier has checked the client's chain
/// against the current bundle and its SPIFFE ID against `--allow-id`), then
/// the answer line.
async fn serve(acceptor: TlsAcceptor, tcp: TcpStream, own_id: &str) -> Result<()> {
    let mut tls = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp))
        .await
        .context("handshake timed out")?
        .context("handshake failed")?;
    let client_cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .context("the client presented no certificate")?;
    let client = summarize(client_cert.as_ref())?;
    let line = format!(
        "server={own_id} client={} client_serial={} client_ca={}\n",
        client.spiffe_id, client.serial, client.ca
    );
    tls.write_all(line.as_bytes()).await?;
    tls.shutdown().await?;
    Ok(())
}
