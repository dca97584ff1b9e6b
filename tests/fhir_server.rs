//! A real FHIR server for the extract tests: sekmet-fhir (pinned in
//! `tests/requirements.txt`) started from the virtual environment on a free
//! loopback port, behind [`Proxy`], a small HTTP proxy that records every
//! request and injects the faults a server cannot produce on demand (429
//! with Retry-After, 500s, a connection cut in the middle of a file, a
//! refused token, a wrong manifest count, a redirect to another origin, a
//! manifest file URL or a `Content-Location` on another host, blank lines
//! in a file).
//!
//! sekmet's `base_url` is the proxy's, so the status URLs and file URLs it
//! hands out lead through the proxy too.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};

/// A fault the proxy injects into the next matching requests.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Answer with this status (and a `Retry-After`, when given) instead of
    /// forwarding.
    Status(u16, Option<String>),
    /// Forward, but send only the first half of the body, then break the
    /// connection.
    Cut,
    /// Forward a manifest with the first output file's count off by one.
    WrongCount,
    /// Redirect (302) to the same path on another origin.
    RedirectTo(String),
    /// Forward a manifest with the first output file's URL moved to this
    /// origin (`scheme://host[:port]`), its path kept.
    OutputOrigin(String),
    /// Forward a kick-off answer with its `Content-Location` moved to this
    /// origin.
    ContentLocationOrigin(String),
    /// Forward a file with blank lines added: an empty one and one of
    /// spaces, a tab and `\r` after its first line, an empty one at its end.
    BlankLines,
}

/// `url` with its scheme, host and port replaced by `origin`.
pub fn with_origin(url: &str, origin: &str) -> String {
    let u = url::Url::parse(url).expect("an absolute URL");
    let rest = &u[url::Position::BeforePath..];
    format!("{}{rest}", origin.trim_end_matches('/'))
}

/// One request the proxy saw.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub authorization: bool,
    pub status: u16,
}

#[derive(Default)]
struct ProxyState {
    /// (method, path substring, fault, times left)
    faults: Vec<(String, String, Fault, usize)>,
    seen: Vec<Seen>,
}

/// The fault-injecting proxy in front of an upstream.
#[derive(Clone)]
pub struct Proxy {
    pub addr: SocketAddr,
    state: Arc<Mutex<ProxyState>>,
}

impl Proxy {
    /// Starts a proxy to `upstream` (scheme://host:port) on a free port; it
    /// runs on its own thread for the life of the process. `authorize`: a
    /// header value added to forwarded requests (a file host that trusts
    /// its own URLs, like a signed-URL store).
    pub fn start(
        upstream: impl Fn() -> String + Send + Sync + 'static,
        authorize: Option<String>,
    ) -> Proxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(ProxyState::default()));
        let proxy = Proxy {
            addr,
            state: state.clone(),
        };
        let upstream = Arc::new(upstream);
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let client = reqwest::Client::builder()
                    .redirect(reqwest::redirect::Policy::none())
                    .build()
                    .unwrap();
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let (state, upstream, client, authorize) = (
                        state.clone(),
                        upstream.clone(),
                        client.clone(),
                        authorize.clone(),
                    );
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |req| {
                            handle(
                                req,
                                state.clone(),
                                upstream(),
                                client.clone(),
                                authorize.clone(),
                            )
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
        });
        proxy
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Injects `fault` into the next `times` requests whose method is
    /// `method` and whose path contains `path`.
    pub fn inject(&self, method: &str, path: &str, fault: Fault, times: usize) {
        self.state
            .lock()
            .unwrap()
            .faults
            .push((method.into(), path.into(), fault, times));
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    pub fn clear(&self) {
        let mut s = self.state.lock().unwrap();
        s.seen.clear();
        s.faults.clear();
    }

    /// How many requests matched `method` and a path containing `path`.
    pub fn count(&self, method: &str, path: &str) -> usize {
        self.seen()
            .iter()
            .filter(|s| s.method == method && s.path.contains(path))
            .count()
    }

    /// GETs of export files that succeeded, by path.
    pub fn file_downloads(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for s in self.seen() {
            if s.method == "GET" && s.path.contains("/bulk-files/") && s.status == 200 {
                *out.entry(s.path).or_default() += 1;
            }
        }
        out
    }
}

