//! Curation rules (step 3): the default set in a run, rules of one's own,
//! broken rules, and the `rules check / test / diff` commands.

use fhirflow_tests::*;

const OBS_PADDED: &str = r#"{"resourceType":"Observation","id":"o1","status":"final","code":{"text":"x"},"subject":{"reference":"Patient/p1"},"identifier":[{"value":" 42 "}],"valueQuantity":{"value":1.50}}"#;
const OBS_ORPHAN: &str = r#"{"resourceType":"Observation","id":"o2","status":"final","code":{"text":"x"},"subject":{"reference":"Patient/nope"}}"#;
const PATIENT: &str = r#"{"resourceType":"Patient","id":"p1"}"#;
const BASIC: &str = r#"{"resourceType":"Basic","id":"b1","code":{"text":"note"}}"#;

async fn sample_lake(t: &TestLake) {
    let input = t.input("in");
    write_lines(&input, "Observation.ndjson", &[OBS_PADDED, OBS_ORPHAN]);
    write_lines(&input, "Patient.ndjson", &[PATIENT]);
    write_lines(&input, "Basic.ndjson", &[BASIC]);
    t.ingest(&[input], "src").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn default_rules_reject_with_their_name_change_text_and_count_per_rule() {
    let t = TestLake::with(|s| {
        s.curate
            .rule_params
            .insert("missing_patient".into(), "reject".into());
    });
    sample_lake(&t).await;
    let report = t.curate().await.expect("curate");
    assert_eq!(report.total.records_in, 4);
    assert_eq!(report.total.rejected, 2);
    assert!(report.total.conserved());

    let errors = t
        .sql("SELECT resource_id, error_code, rule, line_no FROM metadata.import_errors ORDER BY resource_id")
        .await;
    assert_eq!(
        errors,
        [
            [
                "b1",
                "RULE_REJECTED",
                "010_healthlake_resource_types.sql",
                "1"
            ],
            ["o2", "RULE_REJECTED", "030_missing_patient.sql", "2"],
        ]
    );
    // The trimmed identifier is curated with only that change and the label.
    let curated = t.curated_files();
    let obs = String::from_utf8(curated["Observation-processed.ndjson"].clone()).unwrap();
    let want = OBS_PADDED.replace("\" 42 \"", "\"42\"").replace(
        r#""id":"o1","#,
        &format!(r#""id":"o1","meta":{{"security":[{}]}},"#, label(TENANT)),
    );
    assert_eq!(obs.trim_end(), want);

    let metrics = t
        .sql("SELECT resource_type, rule, records_in, records_out, records_rejected, records_changed, conserved FROM metadata.import_metrics WHERE rule IS NOT NULL AND resource_type = 'Observation' ORDER BY rule")
        .await;
    assert_eq!(
        metrics,
        [
            [
                "Observation",
                "010_healthlake_resource_types.sql",
                "2",
                "2",
                "0",
                "0",
                "true"
            ],
            [
                "Observation",
                "020_trim_codes_and_identifiers.sql",
                "2",
                "2",
                "0",
                "1",
                "true"
            ],
            [
                "Observation",
                "030_missing_patient.sql",
                "2",
                "1",
                "1",
                "0",
                "true"
            ],
        ]
    );
}

/// A rules folder with the given files.
fn rules_folder(t: &TestLake, files: &[(&str, &str)]) -> String {
    let dir = t.dir.path().join("my-rules");
    for (name, sql) in files {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, sql).unwrap();
    }
    dir.display().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn own_rules_drop_change_and_scope_by_type_and_source_system() {
    let t = TestLake::new();
    let dir = rules_folder(
        &t,
        &[
            // Dropping a row is a rejection too, never silent.
            ("010_drop.sql", "-- drops o2\nSELECT * FROM records WHERE id <> 'o2'"),
            (
                "Patient/020_gender.sql",
                "-- sets gender\nSELECT * REPLACE (fhir_set(resource, 'gender', '\"unknown\"') AS resource) FROM records",
            ),
        ],
    );
    let mut settings = t.settings.clone();
    settings
        .curate
        .rules_for
        .push(fhirflow::settings::RulesFor {
            tenant: None,
            source_system: Some("src".into()),
            rules: dir,
        });
    sample_lake(&t).await;
    let report = fhirflow::curate::curate(
        &t.lake,
        &settings,
        &tenant(),
        date(),
        &fhirflow::report::Quiet,
    )
    .await
    .expect("curate");
    assert_eq!(
        report.total.rejected, 1,
        "only o2: Basic is kept by these rules"
    );
    let errors = t
        .sql("SELECT resource_id, error_code, rule FROM metadata.import_errors")
        .await;
    assert_eq!(errors, [["o2", "RULE_DROPPED", "010_drop.sql"]]);
    let patient = String::from_utf8(t.curated_files()["Patient-processed.ndjson"].clone()).unwrap();
    assert!(patient.contains(r#""gender":"unknown""#), "{patient}");
    let obs = String::from_utf8(t.curated_files()["Observation-processed.ndjson"].clone()).unwrap();
    assert!(
        !obs.contains("gender"),
        "a Patient/ rule must not touch Observations"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rule_that_changes_an_id_or_breaks_the_contract_is_caught() {
    let t = TestLake::new();
    let dir = rules_folder(
        &t,
        &[(
            "Patient/010_rename.sql",
            "-- changes the id\nSELECT * REPLACE (fhir_set(resource, 'id', '\"other\"') AS resource) FROM records",
        )],
    );
    sample_lake(&t).await;
    let out = t.cli(
        &[
            "curate", "--tenant", TENANT, "--date", DATE, "--rules", &dir,
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let errors = t
        .sql("SELECT resource_id, error_code FROM metadata.import_errors")
        .await;
    assert_eq!(errors, [["p1", "RULE_CHANGED_ID"]]);

    // A rule that returns a row twice stops the run, naming the rule.
    let dir = rules_folder(
        &t,
        &[(
            "Patient/010_rename.sql",
            "-- doubles rows\nSELECT * FROM records UNION ALL SELECT * FROM records",
        )],
    );
    let out = t.cli(
        &[
            "curate", "--tenant", TENANT, "--date", DATE, "--rules", &dir,
        ],
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("010_rename.sql") && err.contains("twice"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broken_rule_is_an_error_naming_the_file_and_position() {
    let t = TestLake::new();
    let dir = rules_folder(
        &t,
        &[
            ("010_ok.sql", "-- fine\nSELECT * FROM records"),
            (
                "020_bad.sql",
                "-- typo\nSELECT *,\n       no_such_column AS reject_reason\nFROM records",
            ),
        ],
    );
    sample_lake(&t).await;
    let out = t.cli(
        &[
            "curate", "--tenant", TENANT, "--date", DATE, "--rules", &dir,
        ],
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("020_bad.sql") && err.contains("no_such_column"),
        "{err}"
    );
    assert!(err.contains("line 3"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // Nothing was curated.
    assert!(t.curated_files().is_empty());

    let out = t.cli(&["rules", "check", &dir], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text.contains("020_bad.sql") && !text.contains("010_ok.sql"),
        "{text}"
    );

    // A file that is not SQL, a rule without a header, a folder that is not a type.
    let dir = rules_folder(&t, &[("030_no_header.sql", "SELECT * FROM records")]);
    std::fs::remove_file(std::path::Path::new(&dir).join("020_bad.sql")).unwrap();
    let out = t.cli(&["rules", "check", &dir], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("030_no_header.sql: no comment at the top"),
        "{text}"
    );
    std::fs::create_dir(std::path::Path::new(&dir).join("Patients")).unwrap();
    let out = t.cli(&["rules", "check", &dir], &[]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("Patients"));
}

#[test]
fn rules_test_passes_on_the_default_set_and_fails_a_wrong_expectation() {
    let t = TestLake::new();
    let out = t.cli(&["rules", "test"], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("3 passed, 0 failed, 0 without a test"),
        "{text}"
    );

    let dir = rules_folder(
        &t,
        &[
            ("010_a.sql", "-- rejects Basic\nSELECT *, CASE WHEN resource_type = 'Basic' THEN 'no' END AS reject_reason FROM records"),
            (
                "010_a.slt",
                "statement ok\nINSERT INTO input VALUES ('{\"resourceType\":\"Basic\",\"id\":\"b\",\"code\":{\"text\":\"x\"}}')\n\nquery TT\nSELECT outcome, reason FROM outcome\n----\nkept NULL\n",
            ),
            ("020_untested.sql", "-- keeps\nSELECT * FROM records"),
        ],
    );
    let out = t.cli(&["rules", "test", &dir], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("FAILED   010_a.sql") && text.contains("rejected no"),
        "{text}"
    );
    assert!(text.contains("NO TEST  020_untested.sql"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn rules_diff_reports_per_rule_with_samples_and_writes_nothing() {
    let t = TestLake::new();
    sample_lake(&t).await;
    let before = files_under(&t.root());
    let out = t.cli(
        &[
            "rules",
            "diff",
            "--tenant",
            TENANT,
            "--date",
            DATE,
            "--rule-param",
            "missing_patient=reject",
        ],
        &[],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("Observation.identifier[0].value: \" 42 \" → \"42\""),
        "{text}"
    );
    assert!(text.contains("references Patient/nope"), "{text}");
    let row = text
        .lines()
        .find(|l| l.starts_with("030_missing_patient.sql") && l.contains("Observation"))
        .unwrap();
    assert_eq!(
        row.split_whitespace().skip(2).collect::<Vec<_>>(),
        ["2", "1", "1", "0"]
    );
    assert_eq!(
        files_under(&t.root()),
        before,
        "the dry run wrote something"
    );
}

fn files_under(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path().display().to_string());
            }
        }
    }
    out.sort();
    out
}
