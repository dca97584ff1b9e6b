//! `fhirflow sql`: filters on partition columns skip files that cannot match.

use fhirflow::layout::{ImportDate, SourceSystem, TenantGuid};
use fhirflow_tests::*;

#[tokio::test(flavor = "multi_thread")]
async fn partition_filters_skip_files_that_cannot_match() {
    let t = TestLake::new();
    let dir = t.input("p");
    write_lines(
        &dir,
        "Patient.ndjson",
        &[
            r#"{"resourceType":"Patient","id":"p1"}"#,
            r#"{"resourceType":"Patient","id":"p2"}"#,
        ],
    );
    let other_date: ImportDate = "2024-05-02".parse().unwrap();
    let other_tenant: TenantGuid = OTHER_TENANT.parse().unwrap();
    let (a, b): (SourceSystem, SourceSystem) = ("a".parse().unwrap(), "b".parse().unwrap());
    for (tenant, system, d) in [
        (tenant(), &a, date()),
        (tenant(), &b, date()),
        (tenant(), &a, other_date),
        (other_tenant, &a, date()),
    ] {
        fhirflow::ingest::ingest(&t.lake, std::slice::from_ref(&dir), &tenant, system, d)
            .await
            .unwrap();
    }
    let ctx = fhirflow::sql::session(&t.lake, &t.settings).await.unwrap();
    // Replace every raw file but those of (TENANT, a, DATE) by a corrupt
    // gzip file: a query that opened another one would now fail.
    let raw = t.root().join("raw");
    for (tn, s, d) in [
        (TENANT, "b", DATE),
        (TENANT, "a", "2024-05-02"),
        (OTHER_TENANT, "a", DATE),
    ] {
        let f = raw.join(format!(
            "tenantGuid={tn}/source_system={s}/import_date={d}/Patient.ndjson"
        ));
        std::fs::remove_file(&f).unwrap();
        std::fs::write(f.with_extension("ndjson.gz"), b"not gzip at all").unwrap();
    }
    let query = |q: String| {
        let ctx = ctx.clone();
        async move { ctx.sql(&q).await.unwrap().collect().await.map(|b| rows(&b)) }
    };
    let filtered = query(format!(
        "SELECT count(*) FROM raw.patient WHERE tenant_guid = '{TENANT}' AND import_date = '{DATE}' AND source_system IN ('a')"
    ))
    .await
    .expect("only the matching file is read");
    assert_eq!(filtered, vec![vec!["2".to_string()]]);
    let unfiltered = query("SELECT count(*) FROM raw.patient".into()).await;
    assert!(unfiltered.is_err(), "without filters every file is read");
    // The tables find their files when a query runs, not when the session
    // starts: a file landed since is seen.
    fhirflow::ingest::ingest(
        &t.lake,
        std::slice::from_ref(&dir),
        &tenant(),
        &"c".parse().unwrap(),
        date(),
    )
    .await
    .unwrap();
    let later = query(format!(
        "SELECT count(*) FROM raw.patient WHERE tenant_guid = '{TENANT}' AND source_system = 'c'"
    ))
    .await
    .expect("the new partition is read");
    assert_eq!(later, vec![vec!["2".to_string()]]);
}

#[tokio::test(flavor = "multi_thread")]
async fn json_access_functions_and_operators_work_on_resources() {
    let t = TestLake::new();
    let dir = t.input("j");
    write_lines(
        &dir,
        "Patient.ndjson",
        &[
            r#"{"resourceType":"Patient","id":"p","gender":"female","name":[{"family":"Doe","given":["A","B"]}],"birthDate":"1970-01-01"}"#,
        ],
    );
    t.ingest(&[dir], "src").await;
    t.curate().await.unwrap();
    let rows = t
        .sql(
            "SELECT json_get_str(resource, 'gender'), resource->'name'->0->>'family', \
             json_length(resource, 'name', 0, 'given'), json_get_str(resource, 'meta', 'security', 0, 'code') \
             FROM curated.patient",
        )
        .await;
    assert_eq!(
        rows,
        vec![vec![
            "female".to_string(),
            "Doe".into(),
            "2".into(),
            TENANT.into()
        ]]
    );
}
