//! Issue 3 in the pipeline: curate step 2 rejects what is not valid FHIR R4
//! with every finding in `import_errors`, the level setting changes what is
//! checked, and `fhirflow validate` reports files with exit codes 0/1/2.

use fhirflow_tests::*;

const GOOD: &str =
    r#"{"resourceType":"Patient","id":"good","gender":"female","birthDate":"1974-12-25"}"#;
/// Two errors: a code outside the required value set, and a bad date.
const BAD_BINDING_AND_DATE: &str =
    r#"{"resourceType":"Patient","id":"bad","gender":"F","birthDate":"1974-13-01"}"#;
/// One error, in a binding only: valid at structure-only.
const BAD_BINDING: &str = r#"{"resourceType":"Patient","id":"binding","gender":"F"}"#;

/// A lake at `level` with the three Patients above ingested and curated.
async fn curate_three(level: fhirflow_fhir::Level) -> (TestLake, fhirflow::curate::CurateReport) {
    let t = TestLake::with(|s| s.curate.validation = level);
    let dir = t.input("v");
    write_lines(
        &dir,
        "Patient.ndjson",
        &[GOOD, BAD_BINDING_AND_DATE, BAD_BINDING],
    );
    t.ingest(&[dir], "src").await;
    let report = t.curate().await.unwrap();
    (t, report)
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_resources_are_rejected_with_every_finding() {
    let (t, report) = curate_three(fhirflow_fhir::Level::Strict).await;
    assert_eq!((report.total.curated, report.total.rejected), (1, 2));
    let errors = t
        .sql("SELECT line_no, resource_id, error_code, location FROM metadata.import_errors ORDER BY line_no, location")
        .await;
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    assert_eq!(
        errors,
        vec![
            s(&["2", "bad", "INVALID_FORMAT", "Patient.birthDate"]),
            s(&["2", "bad", "CODE_NOT_IN_VALUE_SET", "Patient.gender"]),
            s(&["3", "binding", "CODE_NOT_IN_VALUE_SET", "Patient.gender"]),
        ]
    );
    let metrics = t
        .sql("SELECT sum(records_rejected) FROM metadata.import_metrics WHERE stage = 'curate' AND rule IS NULL")
        .await;
    assert_eq!(metrics, vec![vec!["2".to_string()]]);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_level_chooses_what_is_checked() {
    for (level, curated) in [
        (fhirflow_fhir::Level::StructureOnly, 2),
        (fhirflow_fhir::Level::Off, 3),
    ] {
        let (_t, report) = curate_three(level).await;
        assert_eq!(report.total.curated, curated, "{level}");
    }
}

#[test]
fn the_synthea_sample_is_valid_and_curates_whole_with_the_cli() {
    let t = TestLake::new();
    let sample = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/synthea-10");
    let out = t.cli(&["validate", sample.to_str().unwrap()], &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("7160 of 7160 resources in 13 files are valid FHIR R4"),
        "{stdout}"
    );
}

#[test]
fn validate_reports_lines_types_and_exit_codes() {
    let t = TestLake::new();
    let dir = t.input("files");
    write_lines(
        &dir,
        "Patient.ndjson",
        &[GOOD, "", BAD_BINDING_AND_DATE, "{not json"],
    );
    std::fs::write(
        dir.join("bundle.json"),
        r#"{
  "resourceType": "Bundle", "id": "b", "type": "collection",
  "entry": [ { "resource": { "resourceType": "Patient", "id": "in-bundle", "gender": "x" } } ]
}"#,
    )
    .unwrap();
    let d = dir.to_str().unwrap();

    let out = t.cli(&["validate", d], &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("Patient.ndjson:3: error CODE_NOT_IN_VALUE_SET at Patient.gender"),
        "{stdout}"
    );
    assert!(
        stdout.contains("Patient.ndjson:4: error INVALID_JSON"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "bundle.json:1: error CODE_NOT_IN_VALUE_SET at Bundle.entry[0].resource.gender"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("1 of 4 resources in 2 files are valid FHIR R4"),
        "{stdout}"
    );

    let out = t.cli(&["validate", "--format", "json", d], &[]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    assert_eq!(v["summary"]["total"]["invalid"], 3);
    assert_eq!(v["summary"]["by_type"]["Patient"]["resources"], 2);
    let first = &v["findings"][0];
    assert_eq!(
        first["file"].as_str().unwrap(),
        dir.join("Patient.ndjson").to_str().unwrap()
    );
    assert_eq!(
        (first["line"].as_u64(), first["id"].as_str()),
        (Some(3), Some("bad"))
    );

    // structure-only: the bundle's binding is not checked; the bad date is.
    let out = t.cli(&["validate", "--validation", "structure-only", d], &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("2 of 4 resources"), "{stdout}");

    // Usage and I/O errors: 2.
    let out = t.cli(&["validate", "/no/such/file.ndjson"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/no/such/file.ndjson"));
}
