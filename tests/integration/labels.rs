//! Labels: exactly one tenant label, other labels kept, another tenant's
//! label rejected and never relabelled.

use fhirflow_tests::*;

#[tokio::test(flavor = "multi_thread")]
async fn each_resource_gets_exactly_one_tenant_label() {
    // About the label on every shape of meta, some of which validation
    // rejects (`"meta":{}` is an empty object): validation is off.
    let t = TestLake::with(|s| s.curate.validation = fhirflow_fhir::Level::Off);
    let dir = t.input("labels");
    let other =
        r#"{"system":"http://terminology.hl7.org/CodeSystem/v3-Confidentiality","code":"R"}"#;
    let ours = label(TENANT);
    let theirs = label(OTHER_TENANT);
    let lines = [
        r#"{"resourceType":"Patient","id":"no-meta","active":true}"#.to_string(),
        r#"{"resourceType":"Patient","id":"meta-no-security","meta":{"versionId":"1"}}"#
            .to_string(),
        format!(
            r#"{{"resourceType":"Patient","id":"other-label","meta":{{"security":[{other}]}}}}"#
        ),
        format!(
            r#"{{"resourceType":"Patient","id":"already","meta":{{"security":[{other},{ours}]}}}}"#
        ),
        format!(
            r#"{{"resourceType":"Patient","id":"twice","meta":{{"security":[{ours},{ours}]}}}}"#
        ),
        format!(r#"{{"resourceType":"Patient","id":"foreign","meta":{{"security":[{theirs}]}}}}"#),
        r#"{"resourceType":"Patient","id":"empty-meta","meta":{}}"#.to_string(),
    ];
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    write_lines(&dir, "Patient.ndjson", &refs);
    t.ingest(&[dir], "src").await;
    let report = t.curate().await.unwrap();
    assert_eq!((report.total.curated, report.total.rejected), (6, 1));

    let rows = t
        .sql("SELECT id, resource FROM curated.patient ORDER BY id")
        .await;
    for row in &rows {
        let v: serde_json::Value = serde_json::from_str(&row[1]).unwrap();
        let sec = v["meta"]["security"].as_array().unwrap();
        let tenant_labels: Vec<_> = sec.iter().filter(|s| s["system"] == LABEL_SYSTEM).collect();
        assert_eq!(tenant_labels.len(), 1, "{}", row[0]);
        assert_eq!(tenant_labels[0]["code"], TENANT);
        if row[0] == "other-label" || row[0] == "already" {
            assert!(
                sec.iter().any(|s| s["code"] == "R"),
                "other labels stay: {}",
                row[0]
            );
        }
    }
    let ids: Vec<&str> = rows.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(
        ids,
        [
            "already",
            "empty-meta",
            "meta-no-security",
            "no-meta",
            "other-label",
            "twice"
        ]
    );
    // The already-labelled resource is unchanged, byte for byte.
    let already = rows.iter().find(|r| r[0] == "already").unwrap();
    assert_eq!(already[1], lines[3]);

    let errors = t
        .sql("SELECT resource_id, error_code, location, line_no FROM metadata.import_errors")
        .await;
    assert_eq!(
        errors,
        vec![vec![
            "foreign".to_string(),
            "FOREIGN_TENANT_LABEL".into(),
            "Patient.meta.security[0]".into(),
            "6".into()
        ]]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_label_system_is_configurable() {
    let t = TestLake::with(|s| s.tenant_label_system = "urn:example:tenant".into());
    let dir = t.input("sys");
    write_lines(
        &dir,
        "Patient.ndjson",
        &[r#"{"resourceType":"Patient","id":"p"}"#],
    );
    t.ingest(&[dir], "src").await;
    t.curate().await.unwrap();
    let rows = t.sql("SELECT resource FROM curated.patient").await;
    assert_eq!(
        rows[0][0],
        format!(
            r#"{{"resourceType":"Patient","id":"p","meta":{{"security":[{{"system":"urn:example:tenant","code":"{TENANT}"}}]}}}}"#
        )
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_label_udfs_work_in_sql() {
    let t = TestLake::new();
    let rows = t
        .sql(&format!(
            r#"SELECT fhir_tenant_label('{{"resourceType":"Patient","id":"p"}}', '{TENANT}'),
                      fhir_tenant_label_error('{{"id":"p","meta":{{"security":[{}]}}}}', '{TENANT}'),
                      fhir_tenant_label('{{"id":"p"}}', '{TENANT}', 'urn:x'),
                      fhir_tenant_label(NULL, '{TENANT}')"#,
            label(OTHER_TENANT)
        ))
        .await;
    assert_eq!(
        rows,
        vec![vec![
            format!(
                r#"{{"resourceType":"Patient","id":"p","meta":{{"security":[{}]}}}}"#,
                label(TENANT)
            ),
            format!("already labelled for another tenant ({OTHER_TENANT}); not relabelled"),
            format!(
                r#"{{"id":"p","meta":{{"security":[{{"system":"urn:x","code":"{TENANT}"}}]}}}}"#
            ),
            "NULL".to_string(),
        ]]
    );
}
