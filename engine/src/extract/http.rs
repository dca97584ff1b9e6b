//! HTTP for the extract stage: one client, retries with backoff on 429, 5xx
//! and broken connections (honouring `Retry-After`, capped), a renewed token
//! after a 401, and redirects followed by hand so that `Authorization` never
//! goes to another origin than the one it was meant for.

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, LOCATION, RETRY_AFTER};
use reqwest::{Method, Response, StatusCode};
use url::Url;

use super::auth::Auth;
use crate::error::{Error, Result};
use crate::settings::ExtractSettings;

const MAX_REDIRECTS: usize = 10;

/// A request that can be sent again (for retries and redirects).
#[derive(Debug, Clone)]
pub struct Request {
    pub method: Method,
    pub url: Url,
    pub headers: Vec<(&'static str, String)>,
    pub body: Option<Vec<u8>>,
}

impl Request {
    pub fn get(url: Url) -> Request {
        Request {
            method: Method::GET,
            url,
            headers: Vec::new(),
            body: None,
        }
    }

    pub fn post(url: Url, content_type: &str, body: Vec<u8>) -> Request {
        Request {
            method: Method::POST,
            url,
            headers: vec![("Content-Type", content_type.to_string())],
            body: Some(body),
        }
    }

    pub fn delete(url: Url) -> Request {
        Request {
            method: Method::DELETE,
            ..Request::get(url)
        }
    }

    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Request {
        self.headers.push((name, value.into()));
        self
    }
}

/// How long to wait and how often to try again.
#[derive(Debug, Clone)]
pub struct Policy {
    pub retries: u32,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub max_retry_after: Duration,
}

impl Policy {
    pub fn from_settings(s: &ExtractSettings) -> Policy {
        Policy {
            retries: s.retries,
            backoff_initial: Duration::from_millis(s.backoff_initial_ms),
            backoff_max: Duration::from_secs(s.backoff_max_seconds),
            max_retry_after: Duration::from_secs(s.max_retry_after_seconds),
        }
    }

    /// Exponential backoff with jitter for the `attempt`-th retry (from 0).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let base = self
            .backoff_initial
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.backoff_max);
        // Up to a quarter more, so that parallel downloads do not retry in step.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        base + base.mul_f64(f64::from(nanos % 1000) / 4000.0)
    }

    /// The wait a response asks for (`Retry-After` in seconds or as an HTTP
    /// date), capped; None when it asks for none.
    pub fn retry_after(&self, headers: &HeaderMap) -> Option<Duration> {
        let v = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
        let wait = match v.parse::<u64>() {
            Ok(secs) => Duration::from_secs(secs),
            Err(_) => {
                let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
                (at.with_timezone(&chrono::Utc) - chrono::Utc::now())
                    .to_std()
                    .unwrap_or(Duration::ZERO)
            }
        };
        Some(wait.min(self.max_retry_after))
    }
}

/// Whether a failed request may succeed when sent again.
pub fn transient_status(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
}

/// Whether a transport error is a broken or timed-out connection.
pub fn transient_error(e: &reqwest::Error) -> bool {
    e.is_connect() || e.is_timeout() || e.is_body() || e.is_request() || e.is_decode()
}

/// The client of one extraction.
pub struct Http {
    client: reqwest::Client,
    pub policy: Policy,
}

