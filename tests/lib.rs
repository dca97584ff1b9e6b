//! Test harness for fhirflow's integration tests: a lake per test in its own
//! temporary folder, helpers to write NDJSON, run stages in-process or through
//! the real binary, and read results back with SQL.

pub mod fhir_server;
pub mod healthlake;
pub mod lambda_api;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use arrow::array::RecordBatch;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use fhirflow::curate::CurateReport;
use fhirflow::layout::{ImportDate, SourceSystem, TenantGuid};
use fhirflow::settings::{Overrides, Settings};
use fhirflow::storage::Lake;

pub const TENANT: &str = "0f8fad5b-d9cb-469f-a165-70867728950e";
pub const OTHER_TENANT: &str = "7c9e6679-7425-40de-944b-e07fc1f90ae7";
pub const DATE: &str = "2024-05-01";
pub const LABEL_SYSTEM: &str = "http://thirdopinion.io/identity/claims/tenant";

/// A stand-in's HTTP/1.1 server: listens on a free loopback port, answers
/// each request with `handle` on a runtime in a thread of its own, and runs
/// `background` (a stand-in's own work) beside. Returns the address.
pub fn serve_loopback<H, F, B>(handle: H, background: B) -> std::net::SocketAddr
where
    H: Fn(hyper::Request<hyper::body::Incoming>) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<
            Output = Result<
                hyper::Response<http_body_util::Full<bytes::Bytes>>,
                std::convert::Infallible,
            >,
        > + Send
        + 'static,
    B: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            tokio::spawn(background);
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let handle = handle.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(handle);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    });
    addr
}

/// `../shared` beside the repository: the public data sets. Tests that need
/// it fail (never skip) when it is missing.
pub fn shared() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared");
    assert!(
        p.join("data").is_dir(),
        "{} is missing: the tests need ../shared beside the repository",
        p.display()
    );
    p
}

/// The repository's rule folder (`queries/`), which the binary has built in:
/// every test runs with the built-in set, as a user's run does.
pub fn rules_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../queries")
}

/// A lake in its own temporary folder.
pub struct TestLake {
    pub dir: tempfile::TempDir,
    pub settings: Settings,
    pub lake: Lake,
}

impl TestLake {
    pub fn new() -> Self {
        Self::with(|_| {})
    }

    pub fn with(adjust: impl FnOnce(&mut Settings)) -> Self {
        // As the binary does: the stages reach HealthLake and Glue.
        fhirflow_aws::install();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut settings = Settings::resolve(
            None,
            &Overrides {
                lake: Some(dir.path().join("lake").display().to_string()),
                ..Default::default()
            },
        )
        .expect("settings");
        adjust(&mut settings);
        let lake = Lake::open(&settings).expect("lake");
        TestLake {
            dir,
            settings,
            lake,
        }
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("lake")
    }

    /// A folder of input files for this test.
    pub fn input(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join("input").join(name);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    pub async fn ingest(&self, paths: &[PathBuf], system: &str) {
        fhirflow::ingest::ingest(
            &self.lake,
            paths,
            &tenant(),
            &system.parse::<SourceSystem>().unwrap(),
            date(),
        )
        .await
        .expect("ingest");
    }

    pub async fn curate(&self) -> fhirflow::Result<CurateReport> {
        fhirflow::curate::curate(
            &self.lake,
            &self.settings,
            &tenant(),
            date(),
            &fhirflow::report::Quiet,
        )
        .await
    }

    /// Runs SQL and returns the rows as strings ("NULL" for nulls).
    pub async fn sql(&self, query: &str) -> Vec<Vec<String>> {
        let ctx = fhirflow::sql::session(&self.lake, &self.settings)
            .await
            .expect("session");
        let batches = fhirflow::sql::query(&ctx, query)
            .await
            .unwrap_or_else(|e| panic!("{query}: {e}"));
        rows(&batches)
    }

    /// The curated files of the partition: name → bytes.
    pub fn curated_files(&self) -> std::collections::BTreeMap<String, Vec<u8>> {
        let dir = self
            .root()
            .join("curated")
            .join(format!("tenantGuid={TENANT}"))
            .join(format!("import_date={DATE}"));
        let mut out = std::collections::BTreeMap::new();
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries {
                let e = e.unwrap();
                out.insert(
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                );
            }
        }
        out
    }

