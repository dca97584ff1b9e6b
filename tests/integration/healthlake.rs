//! `import --target healthlake` against the HealthLake stand-in
//! (`tests/healthlake.rs`) driven by the real aws-sdk-healthlake client, the
//! lake and the job output on moto's S3.

use std::time::Duration;

use fhirflow::import::{import, ImportRequest};
use fhirflow::layout::{ImportDate, SourceSystem};
use fhirflow::report::Quiet;
use fhirflow::settings::ImportTarget;
use fhirflow_aws::healthlake;
use fhirflow_tests::healthlake::HealthLake;
use fhirflow_tests::*;
use object_store::ObjectStoreExt;

const ROLE: &str = "arn:aws:iam::123456789012:role/healthlake-import";
const DATASTORE: &str = "ds0f8fad5bd9cb469fa16570867728950e";

struct Setup {
    _moto: Moto,
    hl: HealthLake,
    t: TestLake,
}

fn setup(role: &str) -> Setup {
    let moto = Moto::start();
    moto.create_bucket("lake");
    moto.create_bucket("hl-output");
    let hl = HealthLake::start(&moto.endpoint(), &[(DATASTORE, ROLE)]);
    let t = TestLake::with(|s| {
        moto.configure(s, "lake", "fhir");
        hl.configure(s, TENANT, DATASTORE, role);
        s.import.target = ImportTarget::Healthlake;
    });
    Setup { _moto: moto, hl, t }
}