impl Http {
    pub fn new(settings: &ExtractSettings) -> Result<Http> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(settings.timeout_seconds.min(30)))
            .read_timeout(Duration::from_secs(settings.timeout_seconds))
            .user_agent(concat!("fhirflow/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::Config(format!("HTTP client: {e}")))?;
        Ok(Http {
            client,
            policy: Policy::from_settings(settings),
        })
    }

    /// Sends `req`, retrying transient failures. `auth` is the authorization
    /// for the origin of the URL it comes with (None: send none); after a
    /// 401 the token is renewed once. A response with a transient status is
    /// returned after the last retry, for the caller to report with its body;
    /// a transport error after the last retry is an error naming `what`.
    pub async fn send(
        &self,
        what: &str,
        req: &Request,
        auth: Option<(&Auth, &Url)>,
    ) -> Result<Response> {
        let Some((a, origin)) = auth else {
            return self.send_plain(what, req).await;
        };
        let mut renewed = false;
        loop {
            let header = match a.header(self, origin).await? {
                Some(h) => {
                    let mut v = HeaderValue::from_str(&h).map_err(|_| Error::Auth {
                        endpoint: String::new(),
                        message: "the access token is not a valid header value".into(),
                    })?;
                    v.set_sensitive(true);
                    Some((v, origin))
                }
                None => None,
            };
            let resp = self
                .retrying(what, req, || {
                    self.fetch(req, header.as_ref().map(|(v, o)| (v, *o)))
                })
                .await?;
            if resp.status() == StatusCode::UNAUTHORIZED && !renewed && a.invalidate().await {
                renewed = true;
                continue;
            }
            return Ok(resp);
        }
    }

    /// [`Http::send`] without authorization.
    pub async fn send_plain(&self, what: &str, req: &Request) -> Result<Response> {
        self.retrying(what, req, || self.fetch(req, None)).await
    }

    async fn retrying<F, Fut>(
        &self,
        what: &str,
        req: &Request,
        mut attempt_once: F,
    ) -> Result<Response>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<Response, SendError>>,
    {
        let mut attempt = 0;
        loop {
            match attempt_once().await {
                Ok(resp) if transient_status(resp.status()) && attempt < self.policy.retries => {
                    let wait = self
                        .policy
                        .retry_after(resp.headers())
                        .unwrap_or_else(|| self.policy.backoff(attempt));
                    drop(resp);
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                Ok(resp) => return Ok(resp),
                Err(SendError::Http(e)) if transient_error(&e) && attempt < self.policy.retries => {
                    tokio::time::sleep(self.policy.backoff(attempt)).await;
                    attempt += 1;
                }
                Err(SendError::Http(e)) => {
                    return Err(Error::Http {
                        what: what.to_string(),
                        url: shown(&req.url),
                        message: format!("{} (after {attempt} retries)", describe(&e)),
                    })
                }
                Err(SendError::Other(e)) => return Err(e),
            }
        }
    }

    /// One try, following redirects; `auth` (a header value and the origin
    /// it is for) goes only to that origin.
    async fn fetch(
        &self,
        req: &Request,
        auth: Option<(&HeaderValue, &Url)>,
    ) -> Result<Response, SendError> {
        let mut url = req.url.clone();
        let mut method = req.method.clone();
        let mut body = req.body.clone();
        for _ in 0..=MAX_REDIRECTS {
            let mut headers = HeaderMap::new();
            for (k, v) in &req.headers {
                if let Ok(v) = HeaderValue::from_str(v) {
                    headers.insert(*k, v);
                }
            }
            if let Some((h, _)) = auth.filter(|(_, o)| same_origin(o, &url)) {
                headers.insert(AUTHORIZATION, h.clone());
            }
            let mut builder = self
                .client
                .request(method.clone(), url.clone())
                .headers(headers);
            if let Some(b) = &body {
                builder = builder.body(b.clone());
            }
            let resp = builder.send().await.map_err(SendError::Http)?;
            let status = resp.status();
            if !status.is_redirection() || status == StatusCode::NOT_MODIFIED {
                return Ok(resp);
            }
            let Some(next) = resp
                .headers()
                .get(LOCATION)
                .and_then(|l| l.to_str().ok())
                .and_then(|l| url.join(l).ok())
            else {
                return Ok(resp);
            };
            if status == StatusCode::SEE_OTHER
                || (matches!(status, StatusCode::MOVED_PERMANENTLY | StatusCode::FOUND)
                    && method == Method::POST)
            {
                method = Method::GET;
                body = None;
            }
            url = next;
        }
        Err(SendError::Other(Error::Http {
            what: "request".into(),
            url: shown(&req.url),
            message: format!("more than {MAX_REDIRECTS} redirects"),
        }))
    }
}

enum SendError {
    Http(reqwest::Error),
    Other(Error),
}

pub fn same_origin(a: &Url, b: &Url) -> bool {
    a.scheme() == b.scheme()
        && a.host_str() == b.host_str()
        && a.port_or_known_default() == b.port_or_known_default()
}

/// A URL as messages show it: without user info (query strings of FHIR
/// requests carry no secrets; signed download URLs may, so they go too).
pub fn shown(url: &Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    let signed = u.query_pairs().any(|(k, _)| {
        k.to_ascii_lowercase().contains("signature") || k.eq_ignore_ascii_case("sig")
    });
    if signed {
        u.set_query(None);
    }
    u.to_string()
}

/// A transport error without the URL reqwest puts in its text.
pub fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else if e.is_body() || e.is_decode() {
        "the connection broke while reading the body"
    } else {
        "the request failed"
    };
    let mut detail = String::new();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        detail = s.to_string();
        source = s.source();
    }
    if detail.is_empty() {
        kind.to_string()
    } else {
        format!("{kind}: {detail}")
    }
}

