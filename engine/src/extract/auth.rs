//! Authorization of the extract stage: none, a static bearer token, or SMART
//! Backend Services (a client assertion signed with the client's private key,
//! RS384 or ES384, exchanged at the token endpoint for an access token that is
//! renewed before it expires).
//!
//! No token, key or assertion ever appears in a message: errors name the
//! client, the endpoint and the server's OAuth error code and description.

use std::path::Path as FsPath;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, RsaKeyPair};
use serde_json::Value;
use tokio::sync::Mutex;
use url::Url;

use super::http::{Http, Request};
use crate::error::{Error, Result};
use crate::settings::SmartSettings;

const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// The SMART Backend Services IG asks for assertions that expire within five
/// minutes.
const ASSERTION_LIFETIME_SECONDS: i64 = 300;

/// How requests to the FHIR server are authorized.
pub enum Auth {
    None,
    Bearer(String),
    Smart(Box<Smart>),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Auth::None => "Auth::None",
            Auth::Bearer(_) => "Auth::Bearer(****)",
            Auth::Smart(_) => "Auth::Smart(****)",
        })
    }
}

impl Auth {
    /// The `Authorization` header value, fetching or renewing a SMART access
    /// token when the cached one is missing or about to expire.
    pub async fn header(&self, http: &Http, fhir_base: &Url) -> Result<Option<String>> {
        match self {
            Auth::None => Ok(None),
            Auth::Bearer(t) => Ok(Some(format!("Bearer {t}"))),
            Auth::Smart(s) => Ok(Some(format!("Bearer {}", s.token(http, fhir_base).await?))),
        }
    }

    /// Forgets the access token after the server refused it (401), so the
    /// next request fetches a new one. False when nothing can be renewed.
    pub async fn invalidate(&self) -> bool {
        match self {
            Auth::Smart(s) => {
                *s.token.lock().await = None;
                true
            }
            _ => false,
        }
    }
}

