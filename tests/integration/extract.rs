//! The extract stage against a real FHIR server (sekmet-fhir) behind the
//! fault-injecting proxy: system, Patient and Group exports with `_type`,
//! `_since` and POST kick-off give back exactly what was loaded; retries,
//! resume after a kill, count checks (blank lines are not records), SMART
//! Backend Services, redirects, hostile URLs (another host, plain http, the
//! instance-metadata address) and the bearer token kept out of the process
//! list.

use std::collections::BTreeMap;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use fhirflow::extract::export::Level;
use fhirflow::extract::{ExtractReport, ExtractRequest, Since};
use fhirflow::settings::{KickoffMethod, Settings, SmartSettings};
use fhirflow_tests::fhir_server::*;
use fhirflow_tests::*;
use serde_json::{json, Value};

type Resources = BTreeMap<(String, String), Value>;

fn keyed(resources: impl IntoIterator<Item = Value>) -> Resources {
    resources
        .into_iter()
        .map(|r| {
            let key = (
                r["resourceType"].as_str().unwrap().to_string(),
                r["id"].as_str().unwrap().to_string(),
            );
            (key, without_server_meta(r))
        })
        .collect()
}

fn of_types(all: &[Value], types: &[&str]) -> Resources {
    keyed(
        all.iter()
            .filter(|r| types.contains(&r["resourceType"].as_str().unwrap()))
            .cloned(),
    )
}

/// Fast retries for tests; the rest as a user would have it.
fn configure(s: &mut Settings, server: &Sekmet) {
    s.extract.fhir_url = Some(server.base());
    s.extract.bearer_token = Some(TOKEN.into());
    s.extract.backoff_initial_ms = 20;
    s.extract.backoff_max_seconds = 1;
    s.extract.poll_interval_seconds = 1;
    s.extract.retries = 3;
}

fn request(
    server: &Sekmet,
    system: &str,
    level: Level,
    types: &[&str],
    since: Since,
) -> ExtractRequest {
    ExtractRequest {
        fhir_url: url::Url::parse(&server.base()).unwrap(),
        tenant: tenant(),
        source_system: system.parse().unwrap(),
        date: date(),
        level,
        types: types.iter().map(|t| t.to_string()).collect(),
        type_filters: Vec::new(),
        since,
        restart: false,
    }
}

async fn run(t: &TestLake, req: &ExtractRequest) -> fhirflow::Result<ExtractReport> {
    fhirflow::extract::extract(&t.lake, &t.settings, req, &fhirflow::report::Quiet).await
}

/// Every resource in the raw partition of `system`, parsed.
fn raw_resources(t: &TestLake, system: &str, date: &str) -> Resources {
    let dir = t
        .root()
        .join("raw")
        .join(format!("tenantGuid={TENANT}"))
        .join(format!("source_system={system}"))
        .join(format!("import_date={date}"));
    let mut all = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "ndjson") {
            // Blank lines are no records (curate skips them too).
            for line in std::fs::read_to_string(&p).unwrap().lines() {
                if !line.trim().is_empty() {
                    all.push(serde_json::from_str::<Value>(line).unwrap());
                }
            }
        }
    }
    let n = all.len();
    let out = keyed(all);
    assert_eq!(out.len(), n, "no resource extracted twice");
    out
}