type Body = BoxBody<Bytes, std::io::Error>;

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<Mutex<ProxyState>>,
    upstream: String,
    client: reqwest::Client,
    authorize: Option<String>,
) -> Result<Response<Body>, Infallible> {
    let method = req.method().to_string();
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let authorization = req.headers().contains_key("authorization");
    let fault = {
        let mut s = state.lock().unwrap();
        let hit = s
            .faults
            .iter_mut()
            .find(|(m, p, _, left)| *left > 0 && *m == method && path.contains(p.as_str()));
        hit.map(|f| {
            f.3 -= 1;
            f.2.clone()
        })
    };
    let record = |status: u16| {
        state.lock().unwrap().seen.push(Seen {
            method: method.clone(),
            path: path.clone(),
            authorization,
            status,
        })
    };
    match &fault {
        Some(Fault::Status(code, retry_after)) => {
            record(*code);
            let mut r = Response::builder().status(*code);
            if let Some(ra) = retry_after {
                r = r.header("Retry-After", ra);
            }
            let body = json!({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "transient", "diagnostics": "injected by the test proxy"}]});
            return Ok(r.body(full(body.to_string())).unwrap());
        }
        Some(Fault::RedirectTo(origin)) => {
            record(302);
            return Ok(Response::builder()
                .status(StatusCode::FOUND)
                .header("Location", format!("{origin}{path}"))
                .body(full(""))
                .unwrap());
        }
        _ => {}
    }
    // Forward.
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut fwd = client.request(parts.method.clone(), format!("{upstream}{path}"));
    for (k, v) in &parts.headers {
        if k != "host" && k != "content-length" {
            fwd = fwd.header(k, v);
        }
    }
    if let Some(a) = &authorize {
        fwd = fwd.header("authorization", a);
    }
    let resp = match fwd.body(body).send().await {
        Ok(r) => r,
        Err(_) => {
            record(502);
            return Ok(Response::builder().status(502).body(full("")).unwrap());
        }
    };
    let status = resp.status().as_u16();
    let mut builder = Response::builder().status(status);
    for (k, v) in resp.headers() {
        if k == "content-location" {
            if let (Some(Fault::ContentLocationOrigin(origin)), Ok(v)) = (&fault, v.to_str()) {
                builder = builder.header(k, with_origin(v, origin));
                continue;
            }
        }
        if k != "content-length" && k != "transfer-encoding" {
            builder = builder.header(k, v);
        }
    }
    let mut bytes = resp.bytes().await.unwrap_or_default();
    match (&fault, status) {
        (Some(Fault::WrongCount), 200) => {
            let mut manifest: Value = serde_json::from_slice(&bytes).unwrap();
            let c = manifest["output"][0]["count"].as_u64().unwrap();
            manifest["output"][0]["count"] = json!(c + 1);
            bytes = Bytes::from(manifest.to_string());
        }
        (Some(Fault::OutputOrigin(origin)), 200) => {
            let mut manifest: Value = serde_json::from_slice(&bytes).unwrap();
            let url = manifest["output"][0]["url"].as_str().unwrap();
            manifest["output"][0]["url"] = json!(with_origin(url, origin));
            bytes = Bytes::from(manifest.to_string());
        }
        (Some(Fault::BlankLines), 200) => {
            assert!(
                !bytes.starts_with(&[0x1f, 0x8b]),
                "BlankLines needs a plain file"
            );
            let first = bytes.iter().position(|&b| b == b'\n').unwrap() + 1;
            let mut v = bytes[..first].to_vec();
            v.extend_from_slice(b"\n \t\r\n");
            v.extend_from_slice(&bytes[first..]);
            v.extend_from_slice(b"\n");
            bytes = Bytes::from(v);
        }
        _ => {}
    }
    record(status);
    if let Some(Fault::Cut) = fault {
        let half = bytes.slice(..bytes.len() / 2);
        let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = vec![
            Ok(Frame::data(half)),
            Err(std::io::Error::other("connection cut by the test proxy")),
        ];
        // The error comes a moment later, so that the headers and the first
        // half are on the wire before the connection breaks.
        let frames = futures::StreamExt::then(futures::stream::iter(frames), |f| async move {
            if f.is_err() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            f
        });
        let body = StreamBody::new(frames).boxed();
        return Ok(builder
            .header("content-length", bytes.len())
            .body(body)
            .unwrap());
    }
    Ok(builder
        .header("content-length", bytes.len())
        .body(full(bytes))
        .unwrap())
}

/// sekmet-fhir serving on a free loopback port, behind a [`Proxy`], stopped
/// on drop.
pub struct Sekmet {
    child: Child,
    pub port: u16,
    pub proxy: Proxy,
    dir: tempfile::TempDir,
}

/// How the server authorizes requests.
pub enum ServerAuth {
    /// A static bearer token.
    Bearer(String),
    /// SMART Backend Services with these clients (id, public JWK) and
    /// token lifetime in seconds; the static [`TOKEN`] too, for loading.
    Smart {
        clients: Vec<(String, Value)>,
        token_lifetime: u64,
    },
}

pub const TOKEN: &str = "test-bearer-token-3f9a";

impl Sekmet {
    /// Starts the server behind the proxy.
    pub fn start(auth: ServerAuth) -> Sekmet {
        Self::start_with(auth, true)
    }

