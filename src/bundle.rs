//! Trust bundles: the X.509 and JWT authorities of a trust domain, and the
//! SPIFFE bundle format (a JWKS with `use` `x509-svid` / `jwt-svid`,
//! `spiffe_sequence` and `spiffe_refresh_hint`), both ways.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde::{Deserialize, Serialize};
use spiffe::TrustDomain;
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::proto::node as pb;

/// Why a bundle was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    /// Not a JSON document of the expected shape.
    #[error("bundle is not valid SPIFFE bundle JSON: {0}")]
    Json(String),
    /// An `x509-svid` key does not have exactly one `x5c` certificate, or it does not parse.
    #[error("x509-svid key {index}: {reason}")]
    BadX509Authority {
        /// Position in `keys`.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// A `jwt-svid` key has no `kid`, a duplicate `kid`, or an unusable key.
    #[error("jwt-svid key {index}: {reason}")]
    BadJwtAuthority {
        /// Position in `keys`.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// A public key type we cannot express as a JWK.
    #[error("unsupported public key: {0}")]
    UnsupportedKey(String),
    /// The trust domain name is invalid.
    #[error("invalid trust domain {0:?}")]
    BadTrustDomain(String),
}

/// A JSON Web Key (RFC 7517) as used in SPIFFE bundles. Members we do not
/// know are ignored, as RFC 7517 asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Jwk {
    /// Key type: `EC` or `RSA`.
    pub kty: String,
    /// `use`: `x509-svid` or `jwt-svid` in SPIFFE bundles.
    #[serde(rename = "use", default, skip_serializing_if = "Option::is_none")]
    pub key_use: Option<String>,
    /// Key id (required for JWT authorities).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    /// EC curve.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crv: Option<String>,
    /// EC x coordinate, base64url.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x: Option<String>,
    /// EC y coordinate, base64url.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub y: Option<String>,
    /// RSA modulus, base64url.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<String>,
    /// RSA exponent, base64url.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub e: Option<String>,
    /// Certificate chain, base64 (standard) DER.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x5c: Option<Vec<String>>,
}

impl Jwk {
    /// The public key of a SubjectPublicKeyInfo (DER) as a JWK (EC P-256,
    /// P-384 or RSA), without `use` or `kid`.
    pub fn from_spki_der(spki: &[u8]) -> Result<Self, BundleError> {
        let (_, info) = SubjectPublicKeyInfo::from_der(spki)
            .map_err(|e| BundleError::UnsupportedKey(e.to_string()))?;
        let parsed = info
            .parsed()
            .map_err(|e| BundleError::UnsupportedKey(e.to_string()))?;
        match parsed {
            PublicKey::EC(point) => {
                let curve_oid = info
                    .algorithm
                    .parameters
                    .as_ref()
                    .and_then(|p| p.as_oid().ok())
                    .map(|o| o.to_id_string())
                    .unwrap_or_default();
                let (crv, len) = match curve_oid.as_str() {
                    "1.2.840.10045.3.1.7" => ("P-256", 32),
                    "1.3.132.0.34" => ("P-384", 48),
                    other => return Err(BundleError::UnsupportedKey(format!("EC curve {other}"))),
                };
                let data = point.data();
                if data.len() != 1 + 2 * len || data[0] != 4 {
                    return Err(BundleError::UnsupportedKey(
                        "EC point is not uncompressed".into(),
                    ));
                }
                Ok(Self {
                    kty: "EC".into(),
                    crv: Some(crv.into()),
                    x: Some(URL_SAFE_NO_PAD.encode(&data[1..=len])),
                    y: Some(URL_SAFE_NO_PAD.encode(&data[1 + len..])),
                    ..Self::default()
                })
            }
            PublicKey::RSA(rsa) => {
                let strip = |b: &[u8]| {
                    let start = b.iter().position(|x| *x != 0).unwrap_or(b.len());
                    b[start..].to_vec()
                };
                Ok(Self {
                    kty: "RSA".into(),
                    n: Some(URL_SAFE_NO_PAD.encode(strip(rsa.modulus))),
                    e: Some(URL_SAFE_NO_PAD.encode(strip(rsa.exponent))),
                    ..Self::default()
                })
            }
            _ => Err(BundleError::UnsupportedKey(
                "only EC P-256, P-384 and RSA keys are supported".into(),
            )),
        }
    }
}