fn patients(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!(r#"{{"resourceType":"Patient","id":"p{i}","birthDate":"1970-01-01"}}"#))
        .collect()
}

async fn land(t: &TestLake, date: &str, lines: &[String]) {
    let date: ImportDate = date.parse().unwrap();
    let dir = t.input(date.to_string().as_str());
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    let file = write_lines(&dir, "Patient.ndjson", &refs);
    fhirflow::ingest::ingest(
        &t.lake,
        &[file],
        &tenant(),
        &"ehr".parse::<SourceSystem>().unwrap(),
        date,
    )
    .await
    .expect("ingest");
    fhirflow::curate::curate(&t.lake, &t.settings, &tenant(), date, &Quiet)
        .await
        .expect("curate");
}

/// The keys under `prefix` of the job output bucket, sorted.
async fn output_objects(s: &Setup, prefix: &str) -> Vec<String> {
    use futures::TryStreamExt;
    let root = fhirflow::storage::Root::open("s3://hl-output/", &s.t.settings.s3).unwrap();
    let store = root.store.clone();
    let mut keys: Vec<String> = store
        .list(Some(&object_store::path::Path::from(prefix)))
        .map_ok(|o| o.location.to_string())
        .try_collect()
        .await
        .unwrap();
    keys.sort();
    keys
}

fn request(date: &str, wait: bool) -> ImportRequest {
    ImportRequest {
        tenant: tenant(),
        date: date.parse().unwrap(),
        target: ImportTarget::Healthlake,
        wait,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_clean_job_imports_every_curated_resource() {
    let s = setup(ROLE);
    land(&s.t, DATE, &patients(25)).await;
    let report = import(&s.t.lake, &s.t.settings, &request(DATE, true), &Quiet)
        .await
        .expect("import");
    assert_eq!(report.status, "COMPLETED");
    assert_eq!(
        (
            report.records_in,
            report.records_out,
            report.records_rejected
        ),
        (25, 25, 0)
    );
    let stored = s.hl.stored(DATASTORE);
    assert_eq!(stored.len(), 25);
    // What HealthLake received is the curated text, tenant label included.
    assert!(stored["Patient/p3"].contains(&label(TENANT)));

    let jobs = s.hl.jobs();
    assert_eq!(jobs.len(), 1);
    let job = &jobs[0];
    assert_eq!(
        job.input,
        format!("s3://lake/fhir/curated/tenantGuid={TENANT}/import_date={DATE}/")
    );
    assert_eq!(job.output, "s3://hl-output/jobs");
    assert!(!job.name.contains(TENANT) && job.name.starts_with("fhirflow-"));
    assert!(job.client_token.starts_with("fhirflow-"));
    let rows = s
        .t
        .sql("SELECT status, healthlake_job_id, healthlake_status, records_in, records_out FROM metadata.import_jobs WHERE stage = 'import'")
        .await;
    assert_eq!(
        rows,
        vec![vec![
            "succeeded".to_string(),
            job.id.clone(),
            "COMPLETED".into(),
            "25".into(),
            "25".into()
        ]]
    );
    // Every curated record is accounted for, per type.
    let metrics = s
        .t
        .sql("SELECT resource_type, records_in, records_out, records_rejected, conserved FROM metadata.import_metrics WHERE stage = 'import'")
        .await;
    assert_eq!(
        metrics,
        vec![vec![
            "Patient".to_string(),
            "25".into(),
            "25".into(),
            "0".into(),
            "true".into()
        ]]
    );
    // The job's output is where the service puts it, with no FAILURE folder.
    let folder = format!("jobs/{DATASTORE}-FHIR_IMPORT-{}", job.id);
    let listed = output_objects(&s, &folder).await;
    assert_eq!(
        listed,
        vec![
            format!("{folder}/SUCCESS/Patient-processed.ndjson"),
            format!("{folder}/manifest.json"),
        ]
    );
    // The operations the client used, polling included.
    let ops = s.hl.requests();
    assert_eq!(ops[0], "StartFHIRImportJob");
    assert!(
        ops[1..].iter().all(|o| o == "DescribeFHIRImportJob"),
        "{ops:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn healthlake_rejections_come_back_with_their_line() {
    let s = setup(ROLE);
    land(&s.t, DATE, &patients(4)).await;
    // HealthLake rejects what curation let through (here: lines of the
    // visible copy altered on S3 after curation, keeping the size the
    // commit records, standing in for a stricter service check).
    let root = &s.t.lake.curated;
    let path = root
        .paths
        .curated_partition(&tenant(), date())
        .join("Patient-processed.ndjson");
    let text = String::from_utf8(
        root.store
            .get(&path)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
            .to_vec(),
    )
    .unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let same_size = |s: &str, len: usize| format!("{s}{}", " ".repeat(len - s.len()));
    lines[1] = same_size(
        r#"{"resourceType":"Patient","id":"bad id!"}"#,
        lines[1].len(),
    );
    lines[3] = same_size(r#"{"resourceType":"Patient""#, lines[3].len());
    root.store
        .put(&path, (lines.join("\n") + "\n").into_bytes().into())
        .await
        .unwrap();

    let report = import(&s.t.lake, &s.t.settings, &request(DATE, true), &Quiet)
        .await
        .expect("import");
    assert_eq!(report.status, "COMPLETED_WITH_ERRORS");
    assert_eq!(
        (
            report.records_in,
            report.records_out,
            report.records_rejected
        ),
        (4, 2, 2)
    );
    let errors = s
        .t
        .sql("SELECT stage, line_no, error_code, resource_type, resource_id, source_file, location, message FROM metadata.import_errors WHERE stage = 'import' ORDER BY line_no")
        .await;
    let file = format!(
        "s3://lake/fhir/curated/tenantGuid={TENANT}/import_date={DATE}/Patient-processed.ndjson"
    );
    // Each rejection: the curated file and line, the id read from that
    // line, and the OperationOutcome's issue (code, diagnostics, location).
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert_eq!(
        errors[0][..7],
        [
            "import".to_string(),
            "2".into(),
            "HEALTHLAKE_VALUE".into(),
            "Patient".into(),
            "bad id!".into(),
            file.clone(),
            "Patient.id".into()
        ]
    );
    assert!(
        errors[0][7].starts_with("value: Resource id does not match"),
        "{errors:?}"
    );
    assert!(errors[0][7].ends_with("status 400"), "{errors:?}");
    assert_eq!(
        errors[1][..7],
        [
            "import".to_string(),
            "4".into(),
            "HEALTHLAKE_STRUCTURE".into(),
            "Patient".into(),
            "NULL".into(),
            file,
            "NULL".into()
        ]
    );
    let status =
        s.t.sql("SELECT status, records_rejected FROM metadata.import_jobs WHERE stage = 'import'")
            .await;
    assert_eq!(
        status,
        vec![vec!["succeeded with rejections".to_string(), "2".into()]]
    );
    let metrics = s
        .t
        .sql("SELECT records_in, records_out, records_rejected, conserved FROM metadata.import_metrics WHERE stage = 'import'")
        .await;
    assert_eq!(
        metrics,
        vec![vec!["4".to_string(), "2".into(), "2".into(), "true".into()]]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn server_errors_are_accounted_for_and_a_count_that_does_not_add_up_exits_3() {
    let s = setup(ROLE);
    land(&s.t, "2024-05-01", &patients(5)).await;
    let others: Vec<String> = patients(6)
        .iter()
        .map(|p| p.replace("\"id\":\"p", "\"id\":\"q"))
        .collect();
    land(&s.t, "2024-05-02", &others).await;
    // Server errors with their FAILURE lines: every record is accounted for.
    s.hl.server_errors(2);
    let report = import(
        &s.t.lake,
        &s.t.settings,
        &request("2024-05-01", true),
        &Quiet,
    )
    .await
    .expect("import with server errors");
    assert_eq!(report.status, "COMPLETED_WITH_ERRORS");
    assert_eq!(
        (
            report.records_in,
            report.records_out,
            report.records_rejected,
            report.records_server_error
        ),
        (5, 3, 2, 2)
    );
    let codes = s
        .t
        .sql("SELECT line_no, error_code FROM metadata.import_errors WHERE stage = 'import' ORDER BY line_no")
        .await;
    assert_eq!(
        codes,
        vec![
            vec!["1".to_string(), "HEALTHLAKE_SERVER_ERROR".into()],
            vec!["2".to_string(), "HEALTHLAKE_SERVER_ERROR".into()],
        ]
    );

    // Server errors the manifest counts with no line for them: the file
    // does not add up, the import says which and exits 3, and its rows are
    // recorded as not conserved.
    s.hl.lose_server_errors(2);
    let err = import(
        &s.t.lake,
        &s.t.settings,
        &request("2024-05-02", true),
        &Quiet,
    )
    .await
    .unwrap_err();
    assert_eq!(err.exit_code(), 3, "{err}");
    let text = err.to_string();
    assert!(
        text.contains("Patient-processed.ndjson: curate published 6 but HealthLake reports 4 imported + 0 rejected + 0 server errors"),
        "{text}"
    );
    let rows = s
        .t
        .sql("SELECT j.status, m.records_in, m.records_out, m.conserved FROM metadata.import_jobs j JOIN metadata.import_metrics m ON m.job_id = j.job_id WHERE j.stage = 'import' AND j.import_date = DATE '2024-05-02'")
        .await;
    assert_eq!(
        rows,
        vec![vec![
            "not conserved".to_string(),
            "6".into(),
            "4".into(),
            "false".into()
        ]]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn two_tenants_imports_queue_in_the_region_and_a_capitalised_manifest_reads() {
    let moto = Moto::start();
    moto.create_bucket("lake");
    moto.create_bucket("hl-output");
    const OTHER_DATASTORE: &str = "ds7c9e6679742540de944be07fc1f90ae7";
    let hl = HealthLake::start(
        &moto.endpoint(),
        &[(DATASTORE, ROLE), (OTHER_DATASTORE, ROLE)],
    );
    hl.set_work_time(Duration::from_millis(500));
    hl.capitalised_manifest();
    let t = TestLake::with(|s| {
        moto.configure(s, "lake", "fhir");
        hl.configure(s, TENANT, DATASTORE, ROLE);
        hl.configure(s, OTHER_TENANT, OTHER_DATASTORE, ROLE);
        s.import.target = ImportTarget::Healthlake;
    });
    land(&t, DATE, &patients(2)).await;
    let other: fhirflow::layout::TenantGuid = OTHER_TENANT.parse().unwrap();
    let dir = t.input("other");
    let lines = patients(3);
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    let file = write_lines(&dir, "Patient.ndjson", &refs);
    let ehr: SourceSystem = "ehr".parse().unwrap();
    fhirflow::ingest::ingest(&t.lake, &[file], &other, &ehr, date())
        .await
        .unwrap();
    fhirflow::curate::curate(&t.lake, &t.settings, &other, date(), &Quiet)
        .await
        .unwrap();
    let mut second = request(DATE, false);
    second.tenant = other.clone();
    import(&t.lake, &t.settings, &request(DATE, false), &Quiet)
        .await
        .expect("submit the first tenant's");
    import(&t.lake, &t.settings, &second, &Quiet)
        .await
        .expect("submit the second tenant's");
    // Another datastore, the same Region: the second job waits its turn.
    // (A snapshot, which under load may come after the first job ended:
    // the order of the ends below is what proves the queue.)
    tokio::time::sleep(Duration::from_millis(250)).await;
    let jobs = hl.jobs();
    let now: Vec<_> = jobs
        .iter()
        .map(|j| (j.datastore.as_str(), j.status.as_str()))
        .collect();
    assert_eq!(now.len(), 2);
    if now[0].1 == "IN_PROGRESS" {
        assert_eq!(now[1], (OTHER_DATASTORE, "QUEUED"), "{now:?}");
    }
    for (tenant, n) in [(tenant(), 2), (other, 3)] {
        let mut last = None;
        for _ in 0..100 {
            let r = healthlake::status(&t.lake, &t.settings, &tenant, date())
                .await
                .expect("status");
            if r.status == "COMPLETED" {
                last = Some(r);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let r = last.expect("the job completes");
        assert_eq!((r.records_in, r.records_out), (n, n), "{tenant}");
    }
    assert_eq!(hl.stored(OTHER_DATASTORE).len(), 3);
    assert_eq!(hl.stored(DATASTORE).len(), 2);
    // The second job worked only once the first had ended: its end is at
    // least one work time (500 ms) after the first's.
    let jobs = hl.jobs();
    let ends: Vec<f64> = jobs.iter().map(|j| j.end.expect("ended")).collect();
    assert!(
        ends[1] - ends[0] >= 0.45,
        "not one after the other: {jobs:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn minimal_validation_stores_what_strict_rejects() {
    for (level, imported) in [("strict", 1), ("minimal", 2)] {
        let mut s = setup(ROLE);
        s.t.settings.healthlake.validation_level = level.into();
        land(&s.t, DATE, &patients(2)).await;
        // An empty string, which the curated copy is made to hold.
        let root = &s.t.lake.curated;
        let path = root
            .paths
            .curated_partition(&tenant(), date())
            .join("Patient-processed.ndjson");
        let text = String::from_utf8(
            root.store
                .get(&path)
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap()
                .to_vec(),
        )
        .unwrap();
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        let bad = r#"{"resourceType":"Patient","id":"p1","gender":""}"#;
        lines[1] = format!("{bad}{}", " ".repeat(lines[1].len() - bad.len()));
        root.store
            .put(&path, (lines.join("\n") + "\n").into_bytes().into())
            .await
            .unwrap();
        let report = import(&s.t.lake, &s.t.settings, &request(DATE, true), &Quiet)
            .await
            .expect("import");
        assert_eq!(report.records_out, imported, "{level}");
        assert_eq!(s.hl.jobs()[0].validation_level, level);
        if level == "minimal" {
            let stored = s.hl.stored(DATASTORE);
            assert!(
                stored["Patient/p1"].contains("validation-issue"),
                "{stored:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_job_fails_the_import_and_is_recorded() {
    let s = setup("arn:aws:iam::123456789012:role/not-the-datastores");
    land(&s.t, DATE, &patients(2)).await;
    let err = import(&s.t.lake, &s.t.settings, &request(DATE, true), &Quiet)
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("FAILED") && text.contains("data access role"),
        "{text}"
    );
    let rows = s
        .t
        .sql("SELECT status, healthlake_status FROM metadata.import_jobs WHERE stage = 'import'")
        .await;
    assert_eq!(rows, vec![vec!["failed".to_string(), "FAILED".into()]]);
}

#[tokio::test(flavor = "multi_thread")]
async fn throttling_is_retried() {
    let s = setup(ROLE);
    land(&s.t, DATE, &patients(3)).await;
    s.hl.throttle(3);
    let report = import(&s.t.lake, &s.t.settings, &request(DATE, true), &Quiet)
        .await
        .expect("import despite throttling");
    assert_eq!(report.status, "COMPLETED");
    assert_eq!(s.hl.throttled(), 3);
    assert_eq!(s.hl.jobs().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retried_import_reuses_the_job_through_its_client_token() {
    let s = setup(ROLE);
    land(&s.t, DATE, &patients(3)).await;
    let first = import(&s.t.lake, &s.t.settings, &request(DATE, true), &Quiet)
        .await
        .expect("import");
    // A run that crashed before it saved the job id (so before it wrote
    // the job's ledger file) starts again: the same client token brings
    // back the same job, and nothing is imported twice.
    let state = s.t.lake.metadata.paths.import_state(&tenant(), date());
    s.t.lake.metadata.store.delete(&state).await.unwrap();
    let ledger =
        s.t.lake
            .metadata
            .paths
            .ledger(&tenant(), &format!("healthlake-{DATASTORE}"));
    for o in s.t.lake.metadata.list("t", &ledger).await.unwrap() {
        s.t.lake.metadata.store.delete(&o.location).await.unwrap();
    }
    let second = import(&s.t.lake, &s.t.settings, &request(DATE, true), &Quiet)
        .await
        .expect("import again");
    assert_eq!(first.healthlake_job_id, second.healthlake_job_id);
    assert_eq!(s.hl.jobs().len(), 1);
    let starts =
        s.hl.requests()
            .iter()
            .filter(|o| *o == "StartFHIRImportJob")
            .count();
    assert_eq!(starts, 2);
    // With the state in place, a third import does not even call Start.
    let third = import(&s.t.lake, &s.t.settings, &request(DATE, true), &Quiet)
        .await
        .expect("import a third time");
    assert_eq!(third.status, "already imported");
    let starts =
        s.hl.requests()
            .iter()
            .filter(|o| *o == "StartFHIRImportJob")
            .count();
    assert_eq!(starts, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn no_wait_queues_behind_the_running_job_and_status_records_the_outcome() {
    let s = setup(ROLE);
    s.hl.set_work_time(Duration::from_millis(600));
    land(&s.t, "2024-05-01", &patients(2)).await;
    land(&s.t, "2024-05-02", &patients(3)).await;
    let a = import(
        &s.t.lake,
        &s.t.settings,
        &request("2024-05-01", false),
        &Quiet,
    )
    .await
    .expect("submit a");
    let b = import(
        &s.t.lake,
        &s.t.settings,
        &request("2024-05-02", false),
        &Quiet,
    )
    .await
    .expect("submit b");
    assert!(
        ["SUBMITTED", "IN_PROGRESS"].contains(&a.status.as_str()),
        "{}",
        a.status
    );
    // One import per datastore at a time: the second one waits its turn.
    tokio::time::sleep(Duration::from_millis(250)).await;
    let statuses: Vec<String> = s.hl.jobs().iter().map(|j| j.status.clone()).collect();
    assert_eq!(statuses, vec!["IN_PROGRESS".to_string(), "QUEUED".into()]);
    assert!(
        ["SUBMITTED", "QUEUED"].contains(&b.status.as_str()),
        "{}",
        b.status
    );

    // Until the job ends, import_jobs holds its status as submitted.
    let rows = s
        .t
        .sql("SELECT status FROM metadata.import_jobs WHERE stage = 'import' ORDER BY import_date")
        .await;
    assert!(
        ["submitted", "in_progress"].contains(&rows[0][0].as_str()),
        "{rows:?}"
    );
    assert_eq!(rows[1], vec!["queued".to_string()]);

    for day in ["2024-05-01", "2024-05-02"] {
        let d: ImportDate = day.parse().unwrap();
        let mut last = String::new();
        for _ in 0..100 {
            last = healthlake::status(&s.t.lake, &s.t.settings, &tenant(), d)
                .await
                .expect("status")
                .status;
            if last == "COMPLETED" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(last, "COMPLETED", "{day}");
    }
    // The outcome replaced the submitted row: one row per import.
    let rows = s
        .t
        .sql("SELECT import_date, status, records_out FROM metadata.import_jobs WHERE stage = 'import' ORDER BY import_date")
        .await;
    assert_eq!(
        rows,
        vec![
            vec!["2024-05-01".to_string(), "succeeded".into(), "2".into()],
            vec!["2024-05-02".into(), "succeeded".into(), "3".into()],
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn curate_refuses_a_partition_healthlake_is_reading_then_proceeds_once_the_job_ends() {
    let s = setup(ROLE);
    s.hl.set_work_time(Duration::from_millis(700));
    land(&s.t, "2024-05-01", &patients(2)).await;
    land(&s.t, "2024-05-02", &patients(3)).await;
    for day in ["2024-05-01", "2024-05-02"] {
        import(&s.t.lake, &s.t.settings, &request(day, false), &Quiet)
            .await
            .expect("submit");
    }
    // The second job waits behind the first: HealthLake has not read its
    // partition yet, so a re-curate of it must not republish it.
    let statuses: Vec<String> = s.hl.jobs().iter().map(|j| j.status.clone()).collect();
    assert_eq!(statuses[1], "QUEUED", "{statuses:?}");
    let d: ImportDate = "2024-05-02".parse().unwrap();
    let err = fhirflow::curate::curate(&s.t.lake, &s.t.settings, &tenant(), d, &Quiet)
        .await
        .unwrap_err();
    assert_eq!(err.exit_code(), 4, "{err}");
    let job = s.hl.jobs()[1].id.clone();
    assert!(err.to_string().contains(&job), "{err}");

    // Once the job has ended the partition is free again: curate sees the
    // job through and goes on, with nobody running `import status` first.
    for _ in 0..100 {
        if s.hl.jobs().iter().all(|j| j.status == "COMPLETED") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let report = fhirflow::curate::curate(&s.t.lake, &s.t.settings, &tenant(), d, &Quiet)
        .await
        .expect("curate after the job");
    assert_eq!(report.total.curated, 3);
    let rows = s
        .t
        .sql("SELECT status FROM metadata.import_jobs WHERE stage = 'import' AND import_date = DATE '2024-05-02'")
        .await;
    assert_eq!(rows, vec![vec!["succeeded".to_string()]]);
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_healthlake_imports_on_s3_import_once() {
    let s = setup(ROLE);
    s.hl.set_work_time(Duration::from_millis(400));
    land(&s.t, DATE, &patients(30)).await;
    let args = [
        "import",
        "--tenant",
        TENANT,
        "--date",
        DATE,
        "--target",
        "healthlake",
    ];
    let mut seed: u64 = 17;
    for i in 0..20 {
        let mut child =
            s.t.command(&args, &[("FHIRFLOW_LEASE_TTL_SECONDS", "1")])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        tokio::time::sleep(Duration::from_millis((seed >> 33) % 1200)).await;
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        // However often the import was started, one curated commit is one
        // HealthLake job (the ClientToken, and the lease naming the job).
        let jobs = s.hl.jobs();
        assert!(jobs.len() <= 1, "kill {i}: {} jobs", jobs.len());
    }
    let out = s.t.cli(&args, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(s.hl.jobs().len(), 1);
    assert_eq!(s.hl.stored(DATASTORE).len(), 30);
    let rows =
        s.t.sql("SELECT status, records_out FROM metadata.import_jobs WHERE stage = 'import'")
            .await;
    assert_eq!(rows, vec![vec!["succeeded".to_string(), "30".into()]]);
    // The partition is free again: a curate runs.
    fhirflow::curate::curate(&s.t.lake, &s.t.settings, &tenant(), date(), &Quiet)
        .await
        .expect("curate after the imports");
}

fn versioned(id: &str, version: &str, birth: &str) -> String {
    format!(
        r#"{{"resourceType":"Patient","id":"{id}","meta":{{"versionId":"{version}"}},"birthDate":"{birth}"}}"#
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn only_what_changed_is_sent_and_an_unchanged_night_sends_nothing() {
    let s = setup(ROLE);
    let first: Vec<String> = (0..5)
        .map(|i| versioned(&format!("p{i}"), "2", "1970-01-01"))
        .collect();
    land(&s.t, "2024-05-01", &first).await;
    let one = import(
        &s.t.lake,
        &s.t.settings,
        &request("2024-05-01", true),
        &Quiet,
    )
    .await
    .expect("first import");
    assert_eq!((one.records_in, one.records_out), (5, 5));

    // The next night: four the same, p4 re-sent late in an older version
    // with other content, p5 new.
    let mut second = first[..4].to_vec();
    second.push(versioned("p4", "1", "1999-09-09"));
    second.push(versioned("p5", "1", "1980-01-01"));
    land(&s.t, "2024-05-02", &second).await;
    let two = import(
        &s.t.lake,
        &s.t.settings,
        &request("2024-05-02", true),
        &Quiet,
    )
    .await
    .expect("second import");
    assert_eq!(
        (
            two.records_in,
            two.records_out,
            two.records_unchanged,
            two.records_stale
        ),
        (6, 1, 4, 1)
    );
    assert!(two.bytes_not_sent > 0);
    // HealthLake read only the record that changed, from the job's own
    // prefix; the stale one did not overwrite the newer version.
    let jobs = s.hl.jobs();
    assert_eq!(jobs.len(), 2);
    assert!(
        jobs[1].input.starts_with(&format!(
            "s3://lake/fhir/healthlake-import/tenantGuid={TENANT}/import_date=2024-05-02/job="
        )),
        "{}",
        jobs[1].input
    );
    assert_eq!(jobs[1].scanned, 1);
    let stored = s.hl.stored(DATASTORE);
    assert_eq!(stored.len(), 6);
    assert!(stored["Patient/p4"].contains("1970-01-01"));
    let metrics = s
        .t
        .sql("SELECT records_in, records_out, records_unchanged, records_stale, conserved FROM metadata.import_metrics WHERE stage = 'import' AND import_date = DATE '2024-05-02'")
        .await;
    assert_eq!(
        metrics,
        vec![vec![
            "6".to_string(),
            "1".into(),
            "4".into(),
            "1".into(),
            "true".into()
        ]]
    );

    // The same export a third night: nothing to send, and no job.
    land(&s.t, "2024-05-03", &second).await;
    let three = import(
        &s.t.lake,
        &s.t.settings,
        &request("2024-05-03", true),
        &Quiet,
    )
    .await
    .expect("third import");
    assert_eq!(three.status, "nothing to send");
    assert_eq!(
        (
            three.records_in,
            three.records_out,
            three.records_unchanged,
            three.records_stale
        ),
        (6, 0, 5, 1)
    );
    assert_eq!(s.hl.jobs().len(), 2);
    let rows = s
        .t
        .sql("SELECT status, records_in, records_out FROM metadata.import_jobs WHERE stage = 'import' AND import_date = DATE '2024-05-03'")
        .await;
    assert_eq!(
        rows,
        vec![vec!["succeeded".to_string(), "6".into(), "0".into()]]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn deletions_reach_healthlake_through_signed_batch_bundles_and_are_counted() {
    let s = setup(ROLE);
    land(&s.t, "2024-05-01", &patients(3)).await;
    import(
        &s.t.lake,
        &s.t.settings,
        &request("2024-05-01", true),
        &Quiet,
    )
    .await
    .expect("first import");

    // The next export: p1 deleted, and p7, which HealthLake never had.
    export_deleted(
        &s.t.lake,
        "2024-05-02",
        "run-a",
        &["Patient/p1", "Patient/p7"],
        true,
    )
    .await;
    land(&s.t, "2024-05-02", &[patients(4)[3].clone()]).await;
    let two = import(
        &s.t.lake,
        &s.t.settings,
        &request("2024-05-02", true),
        &Quiet,
    )
    .await
    .expect("import with deletions");
    assert_eq!(
        (
            two.deletions_read,
            two.deletions_applied,
            two.deletions_absent,
            two.deletions_failed
        ),
        (2, 1, 1, 0)
    );
    let stored = s.hl.stored(DATASTORE);
    assert!(!stored.contains_key("Patient/p1"), "{stored:?}");
    assert!(stored.contains_key("Patient/p3"));
    assert_eq!(s.hl.batches(), vec![2]);
    // After the job: the deletions follow the partition's import.
    let ops = s.hl.requests();
    let post = ops.iter().position(|o| o == "FHIR POST /").unwrap();
    assert!(
        ops[..post].iter().any(|o| o == "StartFHIRImportJob"),
        "{ops:?}"
    );

    // 170 deletions go as Bundles of at most 160, throttling is retried,
    // and a deletion HealthLake fails is counted and recorded.
    let many: Vec<String> = (0..170).map(|i| format!("Patient/x{i}")).collect();
    let mut urls: Vec<&str> = many.iter().map(String::as_str).collect();
    urls.push("Patient/p0");
    export_deleted(&s.t.lake, "2024-05-03", "run-b", &urls, true).await;
    // The same record as the night before: nothing to import, deletions
    // all the same.
    land(&s.t, "2024-05-03", &[patients(4)[3].clone()]).await;
    s.hl.throttle(2);
    s.hl.fail_deletes(1);
    let three = import(
        &s.t.lake,
        &s.t.settings,
        &request("2024-05-03", true),
        &Quiet,
    )
    .await
    .expect("import of deletions only");
    assert_eq!(three.status, "nothing to send");
    assert_eq!(
        (
            three.deletions_read,
            three.deletions_applied,
            three.deletions_absent,
            three.deletions_failed
        ),
        (171, 0, 170, 1)
    );
    assert_eq!(s.hl.batches()[1..], [160, 11]);
    // The failed one (the first sent, p0) is still there.
    assert!(s.hl.stored(DATASTORE).contains_key("Patient/p0"));
    let rows = s
        .t
        .sql("SELECT error_code, resource_id FROM metadata.import_errors WHERE stage = 'import' AND import_date = DATE '2024-05-03'")
        .await;
    assert_eq!(
        rows,
        vec![vec!["HEALTHLAKE_DELETE_FAILED".to_string(), "p0".into()]]
    );
    let metrics = s
        .t
        .sql("SELECT deletions_read, deletions_applied, deletions_absent, deletions_failed, conserved FROM metadata.import_metrics WHERE stage = 'import' AND import_date = DATE '2024-05-03'")
        .await;
    assert_eq!(
        metrics,
        vec![vec![
            "171".to_string(),
            "0".into(),
            "170".into(),
            "1".into(),
            "true".into()
        ]]
    );
}