/// The text an error response carries: the OperationOutcome's issues when it
/// is one (severity, code, diagnostics or details), else the start of the body.
pub async fn error_text(resp: Response) -> String {
    let status = resp.status();
    let body = resp.bytes().await.unwrap_or_default();
    let mut out = format!("{status}");
    if let Ok(json) = serde_json::from_slice::<serde_json::Value>(&body) {
        if let Some(issues) = json["issue"].as_array() {
            for i in issues {
                let text = i["diagnostics"]
                    .as_str()
                    .or_else(|| i["details"]["text"].as_str())
                    .unwrap_or("");
                out.push_str(&format!(
                    "; {} {}: {text}",
                    i["severity"].as_str().unwrap_or("error"),
                    i["code"].as_str().unwrap_or("")
                ));
            }
            return out;
        }
    }
    let text = String::from_utf8_lossy(&body[..body.len().min(300)]);
    if !text.trim().is_empty() {
        out.push_str(": ");
        out.push_str(text.trim());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy::from_settings(&ExtractSettings {
            max_retry_after_seconds: 60,
            ..Default::default()
        })
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date_and_capped() {
        let p = policy();
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(p.retry_after(&h), Some(Duration::from_secs(7)));
        h.insert(RETRY_AFTER, HeaderValue::from_static("86400"));
        assert_eq!(p.retry_after(&h), Some(Duration::from_secs(60)));
        let at = (chrono::Utc::now() + chrono::Duration::seconds(30)).to_rfc2822();
        let at = at.replace("+0000", "GMT");
        h.insert(RETRY_AFTER, HeaderValue::from_str(&at).unwrap());
        let w = p.retry_after(&h).unwrap();
        assert!(
            w > Duration::from_secs(25) && w <= Duration::from_secs(30),
            "{w:?}"
        );
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Sat, 01 Jan 2000 00:00:00 GMT"),
        );
        assert_eq!(p.retry_after(&h), Some(Duration::ZERO));
        h.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(p.retry_after(&h), None);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = policy();
        assert!(p.backoff(0) >= Duration::from_millis(500));
        assert!(p.backoff(1) >= Duration::from_millis(1000));
        assert!(p.backoff(20) <= Duration::from_secs(30) * 5 / 4);
    }

    #[test]
    fn origins_and_shown_urls() {
        let a = Url::parse("http://127.0.0.1:80/fhir").unwrap();
        assert!(same_origin(&a, &Url::parse("http://127.0.0.1/x").unwrap()));
        assert!(!same_origin(
            &a,
            &Url::parse("http://127.0.0.1:81/x").unwrap()
        ));
        assert!(!same_origin(
            &a,
            &Url::parse("https://127.0.0.1/x").unwrap()
        ));
        let u = Url::parse("https://u:p@files.example/a.ndjson?X-Amz-Signature=abc").unwrap();
        assert_eq!(shown(&u), "https://files.example/a.ndjson");
    }
}