/// A JWT signing authority's public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtAuthority {
    /// The `kid` that JWT-SVID headers name.
    pub key_id: String,
    /// The public key (its `kid` and `use` are set from this authority when serialised).
    pub jwk: Jwk,
    /// When the key stops being used (Unix seconds), if known.
    pub expires_at: Option<i64>,
}

/// The authorities of one trust domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustBundle {
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// CA certificates, DER.
    pub x509_authorities: Vec<Vec<u8>>,
    /// JWT public keys.
    pub jwt_authorities: Vec<JwtAuthority>,
    /// Increases on every change.
    pub sequence: u64,
    /// How often relying parties should refresh, in seconds.
    pub refresh_hint: Option<u64>,
    /// X.509 authorities (DER, also listed in `x509_authorities`) that were
    /// tainted: SVIDs they signed must be replaced now. Carried by the node
    /// API only; the SPIFFE bundle format has no such notion.
    pub tainted_x509_authorities: Vec<Vec<u8>>,
    /// JWT key ids (also listed in `jwt_authorities`) that were tainted.
    pub tainted_jwt_key_ids: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct BundleDoc {
    keys: Vec<Jwk>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    spiffe_sequence: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    spiffe_refresh_hint: Option<u64>,
}

impl TrustBundle {
    /// An empty bundle.
    pub fn new(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            x509_authorities: Vec::new(),
            jwt_authorities: Vec::new(),
            sequence: 0,
            refresh_hint: None,
            tainted_x509_authorities: Vec::new(),
            tainted_jwt_key_ids: Vec::new(),
        }
    }

    fn jwt_jwks(&self) -> Vec<Jwk> {
        self.jwt_authorities
            .iter()
            .map(|a| Jwk {
                key_use: Some("jwt-svid".into()),
                kid: Some(a.key_id.clone()),
                x5c: None,
                ..a.jwk.clone()
            })
            .collect()
    }

    /// The SPIFFE bundle document (JSON).
    pub fn to_spiffe_json(&self) -> Result<String, BundleError> {
        let mut keys = Vec::new();
        for der in &self.x509_authorities {
            let (_, cert) = x509_parser::parse_x509_certificate(der)
                .map_err(|e| BundleError::UnsupportedKey(e.to_string()))?;
            let mut jwk = Jwk::from_spki_der(cert.public_key().raw)?;
            jwk.key_use = Some("x509-svid".into());
            jwk.x5c = Some(vec![STANDARD.encode(der)]);
            keys.push(jwk);
        }
        keys.extend(self.jwt_jwks());
        let doc = BundleDoc {
            keys,
            spiffe_sequence: Some(self.sequence),
            spiffe_refresh_hint: self.refresh_hint,
        };
        serde_json::to_string_pretty(&doc).map_err(|e| BundleError::Json(e.to_string()))
    }

    /// Parses a SPIFFE bundle document for `trust_domain`. Keys with an
    /// unknown `use` are ignored, as the SPIFFE Trust Domain and Bundle
    /// standard asks.
    pub fn from_spiffe_json(trust_domain: TrustDomain, json: &[u8]) -> Result<Self, BundleError> {
        let doc: BundleDoc =
            serde_json::from_slice(json).map_err(|e| BundleError::Json(e.to_string()))?;
        let mut bundle = Self::new(trust_domain);
        bundle.sequence = doc.spiffe_sequence.unwrap_or(0);
        bundle.refresh_hint = doc.spiffe_refresh_hint;
        for (index, key) in doc.keys.into_iter().enumerate() {
            match key.key_use.as_deref() {
                Some("x509-svid") => {
                    let bad = |reason: String| BundleError::BadX509Authority { index, reason };
                    let x5c = key.x5c.as_deref().unwrap_or_default();
                    let [cert] = x5c else {
                        return Err(bad(format!(
                            "x5c must hold exactly one certificate, found {}",
                            x5c.len()
                        )));
                    };
                    let der = STANDARD
                        .decode(cert)
                        .map_err(|e| bad(format!("x5c is not base64: {e}")))?;
                    x509_parser::parse_x509_certificate(&der)
                        .map_err(|e| bad(format!("certificate: {e}")))?;
                    bundle.x509_authorities.push(der);
                }
                Some("jwt-svid") => {
                    let bad = |reason: &str| BundleError::BadJwtAuthority {
                        index,
                        reason: reason.into(),
                    };
                    let kid = key
                        .kid
                        .clone()
                        .filter(|k| !k.is_empty())
                        .ok_or_else(|| bad("missing kid"))?;
                    if bundle.jwt_authorities.iter().any(|a| a.key_id == kid) {
                        return Err(bad("duplicate kid"));
                    }
                    match key.kty.as_str() {
                        "EC" if key.x.is_some() && key.y.is_some() && key.crv.is_some() => {}
                        "RSA" if key.n.is_some() && key.e.is_some() => {}
                        _ => return Err(bad("unsupported or incomplete key")),
                    }
                    bundle.jwt_authorities.push(JwtAuthority {
                        key_id: kid,
                        jwk: key,
                        expires_at: None,
                    });
                }
                _ => {}
            }
        }
        Ok(bundle)
    }

    /// The X.509 authorities concatenated as DER, as the Workload API's
    /// `bundle` fields carry them.
    pub fn x509_der_concat(&self) -> Vec<u8> {
        self.x509_authorities.concat()
    }

    /// The JWT authorities as a JWKS document, as the Workload API's
    /// `JWTBundlesResponse` carries them.
    pub fn jwt_jwks_json(&self) -> Vec<u8> {
        let doc = BundleDoc {
            keys: self.jwt_jwks(),
            spiffe_sequence: None,
            spiffe_refresh_hint: None,
        };
        serde_json::to_vec(&doc).unwrap_or_default()
    }

    /// The node API wire form.
    pub fn to_proto(&self) -> pb::Bundle {
        pb::Bundle {
            trust_domain: self.trust_domain.as_str().to_owned(),
            x509_authorities: self.x509_authorities.clone(),
            jwt_authorities: self
                .jwt_authorities
                .iter()
                .map(|a| pb::JwtAuthority {
                    key_id: a.key_id.clone(),
                    jwk: serde_json::to_vec(&a.jwk).unwrap_or_default(),
                    expires_at: a.expires_at.unwrap_or(0),
                })
                .collect(),
            sequence: self.sequence,
            refresh_hint_seconds: self
                .refresh_hint
                .map_or(0, |h| i64::try_from(h).unwrap_or(i64::MAX)),
            tainted_x509_authorities: self.tainted_x509_authorities.clone(),
            tainted_jwt_key_ids: self.tainted_jwt_key_ids.clone(),
        }
    }

    /// Parses the node API wire form, validating every authority.
    pub fn from_proto(p: &pb::Bundle) -> Result<Self, BundleError> {
        let td = TrustDomain::new(&p.trust_domain)
            .map_err(|_| BundleError::BadTrustDomain(p.trust_domain.clone()))?;
        let mut b = Self::new(td);
        for (index, der) in p.x509_authorities.iter().enumerate() {
            x509_parser::parse_x509_certificate(der).map_err(|e| {
                BundleError::BadX509Authority {
                    index,
                    reason: e.to_string(),
                }
            })?;
            b.x509_authorities.push(der.clone());
        }
        for (index, a) in p.jwt_authorities.iter().enumerate() {
            let jwk: Jwk =
                serde_json::from_slice(&a.jwk).map_err(|e| BundleError::BadJwtAuthority {
                    index,
                    reason: e.to_string(),
                })?;
            b.jwt_authorities.push(JwtAuthority {
                key_id: a.key_id.clone(),
                jwk,
                expires_at: (a.expires_at != 0).then_some(a.expires_at),
            });
        }
        b.sequence = p.sequence;
        b.refresh_hint = u64::try_from(p.refresh_hint_seconds)
            .ok()
            .filter(|h| *h > 0);
        for (index, der) in p.tainted_x509_authorities.iter().enumerate() {
            if !b.x509_authorities.contains(der) {
                return Err(BundleError::BadX509Authority {
                    index,
                    reason: "tainted authority is not in the bundle".into(),
                });
            }
        }
        b.tainted_x509_authorities = p.tainted_x509_authorities.clone();
        b.tainted_jwt_key_ids = p.tainted_jwt_key_ids.clone();
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jwt::JwtSigningKey;
    use crate::x509::{CaParams, X509Authority};
    use time::{Duration, OffsetDateTime};

    fn sample() -> TrustBundle {
        let td = TrustDomain::new("example.org").unwrap();
        let ca = X509Authority::generate(
            &CaParams {
                trust_domain: td.clone(),
                ttl: Duration::hours(1),
                subject: "Mayfly".into(),
            },
            OffsetDateTime::now_utc(),
        )
        .unwrap();
        let jwt = JwtSigningKey::generate().unwrap();
        let mut b = TrustBundle::new(td);
        b.x509_authorities.push(ca.cert_der().to_vec());
        b.jwt_authorities.push(jwt.authority(None).unwrap());
        b.sequence = 7;
        b.refresh_hint = Some(300);
        b.tainted_x509_authorities.push(ca.cert_der().to_vec());
        b
    }

    #[test]
    fn spiffe_json_round_trip() {
        let b = sample();
        let json = b.to_spiffe_json().unwrap();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["spiffe_sequence"], 7);
        assert_eq!(v["spiffe_refresh_hint"], 300);
        assert_eq!(v["keys"][0]["use"], "x509-svid");
        assert_eq!(v["keys"][1]["use"], "jwt-svid");
        let back = TrustBundle::from_spiffe_json(b.trust_domain.clone(), json.as_bytes()).unwrap();
        assert!(
            back.tainted_x509_authorities.is_empty(),
            "taint is not part of the SPIFFE format"
        );
        assert_eq!(back.x509_authorities, b.x509_authorities);
        assert_eq!(back.jwt_authorities[0].key_id, b.jwt_authorities[0].key_id);
        assert_eq!(back.jwt_authorities[0].jwk.x, b.jwt_authorities[0].jwk.x);
        assert_eq!(TrustBundle::from_proto(&b.to_proto()).unwrap(), b);
    }

    #[test]
    fn spiffe_crate_reads_our_jwks() {
        let b = sample();
        let parsed =
            spiffe::JwtBundle::from_jwt_authorities(b.trust_domain.clone(), &b.jwt_jwks_json())
                .unwrap();
        assert!(
            parsed
                .find_jwt_authority(&b.jwt_authorities[0].key_id)
                .is_some()
        );
    }

    #[test]
    fn rejects_malformed_bundles() {
        let td = TrustDomain::new("example.org").unwrap();
        for bad in [
            &b"not json"[..],
            br#"{"keys":[{"kty":"EC","use":"x509-svid"}]}"#,
            br#"{"keys":[{"kty":"EC","use":"x509-svid","x5c":["!!"]}]}"#,
            br#"{"keys":[{"kty":"EC","use":"jwt-svid","crv":"P-256","x":"a","y":"b"}]}"#,
            br#"{"keys":[{"kty":"oct","use":"jwt-svid","kid":"k"}]}"#,
        ] {
            assert!(
                TrustBundle::from_spiffe_json(td.clone(), bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        // Unknown uses are ignored.
        let ok = TrustBundle::from_spiffe_json(td, br#"{"keys":[{"kty":"EC","use":"wit-svid"}]}"#)
            .unwrap();
        assert!(ok.x509_authorities.is_empty() && ok.jwt_authorities.is_empty());
    }
}