    /// Starts the server; `proxied`: the URLs it hands out lead through the
    /// proxy (else straight to the server, for benchmarks).
    pub fn start_with(auth: ServerAuth, proxied: bool) -> Sekmet {
        let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/sekmet");
        assert!(
            bin.is_file(),
            "{} is missing: run tests/run.sh, which installs tests/requirements.txt",
            bin.display()
        );
        let port = free_port();
        let proxy = Proxy::start(move || format!("http://127.0.0.1:{port}"), None);
        let dir = tempfile::tempdir().unwrap();
        let server_auth = match &auth {
            ServerAuth::Bearer(t) => json!({"types": ["bearer"], "tokens": [t]}),
            ServerAuth::Smart {
                clients,
                token_lifetime,
            } => json!({
                "types": ["smart", "bearer"],
                "tokens": [TOKEN],
                "smart_clients": clients.iter().map(|(id, jwk)| json!({
                    "client_id": id, "jwks": {"keys": [jwk]}, "scopes": "system/*.read"})).collect::<Vec<_>>(),
                "token_lifetime": token_lifetime,
            }),
        };
        // YAML is a superset of JSON.
        let settings = json!({
            "base_url": if proxied { format!("{}/fhir", proxy.url()) } else { format!("http://127.0.0.1:{port}/fhir") },
            "host": "127.0.0.1",
            "port": port,
            "data_dir": dir.path().join("data"),
            "log_inbound": false,
            "validation": {"inbound": "off"},
            "simulator": {"enabled": false, "delay_seconds": 0.3},
            "server_auth": server_auth,
        });
        let config = dir.path().join("settings.yaml");
        std::fs::write(&config, settings.to_string()).unwrap();
        let child = Command::new(bin)
            .args(["serve", "-c"])
            .arg(&config)
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start sekmet");
        let server = Sekmet {
            child,
            port,
            proxy,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "sekmet did not listen on port {port}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    /// The FHIR base URL clients use (through the proxy).
    pub fn base(&self) -> String {
        format!("{}/fhir", self.proxy.url())
    }

    /// The server's own base URL.
    pub fn direct_base(&self) -> String {
        self.direct()
    }

    /// The server's own base URL (no proxy), for loading data.
    fn direct(&self) -> String {
        format!("http://127.0.0.1:{}/fhir", self.port)
    }

    pub fn work_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Loads `resources` as transaction Bundles (PUT by id, 500 a bundle).
    pub async fn load(&self, resources: &[Value], authorization: &str) {
        let client = reqwest::Client::new();
        for chunk in resources.chunks(500) {
            let entries: Vec<Value> = chunk
                .iter()
                .map(|r| {
                    json!({"resource": r, "request": {"method": "PUT",
                        "url": format!("{}/{}", r["resourceType"].as_str().unwrap(), r["id"].as_str().unwrap())}})
                })
                .collect();
            let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": entries});
            let resp = client
                .post(self.direct())
                .header("Content-Type", "application/fhir+json")
                .header("Authorization", authorization)
                .body(bundle.to_string())
                .send()
                .await
                .expect("sekmet answers");
            let status = resp.status();
            assert!(
                status.is_success(),
                "loading a bundle: {status}: {}",
                resp.text().await.unwrap_or_default()
            );
        }
    }
}

impl Drop for Sekmet {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The Synthea sample (`tests/data/synthea-10`) as resources, with the
/// conditional references of the export (`Practitioner?identifier=…`)
/// resolved to literal ones, as a server would store them: what the
/// extract tests load and expect back.
pub fn synthea_resources() -> Vec<Value> {
    let dir: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/synthea-10");
    let mut all = Vec::new();
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "ndjson"))
        .collect();
    names.sort();
    for p in names {
        for line in std::fs::read_to_string(&p).unwrap().lines() {
            all.push(serde_json::from_str::<Value>(line).unwrap());
        }
    }
    // identifier system|value -> Type/id
    let mut ids: BTreeMap<String, String> = BTreeMap::new();
    for r in &all {
        for i in r["identifier"].as_array().into_iter().flatten() {
            if let (Some(s), Some(v)) = (i["system"].as_str(), i["value"].as_str()) {
                ids.insert(
                    format!("{}?identifier={s}|{v}", r["resourceType"].as_str().unwrap()),
                    format!(
                        "{}/{}",
                        r["resourceType"].as_str().unwrap(),
                        r["id"].as_str().unwrap()
                    ),
                );
            }
        }
    }
    for r in &mut all {
        resolve(r, &ids);
    }
    all
}

fn resolve(v: &mut Value, ids: &BTreeMap<String, String>) {
    match v {
        Value::Object(m) => {
            for (k, child) in m.iter_mut() {
                if k == "reference" {
                    if let Some(target) = child.as_str().and_then(|s| ids.get(s)) {
                        *child = Value::from(target.clone());
                    }
                } else {
                    resolve(child, ids);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|c| resolve(c, ids)),
        _ => {}
    }
}

/// A resource without the `meta.versionId` and `meta.lastUpdated` a server
/// assigns (an emptied `meta` goes too).
pub fn without_server_meta(mut r: Value) -> Value {
    if let Some(meta) = r.get_mut("meta").and_then(Value::as_object_mut) {
        meta.remove("versionId");
        meta.remove("lastUpdated");
        if meta.is_empty() {
            r.as_object_mut().unwrap().remove("meta");
        }
    }
    r
}
