//! Labels: exactly one tenant label, in its canonical spelling, other labels
//! kept; another tenant's label, at the top or in a nested resource, rejected
//! and never relabelled.

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
            format!("already labelled for another tenant ({OTHER_TENANT}) at meta.security[0]; not relabelled"),
            format!(
                r#"{{"id":"p","meta":{{"security":[{{"system":"urn:x","code":"{TENANT}"}}]}}}}"#
            ),
            "NULL".to_string(),
        ]]
    );
}

/// The tenant labels (codes) in a resource's top-level `meta.security`.
fn tenant_codes(resource: &str) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(resource).unwrap();
    v["meta"]["security"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["system"] == LABEL_SYSTEM)
        .map(|s| s["code"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_nested_resource_with_another_tenants_label_is_rejected_where_it_is() {
    let t = TestLake::new();
    let dir = t.input("nested");
    let conf =
        r#"{"system":"http://terminology.hl7.org/CodeSystem/v3-Confidentiality","code":"R"}"#;
    let theirs = label(OTHER_TENANT);
    let upper = label(&TENANT.to_uppercase());
    let braced = label(&format!("{{{TENANT}}}"));
    let ours = label(TENANT);
    let org = |id: &str, security: &str| {
        format!(
            r#"{{"resourceType":"Organization","id":"{id}","meta":{{"security":[{security}]}},"name":"Acme"}}"#
        )
    };
    let patient = |id: &str, security: &str| {
        format!(
            r#"{{"resourceType":"Patient","id":"{id}","meta":{{"security":[{security}]}},"gender":"female"}}"#
        )
    };
    let patients = [
        // Another tenant's label in a contained resource, after another label.
        format!(
            r##"{{"resourceType":"Patient","id":"contained-foreign","contained":[{}],"managingOrganization":{{"reference":"#o"}}}}"##,
            org("o", &format!("{conf},{theirs}"))
        ),
        // This tenant's, in other spellings, in contained resources: kept.
        format!(
            r##"{{"resourceType":"Patient","id":"contained-ours","contained":[{},{}],"managingOrganization":{{"reference":"#o"}},"extension":[{{"url":"http://example.org/x","valueDecimal":1E-22}}]}}"##,
            org("o", &upper),
            org("p", &format!("{conf},{braced}"))
        ),
    ];
    let bundles = [
        format!(
            r#"{{"resourceType":"Bundle","id":"entry-foreign","type":"collection","entry":[{{"resource":{}}},{{"resource":{}}},{{"resource":{}}},{{"resource":{}}}]}}"#,
            patient("a", &ours),
            patient("b", conf),
            org("c", &upper),
            patient("d", &theirs)
        ),
        format!(
            r#"{{"resourceType":"Bundle","id":"entry-ours","type":"collection","entry":[{{"resource":{}}},{{"resource":{}}}]}}"#,
            patient("a", &braced),
            patient("b", &format!("{ours},{conf}"))
        ),
    ];
    let parameters = [format!(
        r#"{{"resourceType":"Parameters","id":"param-foreign","parameter":[{{"name":"p","resource":{}}}]}}"#,
        patient("x", &theirs)
    )];
    let write = |name, lines: &[String]| {
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        write_lines(&dir, name, &refs);
    };
    write("Patient.ndjson", &patients);
    write("Bundle.ndjson", &bundles);
    write("Parameters.ndjson", &parameters);
    t.ingest(std::slice::from_ref(&dir), "src").await;
    let report = t.curate().await.unwrap();
    assert_eq!((report.total.curated, report.total.rejected), (2, 3));

    let errors = t
        .sql(
            "SELECT resource_id, error_code, location, message FROM metadata.import_errors \
             ORDER BY resource_id",
        )
        .await;
    let want = [
        ("contained-foreign", "Patient.contained[0].meta.security[1]"),
        ("entry-foreign", "Bundle.entry[3].resource.meta.security[0]"),
        (
            "param-foreign",
            "Parameters.parameter[0].resource.meta.security[0]",
        ),
    ];
    assert_eq!(errors.len(), want.len(), "{errors:?}");
    for (row, (id, location)) in errors.iter().zip(want) {
        assert_eq!(row[0], id);
        assert_eq!(row[1], "FOREIGN_TENANT_LABEL");
        assert_eq!(row[2], location);
        // The message names the label's place below the resource type, and
        // the other tenant.
        let below = location.split_once('.').unwrap().1;
        assert_eq!(
            row[3],
            format!(
                "already labelled for another tenant ({OTHER_TENANT}) at {below}; not relabelled"
            )
        );
    }

    // The resources whose nested labels are this tenant's are curated with
    // the top-level label only: the nested text is as it was, byte for byte.
    for (table, raw) in [("patient", &patients[1]), ("bundle", &bundles[1])] {
        let rows = t
            .sql(&format!("SELECT resource FROM curated.{table}"))
            .await;
        assert_eq!(rows.len(), 1, "{table}");
        let cur = &rows[0][0];
        assert_label_only_edit(raw.as_bytes(), cur.as_bytes());
        assert_eq!(tenant_codes(cur), [TENANT]);
        assert!(cur.contains(&upper) || cur.contains(&braced));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn another_spelling_of_the_tenants_label_becomes_the_canonical_code() {
    let t = TestLake::new();
    let dir = t.input("spelling");
    let conf =
        r#"{"system":"http://terminology.hl7.org/CodeSystem/v3-Confidentiality","code":"R"}"#;
    let upper = TENANT.to_uppercase();
    let braced = format!("{{{TENANT}}}");
    let braced_upper = format!("{{{upper}}}");
    let line = |id: &str, security: &str| {
        format!(
            r#"{{"resourceType":"Patient","id":"{id}","meta":{{"versionId":"1","security":[{security}]}},"extension":[{{"url":"http://example.org/x","valueDecimal":6.0}}],"name":[{{"family":"Ström \u00e9"}}]}}"#
        )
    };
    // (id, raw line, the curated line expected)
    let mut cases = Vec::new();
    for (id, code) in [
        ("upper", upper.as_str()),
        ("braced", braced.as_str()),
        ("braced-upper", braced_upper.as_str()),
    ] {
        let raw = line(id, &format!("{conf}, {}", label(code)));
        // Only the code string changes.
        let want = raw.replace(&format!("\"{code}\""), &format!("\"{TENANT}\""));
        cases.push((id, raw, want));
    }
    // A variant beside the canonical label: the variant goes, with its comma.
    let raw = line(
        "variant-and-canonical",
        &format!("{},{conf},{}", label(&upper), label(TENANT)),
    );
    let want = raw.replace(&format!("{},", label(&upper)), "");
    cases.push(("variant-and-canonical", raw, want));
    // Two variants: the first is recoded, the second removed.
    let raw = line(
        "two-variants",
        &format!("{},{}", label(&braced), label(&upper)),
    );
    let want = raw.replace(
        &format!("{},{}", label(&braced), label(&upper)),
        &label(TENANT),
    );
    cases.push(("two-variants", raw, want));
    cases.sort();
    let lines: Vec<&str> = cases.iter().map(|(_, raw, _)| raw.as_str()).collect();
    write_lines(&dir, "Patient.ndjson", &lines);
    t.ingest(&[dir], "src").await;
    let report = t.curate().await.unwrap();
    assert_eq!((report.total.curated, report.total.rejected), (5, 0));

    let rows = t
        .sql("SELECT id, resource FROM curated.patient ORDER BY id")
        .await;
    assert_eq!(rows.len(), cases.len());
    for (row, (id, _, want)) in rows.iter().zip(&cases) {
        assert_eq!(row[0], *id);
        assert_eq!(row[1], *want, "{id}");
        assert_eq!(tenant_codes(&row[1]), [TENANT], "{id}");
    }
    assert!(t
        .sql("SELECT * FROM metadata.import_errors")
        .await
        .is_empty());
}
