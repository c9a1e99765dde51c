//! JWT-SVIDs: minting (ES256) and validation against trust bundles.
//!
//! Minted tokens carry exactly the header members `alg`, `kid` and `typ`
//! (the `spiffe` crate rejects any other) and the claims `sub`, `aud`,
//! `exp`, `iat`, `jti` and, when configured, `iss`. Validation rejects
//! `alg: none`, HMAC algorithms, unknown `kid`s, missing or wrong `aud`,
//! missing `exp` and expired tokens; time is passed in.

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use spiffe::{SpiffeId, TrustDomain};
use time::OffsetDateTime;
use zeroize::Zeroizing;

use crate::bundle::{BundleError, Jwk, JwtAuthority, TrustBundle};

/// Why a JWT-SVID was rejected or could not be minted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwtError {
    /// Not three base64url parts with JSON header and claims.
    #[error("malformed JWT: {0}")]
    Malformed(String),
    /// `alg: none` (an unsigned token).
    #[error("unsigned tokens (alg none) are not accepted")]
    AlgNone,
    /// An HMAC algorithm: shared secrets are never accepted.
    #[error("HMAC algorithm {0} is not accepted")]
    Hmac(String),
    /// Another algorithm we do not accept.
    #[error("unsupported algorithm {0}")]
    UnsupportedAlgorithm(String),
    /// The header has no `kid`.
    #[error("the token header has no kid")]
    MissingKid,
    /// No bundle for the token's trust domain.
    #[error("no trust bundle for trust domain {0}")]
    UnknownTrustDomain(String),
    /// The bundle has no key with this `kid`.
    #[error("no JWT authority with kid {0:?} in the trust bundle")]
    UnknownKid(String),
    /// The signature does not verify.
    #[error("signature verification failed")]
    BadSignature,
    /// `sub` missing or not a SPIFFE ID.
    #[error("sub claim is missing or not a SPIFFE ID")]
    BadSubject,
    /// `aud` missing or empty.
    #[error("aud claim is missing")]
    MissingAudience,
    /// `aud` does not contain the expected audience.
    #[error("the token is not for audience {0:?}")]
    WrongAudience(String),
    /// `exp` missing or not a number.
    #[error("exp claim is missing")]
    MissingExpiry,
    /// The token has expired.
    #[error("the token expired at {0}")]
    Expired(i64),
    /// Signing failed.
    #[error("signing failed: {0}")]
    Sign(String),
    /// A key could not be loaded.
    #[error("invalid JWT key: {0}")]
    BadKey(String),
}

/// The claims of a JWT-SVID we mint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JwtClaims {
    /// The SPIFFE ID.
    pub sub: String,
    /// Audiences (always serialised as an array).
    pub aud: Vec<String>,
    /// Expiry, Unix seconds.
    pub exp: i64,
    /// Issued at, Unix seconds.
    pub iat: i64,
    /// Unique token id, used for revocation.
    pub jti: String,
    /// Issuer, when configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    typ: Option<String>,
}

/// An ES256 signing key with its `kid`.
pub struct JwtSigningKey {
    key_id: String,
    pair: EcdsaKeyPair,
    pkcs8: Zeroizing<Vec<u8>>,
    rng: SystemRandom,
}

impl std::fmt::Debug for JwtSigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtSigningKey")
            .field("key_id", &self.key_id)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl JwtSigningKey {
    /// A new random P-256 key.
    pub fn generate() -> Result<Self, JwtError> {
        let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING)
            .map_err(|e| JwtError::BadKey(e.to_string()))?;
        let doc = pair
            .to_pkcs8v1()
            .map_err(|e| JwtError::BadKey(e.to_string()))?;
        Self::from_pkcs8(doc.as_ref())
    }

    /// Loads a PKCS#8 DER P-256 key. The `kid` is derived from the public
    /// key (a SHA-256 thumbprint), so it is stable across restarts.
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, JwtError> {
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der)
            .map_err(|e| JwtError::BadKey(e.to_string()))?;
        let spki = pair
            .public_key()
            .as_der()
            .map_err(|e| JwtError::BadKey(e.to_string()))?;
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, spki.as_ref());
        let key_id = URL_SAFE_NO_PAD.encode(&digest.as_ref()[..24]);
        Ok(Self {
            key_id,
            pair,
            pkcs8: Zeroizing::new(der.to_vec()),
            rng: SystemRandom::new(),
        })
    }

    /// The key's `kid`.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The PKCS#8 DER private key (a secret).
    pub fn pkcs8_der(&self) -> &[u8] {
        &self.pkcs8
    }

    /// The public half, for bundles.
    pub fn authority(&self, expires_at: Option<i64>) -> Result<JwtAuthority, BundleError> {
        let spki = self
            .pair
            .public_key()
            .as_der()
            .map_err(|e| BundleError::UnsupportedKey(e.to_string()))?;
        Ok(JwtAuthority {
            key_id: self.key_id.clone(),
            jwk: Jwk::from_spki_der(spki.as_ref())?,
            expires_at,
        })
    }

    /// Signs a JWT-SVID with the header `{"alg":"ES256","kid":..,"typ":"JWT"}`.
    pub fn mint(&self, claims: &JwtClaims) -> Result<String, JwtError> {
        let header = Header {
            alg: "ES256".into(),
            kid: Some(self.key_id.clone()),
            typ: Some("JWT".into()),
        };
        let header = serde_json::to_vec(&header).map_err(|e| JwtError::Sign(e.to_string()))?;
        let body = serde_json::to_vec(claims).map_err(|e| JwtError::Sign(e.to_string()))?;
        let mut token = URL_SAFE_NO_PAD.encode(header);
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(body));
        let sig = self
            .pair
            .sign(&self.rng, token.as_bytes())
            .map_err(|e| JwtError::Sign(e.to_string()))?;
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(sig.as_ref()));
        Ok(token)
    }
}

