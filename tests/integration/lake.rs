//! The local Iceberg lake (`import --target local`): two imports with an
//! update between them, the current view, time travel, partition pruning by
//! tenant, and a retried import that appends nothing.

use fhirflow::import::{import, ImportRequest};
use fhirflow::layout::{ImportDate, SourceSystem, TenantGuid};
use fhirflow::report::Quiet;
use fhirflow::settings::ImportTarget;
use fhirflow_tests::*;

fn patient(id: &str, version: &str, family: &str) -> String {
    format!(
        r#"{{"resourceType":"Patient","id":"{id}","meta":{{"versionId":"{version}","lastUpdated":"2024-05-0{version}T10:00:00Z"}},"name":[{{"family":"{family}"}}],"birthDate":"1970-01-0{version}"}}"#
    )
}

async fn land(t: &TestLake, tenant: &TenantGuid, date: &str, lines: &[String]) {
    let date: ImportDate = date.parse().unwrap();
    let dir = t.input(&format!("{tenant}-{date}"));
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    let file = write_lines(&dir, "Patient.ndjson", &refs);
    fhirflow::ingest::ingest(
        &t.lake,
        &[file],
        tenant,
        &"ehr".parse::<SourceSystem>().unwrap(),
        date,
    )
    .await
    .expect("ingest");
    fhirflow::curate::curate(&t.lake, &t.settings, tenant, date, &Quiet)
        .await
        .expect("curate");
}

async fn import_local(
    t: &TestLake,
    tenant: &TenantGuid,
    date: &str,
) -> fhirflow::import::ImportReport {
    import(
        &t.lake,
        &t.settings,
        &local(tenant, date.parse().unwrap()),
        &Quiet,
    )
    .await
    .expect("import")
}