async fn loaded_server(auth: ServerAuth) -> (Sekmet, Vec<Value>) {
    let server = Sekmet::start(auth);
    let all = synthea_resources();
    server.load(&all, &format!("Bearer {TOKEN}")).await;
    (server, all)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_system_export_lands_exactly_what_was_loaded() {
    let (server, all) = loaded_server(ServerAuth::Bearer(TOKEN.into())).await;
    let t = TestLake::with(|s| configure(s, &server));
    let report = run(
        &t,
        &request(&server, "sekmet", Level::System, &[], Since::All),
    )
    .await
    .expect("extract");
    assert_eq!(report.resources(), all.len() as u64);
    assert_eq!(raw_resources(&t, "sekmet", DATE), keyed(all.clone()));

    // The manifest beside the data, in the export's own folder; the status
    // URL deleted when done.
    let partition = t.root().join(format!(
        "raw/tenantGuid={TENANT}/source_system=sekmet/import_date={DATE}"
    ));
    let manifest_path = partition.join(format!("_export/{}/manifest.json", report.run_id));
    let manifest: Value = serde_json::from_slice(&std::fs::read(manifest_path).unwrap()).unwrap();
    assert_eq!(
        manifest["transactionTime"],
        report.transaction_time.as_str()
    );
    assert_eq!(server.proxy.count("DELETE", "/bulk-status/"), 1);
    assert!(!t
        .root()
        .join(format!(
            "raw/tenantGuid={TENANT}/source_system=sekmet/_extract/pending.json"
        ))
        .exists());

    // Metadata: the job and a metrics row per type, with files and bytes.
    let rows = t
        .sql("SELECT stage, status, records_in, records_out FROM metadata.import_jobs")
        .await;
    assert_eq!(
        rows,
        vec![vec![
            "extract".to_string(),
            "succeeded".into(),
            "7160".into(),
            "7160".into()
        ]]
    );
    let rows = t
        .sql("SELECT count(*), sum(files), sum(records_out), bool_and(conserved), min(bytes_out) > 0 FROM metadata.import_metrics WHERE stage = 'extract'")
        .await;
    assert_eq!(
        rows,
        vec![vec![
            "13".to_string(),
            "13".into(),
            "7160".into(),
            "true".into(),
            "true".into()
        ]]
    );

    // Curation reads what extraction wrote.
    let curated = t.curate().await.expect("curate");
    assert_eq!(curated.total.records_in, 7160);
}

#[tokio::test(flavor = "multi_thread")]
async fn patient_and_group_exports_with_type_and_a_post_kickoff() {
    let (server, all) = loaded_server(ServerAuth::Bearer(TOKEN.into())).await;
    let t = TestLake::with(|s| configure(s, &server));
    run(
        &t,
        &request(
            &server,
            "patients",
            Level::Patient,
            &["Patient", "Condition"],
            Since::All,
        ),
    )
    .await
    .expect("patient export");
    assert_eq!(
        raw_resources(&t, "patients", DATE),
        of_types(&all, &["Patient", "Condition"])
    );
    assert!(server.proxy.count("GET", "/fhir/Patient/$export?") == 1);

    // A group of two patients, exported with a POST kick-off.
    let members: Vec<&str> = all
        .iter()
        .filter(|r| r["resourceType"] == "Patient")
        .take(2)
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    let group = json!({"resourceType": "Group", "id": "two", "type": "person", "actual": true,
        "member": members.iter().map(|m| json!({"entity": {"reference": format!("Patient/{m}")}})).collect::<Vec<_>>()});
    server.load(&[group], &format!("Bearer {TOKEN}")).await;
    let t2 = TestLake::with(|s| {
        configure(s, &server);
        s.extract.kickoff_method = KickoffMethod::Post;
    });
    run(
        &t2,
        &request(
            &server,
            "group",
            Level::Group("two".into()),
            &["Patient", "Condition"],
            Since::All,
        ),
    )
    .await
    .expect("group export");
    let expected = keyed(
        all.iter()
            .filter(|r| {
                let ty = r["resourceType"].as_str().unwrap();
                (ty == "Patient" && members.contains(&r["id"].as_str().unwrap()))
                    || (ty == "Condition"
                        && members
                            .iter()
                            .any(|m| r["subject"]["reference"] == format!("Patient/{m}").as_str()))
            })
            .cloned(),
    );
    assert!(expected.len() > 2);
    assert_eq!(raw_resources(&t2, "group", DATE), expected);
    assert_eq!(server.proxy.count("POST", "/fhir/Group/two/$export"), 1);

    // A 4xx kick-off is shown with its OperationOutcome.
    let err = run(
        &t2,
        &request(
            &server,
            "nogroup",
            Level::Group("nope".into()),
            &[],
            Since::All,
        ),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("404") && err.contains("Group/nope not found"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn incremental_exports_what_changed_since_the_last_one() {
    let (server, all) = loaded_server(ServerAuth::Bearer(TOKEN.into())).await;
    let t = TestLake::with(|s| configure(s, &server));
    let first = run(
        &t,
        &request(
            &server,
            "inc",
            Level::System,
            &["Condition"],
            Since::Incremental,
        ),
    )
    .await
    .expect("first export");
    assert_eq!(first.resources(), 555);

    let changed: Vec<Value> = all
        .iter()
        .filter(|r| r["resourceType"] == "Condition")
        .take(3)
        .map(|r| {
            let mut r = r.clone();
            r["note"] = json!([{"text": "reviewed"}]);
            r
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    server.load(&changed, &format!("Bearer {TOKEN}")).await;

    let mut req = request(
        &server,
        "inc",
        Level::System,
        &["Condition"],
        Since::Incremental,
    );
    req.date = "2024-05-02".parse().unwrap();
    let second = run(&t, &req).await.expect("incremental export");
    assert_eq!(raw_resources(&t, "inc", "2024-05-02"), keyed(changed));
    assert_eq!(second.resources(), 3);
    let since =
        url::form_urlencoded::byte_serialize(first.transaction_time.as_bytes()).collect::<String>();
    assert!(
        server
            .proxy
            .seen()
            .iter()
            .any(|s| s.path.contains(&format!("_since={since}"))),
        "the second kick-off carries the first transactionTime as _since"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn transient_faults_are_retried_and_lose_nothing() {
    let (server, all) = loaded_server(ServerAuth::Bearer(TOKEN.into())).await;
    let p = &server.proxy;
    p.inject("GET", "/$export", Fault::Status(429, Some("1".into())), 1);
    let date = chrono::Utc::now() + chrono::Duration::seconds(1);
    let http_date = date.format("%a, %d %b %Y %H:%M:%S GMT").to_string();
    p.inject(
        "GET",
        "/bulk-status/",
        Fault::Status(503, Some(http_date)),
        1,
    );
    p.inject("GET", "/bulk-status/", Fault::Status(500, None), 1);
    p.inject("GET", "/Patient.ndjson", Fault::Cut, 1);
    p.inject("GET", "/Condition.ndjson", Fault::Status(502, None), 2);
    let t = TestLake::with(|s| configure(s, &server));
    let started = std::time::Instant::now();
    let report = run(
        &t,
        &request(
            &server,
            "faults",
            Level::System,
            &["Patient", "Condition", "Device"],
            Since::All,
        ),
    )
    .await
    .expect("extract despite faults");
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(1),
        "Retry-After honoured"
    );
    assert_eq!(
        raw_resources(&t, "faults", DATE),
        of_types(&all, &["Patient", "Condition", "Device"])
    );
    let patient = report
        .files
        .iter()
        .find(|f| f.resource_type == "Patient")
        .unwrap();
    assert_eq!(patient.attempts, 2, "the cut download was fetched again");
    let statuses: Vec<u16> = p.seen().iter().map(|s| s.status).collect();
    for code in [429, 503, 500, 502] {
        assert!(statuses.contains(&code), "{code} injected");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_that_keeps_failing_fails_the_extraction_and_the_rerun_resumes() {
    let (server, all) = loaded_server(ServerAuth::Bearer(TOKEN.into())).await;
    server
        .proxy
        .inject("GET", "/Device.ndjson", Fault::Cut, 100);
    let t = TestLake::with(|s| configure(s, &server));
    let types = ["Patient", "Condition", "Device"];
    let req = request(&server, "failing", Level::System, &types, Since::All);
    let err = run(&t, &req).await.unwrap_err().to_string();
    assert!(
        err.contains("Device file") && err.contains("Device.ndjson"),
        "{err}"
    );
    assert!(err.contains("after 3 retries"), "{err}");

    server.proxy.clear();
    let report = run(&t, &req).await.expect("the rerun resumes");
    assert!(report.resumed);
    assert_eq!(report.reused, 2);
    assert_eq!(server.proxy.count("GET", "/$export"), 0, "no new export");
    let downloads = server.proxy.file_downloads();
    assert_eq!(downloads.len(), 1, "only the failed file: {downloads:?}");
    assert_eq!(raw_resources(&t, "failing", DATE), of_types(&all, &types));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_count_that_does_not_match_the_manifest_fails_and_keeps_nothing() {
    let (server, _) = loaded_server(ServerAuth::Bearer(TOKEN.into())).await;
    server
        .proxy
        .inject("GET", "/bulk-status/", Fault::WrongCount, 100);
    let t = TestLake::with(|s| configure(s, &server));
    let err = run(
        &t,
        &request(&server, "count", Level::System, &["Patient"], Since::All),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("Patient file")
            && err.contains("13 records (non-blank lines), but the manifest's count is 14"),
        "{err}"
    );
    let file = t.root().join(format!(
        "raw/tenantGuid={TENANT}/source_system=count/import_date={DATE}/Patient.ndjson"
    ));
    assert!(!file.exists(), "a file that failed its count is not kept");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_extraction_resumes_without_losing_or_refetching_anything() {
    let (server, all) = loaded_server(ServerAuth::Bearer(TOKEN.into())).await;
    let t = TestLake::new();
    std::fs::write(
        t.dir.path().join("fhirflow.toml"),
        "[extract]\nparallel_downloads = 1\npoll_interval_seconds = 1\n",
    )
    .unwrap();
    let args = [
        "extract",
        "--fhir-url",
        &server.base(),
        "--tenant",
        TENANT,
        "--source-system",
        "killed",
        "--date",
        DATE,
        "--type",
        "Patient,Condition,Device,AllergyIntolerance",
    ];
    let killed = t.cli(
        &args,
        &[
            ("FHIRFLOW_BEARER_TOKEN", TOKEN),
            ("FHIRFLOW_FAILPOINT", "extract-after-file"),
        ],
    );
    assert!(!killed.status.success(), "the failpoint kills the run");
    let written = raw_resources(&t, "killed", DATE);
    assert!(
        !written.is_empty() && written.len() < 595,
        "killed midway: {}",
        written.len()
    );

    let resumed = t.cli(&args, &[("FHIRFLOW_BEARER_TOKEN", TOKEN)]);
    let out = String::from_utf8_lossy(&resumed.stdout);
    assert!(
        resumed.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    assert!(
        out.contains("resumed; 1 files were already written"),
        "{out}"
    );
    assert!(!out.contains(TOKEN) && !String::from_utf8_lossy(&resumed.stderr).contains(TOKEN));
    assert_eq!(
        server.proxy.count("GET", "/$export"),
        1,
        "one export, resumed"
    );
    let downloads = server.proxy.file_downloads();
    assert_eq!(downloads.len(), 4);
    assert!(
        downloads.values().all(|&n| n == 1),
        "no file fetched twice: {downloads:?}"
    );
    assert_eq!(
        raw_resources(&t, "killed", DATE),
        of_types(
            &all,
            &["Patient", "Condition", "Device", "AllergyIntolerance"]
        )
    );
}

/// The data files of a raw partition on a local lake: name → bytes.
fn raw_file_bytes(t: &TestLake, system: &str) -> BTreeMap<String, Vec<u8>> {
    let dir = t.root().join(format!(
        "raw/tenantGuid={TENANT}/source_system={system}/import_date={DATE}"
    ));
    std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_landed_before_a_kill_is_not_fetched_again_and_a_second_export_keeps_the_first() {
    let (server, all) = loaded_server(ServerAuth::Bearer(TOKEN.into())).await;
    let t = TestLake::new();
    std::fs::write(
        t.dir.path().join("fhirflow.toml"),
        "[extract]\nparallel_downloads = 1\npoll_interval_seconds = 1\n",
    )
    .unwrap();
    let types = ["Patient", "Condition", "Device"];
    let type_list = types.join(",");
    let args = [
        "extract",
        "--fhir-url",
        &server.base(),
        "--tenant",
        TENANT,
        "--source-system",
        "relanded",
        "--date",
        DATE,
        "--type",
        &type_list,
    ];
    // Killed after the first file's upload, before `pending.json` records it.
    let killed = t.cli(
        &args,
        &[
            ("FHIRFLOW_BEARER_TOKEN", TOKEN),
            ("FHIRFLOW_FAILPOINT", "extract-after-upload"),
        ],
    );
    assert!(!killed.status.success(), "the failpoint kills the run");
    let first_file = raw_file_bytes(&t, "relanded");
    assert_eq!(first_file.len(), 1, "{:?}", first_file.keys());

    let resumed = t.cli(&args, &[("FHIRFLOW_BEARER_TOKEN", TOKEN)]);
    let out = String::from_utf8_lossy(&resumed.stdout);
    assert!(
        resumed.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    assert!(
        out.contains("resumed; 1 files were already written"),
        "{out}"
    );
    let downloads = server.proxy.file_downloads();
    assert_eq!(downloads.len(), 3);
    assert!(
        downloads.values().all(|&n| n == 1),
        "the file the killed run landed was not fetched again: {downloads:?}"
    );
    assert_eq!(raw_resources(&t, "relanded", DATE), of_types(&all, &types));
    let first = raw_file_bytes(&t, "relanded");
    assert_eq!(
        first.keys().collect::<Vec<_>>(),
        ["Condition.ndjson", "Device.ndjson", "Patient.ndjson"]
    );
    let last_path = t.root().join(format!(
        "raw/tenantGuid={TENANT}/source_system=relanded/_extract/last.json"
    ));
    let last: Value = serde_json::from_slice(&std::fs::read(&last_path).unwrap()).unwrap();

    // A second export the same day: the first one's files stay as they were,
    // the new ones take the next part numbers.
    let again = t.cli(&args, &[("FHIRFLOW_BEARER_TOKEN", TOKEN)]);
    let out = String::from_utf8_lossy(&again.stdout);
    assert!(
        again.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert!(!out.contains("resumed"), "{out}");
    let both = raw_file_bytes(&t, "relanded");
    for (name, bytes) in &first {
        assert_eq!(&both[name], bytes, "{name} kept");
        let second = name.replace(".ndjson", ".002.ndjson");
        let lines = |b: &[u8]| b.iter().filter(|&&c| c == b'\n').count();
        assert_eq!(
            lines(bytes),
            lines(&both[&second]),
            "{second}: the same resources again"
        );
    }
    assert_eq!(both.len(), 6, "{:?}", both.keys());
    // Each export keeps its own manifest; `_since` moved to the second.
    let exports = t.root().join(format!(
        "raw/tenantGuid={TENANT}/source_system=relanded/import_date={DATE}/_export"
    ));
    assert_eq!(std::fs::read_dir(&exports).unwrap().count(), 2);
    let last2: Value = serde_json::from_slice(&std::fs::read(&last_path).unwrap()).unwrap();
    assert_ne!(last["run_id"], last2["run_id"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn authorization_is_not_sent_to_another_host_after_a_redirect() {
    let (server, all) = loaded_server(ServerAuth::Bearer(TOKEN.into())).await;
    // A file host on another origin that serves the server's files itself.
    let port = server.port;
    let files = Proxy::start(
        move || format!("http://127.0.0.1:{port}"),
        Some(format!("Bearer {TOKEN}")),
    );
    server
        .proxy
        .inject("GET", "/Patient.ndjson", Fault::RedirectTo(files.url()), 1);
    let t = TestLake::with(|s| {
        configure(s, &server);
        s.extract.allowed_hosts = vec![files.addr.to_string()];
    });
    run(
        &t,
        &request(
            &server,
            "redirect",
            Level::System,
            &["Patient", "Device"],
            Since::All,
        ),
    )
    .await
    .expect("extract");
    assert_eq!(
        raw_resources(&t, "redirect", DATE),
        of_types(&all, &["Patient", "Device"])
    );
    let at_files = files.seen();
    assert_eq!(at_files.len(), 1);
    assert!(!at_files[0].authorization, "no token to another origin");
    assert!(server
        .proxy
        .seen()
        .iter()
        .filter(|s| s.path.contains("/bulk-files/"))
        .all(|s| s.authorization));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redirect_to_another_host_is_refused_and_not_retried() {
    let (server, _) = loaded_server(ServerAuth::Bearer(TOKEN.into())).await;
    let port = server.port;
    let files = Proxy::start(
        move || format!("http://127.0.0.1:{port}"),
        Some(format!("Bearer {TOKEN}")),
    );
    server.proxy.inject(
        "GET",
        "/Patient.ndjson",
        Fault::RedirectTo(files.url()),
        100,
    );
    let t = TestLake::with(|s| configure(s, &server));
    let err = run(
        &t,
        &request(
            &server,
            "redirect-refused",
            Level::System,
            &["Patient"],
            Since::All,
        ),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.contains(&format!("redirected to {}/fhir/bulk-files/", files.url()))
            && err.contains("refused")
            && err.contains("not the FHIR server's origin")
            && err.contains("allowed_hosts"),
        "{err}"
    );
    assert!(!err.contains("retries"), "{err}");
    assert!(files.seen().is_empty(), "nothing sent to the other host");
    assert_eq!(
        server.proxy.count("GET", "/Patient.ndjson"),
        1,
        "a refusal is not retried"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_manifest_file_url_on_the_metadata_address_is_refused_before_any_request() {
    let (server, _) = loaded_server(ServerAuth::Bearer(TOKEN.into())).await;
    server.proxy.inject(
        "GET",
        "/bulk-status/",
        Fault::OutputOrigin("http://169.254.169.254".into()),
        100,
    );
    let t = TestLake::with(|s| {
        configure(s, &server);
        // Not even an allowed host lifts the rule.
        s.extract.allowed_hosts = vec!["169.254.169.254".into()];
        s.extract.allow_http = true;
    });
    let started = std::time::Instant::now();
    let err = run(
        &t,
        &request(
            &server,
            "metadata",
            Level::System,
            &["Patient", "Device"],
            Since::All,
        ),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("http://169.254.169.254/fhir/bulk-files/")
            && err.contains("refused")
            && err.contains("link-local or instance-metadata address"),
        "{err}"
    );
    // Refused by the policy: no connection tried (that would time out or
    // fail and be retried), and no file of the manifest fetched.
    assert!(
        !err.contains("retries") && !err.contains("connect"),
        "{err}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    assert_eq!(server.proxy.file_downloads(), BTreeMap::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn plain_http_to_another_host_and_a_content_location_elsewhere_are_refused() {
    let (server, _) = loaded_server(ServerAuth::Bearer(TOKEN.into())).await;
    // A file URL on plain http to a host that is not loopback, even when
    // allowed: refused before any name lookup or connection.
    server.proxy.inject(
        "GET",
        "/bulk-status/",
        Fault::OutputOrigin("http://example.invalid".into()),
        100,
    );
    let t = TestLake::with(|s| {
        configure(s, &server);
        s.extract.allowed_hosts = vec!["example.invalid".into()];
    });
    let err = run(
        &t,
        &request(&server, "plain", Level::System, &["Patient"], Since::All),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("http://example.invalid/fhir/bulk-files/")
            && err.contains("refused: plain http to example.invalid"),
        "{err}"
    );
    assert!(
        !err.contains("retries") && !err.contains("connect"),
        "{err}"
    );

    // A kick-off whose status URL is on another host (the same proxy as
    // `localhost`, which is another host than 127.0.0.1): refused, nothing
    // polled, no pending extraction left.
    server.proxy.clear();
    let elsewhere = format!("http://localhost:{}", server.proxy.addr.port());
    server.proxy.inject(
        "GET",
        "/$export",
        Fault::ContentLocationOrigin(elsewhere.clone()),
        1,
    );
    let t = TestLake::with(|s| configure(s, &server));
    let err = run(
        &t,
        &request(
            &server,
            "elsewhere",
            Level::System,
            &["Patient"],
            Since::All,
        ),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("Content-Location")
            && err.contains(&format!("{elsewhere}/fhir/bulk-status/"))
            && err.contains("not the FHIR server's origin"),
        "{err}"
    );
    assert_eq!(server.proxy.count("GET", "/bulk-status/"), 0);
    assert!(!t
        .root()
        .join(format!(
            "raw/tenantGuid={TENANT}/source_system=elsewhere/_extract/pending.json"
        ))
        .exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn allowed_hosts_lets_file_urls_lead_to_another_host() {
    let (server, all) = loaded_server(ServerAuth::Bearer(TOKEN.into())).await;
    // A file host that trusts its own URLs, reached as `localhost`: another
    // host than the FHIR server's 127.0.0.1.
    let port = server.port;
    let files = Proxy::start(
        move || format!("http://127.0.0.1:{port}"),
        Some(format!("Bearer {TOKEN}")),
    );
    let elsewhere = format!("http://localhost:{}", files.addr.port());
    server.proxy.inject(
        "GET",
        "/bulk-status/",
        Fault::OutputOrigin(elsewhere.clone()),
        100,
    );
    let types = ["Patient", "Device"];
    let req = request(&server, "allowed", Level::System, &types, Since::All);
    let mut t = TestLake::with(|s| configure(s, &server));
    let err = run(&t, &req).await.unwrap_err().to_string();
    assert!(
        err.contains(&format!("{elsewhere}/fhir/bulk-files/"))
            && err.contains("not in [extract] allowed_hosts")
            && err.contains("--restart"),
        "{err}"
    );
    assert!(files.seen().is_empty());

    // Allowed: the same extraction, run again, resumes and fetches the file
    // there (without the FHIR server's token).
    t.settings.extract.allowed_hosts = vec!["localhost".into()];
    let report = run(&t, &req).await.expect("extract with the host allowed");
    assert!(report.resumed);
    assert_eq!(raw_resources(&t, "allowed", DATE), of_types(&all, &types));
    let at_files = files.seen();
    assert_eq!(at_files.len(), 1, "{at_files:?}");
    assert!(!at_files[0].authorization, "no token to another origin");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_with_blank_lines_is_accepted_with_its_record_count() {
    let (server, all) = loaded_server(ServerAuth::Bearer(TOKEN.into())).await;
    server
        .proxy
        .inject("GET", "/Patient.ndjson", Fault::BlankLines, 1);
    let t = TestLake::with(|s| configure(s, &server));
    let report = run(
        &t,
        &request(&server, "blank", Level::System, &["Patient"], Since::All),
    )
    .await
    .expect("a file with blank lines is not refused");
    let patients = of_types(&all, &["Patient"]);
    assert_eq!(report.resources(), patients.len() as u64);
    // Kept byte for byte, blank lines included.
    let bytes = &raw_file_bytes(&t, "blank")["Patient.ndjson"];
    let text = String::from_utf8_lossy(bytes);
    assert!(
        text.contains("}\n\n \t\r\n{") && text.ends_with("}\n\n"),
        "{text}"
    );
    assert_eq!(raw_resources(&t, "blank", DATE), patients);
    let curated = t.curate().await.expect("curate");
    assert_eq!(curated.total.records_in, patients.len() as u64);
    assert_eq!(curated.total.curated, patients.len() as u64);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_bearer_token_comes_from_a_file_or_the_environment_never_a_flag() {
    let (server, all) = loaded_server(ServerAuth::Bearer(TOKEN.into())).await;
    let t = TestLake::new();
    std::fs::write(
        t.dir.path().join("fhirflow.toml"),
        "[extract]\npoll_interval_seconds = 1\n",
    )
    .unwrap();
    let base = server.base();
    let args = |system: &'static str| {
        vec![
            "extract".to_string(),
            "--fhir-url".into(),
            base.clone(),
            "--tenant".into(),
            TENANT.into(),
            "--source-system".into(),
            system.into(),
            "--date".into(),
            DATE.into(),
            "--type".into(),
            "Patient".into(),
        ]
    };
    let cli = |args: &[String], env: &[(&str, &str)]| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        t.cli(&args, env)
    };
    let text = |o: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };

    // A token is never a flag value (any user can read those in `ps`).
    let mut flagged = args("flag");
    flagged.extend(["--bearer-token".into(), TOKEN.into()]);
    let out = cli(&flagged, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("unexpected argument '--bearer-token'"),
        "{}",
        text(&out)
    );
    assert_eq!(server.proxy.count("GET", "/$export"), 0);

    // A file: its content, trimmed.
    let token_file = t.dir.path().join("token");
    std::fs::write(&token_file, format!("  {TOKEN}\n")).unwrap();
    let path = token_file.to_str().unwrap().to_string();
    let mut from_file = args("file");
    from_file.extend(["--bearer-token-file".into(), path.clone()]);
    let out = cli(&from_file, &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!text(&out).contains(TOKEN));
    assert!(!from_file.iter().any(|a| a.contains(TOKEN)));
    assert_eq!(
        raw_resources(&t, "file", DATE),
        of_types(&all, &["Patient"])
    );

    // ... or named in the config file.
    std::fs::write(
        t.dir.path().join("fhirflow.toml"),
        format!("[extract]\npoll_interval_seconds = 1\nbearer_token_file = {path:?}\n"),
    )
    .unwrap();
    let out = cli(&args("config-file"), &[]);
    assert!(out.status.success(), "{}", text(&out));
    std::fs::write(
        t.dir.path().join("fhirflow.toml"),
        "[extract]\npoll_interval_seconds = 1\n",
    )
    .unwrap();

    // The environment still works.
    let out = cli(&args("env"), &[("FHIRFLOW_BEARER_TOKEN", TOKEN)]);
    assert!(out.status.success(), "{}", text(&out));

    // A missing, empty or many-line file: an error naming the file, never
    // what it holds; nothing sent.
    server.proxy.clear();
    let missing = t.dir.path().join("no-such-token");
    let empty = t.dir.path().join("empty-token");
    std::fs::write(&empty, " \n").unwrap();
    let two = t.dir.path().join("two-lines");
    std::fs::write(&two, "secret-part-one\nsecret-part-two\n").unwrap();
    for (file, why) in [
        (&missing, "cannot read it"),
        (&empty, "it is empty"),
        (&two, "more than one line"),
    ] {
        let mut a = args("bad-file");
        a.extend([
            "--bearer-token-file".into(),
            file.to_str().unwrap().to_string(),
        ]);
        let out = cli(&a, &[]);
        let shown = text(&out);
        assert_eq!(out.status.code(), Some(2), "{shown}");
        assert!(
            shown.contains(file.to_str().unwrap()) && shown.contains(why),
            "{shown}"
        );
        assert!(!shown.contains("secret-part"), "{shown}");
    }
    assert_eq!(server.proxy.count("GET", "/$export"), 0);

    // Both a token and a file: which one is meant is not guessed.
    let out = cli(&from_file, &[("FHIRFLOW_BEARER_TOKEN", TOKEN)]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("not both"), "{}", text(&out));
}

/// An ES384 key made with ring: (PKCS#8 PEM, public JWK).
fn es384_key() -> (String, Value) {
    use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P384_SHA384_FIXED_SIGNING};
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, &rng).unwrap();
    let pair =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    let public = pair.public_key().as_ref();
    let (x, y) = public[1..].split_at(48);
    let pem = format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        STANDARD.encode(pkcs8.as_ref())
    );
    let jwk = json!({"kty": "EC", "crv": "P-384", "x": URL_SAFE_NO_PAD.encode(x), "y": URL_SAFE_NO_PAD.encode(y), "kid": "es-1", "alg": "ES384"});
    (pem, jwk)
}

/// An RSA key made by the virtual environment's `cryptography`: (private
/// JWK, public JWK).
fn rs384_key(dir: &std::path::Path) -> (Value, Value) {
    let python = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    let script = r#"
import json, base64
from cryptography.hazmat.primitives.asymmetric import rsa
k = rsa.generate_private_key(public_exponent=65537, key_size=2048)
p = k.private_numbers(); u = p.public_numbers
b = lambda n: base64.urlsafe_b64encode(n.to_bytes((n.bit_length() + 7) // 8, "big")).rstrip(b"=").decode()
pub = {"kty": "RSA", "n": b(u.n), "e": b(u.e), "kid": "rs-1", "alg": "RS384"}
priv = dict(pub, d=b(p.d), p=b(p.p), q=b(p.q), dp=b(p.dmp1), dq=b(p.dmq1), qi=b(p.iqmp))
print(json.dumps([priv, pub]))
"#;
    let out = std::process::Command::new(python)
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .output()
        .expect("run the venv's python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pair: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    (pair[0].clone(), pair[1].clone())
}

#[tokio::test(flavor = "multi_thread")]
async fn smart_backend_services_with_es384_and_rs384_and_token_renewal() {
    let keys = tempfile::tempdir().unwrap();
    let (es_pem, es_jwk) = es384_key();
    let (rs_private, rs_jwk) = rs384_key(keys.path());
    let server = Sekmet::start(ServerAuth::Smart {
        clients: vec![("es-client".into(), es_jwk), ("rs-client".into(), rs_jwk)],
        token_lifetime: 2,
    });
    let all = synthea_resources();
    server.load(&all, &format!("Bearer {TOKEN}")).await;

    let es_path = keys.path().join("es.pem");
    std::fs::write(&es_path, es_pem).unwrap();
    let rs_path = keys.path().join("rs.jwk.json");
    std::fs::write(&rs_path, rs_private.to_string()).unwrap();
    for (client, key, system) in [
        ("es-client", es_path, "smart-es"),
        ("rs-client", rs_path, "smart-rs"),
    ] {
        server.proxy.clear();
        // The server refuses the first file's token as if it had expired.
        server
            .proxy
            .inject("GET", "/bulk-files/", Fault::Status(401, None), 1);
        let t = TestLake::with(|s| {
            configure(s, &server);
            s.extract.bearer_token = None;
            s.extract.smart = Some(SmartSettings {
                client_id: client.into(),
                private_key: key.clone(),
                ..Default::default()
            });
        });
        run(
            &t,
            &request(
                &server,
                system,
                Level::System,
                &["Patient", "Condition", "Device"],
                Since::All,
            ),
        )
        .await
        .unwrap_or_else(|e| panic!("{client}: {e}"));
        assert_eq!(
            raw_resources(&t, system, DATE),
            of_types(&all, &["Patient", "Condition", "Device"])
        );
        let tokens = server.proxy.count("POST", "/auth/token");
        assert!(
            tokens >= 2,
            "{client}: a new token after the refusal and before expiry ({tokens})"
        );
        assert_eq!(
            server
                .proxy
                .count("GET", "/.well-known/smart-configuration"),
            1
        );
    }

    // A client the server does not know is refused with the OAuth error.
    let t = TestLake::with(|s| {
        configure(s, &server);
        s.extract.bearer_token = None;
        s.extract.smart = Some(SmartSettings {
            client_id: "stranger".into(),
            private_key: keys.path().join("es.pem"),
            ..Default::default()
        });
    });
    let err = run(
        &t,
        &request(&server, "stranger", Level::System, &["Patient"], Since::All),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("invalid_client") && err.contains("stranger"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn two_extractions_of_one_source_at_once_run_one_at_a_time() {
    let (server, all) = loaded_server(ServerAuth::Bearer(TOKEN.into())).await;
    let t = TestLake::new();
    std::fs::write(
        t.dir.path().join("fhirflow.toml"),
        "[extract]\npoll_interval_seconds = 1\n",
    )
    .unwrap();
    let base = server.base();
    let args = [
        "extract",
        "--fhir-url",
        &base,
        "--tenant",
        TENANT,
        "--source-system",
        "twice",
        "--date",
        DATE,
        "--type",
        "Patient,Condition",
    ];
    let env = [("FHIRFLOW_BEARER_TOKEN", TOKEN), ("FHIRFLOW_WAIT", "0")];
    let spawn = || {
        t.command(&args, &env)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let outs = [a.wait_with_output().unwrap(), b.wait_with_output().unwrap()];
    let codes: Vec<Option<i32>> = outs.iter().map(|o| o.status.code()).collect();
    let mut sorted = codes.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        vec![Some(0), Some(4)],
        "{:?}",
        outs.iter()
            .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
            .collect::<Vec<_>>()
    );
    // One export, landed once.
    assert_eq!(server.proxy.count("GET", "/$export"), 1);
    assert_eq!(
        raw_resources(&t, "twice", DATE),
        of_types(&all, &["Patient", "Condition"])
    );
}

/// `plan` lists the tenants file's sources that are due; `work` extracts
/// one, once: a repeated worker skips, a re-plan lists only the other, and
/// the landed data is then a curate unit.
#[tokio::test(flavor = "multi_thread")]
async fn extract_units_come_from_the_tenants_file_when_due() {
    use fhirflow::fleet::{self, Outcome, PlanRequest, PlanStage};
    let (server, all) = loaded_server(ServerAuth::Bearer(TOKEN.into())).await;
    let files = tempfile::tempdir().unwrap();
    let tenants = files.path().join("tenants.toml");
    std::fs::write(
        &tenants,
        format!(
            "[[tenant]]\ntenant = \"{TENANT}\"\nsource_system = \"ehr-a\"\nfhir_url = \"{0}\"\n\n\
             [[tenant]]\ntenant = \"{TENANT}\"\nsource_system = \"ehr-b\"\nfhir_url = \"{0}\"\nevery_hours = 6\n\
             token_env = \"FHIRFLOW_TEST_EHR_B_TOKEN\"\n",
            server.base()
        ),
    )
    .unwrap();
    let location = tenants.to_str().unwrap().to_string();
    let t = TestLake::with(|s| {
        configure(s, &server);
        s.fleet.tenants = Some(location.clone());
    });
    let req = |stage| PlanRequest {
        stage,
        tenant: None,
        date: Some(date()),
        since: None,
    };
    let systems = |units: &[fleet::Unit]| -> Vec<String> {
        units
            .iter()
            .map(|u| u.source_system.clone().unwrap())
            .collect()
    };
    let quiet = &fhirflow::report::Quiet;

    let first = fleet::plan(&t.lake, &t.settings, &req(PlanStage::Extract))
        .await
        .unwrap();
    assert_eq!(systems(&first.units), ["ehr-a", "ehr-b"]);
    assert!(first
        .units
        .iter()
        .all(|u| u.fhir_url.as_deref() == Some(server.base().as_str())));
    let done = fleet::work(&t.lake, &t.settings, &first.uri, 0, quiet)
        .await
        .unwrap();
    let Outcome::Extracted(x) = done.outcome else {
        panic!("not an extraction")
    };
    assert_eq!(x.resources(), all.len() as u64);
    assert_eq!(
        raw_resources(&t, "ehr-a", &date().to_string()).len(),
        all.len()
    );
    // The same unit again: skipped.
    let again = fleet::work(&t.lake, &t.settings, &first.uri, 0, quiet).await;
    assert!(
        matches!(again, Err(fhirflow::Error::AlreadyDone(_))),
        "{again:?}"
    );

    // Re-planned: only the source not yet extracted.
    let second = fleet::plan(&t.lake, &t.settings, &req(PlanStage::Extract))
        .await
        .unwrap();
    assert_eq!(systems(&second.units), ["ehr-b"]);
    assert_eq!(
        second.units[0].token_env.as_deref(),
        Some("FHIRFLOW_TEST_EHR_B_TOKEN")
    );
    // Its token comes from the variable the tenants file names (the plan
    // holds the name, never the token): unset, the unit cannot run...
    let work = ["work", "--plan", second.uri.as_str(), "--index", "0"];
    let out = t.cli(&work, &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("FHIRFLOW_TEST_EHR_B_TOKEN"), "{err}");
    // ... set, it extracts (the server refuses requests without it).
    let out = t.cli(&work, &[("FHIRFLOW_TEST_EHR_B_TOKEN", TOKEN)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!String::from_utf8_lossy(&out.stderr).contains(TOKEN));
    assert!(!String::from_utf8_lossy(&out.stdout).contains(TOKEN));
    assert_eq!(
        raw_resources(&t, "ehr-b", &date().to_string()).len(),
        all.len()
    );
    let none = fleet::plan(&t.lake, &t.settings, &req(PlanStage::Extract))
        .await
        .unwrap();
    assert!(none.units.is_empty(), "{:?}", none.units);
    // A unit of the first plan whose source was extracted since: skipped.
    let late = fleet::work(&t.lake, &t.settings, &first.uri, 1, quiet).await;
    assert!(
        matches!(late, Err(fhirflow::Error::AlreadyDone(_))),
        "{late:?}"
    );

    // Both sources landed under one (tenant, date): one curate unit.
    let curate = fleet::plan(&t.lake, &t.settings, &req(PlanStage::All))
        .await
        .unwrap();
    assert_eq!(curate.units.len(), 1, "{:?}", curate.units);
    assert_eq!(
        serde_json::to_value(curate.units[0].stage).unwrap(),
        "curate"
    );

    // A tenants file with a bad entry names it.
    std::fs::write(
        &tenants,
        "[[tenant]]\ntenant = \"nope\"\nsource_system = \"a\"\nfhir_url = \"http://x/\"\n",
    )
    .unwrap();
    let err = fleet::plan(&t.lake, &t.settings, &req(PlanStage::Extract))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("[[tenant]] number 1"), "{err}");
}