/// A JWT-SVID that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidatedJwt {
    /// The `sub` claim.
    pub spiffe_id: SpiffeId,
    /// Every claim.
    pub claims: Map<String, Value>,
    /// The `jti` claim, when present.
    pub jti: Option<String>,
    /// The `exp` claim.
    pub expires_at: i64,
    /// The `kid` that signed it.
    pub key_id: String,
}

fn decode_part<T: for<'de> Deserialize<'de>>(part: &str, what: &str) -> Result<T, JwtError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| JwtError::Malformed(format!("{what} is not base64url")))?;
    serde_json::from_slice(&bytes).map_err(|e| JwtError::Malformed(format!("{what}: {e}")))
}

fn decoding_key(jwk: &Jwk, alg: Algorithm) -> Result<DecodingKey, JwtError> {
    let bad = |e: jsonwebtoken::errors::Error| JwtError::BadKey(e.to_string());
    match (jwk.kty.as_str(), alg) {
        ("EC", Algorithm::ES256 | Algorithm::ES384) => {
            let want = if alg == Algorithm::ES256 {
                "P-256"
            } else {
                "P-384"
            };
            if jwk.crv.as_deref() != Some(want) {
                return Err(JwtError::BadSignature);
            }
            DecodingKey::from_ec_components(
                jwk.x.as_deref().unwrap_or_default(),
                jwk.y.as_deref().unwrap_or_default(),
            )
            .map_err(bad)
        }
        (
            "RSA",
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512,
        ) => DecodingKey::from_rsa_components(
            jwk.n.as_deref().unwrap_or_default(),
            jwk.e.as_deref().unwrap_or_default(),
        )
        .map_err(bad),
        _ => Err(JwtError::BadSignature),
    }
}