    /// Runs the real `fhirflow` binary on this lake.
    pub fn cli(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        self.command(args, env).output().expect("run fhirflow")
    }

    /// The real `fhirflow` binary on this lake, ready to run or spawn.
    pub fn command(&self, args: &[&str], env: &[(&str, &str)]) -> Command {
        self.command_of(&binary(), args, env)
    }

    /// `program` (a copy of the binary, such as a packaged `bootstrap`) on
    /// this lake, as [`TestLake::command`] runs the binary.
    pub fn command_of(
        &self,
        program: &std::path::Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Command {
        let mut cmd = Command::new(program);
        if self.settings.s3.endpoint.is_some() {
            // A lake on moto: the binary reads the same settings from a file.
            // Written once, whole (runs started together read it).
            let path = self.dir.path().join("s3-lake.toml");
            if !path.exists() {
                let part = path.with_extension("toml.part");
                std::fs::write(&part, toml::to_string(&self.settings).unwrap()).unwrap();
                std::fs::rename(&part, &path).unwrap();
            }
            cmd.env("FHIRFLOW_CONFIG", path);
        } else {
            cmd.env("FHIRFLOW_LAKE", self.root());
        }
        cmd.args(args)
            .env_remove("FHIRFLOW_RULES")
            // A killed run's lease lapses in seconds, not a minute...
            .env("FHIRFLOW_LEASE_TTL_SECONDS", "3")
            // ... and the next run waits for that (tests of busy runs set 0).
            .env("FHIRFLOW_WAIT", "30")
            .env_remove("FHIRFLOW_FAILPOINT");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.current_dir(self.dir.path());
        cmd
    }

    /// The visible curated folder of the partition, on any store: name → bytes.
    pub async fn visible_files(&self) -> std::collections::BTreeMap<String, Vec<u8>> {
        self.visible_files_of(&tenant(), date()).await
    }

    /// The visible curated folder of one partition, on any store.
    pub async fn visible_files_of(
        &self,
        tenant: &TenantGuid,
        date: ImportDate,
    ) -> std::collections::BTreeMap<String, Vec<u8>> {
        use futures::TryStreamExt;
        use object_store::ObjectStoreExt;
        let root = &self.lake.curated;
        let folder = root.paths.curated_partition(tenant, date);
        let listed: Vec<_> = root.store.list(Some(&folder)).try_collect().await.unwrap();
        let mut out = std::collections::BTreeMap::new();
        for o in listed {
            let bytes = root
                .store
                .get(&o.location)
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            out.insert(o.location.filename().unwrap().to_string(), bytes.to_vec());
        }
        out
    }
}

impl Default for TestLake {
    fn default() -> Self {
        Self::new()
    }
}

pub fn tenant() -> TenantGuid {
    TENANT.parse().unwrap()
}

pub fn date() -> ImportDate {
    DATE.parse().unwrap()
}

/// The `fhirflow` binary built beside this test binary.
pub fn binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let bin = dir.join(format!("fhirflow{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "{} not built: run `cargo build -p fhirflow` first",
        bin.display()
    );
    bin
}

pub fn rows(batches: &[RecordBatch]) -> Vec<Vec<String>> {
    let opts = FormatOptions::default().with_null("NULL");
    let mut out = Vec::new();
    for b in batches {
        let fmts: Vec<_> = b
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &opts).unwrap())
            .collect();
        for i in 0..b.num_rows() {
            out.push(fmts.iter().map(|f| f.value(i).to_string()).collect());
        }
    }
    out
}

/// Writes `lines` joined by `\n` (and a final `\n`) to `dir/name`.
pub fn write_lines(dir: &Path, name: &str, lines: &[&str]) -> PathBuf {
    let p = dir.join(name);
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(&p, text).unwrap();
    p
}

