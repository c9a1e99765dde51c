//! A mutual-TLS client whose identity and trust come from the SPIFFE
//! Workload API. It connects to `--connect` every `--interval` for
//! `--duration` (or until SIGINT/SIGTERM), accepts only a server whose
//! SPIFFE ID is `--server-id`, and prints one line per attempt:
//!
//! ```text
//! ok <server cert serial> <own cert serial> server_ca=<hex> client_ca=<hex>
//! fail <reason>
//! ```
//!
//! (`<own cert serial>` is the one the server saw, so it names exactly the
//! certificate used in that handshake; `*_ca` is the authority key
//! identifier of the CA that signed each side's certificate.) At the end a
//! `summary:` line gives the counts; with `--strict` any failure makes the
//! exit code 1.
//!
//! `mtls_client --connect 127.0.0.1:8443 --server-id spiffe://example.org/server [--interval 200ms] [--duration 30s] [--strict]`

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use mayfly_examples::{CertSummary, endpoint, parse_duration, summarize, x509_source};
use rustls::pki_types::ServerName;
use spiffe_rustls::{LocalOnly, authorizer, mtls_client};
use tokio::io::AsyncReadExt as _;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// mTLS client authenticated by SPIFFE X.509-SVIDs from the Workload API.
#[derive(Debug, Parser)]
struct Args {
    /// Workload API socket (a path or `unix:PATH`); default: `SPIFFE_ENDPOINT_SOCKET`.
    #[arg(long)]
    socket: Option<String>,
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:8443")]
    connect: String,
    /// The server's expected SPIFFE ID.
    #[arg(long = "server-id")]
    server_id: String,
    /// Time between attempts.
    #[arg(long, default_value = "200ms", value_parser = parse_duration)]
    interval: Duration,
    /// How long to run (default: until SIGINT or SIGTERM).
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Time limit of one attempt (connect, handshake, answer).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    timeout: Duration,
    /// Exit 1 if any attempt failed.
    #[arg(long)]
    strict: bool,
    /// Present the SVID with this SPIFFE ID when the workload has several
    /// (default: the first the agent sends).
    #[arg(long = "spiffe-id")]
    spiffe_id: Option<String>,
}

#[derive(Debug, Default)]
struct Tally {
    ok: u64,
    fail: u64,
    server_serials: BTreeSet<String>,
    client_serials: BTreeSet<String>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let endpoint = endpoint(args.socket.as_deref())?;
    let source = x509_source(&endpoint, args.spiffe_id.as_deref()).await?;
    let own = source.svid().context("no usable X.509-SVID")?;
    let config = mtls_client(source.clone())
        .authorize(authorizer::exact([args.server_id.as_str()]).context("invalid --server-id")?)
        .trust_domain_policy(LocalOnly(own.spiffe_id().trust_domain().clone()))
        .build()
        .context("cannot build the TLS client configuration")?;
    let connector = TlsConnector::from(Arc::new(config));
    eprintln!(
        "mtls_client: {} connecting to {} ({}) every {:?}",
        own.spiffe_id(),
        args.connect,
        args.server_id,
        args.interval
    );
    drop(own);

    let mut tally = Tally::default();
    let run = async {
        let mut ticker = tokio::time::interval(args.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let attempt = tokio::time::timeout(args.timeout, attempt(&connector, &args.connect));
            match attempt.await {
                Ok(Ok((server, client))) => {
                    println!(
                        "ok {} {} server_ca={} client_ca={}",
                        server.serial, client.serial, server.ca, client.ca
                    );
                    tally.ok += 1;
                    tally.server_serials.insert(server.serial);
                    tally.client_serials.insert(client.serial);
                }
                Ok(Err(e)) => {
                    println!("fail {}", format!("{e:#}").replace('\n', " "));
                    tally.fail += 1;
                }
                Err(_) => {
                    println!("fail timed out after {:?}", args.timeout);
                    tally.fail += 1;
                }
            }
        }
    };
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let deadline = async {
        match args.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        () = run => {}
        () = deadline => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    println!(
        "summary: attempts={} ok={} fail={} server_certs={} client_certs={}",
        tally.ok + tally.fail,
        tally.ok,
        tally.fail,
        tally.server_serials.len(),
        tally.client_serials.len()
    );
    source.shutdown().await;
    if args.strict && tally.fail > 0 {
        std::process::exit(1);
    }
    Ok(())
}

/// One connection. The verifier has checked the server's chain against the
/// current bundle and its SPIFFE ID against `--server-id` before this
/// returns a stream; the answer line tells which client certificate the
/// server saw.
async fn attempt(connector: &TlsConnector, addr: &str) -> Result<(CertSummary, CertSummary)> {
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    // The name is not checked: the server is identified by its SPIFFE ID.
    let name = ServerName::try_from("mtls-server").context("server name")?;
    let mut tls = connector.connect(name, tcp).await.context("handshake")?;
    let server_cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .context("the server presented no certificate")?;
    let server = summarize(server_cert.as_ref())?;
    let mut answer = String::new();
    tls.read_to_string(&mut answer)
        .await
        .context("reading the answer")?;
    let field = |key: &str| {
        answer
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
            .map(str::to_owned)
    };
    let (Some(serial), Some(ca), Some(id)) =
        (field("client_serial"), field("client_ca"), field("client"))
    else {
        bail!("unexpected answer {:?}", answer.trim());
    };
    Ok((
        server,
        CertSummary {
            spiffe_id: id,
            serial,
            ca,
        },
    ))
}
