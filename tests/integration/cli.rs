//! The binary: bad partition values are refused before anything is written,
//! and `run`, `sql` and `config` work as a user would call them.

use fhirflow_tests::*;

#[test]
fn bad_partition_values_are_clear_errors_and_write_nothing() {
    let t = TestLake::new();
    let dir = t.input("p");
    write_lines(
        &dir,
        "Patient.ndjson",
        &[r#"{"resourceType":"Patient","id":"p"}"#],
    );
    let d = dir.to_str().unwrap();
    for (args, needle) in [
        (
            vec![
                "ingest",
                d,
                "--tenant",
                "not-a-guid",
                "--source-system",
                "s",
                "--date",
                DATE,
            ],
            "tenant GUID",
        ),
        (
            vec![
                "ingest",
                d,
                "--tenant",
                TENANT,
                "--source-system",
                "../../etc",
                "--date",
                DATE,
            ],
            "source system",
        ),
        (
            vec![
                "ingest",
                d,
                "--tenant",
                TENANT,
                "--source-system",
                "s",
                "--date",
                "2023-02-30",
            ],
            "import date",
        ),
        (
            vec!["curate", "--tenant", TENANT, "--date", "yesterday"],
            "import date",
        ),
    ] {
        let out = t.cli(&args, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    let raw = t.root().join("raw");
    assert!(
        !raw.exists() || std::fs::read_dir(&raw).unwrap().next().is_none(),
        "nothing written"
    );
}

#[test]
fn run_sql_and_config_from_the_command_line() {
    let t = TestLake::new();
    let sample = shared().join("data/synthea-10");
    let out = t.cli(
        &[
            "run",
            sample.to_str().unwrap(),
            "--tenant",
            TENANT,
            "--source-system",
            "synthea",
            "--date",
            DATE,
        ],
        &[],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("Procedure"), "{stdout}");
    assert!(stdout.contains("imported into the local lake"), "{stdout}");
    assert!(
        stdout.contains("skipped") && stdout.contains("log.ndjson"),
        "{stdout}"
    );

    let out = t.cli(
        &[
            "sql",
            "SELECT count(*) AS n FROM curated.patient",
            "--format",
            "csv",
        ],
        &[],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "n\n13\n");
    let out = t.cli(
        &[
            "sql",
            "SELECT stage, status, records_in FROM metadata.import_jobs ORDER BY stage",
            "--format",
            "json",
        ],
        &[],
    );
    // run imported into the local lake after curate.
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        concat!(
            r#"{"stage":"curate","status":"succeeded","records_in":7160}"#,
            "\n",
            r#"{"stage":"import","status":"succeeded","records_in":7160}"#
        )
    );
    let out = t.cli(
        &[
            "sql",
            "SELECT count(*) AS n FROM lake.patient",
            "--format",
            "csv",
        ],
        &[],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "n\n13\n");

    std::fs::write(
        t.dir.path().join("fhirflow.toml"),
        "[s3]\nsecret_access_key = \"hunter2\"\n",
    )
    .unwrap();
    let out = t.cli(&["config"], &[]);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        shown.contains("****") && !shown.contains("hunter2"),
        "{shown}"
    );
}
