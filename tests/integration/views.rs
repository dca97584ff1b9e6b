//! SQL-on-FHIR ViewDefinitions: the default views on the Synthea sample
//! (counts computed here from the files, and known rows), views joined in
//! `fhirflow sql`, on S3 as on disk; `view check` errors with their file,
//! line and column; `view test` over the shared conformance files.

use std::path::PathBuf;

use fhirflow_tests::*;
use serde_json::Value;

/// The lines of a sample file, parsed.
fn resources(path: PathBuf) -> Vec<Value> {
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn synthea(ty: &str) -> Vec<Value> {
    resources(shared().join(format!("data/synthea-10/{ty}.000.ndjson")))
}

fn observations() -> PathBuf {
    shared().join("data/pathling-r4/Observation.ndjson")
}

/// The sample curated into a lake, with Observations (which the Synthea
/// sample lacks) from the Pathling sample.
async fn sample_lake(t: &TestLake) {
    let obs = t.input("obs");
    std::fs::copy(observations(), obs.join("Observation.ndjson")).unwrap();
    t.ingest(&[shared().join("data/synthea-10"), obs], "synthea")
        .await;
    t.curate().await.expect("curate");
}

async fn count(t: &TestLake, view: &str) -> String {
    one(t.sql(&format!("SELECT count(*) FROM view.{view}")).await)
}

fn one(rows: Vec<Vec<String>>) -> String {
    assert_eq!(rows.len(), 1, "{rows:?}");
    rows[0][0].clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_default_views_on_the_synthea_sample() {
    let t = TestLake::new();
    sample_lake(&t).await;

    // patient_demographics: one row per patient, and a known one in full.
    let patients = synthea("Patient");
    assert_eq!(
        count(&t, "patient_demographics").await,
        patients.len().to_string()
    );
    let row = t
        .sql(
            "SELECT gender, birth_date, deceased, family_name, given_names, race, ethnicity, \
             marital_status, city, state, postal_code FROM view.patient_demographics \
             WHERE id = '129c6ac7-8d06-89de-ad63-0204a93e76c3'",
        )
        .await;
    assert_eq!(
        row,
        vec![vec![
            "female",
            "1927-05-21",
            "true",
            "Medhurst46",
            "Sumiko254 Larue605",
            "White",
            "Not Hispanic or Latino",
            "M",
            "Emporia",
            "KS",
            "66801"
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>()]
    );
    let deceased = patients
        .iter()
        .filter(|p| {
            p.get("deceasedDateTime").is_some() || p["deceasedBoolean"] == Value::Bool(true)
        })
        .count();
    assert_eq!(
        one(t
            .sql("SELECT count(*) FROM view.patient_demographics WHERE deceased")
            .await),
        deceased.to_string()
    );

    // encounters: one row per encounter, each with its patient.
    let encounters = synthea("Encounter");
    assert_eq!(count(&t, "encounters").await, encounters.len().to_string());
    assert_eq!(
        t.sql("SELECT patient_id, class_code, type_code, start FROM view.encounters WHERE id = '00c7f717-4030-5582-2ed8-888ad2bc878e'").await,
        vec![vec![
            "79a66c97-6131-3213-f3c9-4606946ab056".to_string(),
            "AMB".into(),
            "185347001".into(),
            "1989-10-04T02:25:16-04:00".into()
        ]]
    );
    // Joined in SQL: every encounter's patient is in the sample.
    assert_eq!(
        one(t.sql("SELECT count(*) FROM view.encounters e JOIN view.patient_demographics p ON p.id = e.patient_id").await),
        encounters.len().to_string()
    );

    // conditions: one row per coding (one with nulls when a condition has none).
    let conditions = synthea("Condition");
    let codings: usize = conditions
        .iter()
        .map(|c| c["code"]["coding"].as_array().map_or(1, |a| a.len().max(1)))
        .sum();
    assert_eq!(count(&t, "conditions").await, codings.to_string());
    let active = conditions
        .iter()
        .filter(|c| c["clinicalStatus"]["coding"][0]["code"] == "active")
        .map(|c| c["code"]["coding"].as_array().map_or(1, |a| a.len().max(1)))
        .sum::<usize>();
    assert_eq!(
        one(t
            .sql("SELECT count(*) FROM view.conditions WHERE clinical_status = 'active'")
            .await),
        active.to_string()
    );

    // medication_requests and immunizations: one row each, known values.
    assert_eq!(
        count(&t, "medication_requests").await,
        synthea("MedicationRequest").len().to_string()
    );
    assert_eq!(
        t.sql("SELECT medication_code, status, intent, dose_value, as_needed FROM view.medication_requests WHERE id = '002eb5b8-2964-effd-3b09-f132017dae04'").await,
        vec![vec!["314076".to_string(), "stopped".into(), "order".into(), "1.0".into(), "false".into()]]
    );
    assert_eq!(
        count(&t, "immunizations").await,
        synthea("Immunization").len().to_string()
    );
    assert_eq!(
        t.sql("SELECT vaccine_code, vaccine_display, occurrence, primary_source FROM view.immunizations WHERE id = '04912b69-f775-5a9d-3e8b-9d06c28165ad'").await,
        vec![vec!["62".to_string(), "HPV, quadrivalent".into(), "2014-08-19T01:16:46-04:00".into(), "true".into()]]
    );

    // observation_values: the observation's own value plus one row per component.
    let obs = resources(observations());
    let values: usize = obs
        .iter()
        .map(|o| 1 + o["component"].as_array().map_or(0, Vec::len))
        .sum();
    assert_eq!(count(&t, "observation_values").await, values.to_string());
    let components: usize = obs
        .iter()
        .map(|o| o["component"].as_array().map_or(0, Vec::len))
        .sum();
    assert!(components > 0, "the sample has components");
    assert_eq!(
        one(t
            .sql("SELECT count(*) FROM view.observation_values WHERE component_index IS NOT NULL")
            .await),
        components.to_string()
    );
    assert_eq!(
        t.sql("SELECT code, value, unit FROM view.observation_values WHERE id = 'a7b38940-3cd3-43b1-bba9-6adb6090d1d3'").await,
        vec![vec!["8302-2".to_string(), "139.9996742575894".into(), "cm".into()]]
    );
}

#[test]
fn view_run_reads_layers_and_files_and_filters_by_tenant() {
    let t = TestLake::new();
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(sample_lake(&t));
    let run = |args: &[&str]| {
        let out = t.cli(args, &[]);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let csv = run(&["view", "run", "immunizations", "--format", "csv"]);
    assert_eq!(csv.lines().count(), synthea("Immunization").len() + 1);
    let mine = run(&[
        "view",
        "run",
        "immunizations",
        "--tenant",
        TENANT,
        "--date",
        DATE,
        "--format",
        "csv",
    ]);
    assert_eq!(mine, csv);
    let other = run(&[
        "view",
        "run",
        "immunizations",
        "--tenant",
        OTHER_TENANT,
        "--format",
        "csv",
    ]);
    assert_eq!(
        other.lines().count(),
        1,
        "another tenant's view is empty: {other}"
    );
    // Over files, the same rows as over the curated layer.
    let files = run(&[
        "view",
        "run",
        "immunizations",
        "--over",
        shared().join("data/synthea-10").to_str().unwrap(),
        "--format",
        "csv",
    ]);
    let sorted = |s: &str| {
        let mut l: Vec<String> = s.lines().map(String::from).collect();
        l.sort();
        l
    };
    assert_eq!(sorted(&files), sorted(&csv));
    // Written to a file whole.
    let out = t.dir.path().join("imm.json");
    run(&[
        "view",
        "run",
        "immunizations",
        "--format",
        "json",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert_eq!(
        std::fs::read_to_string(&out).unwrap().lines().count(),
        synthea("Immunization").len()
    );
}

#[test]
fn view_check_gives_file_line_and_column() {
    let t = TestLake::new();
    let dir = t.input("views");
    std::fs::write(
        dir.join("good.json"),
        r#"{"resource": "Patient", "select": [{"column": [{"name": "id", "path": "id"}]}]}"#,
    )
    .unwrap();
    // Line 4, column 45: the `.` where a name should follow.
    std::fs::write(
        dir.join("syntax.json"),
        "{\n  \"resource\": \"Patient\",\n  \"select\": [{\"column\": [\n    {\"name\": \"family\", \"path\": \"name.family.\"}\n  ]}]\n}\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("unknown.json"),
        "{\"resource\": \"Patient\",\n \"select\": [{\"column\": [{\"name\": \"x\", \"path\": \"name.famly\"}]}]}\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("where.json"),
        "{\"resource\": \"Patient\", \"where\": [{\"path\": \"name.family\"}],\n \"select\": [{\"column\": [{\"name\": \"id\", \"path\": \"id\"}]}]}\n",
    )
    .unwrap();
    let out = t.cli(&["view", "check", dir.to_str().unwrap()], &[]);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let at = |name: &str| dir.join(name).display().to_string();
    assert!(text.contains(&format!("ok {}", at("good.json"))), "{text}");
    assert!(
        text.contains(&format!(
            "{}:4:45: select[0].column[0].path: FHIRPath: expected a name, found the end",
            at("syntax.json")
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "warning {}:2:53: select[0].column[0].path: HumanName has no element 'famly'",
            at("unknown.json")
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "{}:1:45: where[0].path: a where path must be boolean",
            at("where.json")
        )),
        "{text}"
    );
}

#[test]
fn view_test_runs_the_conformance_files_and_writes_the_report() {
    let t = TestLake::new();
    let report = t.dir.path().join("test_report.json");
    let suite = shared().join("sql-on-fhir/tests");
    let out = t.cli(
        &[
            "view",
            "test",
            suite.to_str().unwrap(),
            "--report",
            report.to_str().unwrap(),
        ],
        &[],
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let files = doc.as_object().unwrap();
    assert_eq!(files.len(), 12);
    let tests: Vec<&Value> = files
        .values()
        .flat_map(|f| f["tests"].as_array().unwrap())
        .collect();
    assert!(tests.len() > 60, "{} tests", tests.len());
    assert!(tests
        .iter()
        .all(|t| t["result"]["passed"] == Value::Bool(true) && t["name"].is_string()));

    // A failing expectation fails the command and says why in the report.
    let dir = t.input("suite");
    std::fs::write(
        dir.join("mine.json"),
        r#"{"title": "t", "resources": [{"resourceType": "Patient", "id": "p1"}],
            "tests": [{"title": "wrong", "view": {"resource": "Patient", "select": [{"column": [{"name": "id", "path": "id"}]}]},
                       "expect": [{"id": "p2"}]}]}"#,
    )
    .unwrap();
    let out = t.cli(
        &[
            "view",
            "test",
            dir.to_str().unwrap(),
            "--report",
            report.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    let doc: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let result = &doc["mine.json"]["tests"][0]["result"];
    assert_eq!(result["passed"], Value::Bool(false));
    assert!(
        result["reason"].as_str().unwrap().contains("p2"),
        "{result}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn views_on_s3_give_what_they_give_on_disk() {
    let s3 = Store::s3("views");
    let local = TestLake::new();
    for t in [&s3.t, &local] {
        sample_lake(t).await;
    }
    for view in ["patient_demographics", "observation_values", "conditions"] {
        let q = format!("SELECT * FROM view.{view} ORDER BY 1, 2, 3");
        let a = s3.t.sql(&q).await;
        assert!(!a.is_empty());
        assert_eq!(a, local.sql(&q).await, "{view}");
    }
    let out = s3.t.cli(
        &["view", "run", "patient_demographics", "--format", "csv"],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count(),
        synthea("Patient").len() + 1
    );
}
