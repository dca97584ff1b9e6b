//! HTTP for the extract stage: one client, retries with backoff on 429, 5xx
//! and broken connections (honouring `Retry-After`, capped), a renewed token
//! after a 401, and [`Destinations`]: the one check of where a URL the
//! server hands out (a manifest's file URL, a kick-off's `Content-Location`,
//! a redirect's `Location`) may lead. `Authorization` goes only to the origin
//! it was meant for: it is added when a request's URL has that origin, and
//! removed by the client when a redirect leaves its host and port.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, RETRY_AFTER};
use reqwest::{Method, Response, StatusCode};
use url::{Host, Url};

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

/// Where the client may go: the FHIR server's own origin (scheme, host and
/// port of its base URL) and the hosts of `[extract] allowed_hosts`; over
/// https unless the host is loopback or `allow_http` is set; never to a
/// link-local or instance-metadata address, whatever is allowed.
#[derive(Debug, Clone)]
pub struct Destinations {
    origin: Url,
    allowed: Vec<AllowedHost>,
    allow_http: bool,
}

/// An `allowed_hosts` entry: a host, and a port or any port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedHost {
    host: Host<String>,
    port: Option<u16>,
}

impl AllowedHost {
    /// `host`, `host:port`, `[v6]` or `[v6]:port`; host names are compared
    /// as the URL parser writes them (lower case, punycode).
    pub fn parse(entry: &str) -> std::result::Result<AllowedHost, String> {
        let entry = entry.trim();
        let (host, port) = match entry.rsplit_once(':') {
            Some((h, p))
                if !p.is_empty()
                    && p.bytes().all(|b| b.is_ascii_digit())
                    && (!h.contains(':') || (h.starts_with('[') && h.ends_with(']'))) =>
            {
                let port = p
                    .parse::<u16>()
                    .map_err(|_| format!("port {p} is out of range"))?;
                (h, Some(port))
            }
            _ => (entry, None),
        };
        if host.is_empty() || host.contains(['/', '@', '?', '#']) {
            return Err("not a host name, host:port or [IPv6]:port".into());
        }
        let host = Host::parse(host).map_err(|e| format!("not a host name: {e}"))?;
        Ok(AllowedHost {
            host: without_trailing_dot(host),
            port,
        })
    }

    fn matches(&self, url: &Url) -> bool {
        url.host()
            .map(|h| without_trailing_dot(h.to_owned()))
            .as_ref()
            == Some(&self.host)
            && self
                .port
                .is_none_or(|p| url.port_or_known_default() == Some(p))
    }
}

fn without_trailing_dot(host: Host<String>) -> Host<String> {
    match host {
        Host::Domain(d) => Host::Domain(d.strip_suffix('.').unwrap_or(&d).to_string()),
        other => other,
    }
}

/// Why a URL is not followed.
#[derive(Debug, Clone)]
pub struct Refused {
    /// The URL as messages show it (a host name, when the resolver refused).
    pub url: String,
    pub reason: String,
    /// A redirect led there.
    pub redirect: bool,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.redirect {
            write!(f, "redirected to {}, refused: {}", self.url, self.reason)
        } else {
            write!(f, "{} refused: {}", self.url, self.reason)
        }
    }
}

impl std::error::Error for Refused {}

impl Destinations {
    /// The destinations of an extraction from the server at `fhir_url`.
    /// `allowed_hosts` entries are checked by the settings; one that does not
    /// parse allows nothing.
    pub fn new(fhir_url: &Url, settings: &ExtractSettings) -> Destinations {
        Destinations {
            origin: fhir_url.clone(),
            allowed: settings
                .allowed_hosts
                .iter()
                .filter_map(|h| AllowedHost::parse(h).ok())
                .collect(),
            allow_http: settings.allow_http,
        }
    }

