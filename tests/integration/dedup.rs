//! Dedup: one survivor per (resourceType, id), chosen by version, then
//! lastUpdated, then import date, file and line; exact duplicates counted.

use fhirflow_tests::*;

fn obs(id: &str, version: Option<&str>, updated: Option<&str>, extra: &str) -> String {
    let mut meta = Vec::new();
    if let Some(v) = version {
        meta.push(format!(r#""versionId":"{v}""#));
    }
    if let Some(u) = updated {
        meta.push(format!(r#""lastUpdated":"{u}""#));
    }
    let meta = if meta.is_empty() {
        String::new()
    } else {
        format!(r#","meta":{{{}}}"#, meta.join(","))
    };
    format!(
        r#"{{"resourceType":"Observation","id":"{id}"{meta},"status":"final","code":{{"text":"{extra}"}}}}"#
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn the_survivor_is_chosen_as_designed() {
    let t = TestLake::new();
    let a = t.input("a");
    let b = t.input("b");
    let lines_a = [
        // Version 10 beats 9 and 2: versions compare as numbers.
        obs("v", Some("2"), Some("2024-01-03T00:00:00Z"), "v2"),
        obs("v", Some("10"), Some("2024-01-01T00:00:00Z"), "v10"),
        obs("v", Some("9"), Some("2024-01-05T00:00:00Z"), "v9"),
        // Same version: the later lastUpdated wins.
        obs("u", Some("1"), Some("2024-01-01T00:00:00+00:00"), "early"),
        obs("u", Some("1"), Some("2024-01-01T01:00:00+00:00"), "late"),
        // Exact duplicates: the same text three times.
        obs("x", None, None, "same"),
        obs("x", None, None, "same"),
        // A lone resource.
        obs("lone", None, None, "lone"),
    ];
    // In file b (a later source file), a tie on every key: the later file wins.
    let lines_b = [
        obs("t", None, None, "later-file"),
        obs("x", None, None, "same"),
    ];
    let lines_a0 = [obs("t", None, None, "zero-file")];
    write_lines(
        &a,
        "Observation.001.ndjson",
        &lines_a.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    write_lines(
        &a,
        "Observation.000.ndjson",
        &lines_a0.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    write_lines(
        &b,
        "Observation.002.ndjson",
        &lines_b.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    t.ingest(&[a], "sys-a").await;
    t.ingest(&[b], "sys-b").await;
    let report = t.curate().await.unwrap();
    assert_eq!(report.total.records_in, 11);
    assert_eq!(report.total.curated, 5);
    assert_eq!(report.total.duplicates, 6);
    // x twice more, and nothing else identical to its survivor.
    assert_eq!(report.total.exact_duplicates, 2);

    let rows = t
        .sql("SELECT id, json_get_str(resource, 'code', 'text') FROM curated.observation ORDER BY id")
        .await;
    let got: Vec<(String, String)> = rows
        .into_iter()
        .map(|r| (r[0].clone(), r[1].clone()))
        .collect();
    let want = [
        ("lone", "lone"),
        ("t", "later-file"),
        ("u", "late"),
        ("v", "v10"),
        ("x", "same"),
    ];
    assert_eq!(
        got,
        want.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect::<Vec<_>>()
    );

    let m = t
        .sql("SELECT records_duplicate, records_exact_duplicate, conserved FROM metadata.import_metrics WHERE rule IS NULL")
        .await;
    assert_eq!(m, vec![vec!["6".to_string(), "2".into(), "true".into()]]);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dedup_query_is_a_readable_sql_file() {
    let sql = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../engine/src/curate/dedup.sql"
    ))
    .unwrap();
    assert_eq!(sql, fhirflow::curate::dedup::DEDUP_SQL);
    assert!(sql.contains("ORDER BY k.tenant_guid, k.resource_type, k.id"));
}

/// A step-2 check for the test: rejects `entered-in-error` records with two
/// findings.
struct NoEnteredInError;

impl fhirflow::curate::check::LineCheck for NoEnteredInError {
    fn check(
        &self,
        line: &fhirflow::curate::check::CheckedLine<'_>,
    ) -> Vec<fhirflow::curate::parse::Reject> {
        use fhirflow::curate::parse::Reject;
        if !line.text.contains(r#""status":"entered-in-error""#) {
            return Vec::new();
        }
        let ty = line.resource_type;
        vec![
            Reject::new("TEST_STATUS", "entered in error").at(format!("{ty}.status")),
            Reject::new("TEST_SECOND", "a second finding").at(format!("{ty}.id")),
        ]
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_record_failing_step_2_takes_no_part_in_dedup() {
    let t = TestLake::new();
    let dir = t.input("v");
    write_lines(
        &dir,
        "Observation.ndjson",
        &[
            r#"{"resourceType":"Observation","id":"o","meta":{"versionId":"1"},"status":"final"}"#,
            r#"{"resourceType":"Observation","id":"o","meta":{"versionId":"2"},"status":"entered-in-error"}"#,
        ],
    );
    t.ingest(&[dir], "src").await;
    let checks: Vec<std::sync::Arc<dyn fhirflow::curate::check::LineCheck>> =
        vec![std::sync::Arc::new(NoEnteredInError)];
    let report = fhirflow::curate::curate_with_checks(
        &t.lake,
        &t.settings,
        &tenant(),
        date(),
        &fhirflow::report::Quiet,
        checks,
    )
    .await
    .unwrap();
    assert_eq!(
        (
            report.total.curated,
            report.total.rejected,
            report.total.duplicates
        ),
        (1, 1, 0)
    );
    let kept = t.sql("SELECT version_id FROM curated.observation").await;
    assert_eq!(
        kept,
        vec![vec!["1".to_string()]],
        "the older valid version survives"
    );
    let errors = t
        .sql("SELECT line_no, error_code, location, resource_id FROM metadata.import_errors ORDER BY error_code")
        .await;
    assert_eq!(
        errors,
        vec![
            vec![
                "2".to_string(),
                "TEST_SECOND".into(),
                "Observation.id".into(),
                "o".into()
            ],
            vec![
                "2".to_string(),
                "TEST_STATUS".into(),
                "Observation.status".into(),
                "o".into()
            ],
        ]
    );
}

/// Two source systems' records under one id with other content are an id
/// collision: by default the loser is a duplicate with an ID_COLLISION
/// warning naming both sources; with `id_collision = "reject"` it is
/// rejected. The same content from two sources is no collision.
#[tokio::test(flavor = "multi_thread")]
async fn id_collisions_across_sources_are_reported_or_rejected() {
    for reject in [false, true] {
        let t = TestLake::with(|s| {
            if reject {
                s.curate.id_collision = fhirflow::settings::IdCollision::Reject;
            }
        });
        let (a, b) = (t.input("a"), t.input("b"));
        write_lines(
            &a,
            "Observation.ndjson",
            &[
                &obs("p1", Some("2"), None, "from a"),
                &obs("same", None, None, "same"),
            ],
        );
        write_lines(
            &b,
            "Observation.ndjson",
            &[
                &obs("p1", Some("1"), None, "from b"),
                &obs("same", None, None, "same"),
            ],
        );
        t.ingest(&[a], "ehr-a").await;
        t.ingest(&[b], "ehr-b").await;
        let report = t.curate().await.expect("curate");
        let total = &report.total;
        assert_eq!(total.curated, 2);
        assert_eq!(total.id_collisions, 1);
        assert_eq!(
            (total.duplicates, total.rejected),
            if reject { (1, 1) } else { (2, 0) }
        );
        let rows = t
            .sql("SELECT error_code, severity, resource_id, line_no, message FROM metadata.import_errors")
            .await;
        assert_eq!(rows.len(), 1, "{rows:?}");
        let severity = if reject { "error" } else { "warning" };
        assert_eq!(rows[0][..4], ["ID_COLLISION", severity, "p1", "1"]);
        let message = &rows[0][4];
        assert!(
            message.contains("source system ehr-b") && message.contains("source system ehr-a"),
            "{message}"
        );
        assert_eq!(
            t.sql("SELECT records_id_collision, conserved FROM metadata.import_metrics WHERE rule IS NULL").await,
            vec![vec!["1".to_string(), "true".into()]]
        );
    }
}