/// The tenant label for `code`, as fhirflow writes it.
/// Writes an export's `deleted` file for tenant [`TENANT`], source system
/// `ehr`, as the extract stage keeps it (under `_export/<run>/`), with the
/// run's manifest when it `finished`. One Bundle line of DELETE entries.
pub async fn export_deleted(
    lake: &fhirflow::storage::Lake,
    date: &str,
    run: &str,
    urls: &[&str],
    finished: bool,
) {
    let d: ImportDate = date.parse().unwrap();
    let ehr: fhirflow::layout::SourceSystem = "ehr".parse().unwrap();
    let entries: Vec<String> = urls
        .iter()
        .map(|u| format!(r#"{{"request":{{"method":"DELETE","url":"{u}"}}}}"#))
        .collect();
    let line = format!(
        r#"{{"resourceType":"Bundle","type":"transaction","entry":[{}]}}"#,
        entries.join(",")
    );
    let raw = &lake.raw;
    let path = raw
        .paths
        .export_run_file(&tenant(), &ehr, d, run, "deleted/Patient.ndjson");
    raw.put("t", &path, format!("{line}\n").into_bytes())
        .await
        .unwrap();
    if finished {
        let manifest = raw
            .paths
            .export_run_file(&tenant(), &ehr, d, run, "manifest.json");
        raw.put("t", &manifest, b"{}".to_vec()).await.unwrap();
    }
}

pub fn label(code: &str) -> String {
    format!(r#"{{"system":"{LABEL_SYSTEM}","code":"{code}"}}"#)
}

/// Checks that `curated` is `raw` with exactly one tenant label inserted, in
/// one of the forms the label step uses, and nothing else changed.
pub fn assert_label_only_edit(raw: &[u8], curated: &[u8]) {
    let l = label(TENANT);
    let forms = [
        format!(r#","meta":{{"security":[{l}]}}"#),
        format!(r#""meta":{{"security":[{l}]}},"#),
        format!(r#","security":[{l}]"#),
        format!(r#""security":[{l}]"#),
        format!(",{l}"),
        l.clone(),
    ];
    if raw == curated {
        // Already labelled for this tenant.
        assert!(
            memchr_find(raw, l.as_bytes()),
            "unchanged line must already carry the label: {}",
            String::from_utf8_lossy(&raw[..raw.len().min(200)])
        );
        return;
    }
    let prefix = raw.iter().zip(curated).take_while(|(a, b)| a == b).count();
    for form in &forms {
        let f = form.as_bytes();
        // The insertion may start anywhere the common prefix allows (the
        // label text can repeat bytes that follow it).
        for start in (prefix.saturating_sub(f.len())..=prefix).rev() {
            if curated.len() == raw.len() + f.len()
                && curated[..start] == raw[..start]
                && &curated[start..start + f.len()] == f
                && curated[start + f.len()..] == raw[start..]
            {
                return;
            }
        }
    }
    panic!(
        "curated line is not the raw line plus one label:\nraw:     {}\ncurated: {}",
        String::from_utf8_lossy(&raw[..raw.len().min(300)]),
        String::from_utf8_lossy(&curated[..curated.len().min(300)])
    );
}

fn memchr_find(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// A lake on a local disk or on moto (kept running as long as the lake).
pub struct Store {
    pub _moto: Option<Moto>,
    pub t: TestLake,
}

impl Store {
    pub fn local() -> Store {
        Store {
            _moto: None,
            t: TestLake::new(),
        }
    }

    /// A lake at `s3://lake/<prefix>` on a moto of its own.
    pub fn s3(prefix: &str) -> Store {
        let moto = Moto::start();
        moto.create_bucket("lake");
        let t = TestLake::with(|s| moto.configure(s, "lake", prefix));
        Store {
            _moto: Some(moto),
            t,
        }
    }
}

/// moto in server mode (S3 and Glue), started on a free loopback port from
/// the virtual environment `tests/run.sh` creates, and stopped on drop.
pub struct Moto {
    child: std::process::Child,
    pub port: u16,
}

impl Moto {
    pub fn start() -> Moto {
        let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/moto_server");
        assert!(
            bin.is_file(),
            "{} is missing: run tests/run.sh, which installs tests/requirements.txt",
            bin.display()
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start moto_server");
        let moto = Moto { child, port };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "moto_server did not listen on port {port}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        moto
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Creates a bucket (moto does not check request signatures).
    pub fn create_bucket(&self, bucket: &str) {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(
            s,
            "PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        )
        .unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "create bucket: {answer}"
        );
    }

    /// Settings for a lake at `s3://<bucket>/<prefix>` on this server.
    pub fn configure(&self, s: &mut Settings, bucket: &str, prefix: &str) {
        s.lake = format!("s3://{bucket}/{prefix}");
        s.s3.endpoint = Some(self.endpoint());
        s.s3.region = Some("us-east-1".into());
        s.s3.allow_http = true;
        s.s3.access_key_id = Some("testing".into());
        s.s3.secret_access_key = Some("testing".into());
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Checks one CloudWatch Embedded Metric Format line against what the
/// specification requires ("Specification: Embedded metric format", AWS
/// CloudWatch User Guide): a root `_aws` object with `Timestamp` (an integer,
/// milliseconds since the epoch) and `CloudWatchMetrics`, a list of metric
/// directives, each with a `Namespace` (1 to 1024 characters), `Dimensions`
/// (a list of dimension sets, each of at most 30 names of root members
/// whose values are strings; CloudWatch takes 1 to 1024 characters) and `Metrics` (at most 100, each a `Name` of 1
/// to 1024 characters and an optional `Unit` from CloudWatch's list, naming a
/// root member that is a number or a list of at most 100 numbers).
pub fn check_emf(line: &serde_json::Value) -> Result<(), String> {
    const UNITS: &[&str] = &[
        "Seconds",
        "Microseconds",
        "Milliseconds",
        "Bytes",
        "Kilobytes",
        "Megabytes",
        "Gigabytes",
        "Terabytes",
        "Bits",
        "Kilobits",
        "Megabits",
        "Gigabits",
        "Terabits",
        "Percent",
        "Count",
        "Bytes/Second",
        "Kilobytes/Second",
        "Megabytes/Second",
        "Gigabytes/Second",
        "Terabytes/Second",
        "Bits/Second",
        "Kilobits/Second",
        "Megabits/Second",
        "Gigabits/Second",
        "Terabits/Second",
        "Count/Second",
        "None",
    ];
    let root = line.as_object().ok_or("not an object")?;
    let aws = root
        .get("_aws")
        .and_then(|a| a.as_object())
        .ok_or("no _aws object")?;
    aws.get("Timestamp")
        .and_then(|t| t.as_i64())
        .filter(|t| *t > 0)
        .ok_or("_aws.Timestamp is not milliseconds since the epoch")?;
    let directives = aws
        .get("CloudWatchMetrics")
        .and_then(|c| c.as_array())
        .ok_or("no _aws.CloudWatchMetrics list")?;
    if directives.is_empty() {
        return Err("CloudWatchMetrics is empty".into());
    }
    let name_ok = |s: &str| !s.is_empty() && s.chars().count() <= 1024;
    for d in directives {
        let ns = d["Namespace"]
            .as_str()
            .ok_or("a directive without Namespace")?;
        if !name_ok(ns) {
            return Err(format!("Namespace {ns:?} is not 1 to 1024 characters"));
        }
        let sets = d["Dimensions"]
            .as_array()
            .ok_or("a directive without Dimensions")?;
        for set in sets {
            let set = set.as_array().ok_or("a dimension set is not a list")?;
            if set.len() > 30 {
                return Err("a dimension set of more than 30 dimensions".into());
            }
            for dim in set {
                let dim = dim.as_str().ok_or("a dimension name is not a string")?;
                if !root.get(dim).and_then(|v| v.as_str()).is_some_and(name_ok) {
                    return Err(format!(
                        "dimension {dim} is not a string of 1 to 1024 characters at the root"
                    ));
                }
            }
        }
        let metrics = d["Metrics"]
            .as_array()
            .ok_or("a directive without Metrics")?;
        if metrics.len() > 100 {
            return Err("more than 100 metrics in a directive".into());
        }
        for m in metrics {
            let name = m["Name"]
                .as_str()
                .filter(|n| name_ok(n))
                .ok_or("a metric without a Name")?;
            if let Some(unit) = m.get("Unit") {
                let unit = unit.as_str().ok_or("a Unit is not a string")?;
                if !UNITS.contains(&unit) {
                    return Err(format!("metric {name}: {unit} is not a CloudWatch unit"));
                }
            }
            let ok = match root.get(name) {
                Some(serde_json::Value::Number(_)) => true,
                Some(serde_json::Value::Array(v)) => {
                    v.len() <= 100 && v.iter().all(|x| x.is_number())
                }
                _ => false,
            };
            if !ok {
                return Err(format!("metric {name} has no numeric value at the root"));
            }
        }
    }
    Ok(())
}
