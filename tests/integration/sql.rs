//! `fhirflow sql`: filters on partition columns skip files that cannot match;
//! the session is read-only; a committed object that is missing or damaged
//! fails the query naming it, never a smaller answer.

use std::path::{Path, PathBuf};

use fhirflow::layout::{ImportDate, SourceSystem, TenantGuid};
use fhirflow::report::Quiet;
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

/// Every file below `dir`, with its size.
fn tree(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                todo.push(e.path());
            } else {
                out.push((e.path(), meta.len()));
            }
        }
    }
    out.sort();
    out
}

/// Lands `lines` as the tenant's Patient file and curates the partition.
async fn curated_patients(t: &TestLake, lines: &[&str]) {
    let dir = t.input("patients");
    write_lines(&dir, "Patient.ndjson", lines);
    t.ingest(&[dir], "ehr").await;
    t.curate().await.expect("curate");
}

/// The latest curate commit of the partition.
async fn record(t: &TestLake) -> fhirflow::commit::CommitRecord {
    fhirflow::commit::latest_curate(&t.lake, &tenant(), date())
        .await
        .unwrap()
        .expect("a curate commit")
}

/// The committed Patient part on disk (what `curated.patient` reads).
async fn patient_part(t: &TestLake) -> PathBuf {
    let r = record(t).await;
    let part = r
        .curated
        .iter()
        .find(|o| o.name.as_deref() == Some("Patient-processed.ndjson"))
        .expect("a Patient part");
    PathBuf::from(format!("/{}", part.path))
}

/// Runs `query` in a fresh session: its rows or its error's text.
async fn try_sql(t: &TestLake, query: &str) -> Result<Vec<Vec<String>>, String> {
    let ctx = fhirflow::sql::session(&t.lake, &t.settings)
        .await
        .map_err(|e| e.to_string())?;
    fhirflow::sql::query(&ctx, query)
        .await
        .map(|b| rows(&b))
        .map_err(|e| e.to_string())
}

const PATIENTS: [&str; 3] = [
    r#"{"resourceType":"Patient","id":"p1","name":[{"family":"One"}]}"#,
    r#"{"resourceType":"Patient","id":"p2","name":[{"family":"Two"}]}"#,
    r#"{"resourceType":"Patient","id":"p3","name":[{"family":"Three"}]}"#,
];

