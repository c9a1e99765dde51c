//! Shared pieces of the `mtls_server` and `mtls_client` examples: where the
//! Workload API is, which of the workload's SVIDs to present, what a
//! certificate says about itself, and a small duration parser.
//!
//! The examples take everything they need (their own SVID, the trust
//! bundle) from the SPIFFE Workload API through [`spiffe::X509Source`],
//! which follows rotations of both; `spiffe-rustls` reads the source's
//! current state at every handshake.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use spiffe::x509_source::SvidPicker;
use spiffe::{SpiffeId, X509Source, X509Svid};
use x509_parser::extensions::{GeneralName, ParsedExtension};

/// The environment variable SPIFFE clients read the Workload API address from.
pub const ENDPOINT_ENV: &str = "SPIFFE_ENDPOINT_SOCKET";

/// The Workload API endpoint: `--socket` if given, else
/// `SPIFFE_ENDPOINT_SOCKET`. A bare path is taken as a Unix socket.
pub fn endpoint(socket: Option<&str>) -> Result<String> {
    let raw = match socket {
        Some(s) => s.to_owned(),
        None => std::env::var(ENDPOINT_ENV).with_context(|| {
            format!("no Workload API socket: pass --socket PATH or set {ENDPOINT_ENV}")
        })?,
    };
    Ok(if raw.starts_with('/') {
        format!("unix:{raw}")
    } else {
        raw
    })
}

/// Picks the SVID with one SPIFFE ID, for a workload that is given several
/// (several entries match the same process).
#[derive(Debug)]
pub struct IdPicker(pub SpiffeId);

impl SvidPicker for IdPicker {
    fn pick_svid(&self, svids: &[Arc<X509Svid>]) -> Option<usize> {
        svids.iter().position(|s| s.spiffe_id() == &self.0)
    }
}

/// Connects an [`X509Source`] to `endpoint`. With `want`, the source holds
/// the SVID with that SPIFFE ID; without, the first one the agent sends.
pub async fn x509_source(endpoint: &str, want: Option<&str>) -> Result<X509Source> {
    let mut builder = X509Source::builder().endpoint(endpoint);
    if let Some(id) = want {
        let id = SpiffeId::new(id).with_context(|| format!("invalid SPIFFE ID {id:?}"))?;
        builder = builder.picker(IdPicker(id));
    }
    builder
        .build()
        .await
        .with_context(|| format!("cannot get an X.509-SVID from the Workload API at {endpoint}"))
}

/// What the examples report about a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSummary {
    /// The URI SAN (the SPIFFE ID).
    pub spiffe_id: String,
    /// The serial number, lowercase hex.
    pub serial: String,
    /// Which CA signed it: the authority key identifier (lowercase hex), or
    /// `issuer:<DN>` when the certificate has none.
    pub ca: String,
}

/// Reads the SPIFFE ID, serial and issuing CA of a DER certificate.
pub fn summarize(der: &[u8]) -> Result<CertSummary> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).context("peer certificate is not X.509")?;
    let mut spiffe_id = None;
    let mut aki = None;
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                spiffe_id = san.general_names.iter().find_map(|n| match n {
                    GeneralName::URI(u) => Some((*u).to_owned()),
                    _ => None,
                });
            }
            ParsedExtension::AuthorityKeyIdentifier(a) => {
                aki = a.key_identifier.as_ref().map(|k| hex(k.0));
            }
            _ => {}
        }
    }
    Ok(CertSummary {
        spiffe_id: spiffe_id.context("certificate has no URI SAN")?,
        serial: hex(cert.raw_serial()),
        ca: aki.unwrap_or_else(|| format!("issuer:{}", cert.issuer()).replace(' ', "_")),
    })
}

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Parses `250ms`, `30s`, `5m`, `1h` (one number and one unit).
pub fn parse_duration(s: &str) -> Result<Duration> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .with_context(|| format!("duration {s:?} has no unit (write 200ms, 30s, 5m or 1h)"))?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .with_context(|| format!("duration {s:?} does not start with a number"))?;
    Ok(match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => bail!("duration {s:?}: unknown unit {unit:?} (use ms, s, m or h)"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("200ms").ok(),
            Some(Duration::from_millis(200))
        );
        assert_eq!(parse_duration("30s").ok(), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m").ok(), Some(Duration::from_secs(120)));
        assert!(parse_duration("30").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("3d").is_err());
    }

    #[test]
    fn bare_paths_are_unix_sockets() {
        assert_eq!(
            endpoint(Some("/tmp/a.sock")).ok().as_deref(),
            Some("unix:/tmp/a.sock")
        );
        assert_eq!(
            endpoint(Some("unix:///tmp/a.sock")).ok().as_deref(),
            Some("unix:///tmp/a.sock")
        );
    }
}

/// The flags both example mTLS servers take.
#[derive(Debug, clap::Args)]
pub struct ServerArgs {
    /// Workload API socket (a path or `unix:PATH`); default: `SPIFFE_ENDPOINT_SOCKET`.
    #[arg(long)]
    pub socket: Option<String>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8443")]
    pub listen: SocketAddr,
    /// A client SPIFFE ID to accept (repeatable). Every other client is refused.
    #[arg(long = "allow-id", required = true)]
    pub allow_id: Vec<String>,
    /// Present the SVID with this SPIFFE ID when the workload has several
    /// (default: the first the agent sends).
    #[arg(long = "spiffe-id")]
    pub spiffe_id: Option<String>,
}