    /// Whether the client may send a request to `url`: the one check of
    /// manifest file URLs, `Content-Location` and redirects (and of every
    /// request [`Http::send`] makes).
    pub fn check(&self, url: &Url) -> std::result::Result<(), Refused> {
        let refuse = |reason: String| {
            Err(Refused {
                url: shown(url),
                reason,
                redirect: false,
            })
        };
        if let Err(reason) = check_address(url) {
            return refuse(reason);
        }
        let host = url.host().expect("checked by check_address");
        if url.scheme() == "http" && !self.allow_http && !is_loopback(&host) {
            return refuse(format!(
                "plain http to {host}, which is not a loopback host (https only, unless \
                 [extract] allow_http = true)"
            ));
        }
        if same_origin(&self.origin, url) || self.allowed.iter().any(|a| a.matches(url)) {
            return Ok(());
        }
        refuse(format!(
            "{} is not the FHIR server's origin ({}) and not in [extract] allowed_hosts",
            origin_of(url),
            origin_of(&self.origin)
        ))
    }
}

/// `scheme://host:port` of a URL.
fn origin_of(url: &Url) -> String {
    url.origin().ascii_serialization()
}

/// The part of the check no setting lifts: an http(s) URL with a host that
/// is not a link-local or instance-metadata address. Also the only check of
/// the SMART token endpoint, which is configured (or discovered) separately.
pub fn check_address(url: &Url) -> std::result::Result<(), String> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("{:?} is not an http or https URL", url.scheme()));
    }
    let ip = match url.host() {
        None => return Err("the URL has no host".into()),
        Some(Host::Domain(_)) => return Ok(()),
        Some(Host::Ipv4(ip)) => IpAddr::V4(ip),
        Some(Host::Ipv6(ip)) => IpAddr::V6(ip),
    };
    if forbidden_ip(ip) {
        return Err(format!(
            "{ip} is a link-local or instance-metadata address, never followed"
        ));
    }
    Ok(())
}

/// 169.254.0.0/16 (link-local, the instance metadata service of EC2, Azure,
/// GCP and others), fe80::/10, EC2's IPv6 metadata address fd00:ec2::254,
/// and those written as IPv4-mapped IPv6.
pub fn forbidden_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => {
            (v6.segments()[0] & 0xffc0) == 0xfe80
                || v6 == Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x254)
                || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_link_local())
        }
    }
}

fn is_loopback(host: &Host<&str>) -> bool {
    match host {
        Host::Domain(d) => {
            d.eq_ignore_ascii_case("localhost") || d.eq_ignore_ascii_case("localhost.")
        }
        Host::Ipv4(ip) => ip.is_loopback(),
        Host::Ipv6(ip) => {
            ip.is_loopback()
                || ip
                    .to_ipv4_mapped()
                    .is_some_and(|v4: Ipv4Addr| v4.is_loopback())
        }
    }
}

/// The system resolver, refusing a name that resolves to a forbidden
/// address (a host name is checked by its addresses, as an IP literal is by
/// [`check_address`]).
struct Resolver;