/// The static bearer token in `path`: its content, trimmed. Errors name the
/// file, never its content.
pub fn token_from_file(path: &FsPath) -> Result<String> {
    let bad = |why: String| {
        Error::Config(format!(
            "extract.bearer_token_file {}: {why}",
            path.display()
        ))
    };
    let bytes = std::fs::read(path).map_err(|e| bad(format!("cannot read it: {e}")))?;
    let text = String::from_utf8(bytes).map_err(|_| bad("it is not UTF-8 text".into()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(bad("it is empty".into()));
    }
    if token.bytes().any(|b| b.is_ascii_control()) {
        return Err(bad(
            "it holds more than one line (or control characters); a token is one line".into(),
        ));
    }
    Ok(token.to_string())
}

/// A SMART backend client.
pub struct Smart {
    client_id: String,
    kid: Option<String>,
    key: Signer,
    /// Configured, or discovered once.
    token_url: tokio::sync::OnceCell<String>,
    scope: String,
    token: Mutex<Option<Token>>,
}

struct Token {
    value: String,
    /// Renew from this instant on: a while before the server's expiry, so
    /// a long download never starts a request with a token about to lapse.
    renew_at: Instant,
}

impl Smart {
    pub fn new(settings: &SmartSettings) -> Result<Smart> {
        let (key, jwk_kid) = Signer::load(&settings.private_key)?;
        Ok(Smart {
            client_id: settings.client_id.clone(),
            kid: settings.kid.clone().or(jwk_kid),
            key,
            token_url: match &settings.token_url {
                Some(u) => tokio::sync::OnceCell::new_with(Some(u.clone())),
                None => tokio::sync::OnceCell::new(),
            },
            scope: settings.scope.clone(),
            token: Mutex::new(None),
        })
    }

    async fn token(&self, http: &Http, fhir_base: &Url) -> Result<String> {
        let mut cached = self.token.lock().await;
        if let Some(t) = cached.as_ref().filter(|t| Instant::now() < t.renew_at) {
            return Ok(t.value.clone());
        }
        let token_url = self
            .token_url
            .get_or_try_init(|| discover_token_url(http, fhir_base))
            .await?
            .clone();
        let assertion = self.assertion(&token_url)?;
        let body: String = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", "client_credentials")
            .append_pair("scope", &self.scope)
            .append_pair("client_assertion_type", ASSERTION_TYPE)
            .append_pair("client_assertion", &assertion)
            .finish();
        let url = Url::parse(&token_url).map_err(|e| auth_error(&token_url, e.to_string()))?;
        let req = Request::post(url, "application/x-www-form-urlencoded", body.into_bytes());
        let started = Instant::now();
        let resp = http.send_plain("token request", &req).await?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .map_err(|e| auth_error(&token_url, e.to_string()))?;
        let json: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if !status.is_success() {
            // RFC 6749 5.2: `error` and `error_description`; never the body
            // as a whole (it could echo what was sent).
            let code = json["error"].as_str().unwrap_or("no OAuth error code");
            let desc = json["error_description"].as_str().unwrap_or("");
            return Err(auth_error(
                &token_url,
                format!(
                    "client {:?} was refused ({status}): {code} {desc}",
                    self.client_id
                ),
            ));
        }
        let value = json["access_token"]
            .as_str()
            .ok_or_else(|| auth_error(&token_url, "the answer has no access_token".into()))?
            .to_string();
        let lifetime = Duration::from_secs(json["expires_in"].as_u64().unwrap_or(300));
        // Renew a minute before expiry, or after two thirds of a lifetime
        // shorter than three minutes.
        let margin = (lifetime / 3).min(Duration::from_secs(60));
        let renew_at = started + lifetime.saturating_sub(margin);
        *cached = Some(Token {
            value: value.clone(),
            renew_at,
        });
        Ok(value)
    }

    /// The signed client assertion (a JWT) for `token_url`.
    fn assertion(&self, token_url: &str) -> Result<String> {
        let now = chrono::Utc::now().timestamp();
        let mut header = serde_json::json!({"alg": self.key.alg(), "typ": "JWT"});
        if let Some(kid) = &self.kid {
            header["kid"] = Value::from(kid.as_str());
        }
        let claims = serde_json::json!({
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": token_url,
            "exp": now + ASSERTION_LIFETIME_SECONDS,
            "iat": now,
            "jti": uuid::Uuid::now_v7().to_string(),
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = self.key.sign(signing_input.as_bytes())?;
        Ok(format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig)))
    }
}

fn auth_error(endpoint: &str, message: String) -> Error {
    Error::Auth {
        endpoint: endpoint.to_string(),
        message,
    }
}

/// The token endpoint from `<base>/.well-known/smart-configuration`.
async fn discover_token_url(http: &Http, fhir_base: &Url) -> Result<String> {
    let url = super::export::join(fhir_base, ".well-known/smart-configuration");
    let shown = url.to_string();
    let resp = http
        .send_plain(
            "SMART configuration",
            &Request::get(url).header("Accept", "application/json"),
        )
        .await?;
    let status = resp.status();
    if !status.is_success() {
        return Err(auth_error(
            &shown,
            format!("{status}; set extract.smart.token_url instead"),
        ));
    }
    let body = resp
        .bytes()
        .await
        .map_err(|e| auth_error(&shown, super::http::describe(&e)))?;
    let json: Value =
        serde_json::from_slice(&body).map_err(|e| auth_error(&shown, e.to_string()))?;
    json["token_endpoint"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| auth_error(&shown, "no token_endpoint in the configuration".into()))
}

/// A private key that signs client assertions.
enum Signer {
    /// RS384: RSASSA-PKCS1-v1_5 with SHA-384.
    Rsa(RsaKeyPair),
    /// ES384: ECDSA on P-384 with SHA-384, the signature as r || s.
    Ec(EcdsaKeyPair),
}

impl Signer {
    fn alg(&self) -> &'static str {
        match self {
            Signer::Rsa(_) => "RS384",
            Signer::Ec(_) => "ES384",
        }
    }

    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>> {
        let rng = SystemRandom::new();
        let failed = |_| Error::Auth {
            endpoint: String::new(),
            message: "signing the client assertion failed".into(),
        };
        match self {
            Signer::Rsa(k) => {
                let mut sig = vec![0; k.public().modulus_len()];
                k.sign(&signature::RSA_PKCS1_SHA384, &rng, msg, &mut sig)
                    .map_err(failed)?;
                Ok(sig)
            }
            Signer::Ec(k) => Ok(k.sign(&rng, msg).map_err(failed)?.as_ref().to_vec()),
        }
    }

    /// Reads a PEM or JWK key file; also the JWK's `kid`, if any.
    fn load(path: &FsPath) -> Result<(Signer, Option<String>)> {
        let bad = |reason: String| Error::Input {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let text = text.trim();
        if text.starts_with('{') {
            let json: Value =
                serde_json::from_str(text).map_err(|e| bad(format!("not a JWK: {e}")))?;
            // A JWK, or a JWK Set: the first key with a private part.
            let jwk = match json.get("keys").and_then(Value::as_array) {
                Some(keys) => keys
                    .iter()
                    .find(|k| k.get("d").is_some())
                    .ok_or_else(|| bad("the JWK Set holds no private key".into()))?,
                None => &json,
            };
            let kid = jwk["kid"].as_str().map(str::to_string);
            return Ok((Self::from_jwk(jwk).map_err(bad)?, kid));
        }
        Ok((Self::from_pem(text).map_err(bad)?, None))
    }

    fn from_pem(text: &str) -> std::result::Result<Signer, String> {
        let begin = text
            .find("-----BEGIN ")
            .ok_or("neither a PEM file nor a JWK")?;
        let rest = &text[begin + 11..];
        let label_end = rest.find("-----").ok_or("a broken PEM header")?;
        let label = &rest[..label_end];
        let body_start = label_end + 5;
        let end = rest
            .find(&format!("-----END {label}-----"))
            .ok_or("a PEM block without its END line")?;
        let b64: String = rest[body_start..end]
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        let der = STANDARD
            .decode(b64)
            .map_err(|e| format!("PEM body is not base64: {e}"))?;
        match label {
            "PRIVATE KEY" => RsaKeyPair::from_pkcs8(&der)
                .map(Signer::Rsa)
                .or_else(|_| {
                    EcdsaKeyPair::from_pkcs8(
                        &signature::ECDSA_P384_SHA384_FIXED_SIGNING,
                        &der,
                        &SystemRandom::new(),
                    )
                    .map(Signer::Ec)
                })
                .map_err(|e| format!("not an RSA or P-384 PKCS#8 private key: {e}")),
            "RSA PRIVATE KEY" => RsaKeyPair::from_der(&der)
                .map(Signer::Rsa)
                .map_err(|e| format!("not a usable RSA private key: {e}")),
            "EC PRIVATE KEY" => {
                Err("an SEC1 EC key: convert it to PKCS#8 (openssl pkcs8 -topk8 -nocrypt)".into())
            }
            "ENCRYPTED PRIVATE KEY" => {
                Err("an encrypted key: give the key unencrypted (and keep the file private)".into())
            }
            other => Err(format!("a PEM block of {other:?}, not a private key")),
        }
    }

    fn from_jwk(jwk: &Value) -> std::result::Result<Signer, String> {
        let part = |name: &str| -> std::result::Result<Vec<u8>, String> {
            let v = jwk[name]
                .as_str()
                .ok_or_else(|| format!("the JWK has no {name:?}"))?;
            URL_SAFE_NO_PAD
                .decode(v.trim_end_matches('='))
                .map_err(|e| format!("JWK {name:?}: {e}"))
        };
        match jwk["kty"].as_str() {
            Some("RSA") => {
                let components = ring::rsa::KeyPairComponents {
                    public_key: ring::rsa::PublicKeyComponents {
                        n: part("n")?,
                        e: part("e")?,
                    },
                    d: part("d")?,
                    p: part("p")?,
                    q: part("q")?,
                    dP: part("dp")?,
                    dQ: part("dq")?,
                    qInv: part("qi")?,
                };
                RsaKeyPair::from_components(&components)
                    .map(Signer::Rsa)
                    .map_err(|e| format!("not a usable RSA key: {e}"))
            }
            Some("EC") if jwk["crv"] == "P-384" => {
                let mut public = vec![4u8];
                public.extend(part("x")?);
                public.extend(part("y")?);
                EcdsaKeyPair::from_private_key_and_public_key(
                    &signature::ECDSA_P384_SHA384_FIXED_SIGNING,
                    &part("d")?,
                    &public,
                    &SystemRandom::new(),
                )
                .map(Signer::Ec)
                .map_err(|e| format!("not a usable P-384 key: {e}"))
            }
            Some("EC") => Err("an EC key on another curve than P-384 (ES384 needs P-384)".into()),
            other => Err(format!(
                "a JWK of kty {other:?}: RS384 needs RSA, ES384 needs EC P-384"
            )),
        }
    }

    #[cfg(test)]
    fn public_key(&self) -> Vec<u8> {
        use ring::signature::KeyPair;
        match self {
            Signer::Rsa(k) => k.public().as_ref().to_vec(),
            Signer::Ec(k) => k.public_key().as_ref().to_vec(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ES384 assertion verifies with the key's public half and carries
    /// the claims the SMART Backend Services IG requires.
    #[test]
    fn es384_assertion_verifies() {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P384_SHA384_FIXED_SIGNING, &rng)
            .unwrap();
        let pem = format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            STANDARD.encode(pkcs8.as_ref())
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        std::fs::write(&path, pem).unwrap();
        let smart = Smart::new(&SmartSettings {
            client_id: "client-1".into(),
            private_key: path,
            kid: Some("k1".into()),
            token_url: None,
            scope: "system/*.read".into(),
        })
        .unwrap();
        let jwt = smart.assertion("https://auth.example/token").unwrap();
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3);
        let header: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
        assert_eq!(header["alg"], "ES384");
        assert_eq!(header["kid"], "k1");
        let claims: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(claims["iss"], "client-1");
        assert_eq!(claims["sub"], "client-1");
        assert_eq!(claims["aud"], "https://auth.example/token");
        let exp = claims["exp"].as_i64().unwrap() - chrono::Utc::now().timestamp();
        assert!((0..=300).contains(&exp), "{exp}");
        let public = signature::UnparsedPublicKey::new(
            &signature::ECDSA_P384_SHA384_FIXED,
            smart.key.public_key(),
        );
        let sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        public
            .verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &sig)
            .expect("signature verifies");
    }

    #[test]
    fn a_token_file_is_read_trimmed_and_its_errors_never_show_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "\n  abc.def-123 \r\n").unwrap();
        assert_eq!(token_from_file(&path).unwrap(), "abc.def-123");
        for (content, why) in [
            (&b" \n"[..], "empty"),
            (b"secret-1\nsecret-2", "more than one line"),
            (b"secret\xff", "not UTF-8"),
        ] {
            std::fs::write(&path, content).unwrap();
            let err = token_from_file(&path).unwrap_err().to_string();
            assert!(err.contains(why) && err.contains("token"), "{err}");
            assert!(!err.contains("secret"), "{err}");
        }
        let err = token_from_file(&dir.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("missing") && err.contains("cannot read"),
            "{err}"
        );
    }

    #[test]
    fn key_file_errors_name_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        std::fs::write(
            &path,
            "-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n",
        )
        .unwrap();
        let err = Signer::load(&path).err().unwrap().to_string();
        assert!(err.contains("PKCS#8") && err.contains("key.pem"), "{err}");
        std::fs::write(&path, r#"{"kty":"EC","crv":"P-256","x":"","y":"","d":""}"#).unwrap();
        let err = Signer::load(&path).err().unwrap().to_string();
        assert!(err.contains("P-384"), "{err}");
    }
}