fn local(tenant: &TenantGuid, date: ImportDate) -> ImportRequest {
    ImportRequest {
        tenant: tenant.clone(),
        date,
        target: ImportTarget::Local,
        wait: true,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_imports_give_the_current_view_and_time_travel() {
    let t = TestLake::new();
    let other: TenantGuid = OTHER_TENANT.parse().unwrap();
    land(
        &t,
        &tenant(),
        "2024-05-01",
        &[patient("p1", "1", "Old"), patient("p2", "1", "Two")],
    )
    .await;
    let first = import_local(&t, &tenant(), "2024-05-01").await;
    assert_eq!(first.status, "succeeded");
    assert_eq!(first.records_out, 2);
    let first_snapshot = first.snapshots["Patient"];

    // p1 changes; p3 is new; another tenant lands in the same table.
    land(
        &t,
        &tenant(),
        "2024-05-02",
        &[patient("p1", "2", "New"), patient("p3", "1", "Three")],
    )
    .await;
    let second = import_local(&t, &tenant(), "2024-05-02").await;
    assert_eq!(second.records_out, 2);
    land(&t, &other, "2024-05-02", &[patient("p1", "1", "Elsewhere")]).await;
    import_local(&t, &other, "2024-05-02").await;

    // The current view: the latest version per tenant and id.
    let q = format!(
        "SELECT id, version_id, json_get_str(resource, 'name', 0, 'family') FROM lake.patient WHERE tenant_guid = '{TENANT}' ORDER BY id"
    );
    assert_eq!(
        t.sql(&q).await,
        vec![
            vec!["p1".to_string(), "2".into(), "New".into()],
            vec!["p2".into(), "1".into(), "Two".into()],
            vec!["p3".into(), "1".into(), "Three".into()],
        ]
    );
    // Every version stays in the history; the curated text is kept whole.
    assert_eq!(
        t.sql(&format!(
            "SELECT count(*) FROM lake_history.patient WHERE tenant_guid = '{TENANT}'"
        ))
        .await,
        vec![vec!["4".to_string()]]
    );
    let curated = t
        .sql("SELECT resource FROM curated.patient WHERE id = 'p3'")
        .await;
    let lake = t
        .sql(&format!(
            "SELECT resource FROM lake.patient WHERE id = 'p3' AND tenant_guid = '{TENANT}'"
        ))
        .await;
    assert_eq!(curated, lake);

    // Time travel: the lake as the first import left it.
    assert_eq!(
        t.sql(&format!(
            "SELECT id, version_id FROM lake_at('Patient', {first_snapshot}) ORDER BY id"
        ))
        .await,
        vec![
            vec!["p1".to_string(), "1".into()],
            vec!["p2".into(), "1".into()],
        ]
    );
    let snaps = t
        .sql("SELECT count(*), count(DISTINCT job_id) FROM lake_snapshots WHERE table_name = 'patient'")
        .await;
    assert_eq!(snaps, vec![vec!["3".to_string(), "3".into()]]);

    // Pruned reads by tenant return every row of that tenant, and only those.
    let by_tenant = t
        .sql("SELECT tenant_guid, count(*) FROM lake_history.patient GROUP BY tenant_guid ORDER BY tenant_guid")
        .await;
    assert_eq!(
        by_tenant,
        vec![
            vec![TENANT.to_string(), "4".into()],
            vec![OTHER_TENANT.to_string(), "1".into()]
        ]
    );
    assert_eq!(
        t.sql(&format!(
            "SELECT id FROM lake.patient WHERE tenant_guid = '{OTHER_TENANT}'"
        ))
        .await,
        vec![vec!["p1".to_string()]]
    );
    // The files themselves sit under their tenant's partition folder.
    let data = t.root().join("iceberg/warehouse/fhir/patient/data");
    let mut dirs: Vec<String> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    dirs.sort();
    assert_eq!(
        dirs,
        vec![
            format!("tenant_guid={TENANT}"),
            format!("tenant_guid={OTHER_TENANT}")
        ]
    );

    // A retried import appends nothing and says so.
    let again = import_local(&t, &tenant(), "2024-05-02").await;
    assert_eq!(again.status, "already imported");
    assert_eq!(
        t.sql(&format!(
            "SELECT count(*) FROM lake_history.patient WHERE tenant_guid = '{TENANT}'"
        ))
        .await,
        vec![vec!["4".to_string()]]
    );
    // Every import in the history; the current table holds each
    // partition's latest one.
    let jobs = t
        .sql("SELECT status, records_in FROM metadata.import_jobs_history WHERE stage = 'import' ORDER BY job_id")
        .await;
    assert_eq!(jobs.len(), 4);
    assert_eq!(jobs[3], vec!["already imported".to_string(), "2".into()]);
    let current = t
        .sql("SELECT count(*) FROM metadata.import_jobs WHERE stage = 'import'")
        .await;
    assert_eq!(current, vec![vec!["3".to_string()]]);
}

#[tokio::test(flavor = "multi_thread")]
async fn importing_what_was_never_curated_is_a_clear_error() {
    let t = TestLake::new();
    let err = import(&t.lake, &t.settings, &local(&tenant(), date()), &Quiet)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("nothing curated"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_damaged_curated_file_fails_the_import_naming_its_line() {
    let t = TestLake::new();
    let dir = t.input("two-types");
    let org = r#"{"resourceType":"Organization","id":"o1","name":"Clinic"}"#;
    let files = [
        write_lines(
            &dir,
            "Patient.ndjson",
            &[&patient("p1", "1", "One"), &patient("p2", "1", "Two")],
        ),
        write_lines(&dir, "Organization.ndjson", &[org]),
    ];
    t.ingest(&files, "ehr").await;
    t.curate().await.expect("curate");
    // Cut the second Patient short after curation, as a damaged copy would
    // be: the committed object itself, which the import reads.
    let record = fhirflow::commit::latest_curate(&t.lake, &tenant(), date())
        .await
        .unwrap()
        .unwrap();
    let part = record
        .curated
        .iter()
        .find(|o| o.name.as_deref() == Some("Patient-processed.ndjson"))
        .unwrap();
    let name = part.path.rsplit('/').next().unwrap().to_string();
    let path = std::path::PathBuf::from(format!("/{}", part.path));
    let text = std::fs::read_to_string(&path).unwrap();
    let cut = text.rfind("\"name\"").unwrap();
    std::fs::write(&path, format!("{}\n", &text[..cut])).unwrap();

    let err = import(&t.lake, &t.settings, &local(&tenant(), date()), &Quiet)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&name) && err.contains("does not match its commit"),
        "{err}"
    );
    // Nothing of the Patient table became visible, and no import was recorded.
    let patients = t
        .sql("SELECT count(*) FROM lake_snapshots WHERE table_name = 'patient'")
        .await;
    assert_eq!(patients, vec![vec!["0".to_string()]]);
    let jobs = t
        .sql("SELECT count(*) FROM metadata.import_jobs WHERE stage = 'import'")
        .await;
    assert_eq!(jobs, vec![vec!["0".to_string()]]);
}

/// `lake.<type>` orders versions as dedup does: a late re-send of an old
/// version, imported on a later date, does not become current; versions
/// compare as numbers (10 after 9).
#[tokio::test(flavor = "multi_thread")]
async fn the_current_version_is_the_newest_version_not_the_last_import() {
    let t = TestLake::new();
    land(
        &t,
        &tenant(),
        "2024-05-01",
        &[patient("p1", "3", "Three"), patient("p2", "9", "Nine")],
    )
    .await;
    import_local(&t, &tenant(), "2024-05-01").await;
    let ten = patient("p2", "9", "Ten").replace("\"versionId\":\"9\"", "\"versionId\":\"10\"");
    land(
        &t,
        &tenant(),
        "2024-05-02",
        &[patient("p1", "2", "Two, re-sent late"), ten],
    )
    .await;
    let second = import_local(&t, &tenant(), "2024-05-02").await;
    // The late re-send is older than what the lake holds: counted stale and
    // not imported.
    assert_eq!(
        (second.records_in, second.records_out, second.records_stale),
        (2, 1, 1)
    );
    let q = format!(
        "SELECT id, version_id, json_get_str(resource, 'name', 0, 'family') FROM lake.patient WHERE tenant_guid = '{TENANT}' ORDER BY id"
    );
    assert_eq!(
        t.sql(&q).await,
        vec![
            vec!["p1".to_string(), "3".into(), "Three".into()],
            vec!["p2".into(), "10".into(), "Ten".into()],
        ]
    );
    assert_eq!(
        t.sql(&format!(
            "SELECT count(*) FROM lake_history.patient WHERE tenant_guid = '{TENANT}'"
        ))
        .await,
        vec![vec!["3".to_string()]]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unchanged_nightly_export_imports_nothing_and_says_so() {
    let t = TestLake::new();
    let night = |family: &str| {
        vec![
            patient("p1", "1", "One"),
            patient("p2", "1", family),
            patient("p3", "1", "Three"),
        ]
    };
    land(&t, &tenant(), "2024-05-01", &night("Two")).await;
    let first = import_local(&t, &tenant(), "2024-05-01").await;
    assert_eq!((first.records_out, first.records_unchanged), (3, 0));

    // The next night's full export sends the same resources; one of them
    // only with a new versionId and lastUpdated.
    let mut same = night("Two");
    same[0] = same[0]
        .replace("\"versionId\":\"1\"", "\"versionId\":\"2\"")
        .replace("2024-05-01T10", "2024-05-02T10");
    land(&t, &tenant(), "2024-05-02", &same).await;
    let second = import_local(&t, &tenant(), "2024-05-02").await;
    assert_eq!(
        (
            second.records_in,
            second.records_out,
            second.records_unchanged,
            second.records_stale
        ),
        (3, 0, 3, 0)
    );
    assert!(second.bytes_not_sent > 300, "{}", second.bytes_not_sent);
    let metrics = t
        .sql("SELECT records_in, records_out, records_unchanged, records_stale, conserved FROM metadata.import_metrics WHERE stage = 'import' AND import_date = DATE '2024-05-02'")
        .await;
    assert_eq!(
        metrics,
        vec![vec![
            "3".to_string(),
            "0".into(),
            "3".into(),
            "0".into(),
            "true".into()
        ]]
    );
    // A retry of that import finds its (empty) snapshot and the same counts.
    let again = import_local(&t, &tenant(), "2024-05-02").await;
    assert_eq!(again.status, "already imported");
    assert_eq!((again.records_in, again.records_unchanged), (3, 3));

    // A third night changes p2: only it is sent.
    land(&t, &tenant(), "2024-05-03", &night("Changed")).await;
    let third = import_local(&t, &tenant(), "2024-05-03").await;
    assert_eq!((third.records_out, third.records_unchanged), (1, 2));
    assert_eq!(
        t.sql(&format!(
            "SELECT json_get_str(resource, 'name', 0, 'family') FROM lake.patient WHERE tenant_guid = '{TENANT}' AND id = 'p2'"
        ))
        .await,
        vec![vec!["Changed".to_string()]]
    );
    assert_eq!(
        t.sql(&format!(
            "SELECT count(*) FROM lake_history.patient WHERE tenant_guid = '{TENANT}'"
        ))
        .await,
        vec![vec!["4".to_string()]]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn deletions_leave_the_current_view_stay_in_history_and_are_counted() {
    let t = TestLake::new();
    let first = [
        patient("p1", "1", "One"),
        patient("p2", "1", "Two"),
        patient("p3", "1", "Three"),
    ];
    land(&t, &tenant(), "2024-05-01", &first).await;
    let one = import_local(&t, &tenant(), "2024-05-01").await;
    let before = one.snapshots["Patient"];

    // The next export: p4 is new, p2 and p9 (never held) were deleted; an
    // export that did not finish (no manifest) says p3 was deleted too.
    export_deleted(
        &t.lake,
        "2024-05-02",
        "run-a",
        &["Patient/p2", "Patient/p9"],
        true,
    )
    .await;
    export_deleted(&t.lake, "2024-05-02", "run-b", &["Patient/p3"], false).await;
    let dir = t.input("deletions");
    let p4 = patient("p4", "1", "Four");
    let file = write_lines(&dir, "Patient.ndjson", &[p4.as_str()]);
    let ehr: SourceSystem = "ehr".parse().unwrap();
    let d2: ImportDate = "2024-05-02".parse().unwrap();
    fhirflow::ingest::ingest(&t.lake, &[file], &tenant(), &ehr, d2)
        .await
        .unwrap();
    let curated = fhirflow::curate::curate(&t.lake, &t.settings, &tenant(), d2, &Quiet)
        .await
        .unwrap();
    assert_eq!(curated.deletions, 2);
    // The deletions are not in the visible curated folder (HealthLake
    // imports every object there).
    let visible = t.sql("SELECT count(*) FROM curated.patient").await;
    assert_eq!(visible, vec![vec!["4".to_string()]]);

    let two = import_local(&t, &tenant(), "2024-05-02").await;
    assert_eq!(
        (
            two.deletions_read,
            two.deletions_applied,
            two.deletions_absent,
            two.deletions_failed
        ),
        (2, 1, 1, 0)
    );
    let current = format!("SELECT id FROM lake.patient WHERE tenant_guid = '{TENANT}' ORDER BY id");
    assert_eq!(
        t.sql(&current).await,
        vec![vec!["p1".to_string()], vec!["p3".into()], vec!["p4".into()]]
    );
    // In the history, p2's version and its tombstone (an empty resource).
    assert_eq!(
        t.sql(&format!(
            "SELECT id, resource = '' FROM lake_history.patient WHERE tenant_guid = '{TENANT}' AND id = 'p2' ORDER BY imported_at"
        ))
        .await,
        vec![
            vec!["p2".to_string(), "false".into()],
            vec!["p2".into(), "true".into()]
        ]
    );
    // Before the deletion, time travel still shows it.
    assert_eq!(
        t.sql(&format!(
            "SELECT count(*) FROM lake_at('Patient', {before}) WHERE id = 'p2'"
        ))
        .await,
        vec![vec!["1".to_string()]]
    );
    let metrics = t
        .sql("SELECT deletions_read, deletions_applied, deletions_absent, deletions_failed, conserved FROM metadata.import_metrics WHERE stage = 'import' AND import_date = DATE '2024-05-02'")
        .await;
    assert_eq!(
        metrics,
        vec![vec![
            "2".to_string(),
            "1".into(),
            "1".into(),
            "0".into(),
            "true".into()
        ]]
    );

    // p2 sent again, as it was: the lake no longer holds it, so it is not
    // "unchanged" but imported, and current again.
    land(&t, &tenant(), "2024-05-03", &[patient("p2", "1", "Two")]).await;
    let three = import_local(&t, &tenant(), "2024-05-03").await;
    assert_eq!((three.records_out, three.records_unchanged), (1, 0));
    assert_eq!(t.sql(&current).await.len(), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn one_tenants_imports_take_turns_on_its_ledger() {
    let t = TestLake::with(|s| s.lease.wait_seconds = 0);
    land(&t, &tenant(), "2024-05-01", &[patient("p1", "1", "One")]).await;
    land(&t, &tenant(), "2024-05-02", &[patient("p1", "2", "Two")]).await;

    // Another import of the tenant (another date) is under way: this one
    // does not judge against the ledger meanwhile; it is busy.
    let other = fhirflow::commit::lease_imports(&t.lake, &t.settings, &tenant(), "import", "other")
        .await
        .expect("the other import's turn");
    let err = import(
        &t.lake,
        &t.settings,
        &local(&tenant(), "2024-05-02".parse().unwrap()),
        &Quiet,
    )
    .await
    .expect_err("busy while the other import runs");
    assert!(
        matches!(err, fhirflow::Error::Busy { .. }) && err.exit_code() == 4,
        "{err}"
    );
    // Another tenant's imports do not wait for it.
    let someone: TenantGuid = "7c9e6679-7425-40de-944b-e07fc1f90ae7".parse().unwrap();
    land(&t, &someone, "2024-05-01", &[patient("p9", "1", "Nine")]).await;
    assert_eq!(
        import_local(&t, &someone, "2024-05-01").await.records_out,
        1
    );
    other.release().await.expect("release");

    // Two at once, each willing to wait: both run, one after the other, and
    // every record is accounted for once.
    let t = std::sync::Arc::new(TestLake::with(|s| s.lease.wait_seconds = 60));
    land(&t, &tenant(), "2024-05-01", &[patient("p1", "1", "One")]).await;
    land(&t, &tenant(), "2024-05-02", &[patient("p1", "2", "Two")]).await;
    let both = futures::future::join_all(["2024-05-01", "2024-05-02"].map(|d| {
        let t = t.clone();
        async move { import_local(&t, &tenant(), d).await }
    }))
    .await;
    let sent: u64 = both.iter().map(|r| r.records_out).sum();
    let stale: u64 = both.iter().map(|r| r.records_stale).sum();
    // In date order both versions go in; the other way round the older one
    // is judged stale against the newer one the ledger holds.
    assert!(
        (sent, stale) == (2, 0) || (sent, stale) == (1, 1),
        "{sent} sent, {stale} stale"
    );
}