/// Validates a JWT-SVID for `audience` against `bundles` at time `now`.
pub fn validate(
    token: &str,
    audience: &str,
    bundles: &[&TrustBundle],
    now: OffsetDateTime,
) -> Result<ValidatedJwt, JwtError> {
    let parts: Vec<&str> = token.split('.').collect();
    let [header_b64, claims_b64, _sig] = parts.as_slice() else {
        return Err(JwtError::Malformed(format!(
            "{} parts, expected 3",
            parts.len()
        )));
    };
    let header: Header = decode_part(header_b64, "header")?;
    let alg = match header.alg.as_str() {
        "none" | "None" | "NONE" => return Err(JwtError::AlgNone),
        a if a.to_ascii_uppercase().starts_with("HS") => return Err(JwtError::Hmac(a.to_owned())),
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        other => return Err(JwtError::UnsupportedAlgorithm(other.to_owned())),
    };
    if let Some(typ) = &header.typ
        && typ != "JWT"
        && typ != "JOSE"
    {
        return Err(JwtError::Malformed(format!("typ {typ:?}")));
    }
    let kid = header.kid.ok_or(JwtError::MissingKid)?;
    // The trust domain is read from the unverified subject only to choose
    // the bundle; nothing else is trusted before the signature verifies.
    let unverified: Map<String, Value> = decode_part(claims_b64, "claims")?;
    let sub = unverified
        .get("sub")
        .and_then(Value::as_str)
        .and_then(|s| SpiffeId::new(s).ok())
        .ok_or(JwtError::BadSubject)?;
    let td: TrustDomain = sub.trust_domain().clone();
    let bundle = bundles
        .iter()
        .find(|b| b.trust_domain == td)
        .ok_or_else(|| JwtError::UnknownTrustDomain(td.to_string()))?;
    let authority = bundle
        .jwt_authorities
        .iter()
        .find(|a| a.key_id == kid)
        .ok_or_else(|| JwtError::UnknownKid(kid.clone()))?;
    let key = decoding_key(&authority.jwk, alg)?;
    let mut validation = Validation::new(alg);
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key, &validation).map_err(
        |e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::InvalidSignature => JwtError::BadSignature,
            _ => JwtError::Malformed(e.to_string()),
        },
    )?;
    let claims = data.claims;
    let auds: Vec<&str> = match claims.get("aud") {
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    };
    if auds.is_empty() {
        return Err(JwtError::MissingAudience);
    }
    if !auds.contains(&audience) {
        return Err(JwtError::WrongAudience(audience.to_owned()));
    }
    let exp = claims
        .get("exp")
        .and_then(Value::as_i64)
        .ok_or(JwtError::MissingExpiry)?;
    if exp <= now.unix_timestamp() {
        return Err(JwtError::Expired(exp));
    }
    let jti = claims.get("jti").and_then(Value::as_str).map(str::to_owned);
    Ok(ValidatedJwt {
        spiffe_id: sub,
        claims,
        jti,
        expires_at: exp,
        key_id: kid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (JwtSigningKey, TrustBundle, OffsetDateTime) {
        let key = JwtSigningKey::generate().unwrap();
        let mut b = TrustBundle::new(TrustDomain::new("example.org").unwrap());
        b.jwt_authorities.push(key.authority(None).unwrap());
        (key, b, OffsetDateTime::now_utc())
    }

    fn claims(now: OffsetDateTime) -> JwtClaims {
        JwtClaims {
            sub: "spiffe://example.org/web".into(),
            aud: vec!["db".into()],
            exp: now.unix_timestamp() + 300,
            iat: now.unix_timestamp(),
            jti: "j1".into(),
            iss: None,
        }
    }

    fn forge(header: &str, body: &Value) -> String {
        format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(body.to_string()),
            URL_SAFE_NO_PAD.encode(b"sig")
        )
    }

    #[test]
    fn mint_and_validate() {
        let (key, b, now) = setup();
        let token = key.mint(&claims(now)).unwrap();
        let header: Value = decode_part(token.split('.').next().unwrap(), "h").unwrap();
        let members: Vec<&String> = header.as_object().unwrap().keys().collect();
        assert_eq!(members, ["alg", "kid", "typ"]);
        let v = validate(&token, "db", &[&b], now).unwrap();
        assert_eq!(v.spiffe_id.to_string(), "spiffe://example.org/web");
        assert_eq!(v.jti.as_deref(), Some("j1"));
        // The spiffe crate accepts what we mint.
        let bundle =
            spiffe::JwtBundle::from_jwt_authorities(b.trust_domain.clone(), &b.jwt_jwks_json())
                .unwrap();
        let mut set = spiffe::JwtBundleSet::new();
        set.add_bundle(bundle);
        spiffe::JwtSvid::parse_and_validate(&token, &set, &["db"]).unwrap();
    }

    #[test]
    fn rejects_what_it_must() {
        let (key, b, now) = setup();
        let good = key.mint(&claims(now)).unwrap();
        assert_eq!(
            validate(&good, "web", &[&b], now),
            Err(JwtError::WrongAudience("web".into()))
        );
        assert_eq!(
            validate(&good, "db", &[&b], now + time::Duration::minutes(6)).unwrap_err(),
            JwtError::Expired(now.unix_timestamp() + 300)
        );
        let body = serde_json::to_value(claims(now)).unwrap();
        assert_eq!(
            validate(&forge(r#"{"alg":"none"}"#, &body), "db", &[&b], now),
            Err(JwtError::AlgNone)
        );
        assert!(matches!(
            validate(
                &forge(r#"{"alg":"HS256","kid":"x"}"#, &body),
                "db",
                &[&b],
                now
            ),
            Err(JwtError::Hmac(_))
        ));
        assert_eq!(
            validate(
                &forge(r#"{"alg":"ES256","kid":"nope"}"#, &body),
                "db",
                &[&b],
                now
            ),
            Err(JwtError::UnknownKid("nope".into()))
        );
        let kid = key.key_id();
        assert_eq!(
            validate(
                &forge(&format!(r#"{{"alg":"ES256","kid":"{kid}"}}"#), &body),
                "db",
                &[&b],
                now
            ),
            Err(JwtError::BadSignature)
        );
        let mut no_aud = claims(now);
        no_aud.aud.clear();
        assert_eq!(
            validate(&key.mint(&no_aud).unwrap(), "db", &[&b], now),
            Err(JwtError::MissingAudience)
        );
        let mut body = serde_json::to_value(claims(now)).unwrap();
        body.as_object_mut().unwrap().remove("exp");
        // Re-sign a token without exp through a raw signature.
        let header = format!(r#"{{"alg":"ES256","kid":"{kid}","typ":"JWT"}}"#);
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(&header),
            URL_SAFE_NO_PAD.encode(body.to_string())
        );
        let sig = key.pair.sign(&key.rng, signing_input.as_bytes()).unwrap();
        let no_exp = format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()));
        assert_eq!(
            validate(&no_exp, "db", &[&b], now),
            Err(JwtError::MissingExpiry)
        );
        for junk in ["", "a.b", "a.b.c", "!!!.!!!.!!!"] {
            assert!(
                matches!(
                    validate(junk, "db", &[&b], now),
                    Err(JwtError::Malformed(_))
                ),
                "{junk}"
            );
        }
        let other = TrustBundle::new(TrustDomain::new("other.org").unwrap());
        assert!(matches!(
            validate(&good, "db", &[&other], now),
            Err(JwtError::UnknownTrustDomain(_))
        ));
    }
}