impl reqwest::dns::Resolve for Resolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if let Some(bad) = addrs.iter().find(|a| forbidden_ip(a.ip())) {
                return Err(Box::new(Refused {
                    url: host.clone(),
                    redirect: false,
                    reason: format!(
                        "the name resolves to {}, a link-local or instance-metadata address, \
                         never followed",
                        bad.ip()
                    ),
                })
                    as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The refusal in a transport error's chain, if the redirect policy or the
/// resolver refused.
fn refusal(e: &reqwest::Error) -> Option<&Refused> {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(r) = s.downcast_ref::<Refused>() {
            return Some(r);
        }
        source = s.source();
    }
    None
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
    pub destinations: Arc<Destinations>,
}

impl Http {
    /// The client of an extraction from the server at `fhir_url`.
    pub fn new(fhir_url: &Url, settings: &ExtractSettings) -> Result<Http> {
        let destinations = Arc::new(Destinations::new(fhir_url, settings));
        let check = destinations.clone();
        // Redirects are followed by the client, each hop only where
        // `Destinations` allows; the client drops `Authorization` when a
        // hop leaves the host and port.
        let redirects = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() > MAX_REDIRECTS {
                let url = shown(attempt.url());
                return attempt.error(format!(
                    "more than {MAX_REDIRECTS} redirects, the last to {url}"
                ));
            }
            match check.check(attempt.url()) {
                Ok(()) => attempt.follow(),
                Err(refused) => attempt.error(Refused {
                    redirect: true,
                    ..refused
                }),
            }
        });
        let client = reqwest::Client::builder()
            .redirect(redirects)
            .dns_resolver(Arc::new(Resolver))
            .connect_timeout(Duration::from_secs(settings.timeout_seconds.min(30)))
            .read_timeout(Duration::from_secs(settings.timeout_seconds))
            .user_agent(concat!("fhirflow/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::Config(format!("HTTP client: {e}")))?;
        Ok(Http {
            client,
            policy: Policy::from_settings(settings),
            destinations,
        })
    }

    /// [`Destinations::check`] as the error of a request for `what`.
    pub fn check(&self, what: &str, url: &Url) -> Result<()> {
        self.destinations.check(url).map_err(|r| Error::Http {
            what: what.to_string(),
            url: r.url,
            message: format!("refused: {}", r.reason),
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
        self.check(what, &req.url)?;
        let Some((a, origin)) = auth else {
            return self.retrying(what, req, || self.fetch(req, None)).await;
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

    /// A request without authorization outside the FHIR server's
    /// destinations (the SMART token endpoint): only [`check_address`]
    /// applies, and the redirect policy.
    pub async fn send_plain(&self, what: &str, req: &Request) -> Result<Response> {
        check_address(&req.url).map_err(|reason| Error::Http {
            what: what.to_string(),
            url: shown(&req.url),
            message: format!("refused: {reason}"),
        })?;
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
        Fut: std::future::Future<Output = reqwest::Result<Response>>,
    {
        let mut attempt = 0;
        loop {
            match attempt_once().await {
                Ok(resp) if transient_status(resp.status()) && attempt < self.policy.retries => {
                    let wait = self
                        .policy
                        .retry_after(resp.headers())
                        .unwrap_or_else(|| self.policy.backoff(attempt));
                    tracing::info!(
                        what,
                        url = %shown(&req.url),
                        status = resp.status().as_u16(),
                        wait_seconds = wait.as_secs_f64(),
                        attempt = attempt + 1,
                        "FHIR server answered a transient status; retrying after a backoff"
                    );
                    drop(resp);
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                Ok(resp) => return Ok(resp),
                // A refusal is final: the same URL would be refused again.
                Err(e) if refusal(&e).is_some() => {
                    return Err(Error::Http {
                        what: what.to_string(),
                        url: shown(&req.url),
                        message: refusal(&e).expect("just matched").to_string(),
                    });
                }
                Err(e) if transient_error(&e) && attempt < self.policy.retries => {
                    let wait = self.policy.backoff(attempt);
                    tracing::info!(
                        what,
                        url = %shown(&req.url),
                        wait_seconds = wait.as_secs_f64(),
                        attempt = attempt + 1,
                        "request to the FHIR server failed ({}); retrying after a backoff",
                        describe(&e)
                    );
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                Err(e) => {
                    return Err(Error::Http {
                        what: what.to_string(),
                        url: shown(&req.url),
                        message: format!("{} (after {attempt} retries)", describe(&e)),
                    })
                }
            }
        }
    }

    /// One try, redirects followed by the client; `auth` (a header value
    /// and the origin it is for) goes only to that origin.
    async fn fetch(
        &self,
        req: &Request,
        auth: Option<(&HeaderValue, &Url)>,
    ) -> reqwest::Result<Response> {
        let mut headers = HeaderMap::new();
        for (k, v) in &req.headers {
            if let Ok(v) = HeaderValue::from_str(v) {
                headers.insert(*k, v);
            }
        }
        if let Some((h, _)) = auth.filter(|(_, o)| same_origin(o, &req.url)) {
            headers.insert(AUTHORIZATION, h.clone());
        }
        let mut builder = self
            .client
            .request(req.method.clone(), req.url.clone())
            .headers(headers);
        if let Some(b) = &req.body {
            builder = builder.body(b.clone());
        }
        builder.send().await
    }
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

    fn destinations(fhir: &str, allowed: &[&str], allow_http: bool) -> Destinations {
        Destinations::new(
            &Url::parse(fhir).unwrap(),
            &ExtractSettings {
                allowed_hosts: allowed.iter().map(|h| h.to_string()).collect(),
                allow_http,
                ..Default::default()
            },
        )
    }

    fn refused(d: &Destinations, url: &str) -> Option<String> {
        d.check(&Url::parse(url).unwrap()).err().map(|r| r.reason)
    }

    #[test]
    fn destinations_are_the_origin_and_the_allowed_hosts() {
        let d = destinations(
            "https://ehr.example/fhir",
            &[
                "files.example",
                "Store.Example:8443",
                "[::1]:9000",
                "10.0.0.7",
            ],
            false,
        );
        for ok in [
            "https://ehr.example/fhir/bulk/1",
            "https://ehr.example:443/x",
            "https://files.example/a.ndjson",
            "https://files.example:9999/a.ndjson",
            "https://store.example:8443/a",
            "https://10.0.0.7/a",
            "http://[::1]:9000/a",
        ] {
            assert_eq!(refused(&d, ok), None, "{ok}");
        }
        for (no, why) in [
            ("https://ehr.example:8443/x", "not the FHIR server's origin"),
            ("https://other.example/x", "not in [extract] allowed_hosts"),
            ("https://store.example/a", "allowed_hosts"),
            ("https://ehr.example.evil/x", "allowed_hosts"),
            ("http://ehr.example/fhir/x", "plain http"),
            ("http://files.example/a", "plain http"),
            ("http://[::1]:9001/a", "allowed_hosts"),
            ("ftp://ehr.example/x", "not an http or https URL"),
            ("http://169.254.169.254/latest/meta-data/", "link-local"),
            ("http://2852039166/latest/meta-data/", "link-local"),
            ("http://0xa9.0xfe.0xa9.0xfe/", "link-local"),
            ("http://[fe80::1]/", "link-local"),
            ("http://[fd00:ec2::254]/", "instance-metadata"),
            ("http://[::ffff:169.254.169.254]/", "link-local"),
        ] {
            let r = refused(&d, no).unwrap_or_else(|| panic!("{no} allowed"));
            assert!(r.contains(why), "{no}: {r}");
        }
        // An allowed_hosts entry does not lift the address rule.
        let d = destinations("http://127.0.0.1:8080/fhir", &["169.254.169.254"], true);
        assert!(refused(&d, "http://169.254.169.254/x").is_some());
        // Plain http: loopback, or with allow_http.
        assert_eq!(refused(&d, "http://127.0.0.1:8080/x"), None);
        let d = destinations(
            "http://127.0.0.1:8080/fhir",
            &["localhost", "ehr.lan"],
            false,
        );
        assert_eq!(refused(&d, "http://localhost:8080/x"), None);
        assert!(refused(&d, "http://ehr.lan/x")
            .unwrap()
            .contains("plain http"));
        let d = destinations("http://ehr.lan/fhir", &[], true);
        assert_eq!(refused(&d, "http://ehr.lan/fhir/x"), None);
    }

    #[test]
    fn allowed_host_entries() {
        assert!(AllowedHost::parse("files.example").is_ok());
        assert!(AllowedHost::parse("files.example:443").unwrap().port == Some(443));
        assert!(AllowedHost::parse("[::1]").is_ok());
        for bad in [
            "",
            "https://files.example",
            "a/b",
            "host:99999",
            "::1",
            "u@h",
        ] {
            assert!(AllowedHost::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn forbidden_addresses() {
        for ip in [
            "169.254.169.254",
            "169.254.0.1",
            "fe80::1",
            "febf::1",
            "fd00:ec2::254",
        ] {
            assert!(forbidden_ip(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "127.0.0.1",
            "10.0.0.1",
            "::1",
            "fd00:ec2::253",
            "fec0::1",
            "8.8.8.8",
        ] {
            assert!(!forbidden_ip(ip.parse().unwrap()), "{ip}");
        }
    }
}