#[tokio::test(flavor = "multi_thread")]
async fn statements_that_write_are_refused_and_write_nothing() {
    let t = TestLake::new();
    curated_patients(&t, &PATIENTS).await;
    fhirflow::import::import(
        &t.lake,
        &t.settings,
        &fhirflow::import::ImportRequest {
            tenant: tenant(),
            date: date(),
            target: fhirflow::settings::ImportTarget::Local,
            wait: true,
        },
        &Quiet,
    )
    .await
    .expect("import");
    let out = t.dir.path().join("out");
    let o = out.display();
    let before = tree(t.dir.path());
    for statement in [
        format!("COPY (SELECT 1 AS x) TO '{o}/copy.csv' STORED AS CSV"),
        format!("COPY curated.patient TO '{o}/patients.parquet'"),
        format!("EXPLAIN ANALYZE COPY (SELECT 1 AS x) TO '{o}/explained.csv' STORED AS CSV"),
        "INSERT INTO curated.patient SELECT * FROM curated.patient".into(),
        "INSERT INTO lake_snapshots SELECT * FROM lake_snapshots".into(),
        format!("CREATE EXTERNAL TABLE ext (x INT) STORED AS CSV LOCATION '{o}/ext/'"),
        "CREATE TABLE copy AS SELECT * FROM curated.patient".into(),
        "CREATE VIEW v AS SELECT 1".into(),
        "DROP TABLE curated.patient".into(),
        "DROP VIEW lake.patient".into(),
        "UPDATE curated.patient SET id = 'x'".into(),
        "DELETE FROM curated.patient".into(),
        "SET datafusion.execution.target_partitions = 1".into(),
    ] {
        let run = t.cli(&["sql", &statement], &[]);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(2), "{statement}: {stderr}");
        assert!(stderr.contains("read-only"), "{statement}: {stderr}");
        assert!(run.stdout.is_empty(), "{statement}");
    }
    assert!(!out.exists(), "a refused statement wrote {}", out.display());
    assert_eq!(
        tree(t.dir.path()),
        before,
        "a refused statement changed the lake"
    );
    // Queries, DESCRIBE, EXPLAIN and the views the engine registers still run.
    for query in [
        "SELECT count(*) FROM curated.patient",
        "SELECT count(*) FROM lake.patient",
        "WITH p AS (SELECT id FROM lake_history.patient) SELECT count(*) FROM p",
        "DESCRIBE curated.patient",
        "EXPLAIN SELECT count(*) FROM lake.patient",
    ] {
        let run = t.cli(&["sql", "--format", "csv", query], &[]);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(run.status.success(), "{query}: {stderr}");
    }
    let counts = t
        .sql("SELECT (SELECT count(*) FROM curated.patient) AS c, (SELECT count(*) FROM lake.patient) AS l")
        .await;
    assert_eq!(counts, vec![vec!["3".to_string(), "3".to_string()]]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_or_replaced_committed_object_fails_the_query_naming_it() {
    let t = TestLake::new();
    curated_patients(&t, &PATIENTS).await;
    let part = patient_part(&t).await;
    let name = part.display().to_string();
    let bytes = std::fs::read(&part).unwrap();

    // Deleted behind the engine's back: an error naming it, not 0 rows.
    std::fs::remove_file(&part).unwrap();
    let err = try_sql(&t, "SELECT count(*) FROM curated.patient")
        .await
        .expect_err("a missing part fails the query");
    assert!(err.contains(&name) && err.contains("missing"), "{err}");

    // Replaced by other bytes: named too.
    std::fs::write(&part, b"{}\n").unwrap();
    let err = try_sql(&t, "SELECT id FROM curated.patient")
        .await
        .expect_err("a replaced part fails the query");
    assert!(
        err.contains(&name) && err.contains("does not match its commit"),
        "{err}"
    );
    std::fs::write(&part, &bytes).unwrap();
    assert_eq!(
        try_sql(&t, "SELECT count(*) FROM curated.patient").await,
        Ok(vec![vec!["3".to_string()]])
    );

    // A metadata file the commit lists: missing is an error, not fewer rows.
    let r = record(&t).await;
    let jobs = r
        .metadata_of(fhirflow::layout::MetadataTable::ALL[0])
        .next()
        .expect("a metadata file");
    let table = fhirflow::layout::MetadataTable::ALL[0].name();
    let path = PathBuf::from(format!("/{}", jobs.path));
    std::fs::remove_file(&path).unwrap();
    for q in [
        format!("SELECT count(*) FROM metadata.{table}"),
        format!("SELECT count(*) FROM metadata.{table}_history"),
    ] {
        let err = try_sql(&t, &q)
            .await
            .expect_err("a missing metadata file fails");
        assert!(
            err.contains(&path.display().to_string()) && err.contains("missing"),
            "{q}: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_curated_line_damaged_in_place_fails_with_its_file_and_line() {
    let t = TestLake::new();
    curated_patients(&t, &PATIENTS).await;
    let part = patient_part(&t).await;
    let name = part.display().to_string();
    let text = std::fs::read_to_string(&part).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");

    // Line 2 overwritten with garbage of the same length: the size still
    // matches the commit.
    let garbage = "#".repeat(lines[1].len());
    std::fs::write(&part, format!("{}\n{garbage}\n{}\n", lines[0], lines[2])).unwrap();
    assert_eq!(std::fs::metadata(&part).unwrap().len(), text.len() as u64);
    let err = try_sql(&t, "SELECT count(*) FROM curated.patient")
        .await
        .expect_err("a damaged line fails the query");
    assert!(err.contains(&name) && err.contains("line 2"), "{err}");

    // A change that still parses, same length: the checksum names the file.
    let edited = text.replacen("\"Two\"", "\"Owt\"", 1);
    assert_eq!(edited.len(), text.len());
    std::fs::write(&part, edited).unwrap();
    let err = try_sql(&t, "SELECT count(*) FROM curated.patient")
        .await
        .expect_err("a changed part fails the query");
    assert!(err.contains(&name) && err.contains("checksum"), "{err}");

    // The raw layer keeps showing every line, bad ones with their error.
    let raw = t
        .sql("SELECT count(*), count(error) FROM raw.patient")
        .await;
    assert_eq!(raw, vec![vec!["3".to_string(), "0".to_string()]]);
}
